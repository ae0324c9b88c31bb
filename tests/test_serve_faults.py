"""Faults, limits and safety of `k2 serve` (issue 14, parts 4 and 5): a real server process on the demo model, driven
by the official openai and anthropic clients, and by raw HTTP (httpx) for what a client cannot send. Each hostile
request must get its error in the shape of the API called, and the next good request must still succeed.

Most cases share one server; a client that leaves mid-reply is checked against the greedy reply the same server gives
when the client stays: the server's generated-tokens counter (/metrics) says how much of that reply the abandoned
request drew, which a generation that went on would have run to the end.
"""
import signal
import socket
import sys
import time

import anthropic
import httpx2
import openai
import pytest

from tests.helpers import assert_one_line_error, copy_checkpoint, run_k2, run_k2_here
from tests.serve_process import ServerProcess

CTX = 512  # long enough that a reply the server failed to stop takes far longer than noticing a client left
KEY = "k2-test-key"
HI = [{"role": "user", "content": "hi"}]
LONG = 100_000  # a max_tokens far past the context: capped at what the context leaves
MIB = 1 << 20


@pytest.fixture(scope="module")
def server(demo_dir):
    process = ServerProcess(str(demo_dir), "--dtype", "float32", "--quiet", "--ctx", str(CTX))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def still_serves(oai: openai.OpenAI, claude: anthropic.Anthropic):
    reply = oai.chat.completions.create(model="demo", messages=HI, max_tokens=2)
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens >= 1
    message = claude.messages.create(model="demo", messages=HI, max_tokens=2)
    assert message.stop_reason in ("max_tokens", "end_turn") and message.usage.output_tokens >= 1


def openai_error(response: httpx2.Response, status: int) -> dict:
    """OpenAI's error shape, as its client reads it: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def anthropic_error(response: httpx2.Response, status: int) -> dict:
    """Anthropic's error shape: {"type": "error", "error": {"type", "message"}}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and {"type", "message"} <= set(body["error"]), body
    return body["error"]


# Malformed requests -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, param, problem", [
    ({"max_tokens": "10"}, "max_tokens", "should be an integer"),
    ({"messages": "hi"}, "messages", "should be a JSON list"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "should be a string or a JSON list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "not 'wizard'"),
    ({"max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"n": 2}, "n", "should be 1, not 2"),
    ({"response_format": {"type": "json_object"}}, "response_format", "json_object is not supported"),
    ({"seed": 2**64}, None, "seed must fit in 64 bits"),
    ({"extra_body": {"chat_template_kwargs": {"add_generation_prompt": False}}}, "chat_template_kwargs",
     "'add_generation_prompt' is not a template option"),
], ids=["max_tokens-string", "messages-not-list", "content-number", "unknown-role", "negative-max_tokens",
        "zero-max_tokens", "n-2", "json_object", "seed-over-64-bits", "template-kwargs-own-name"])
def test_openai_malformed_request_names_the_field(oai, claude, fields, param, problem):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(**{"model": "demo", "messages": HI, "max_tokens": 4, **fields})
    error = caught.value
    assert error.status_code == 400 and error.body["type"] == "invalid_request_error"
    assert error.body["param"] == param
    assert error.body["message"].startswith(param or problem) and problem in error.body["message"]
    still_serves(oai, claude)


@pytest.mark.parametrize("fields, field, problem", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "not 'wizard'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "should be a string or a JSON list"),
    ({"max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
], ids=["unknown-role", "content-number", "negative-max_tokens"])
def test_anthropic_malformed_request_names_the_field(oai, claude, fields, field, problem):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(**{"model": "demo", "messages": HI, "max_tokens": 4, **fields})
    error = caught.value.body["error"]
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{field}: ") and problem in error["message"]
    still_serves(oai, claude)


@pytest.mark.parametrize("path, body, problem", [
    ("/v1/chat/completions", b"this is not JSON", "the request body is not JSON"),
    ("/v1/chat/completions", b"[1, 2]", "the request body must be a JSON object"),
    ("/v1/chat/completions", b"[" * 100_000, "nested too deeply"),
    ("/v1/completions", b'{"prompt": [[1, "two"]]}', "prompt[0][1]: should be an integer"),
    ("/v1/messages", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}',
     "max_tokens: should be an integer"),
    ("/v1/messages", b"this is not JSON", "the request body is not JSON"),
    ("/v1/messages/count_tokens", b'{"messages": {"role": "user"}}', "messages: should be a JSON list"),
], ids=["not-json", "not-object", "nested", "prompt-type", "messages-max_tokens-string", "messages-not-json",
        "count_tokens-messages-type"])
def test_what_no_client_sends_is_a_400(server, oai, claude, path, body, problem):
    response = httpx2.post(server.url + path, content=body, headers={"content-type": "application/json"})
    error = anthropic_error(response, 400) if path.startswith("/v1/messages") else openai_error(response, 400)
    assert problem in error["message"]
    still_serves(oai, claude)


# Limits -------------------------------------------------------------------------------------------------------------

def test_prompt_over_the_context_says_by_how_much(oai, claude):
    # Each user message adds the same tokens, so two prompts that fit give the length of any number of them.
    one, two = (oai.chat.completions.create(model="demo", messages=HI * n, max_tokens=1).usage.prompt_tokens
                for n in (1, 2))
    count = (CTX - one) // (two - one) + 3
    length = one + (count - 1) * (two - one)
    expected = f"the prompt has {length} tokens and the context holds {CTX}: {length - CTX + 1} too many"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="demo", messages=HI * count, max_tokens=1)
    assert caught.value.body["param"] == "messages" and expected in caught.value.body["message"]
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="demo", messages=HI * count, max_tokens=1)
    assert expected in caught.value.body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # raw ids: the length is the list's
        oai.completions.create(model="demo", prompt=[1] * (CTX + 7), max_tokens=1)
    assert f"has {CTX + 7} tokens" in caught.value.body["message"] and "8 too many" in caught.value.body["message"]
    still_serves(oai, claude)


