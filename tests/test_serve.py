"""`k2 serve` driven by the official `openai` and `anthropic` clients, against a real server process: tool-call round
trips and reasoning on the scripted model (tests/scripted_model.py), a 20-turn agent loop whose every prompt is what
K2's template (rendered by transformers) gives for the history, and the demo's greedy reply equal to `k2 generate`'s
on the same ids."""
import json
import uuid

import anthropic
import openai
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from runtime.tokenizer import Tokenizer
from tests.helpers import run_k2_here
from tests.scripted_k2 import SCRIPT
from tests.scripted_model import write_scripted
from tests.serve_process import ServerProcess

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
CALL = ("<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>")
AGENT_TURNS = 20
CITIES = ["Paris", "Oslo", "Lima", "Kyiv", "Rome"]


def _calls(turn: int) -> list[tuple[str, dict]]:
    """The calls the scripted model makes in agent turn `turn` (every fourth turn two at once, in parallel)."""
    city = CITIES[turn % len(CITIES)]
    calls = [("get_weather", {"city": city})]
    if turn % 4 == 3:
        calls.append(("get_time", {"city": city}))
    return calls


def _script() -> list[str]:
    """Reply r answers the request whose history holds r assistant turns: the agent loop's tool calls, each with its
    reasoning, then the final answer."""
    replies, index = [], 0
    for turn in range(AGENT_TURNS - 1):
        calls = ""
        for name, arguments in _calls(turn):
            calls += CALL.format(name=name, index=index, arguments=json.dumps(arguments))
            index += 1
        replies.append(f"<think>Step {turn}: I need a tool.</think>Checking."
                       f"<|tool_calls_section_begin|>{calls}<|tool_calls_section_end|>")
    replies.append("<think>I have everything.</think>It is sunny everywhere.")
    return replies


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, demo_dir):
    folder = write_scripted(tmp_path_factory.mktemp("scripted") / "model", _script(), tokenizer_from=demo_dir)
    server = ServerProcess(str(folder), "--quiet", launcher=SCRIPT)
    yield folder, server
    assert server.stop() == 0, server.log