def test_max_tokens_is_capped_at_the_context(oai, claude):
    prompt = [1] * (CTX - 3)
    reply = oai.completions.create(model="demo", prompt=prompt, max_tokens=10**9, temperature=0)
    assert reply.usage.prompt_tokens == CTX - 3 and reply.usage.total_tokens <= CTX
    still_serves(oai, claude)


def test_ten_megabyte_bodies_are_refused_with_413(server, oai, claude):
    text = "x" * (10 * MIB)
    with pytest.raises(openai.APIStatusError) as caught:
        oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": text}], max_tokens=1)
    assert caught.value.status_code == 413 and "request body" in caught.value.body["message"]
    with pytest.raises(anthropic.ContentTooLargeError) as caught:
        claude.messages.create(model="demo", messages=[{"role": "user", "content": text}], max_tokens=1)
    assert caught.value.body["error"]["type"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is found while reading
        for _ in range(10):
            yield b" " * MIB

    for path, shape in (("/v1/chat/completions", openai_error), ("/v1/messages", anthropic_error)):
        response = httpx2.post(server.url + path, content=chunks(), headers={"content-type": "application/json"})
        assert "request body is over" in shape(response, 413)["message"]
    still_serves(oai, claude)


def test_unknown_paths_and_methods_answer_in_json(server, oai, claude):
    assert openai_error(httpx2.get(f"{server.url}/v1/nothing"), 404)["type"] == "not_found_error"
    assert openai_error(httpx2.post(f"{server.url}/v2/chat/completions", json={}), 404)["message"].startswith(
        "no route")
    assert "GET" in openai_error(httpx2.get(f"{server.url}/v1/chat/completions"), 405)["message"]
    assert "GET" in anthropic_error(httpx2.get(f"{server.url}/v1/messages"), 405)["message"]
    still_serves(oai, claude)


# Clients that leave -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def greedy(oai):
    """The whole greedy reply to HI when the client stays: its prompt ids, its token ids, how long it took."""
    start = time.monotonic()
    reply = oai.chat.completions.create(model="demo", messages=HI, max_tokens=LONG, temperature=0,
                                        extra_body={"return_token_ids": True})
    seconds = time.monotonic() - start
    prompt, tokens = reply.prompt_token_ids, reply.choices[0].token_ids
    assert reply.choices[0].finish_reason == "length" and len(prompt) + len(tokens) == CTX, \
        "the greedy reply must run to the context's end for an abandoned one to be told from it"
    return prompt, tokens, seconds


def drawn_by(server: ServerProcess, leave) -> int:
    """How many tokens the server drew for the request that `leave()` sends and abandons: what its generated-tokens
    counter gained once nothing runs or waits any more (a generation that went on would run to the context's end)."""
    before = server.settled_metrics()["k2_generated_tokens_total"]
    leave()
    return server.settled_metrics()["k2_generated_tokens_total"] - before


def test_openai_stream_left_mid_reply_stops_its_generation(server, oai, claude, greedy):
    received = []

    def leave():
        stream = oai.chat.completions.create(model="demo", messages=HI, max_tokens=LONG, temperature=0, stream=True)
        chunks = iter(stream)
        received.extend(next(chunks) for _ in range(4))
        stream.close()

    drawn = drawn_by(server, leave)
    assert received[0].choices[0].delta.role == "assistant"
    assert 0 < drawn < len(greedy[1]) // 2, f"the abandoned stream drew {drawn} of {len(greedy[1])} tokens"
    still_serves(oai, claude)


def test_anthropic_stream_left_mid_reply_stops_its_generation(server, oai, claude, greedy):
    received = []

    def leave():
        stream = claude.messages.create(model="demo", messages=HI, max_tokens=LONG, stream=True,
                                        extra_body={"temperature": 0})
        events = iter(stream)
        received.extend(next(events) for _ in range(4))
        stream.close()

    drawn = drawn_by(server, leave)
    assert received[0].type == "message_start" and received[0].message.usage.input_tokens == len(greedy[0])
    assert 0 < drawn < len(greedy[1]) // 2, f"the abandoned stream drew {drawn} of {len(greedy[1])} tokens"
    still_serves(oai, claude)


def test_request_whose_client_times_out_stops_its_generation(server, oai, claude, greedy):
    def leave():
        with pytest.raises(openai.APITimeoutError):  # after a twentieth of the time the whole reply takes
            oai.with_options(timeout=greedy[2] / 20).chat.completions.create(model="demo", messages=HI,
                                                                             max_tokens=LONG, temperature=0)

    drawn = drawn_by(server, leave)
    assert drawn < len(greedy[1]) // 2, f"the abandoned request drew {drawn} of {len(greedy[1])} tokens"
    still_serves(oai, claude)


def test_client_that_leaves_mid_upload_is_no_error(server, oai, claude):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: k2\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{\"messages\": ")
        time.sleep(0.2)  # the server is reading the body when the client goes
    still_serves(oai, claude)
    time.sleep(0.5)  # what the server wrote about it has reached the log
    assert "Traceback" not in server.log, server.log


# A template that refuses the conversation ---------------------------------------------------------------------------

REFUSAL = "this model will not read the word FORBIDDEN"


@pytest.fixture(scope="module")
def refusing_server(demo_dir, tmp_path_factory):
    """The demo with a chat template that raises for one word and otherwise renders as the demo's."""
    folder = copy_checkpoint(demo_dir, tmp_path_factory.mktemp("refusing") / "refusing-demo")
    template = folder / "chat_template.jinja"
    guard = ("{%- for m in messages -%}{%- if m.content is string and 'FORBIDDEN' in m.content -%}"
             f"{{{{ raise_exception('{REFUSAL}') }}}}{{%- endif -%}}{{%- endfor -%}}\n")
    template.write_text(guard + template.read_text())
    process = ServerProcess(str(folder), "--dtype", "float32", "--quiet", "--ctx", "128")
    yield process
    process.stop()


def test_template_that_fails_is_a_400_with_its_message(refusing_server):
    oai = openai.OpenAI(base_url=f"{refusing_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    claude = anthropic.Anthropic(base_url=refusing_server.url, api_key="unused", max_retries=0, timeout=60)
    still_serves(oai, claude)  # the template renders an ordinary conversation
    forbidden = [{"role": "user", "content": "say FORBIDDEN"}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            oai.chat.completions.create(model="demo", messages=forbidden, max_tokens=2, stream=stream)
        assert REFUSAL in caught.value.body["message"]
        still_serves(oai, claude)
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="demo", messages=forbidden, max_tokens=2)
    assert REFUSAL in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.count_tokens(model="demo", messages=forbidden)
    assert REFUSAL in caught.value.body["error"]["message"]
    still_serves(oai, claude)
    assert "Traceback" not in refusing_server.log


# Safety -------------------------------------------------------------------------------------------------------------

def test_binds_loopback_by_default_without_a_warning(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert "warning" not in server.log


@pytest.fixture(scope="module", params=["--api-key", "K2_API_KEY"])
def keyed_server(request, demo_dir):
    """The key given as the option, or in the environment (then on a public address, where a key silences the
    warning)."""
    common = (str(demo_dir), "--dtype", "float32", "--quiet", "--ctx", "128")
    if request.param == "--api-key":
        process = ServerProcess(*common, "--api-key", KEY)
    else:
        process = ServerProcess(*common, "--host", "0.0.0.0", env={"K2_API_KEY": KEY})
    yield process
    process.stop()


def test_api_key_guards_every_endpoint_but_health(keyed_server):
    url = keyed_server.url
    assert httpx2.get(f"{url}/health").status_code == 200
    for path in ("/v1/models", "/v1/chat/completions", "/v1/completions"):
        response = httpx2.request("GET" if path == "/v1/models" else "POST", url + path, json={})
        assert openai_error(response, 401)["type"] == "authentication_error"
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        assert anthropic_error(httpx2.post(url + path, json={}), 401)["type"] == "authentication_error"

    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert caught.value.body["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model="demo", messages=HI, max_tokens=2)
    assert caught.value.body["error"]["type"] == "authentication_error"

    # The openai client sends Authorization: Bearer; the anthropic client x-api-key, or Bearer given an auth token.
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert len(oai.models.list().data) == 1
    still_serves(oai, anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=60))
    still_serves(oai, anthropic.Anthropic(base_url=url, auth_token=KEY, max_retries=0, timeout=60))
    response = httpx2.post(f"{url}/v1/chat/completions", headers={"x-api-key": KEY},
                           json={"messages": HI, "max_tokens": 1})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 1
    assert "warning" not in keyed_server.log


def test_public_address_without_a_key_warns(demo_dir):
    process = ServerProcess(str(demo_dir), "--dtype", "float32", "--quiet", "--ctx", "128", "--host", "0.0.0.0")
    try:
        assert httpx2.get(f"{process.url}/health").json() == {"status": "ok"}
        warning = next(line for line in process.lines if line.startswith("warning:"))
        assert "0.0.0.0" in warning and "without an API key" in warning
    finally:
        assert process.stop() == 0


def test_empty_api_key_is_refused(demo_dir):
    assert_one_line_error(run_k2_here("serve", str(demo_dir), "--api-key", " "), "--api-key is empty")


def test_without_the_serve_extra_a_one_line_error_before_loading(monkeypatch, tmp_path):
    """Installed without `k2[serve]`: the error says what to install, before any model is read (the folder named
    does not even exist)."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # an import of it raises ImportError, as when it is missing
    assert_one_line_error(run_k2_here("serve", str(tmp_path / "nowhere")), "pip install 'k2[serve]'")


def test_port_in_use_is_a_one_line_error(demo_dir):
    """On a public address without a key too: no warning about serving where it cannot."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_k2("serve", str(demo_dir), "--dtype", "float32", "--host", "0.0.0.0", "--port", str(port))
    assert result.returncode == 1
    assert_one_line_error(result, f"cannot listen on 0.0.0.0:{port}", "in use")


# Ctrl-C (last: it stops the shared server) --------------------------------------------------------------------------

def test_ctrl_c_finishes_the_stream_in_flight_then_exits_0(server, oai):
    stream = oai.chat.completions.create(model="demo", messages=HI, max_tokens=200, temperature=0, stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    server.proc.send_signal(signal.SIGINT)
    rest = list(chunks)
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert rest[-1].usage.completion_tokens == 200
    assert server.proc.wait(60) == 0
    log = server.log
    assert "k2 serve: stopped" in log and "Traceback" not in log, log


def test_second_ctrl_c_stops_a_generation_at_once(demo_dir):
    process = ServerProcess(str(demo_dir), "--dtype", "float32", "--quiet", "--ctx", "4096")
    try:
        oai = openai.OpenAI(base_url=f"{process.url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = oai.chat.completions.create(model="demo", messages=HI, max_tokens=LONG, temperature=0, stream=True)
        chunks = iter(stream)
        received = [next(chunks) for _ in range(3)]
        assert received[0].choices[0].delta.role == "assistant"
        process.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.proc.send_signal(signal.SIGINT)
        process.proc.wait(10)  # the greedy reply to the context's end, had it gone on, takes longer here
        stream.close()
    finally:
        process.stop()
    log = process.log
    assert "k2 serve: stopped" in log and "Exception in thread k2-model" not in log, log