@pytest.fixture(scope="module")
def client(scripted):
    return openai.OpenAI(base_url=scripted[1].url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(scripted):
    return anthropic.Anthropic(base_url=scripted[1].url, api_key="unused", max_retries=0)


def _stream_message(stream) -> tuple[dict, str, dict | None]:
    """A streamed reply put together from its deltas as an agent does: (message, finish_reason, usage)."""
    message, calls, finish, usage = {"reasoning_content": "", "content": ""}, {}, None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta
            message["content"] += delta.content or ""
            message["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
    message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, finish, usage


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_call_round_trip(client, stream):
    """call -> tool result -> answer, in K2's format: reasoning as reasoning_content, the call with K2's id and JSON
    arguments, then the answer once the result is sent back with that id."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    kwargs = dict(model="k2", messages=messages, tools=TOOLS, temperature=0.7)
    if stream:
        message, finish, usage = _stream_message(client.chat.completions.create(**kwargs, stream=True))
        assert usage is not None and usage.completion_tokens > 0
        calls = message["tool_calls"]
    else:
        reply = client.chat.completions.create(**kwargs)
        finish, choice = reply.choices[0].finish_reason, reply.choices[0].message
        message = {"content": choice.content, "reasoning_content": choice.model_extra["reasoning_content"]}
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in choice.tool_calls]
    assert finish == "tool_calls"
    assert message["reasoning_content"] == "Step 0: I need a tool."
    assert message["content"] == "Checking."
    assert calls == [{"id": "functions.get_weather:0", "name": "get_weather", "arguments": '{"city": "Paris"}'}]

    # The answer: a history with the call answered. The script's reply 1 is its next tool call; the loop test walks
    # the whole script, here the client's rewritten id and the reasoning it sends back are what matter.
    messages += [{"role": "assistant", "content": message["content"], "reasoning_content": message["reasoning_content"],
                  "tool_calls": [{"id": "call_abc123", "type": "function",
                                  "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
                 {"role": "tool", "tool_call_id": "call_abc123", "content": "18 C, sunny"}]
    reply = client.chat.completions.create(model="k2", messages=messages, tools=TOOLS, extra_body={
        "return_token_ids": True})
    assert reply.choices[0].message.tool_calls[0].id == "functions.get_weather:1"
    prompt = Tokenizer.from_folder(SCRIPTED_FOLDER[0]).decode(reply.model_extra["prompt_token_ids"])
    assert "## Return of functions.get_weather:0\n18 C, sunny" in prompt and "call_abc123" not in prompt


SCRIPTED_FOLDER = []


@pytest.fixture(scope="module", autouse=True)
def _folder(scripted):
    SCRIPTED_FOLDER[:] = [scripted[0]]


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_use_round_trip(claude, stream):
    """The same through Anthropic's Messages API: a thinking block, a tool_use block, then tool_result -> answer."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    kwargs = dict(model="k2", max_tokens=200, messages=messages, tools=ANTHROPIC_TOOLS)
    if stream:
        with claude.messages.stream(**kwargs) as events:
            kinds = {event.type for event in events}
            reply = events.get_final_message()
        assert {"message_start", "content_block_start", "content_block_delta", "content_block_stop",
                "message_stop"} <= kinds
    else:
        reply = claude.messages.create(**kwargs)
    assert reply.stop_reason == "tool_use"
    assert [block.type for block in reply.content] == ["thinking", "text", "tool_use"]
    thinking, text, call = reply.content
    assert thinking.thinking == "Step 0: I need a tool." and text.text == "Checking."
    assert (call.id, call.name, call.input) == ("functions.get_weather:0", "get_weather", {"city": "Paris"})
    # Anthropic counts prompt tokens read from a cache apart (the OpenAI test above sent this same prompt).
    usage = reply.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == claude.messages.count_tokens(
        model="k2", messages=messages, tools=ANTHROPIC_TOOLS).input_tokens

    messages += [{"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in reply.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}]}]
    answer = claude.messages.create(model="k2", max_tokens=200, messages=messages, tools=ANTHROPIC_TOOLS)
    assert answer.content[-1].type == "tool_use" and answer.content[-1].id == "functions.get_weather:1"


def _oracle_prompt(folder, tokenizer: Tokenizer, history: list[dict]) -> list[int]:
    """What K2's template, rendered by transformers, gives for `history`, in ids."""
    source = (folder / "chat_template.jinja").read_text()
    text = render_jinja_template([history], tools=TOOLS, chat_template=source, add_generation_prompt=True)[0][0]
    return tokenizer.encode_with_added(text)


@pytest.fixture(scope="module")
def cold(scripted):
    """The same model behind a server with one slot and no prefix store: before each request it is sent another
    whose prompt shares nothing, so the request is computed whole (its cached_tokens say so)."""
    server = ServerProcess(str(scripted[0]), "--quiet", "--max-batch", "1", "--cache-budget", "0", launcher=SCRIPT)
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert server.stop() == 0, server.log


def _shared(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_agent_loop_20_turns(scripted, client, cold):
    """A 20-turn agent loop: the client rewrites every tool call id to its own (`call_...`) and sends reasoning back,
    as thinking agents must; every turn's prompt is what K2's template gives for the history with K2's ids
    (functions.NAME:IDX counted over the conversation) and the reasoning kept, and the model's calls carry those
    ids. From turn 1 on, the turn computes only what is new: its cached_tokens are all that it shares with what the
    last turn left in the cache (that prompt and reply), at least that whole prompt; and its reply is the one the same
    request gets computed whole."""
    folder = scripted[0]
    tokenizer = Tokenizer.from_folder(folder)
    sent = [{"role": "user", "content": "Plan my trip: check the weather everywhere."}]  # what the agent sends
    expected = [dict(sent[0])]  # the same history as K2 must read it
    index, left = 0, None  # left: the ids the last turn left in the cache
    for turn in range(AGENT_TURNS):
        request = dict(model="k2", messages=sent, tools=TOOLS, temperature=1.0, extra_body={"return_token_ids": True})
        reply = client.chat.completions.create(**request)
        prompt, drawn = reply.model_extra["prompt_token_ids"], reply.choices[0].token_ids
        assert prompt == _oracle_prompt(folder, tokenizer, expected), turn
        if left is not None:
            cached = reply.usage.prompt_tokens_details.cached_tokens
            assert cached == min(_shared(left, prompt), len(prompt) - 1) and cached >= len(left) - len(drawn), turn
        left = prompt + drawn[:-1]  # the last id drawn (end of turn) is never fed back
        cold.completions.create(model="k2", prompt=[7] * 4, max_tokens=1)
        whole = cold.chat.completions.create(**request)
        assert whole.usage.prompt_tokens_details.cached_tokens == 0, turn
        assert whole.choices[0].token_ids == drawn, turn
        message = reply.choices[0].message
        assert whole.choices[0].message.content == message.content, turn
        reasoning = message.model_extra["reasoning_content"]
        if turn == AGENT_TURNS - 1:
            assert reply.choices[0].finish_reason == "stop" and not message.tool_calls
            assert message.content == "It is sunny everywhere."
            break
        assert reply.choices[0].finish_reason == "tool_calls"
        calls = _calls(turn)
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == calls
        k2_ids = [f"functions.{name}:{index + i}" for i, (name, _) in enumerate(calls)]
        assert [c.id for c in message.tool_calls] == k2_ids
        index += len(calls)
        own_ids = [f"call_{uuid.uuid4().hex[:12]}" for _ in calls]
        for history, ids in ((sent, own_ids), (expected, k2_ids)):
            history.append({"role": "assistant", "content": message.content, "reasoning_content": reasoning,
                            "tool_calls": [{"id": i, "type": "function",
                                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                           for i, c in zip(ids, message.tool_calls)]})
            history += [{"role": "tool", "tool_call_id": i, "content": f"result {turn}.{j}"}
                        for j, i in enumerate(ids)]


def test_demo_greedy_equals_generate(demo_dir):
    """On the demo, a greedy fp32 request's tokens are `k2 generate --ids`'s on the ids the template renders."""
    server = ServerProcess(str(demo_dir), "--dtype", "float32", "--quiet")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
        reply = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=12,
                                               extra_body={"return_token_ids": True})
        streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                           for c in client.chat.completions.create(model="demo", messages=messages, temperature=0,
                                                                   max_tokens=12, stream=True) if c.choices)
    finally:
        assert server.stop() == 0, server.log
    prompt = reply.model_extra["prompt_token_ids"]
    source = (demo_dir / "chat_template.jinja").read_text()
    text = render_jinja_template([messages], chat_template=source, add_generation_prompt=True)[0][0]
    tokenizer = Tokenizer.from_folder(demo_dir)
    assert prompt == tokenizer.encode_with_added(text)
    generated = run_k2_here("generate", demo_dir, "--ids", ",".join(map(str, prompt)), "-n", "12", "--dtype", "float32",
                            "--json")
    assert generated.returncode == 0, generated.stderr
    new_ids = json.loads(generated.stdout)["new_ids"]
    token_ids = reply.choices[0].model_extra["token_ids"]
    assert token_ids == new_ids[:len(token_ids)]
    message = reply.choices[0].message
    assert (message.model_extra.get("reasoning_content") or "") + (message.content or "") == \
        tokenizer.decode(token_ids)
    assert streamed == message.model_extra.get("reasoning_content")


THINKING_SWITCH = "{% if add_generation_prompt and thinking is defined and not thinking %}<think></think>{% endif %}"


@pytest.fixture(scope="module")
def switchable(tmp_path_factory, demo_dir):
    """A scripted model whose template has K2.5's thinking switch (`thinking`: false closes the think block the
    reply would start in); reply 0 is an answer without reasoning, reply 1 a call made without reasoning."""
    call = CALL.format(name="get_time", index=0, arguments='{"city": "Oslo"}')
    replies = ["<think></think>Plain answer.", f"<|tool_calls_section_begin|>{call}<|tool_calls_section_end|>"]
    folder = write_scripted(tmp_path_factory.mktemp("switch") / "model", replies, tokenizer_from=demo_dir)
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text() + THINKING_SWITCH)
    server = ServerProcess(str(folder), "--quiet", launcher=SCRIPT)
    yield folder, server
    assert server.stop() == 0, server.log


def test_thinking_switch_reaches_the_template(switchable):
    """chat_template_kwargs (OpenAI) and `thinking` (Anthropic) reach the template: with thinking off the prompt is
    transformers' render with thinking=False (the think block closed) and the reply after it is content."""
    folder, server = switchable
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    off = client.chat.completions.create(model="k2", messages=messages, extra_body={
        "chat_template_kwargs": {"thinking": False}, "return_token_ids": True})
    source = (folder / "chat_template.jinja").read_text()
    text = render_jinja_template([messages], chat_template=source, add_generation_prompt=True, thinking=False)[0][0]
    tokenizer = Tokenizer.from_folder(folder)
    assert off.model_extra["prompt_token_ids"] == tokenizer.encode_with_added(text)
    assert text.endswith("<think></think>")
    assert off.choices[0].message.content == "Plain answer."
    assert not off.choices[0].message.model_extra.get("reasoning_content")
    on = client.chat.completions.create(model="k2", messages=messages, extra_body={"return_token_ids": True})
    text = render_jinja_template([messages], chat_template=source, add_generation_prompt=True)[0][0]
    assert on.model_extra["prompt_token_ids"] == tokenizer.encode_with_added(text)
    assert not text.endswith("<think></think>")

    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    reply = claude.messages.create(model="k2", max_tokens=50, messages=messages, thinking={"type": "disabled"})
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == len(off.model_extra["prompt_token_ids"])
    assert [(b.type, b.text) for b in reply.content] == [("text", "Plain answer.")]


def test_tool_choice(switchable):
    """A named tool_choice starts the reply as that call (the model writes the arguments); `none` offers no tools."""
    folder, server = switchable
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Time in Oslo?"}]
    reply = client.chat.completions.create(model="k2", messages=messages, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    call = reply.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == \
        ("functions.get_time:0", "get_time", {"city": "Oslo"})
    assert reply.choices[0].finish_reason == "tool_calls"
    tokenizer = Tokenizer.from_folder(folder)
    none = client.chat.completions.create(model="k2", messages=messages, tools=TOOLS, tool_choice="none",
                                          extra_body={"return_token_ids": True})
    auto = client.chat.completions.create(model="k2", messages=messages, tools=TOOLS,
                                          extra_body={"return_token_ids": True})
    assert "tool_declare" in tokenizer.decode(auto.model_extra["prompt_token_ids"])
    assert "tool_declare" not in tokenizer.decode(none.model_extra["prompt_token_ids"])
