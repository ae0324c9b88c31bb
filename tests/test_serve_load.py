"""`k2 serve` under load (issue 17): many streaming clients at once on the demo, some leaving mid-stream; a queue
that refuses at once past its bound; a prefix cache that stays within its byte budget. Real server processes, driven
by the official clients, checked against the engine run in this process on each request alone.

Greedy equality under batching: in fp32, a batched decode step rounds differently from a batch of one (the matmuls
split their sums by the batch's shape, attention spans the longest row), by ~1e-6 here. Making the step
batch-invariant would mean computing each row on its own, which is what batching exists to avoid. So a client's
tokens must equal its run alone up to the first token where they differ, and there the run alone must have been a
near tie: its two best logits within MARGIN (1e-4, two orders of magnitude above the rounding). After that token the
two sequences differ and are not compared.
"""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx2
import openai
import pytest
import torch

from runtime.engine import Engine
from runtime.loading import load_model
from tests.reference_runs import random_ids
from tests.serve_process import ServerProcess
from tests.test_serve_engine import Recording

# This process's runs are small: one thread, or the OpenMP threads of this process and the server's spin against each
# other on a busy machine (a minute instead of a second here).
pytestmark = pytest.mark.usefixtures("one_thread")

MARGIN = 1e-4
CLIENTS, LEAVING, NEW_TOKENS, LEAVE_AFTER = 16, (3, 8, 13), 24, 4


@pytest.fixture(scope="module")
def model(demo_dir):
    return load_model(demo_dir, dtype=torch.float32)


def alone(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """The greedy ids of `prompt` run alone in the engine (one slot, as `k2 generate` runs it), and each one's margin:
    how far its logit is above the runner-up's."""
    engine, sampler = Engine(model, 1, len(prompt) + n), Recording(model.args.vocab_size)
    ids = list(engine.stream(0, prompt, sampler, n))
    margins = [float(top[0] - top[1]) for top in (row.topk(2).values for row in sampler.logits)]
    return ids, margins


def assert_greedy_equal(got: list[int], expected: list[int], margins: list[float], what: str):
    """`got` is `expected` (its run alone) up to the first difference, and that one came where the run alone had a
    near tie."""
    assert len(got) <= len(expected), what
    for j, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            assert margins[j] < MARGIN, f"{what}: token {j} is {a}, alone {b}, whose margin was {margins[j]:.2e}"
            return


def stream_ids(client: openai.OpenAI, prompt: list[int], n: int, leave_after: int | None = None,
               start: threading.Barrier | None = None) -> list[int]:
    """The ids a streamed greedy completion sends (all `n` of them: end-of-sequence ignored); with `leave_after`,
    the client closes the stream once it has that many."""
    if start is not None:
        start.wait()
    ids = []
    stream = client.completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    for chunk in stream:
        for choice in chunk.choices:
            ids += choice.model_extra.get("token_ids") or []
        if leave_after is not None and len(ids) >= leave_after:
            stream.close()
            break
    return ids


@pytest.fixture(scope="module")
def server(demo_dir):
    process = ServerProcess(str(demo_dir), "--dtype", "float32", "--ctx", "2048", "--max-batch", str(CLIENTS))
    yield process
    assert process.stop() == 0, process.log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_sixteen_streaming_clients_three_leaving(server, client, model):
    """16 clients stream at once and 3 leave after a few tokens: the others' greedy tokens are their runs alone, the
    batch held many of them at once, and afterwards no slot is held and a 17th request, an agent's next turn of
    client 0's conversation, is served from its cache and equals its run alone too."""
    vocab = model.args.vocab_size
    prompts = [[k + 1, *random_ids(vocab, (8 + 3 * k,), seed=k).tolist()] for k in range(CLIENTS)]
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], server.metrics()["k2_running_requests"])
            time.sleep(0.01)

    before = server.settled_metrics()
    watcher = threading.Thread(target=watch)
    watcher.start()
    start = threading.Barrier(CLIENTS)
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(stream_ids, client, prompt, NEW_TOKENS, LEAVE_AFTER if k in LEAVING else None,
                                   start) for k, prompt in enumerate(prompts)]
            got = [f.result(timeout=60) for f in futures]
    finally:
        done.set()
        watcher.join()
    metrics = server.settled_metrics()
    assert metrics["k2_running_requests"] == 0 and metrics["k2_queue_depth"] == 0
    assert peak[0] >= CLIENTS // 2, f"at most {peak[0]} requests ran at once"
    drawn = metrics["k2_generated_tokens_total"] - before["k2_generated_tokens_total"]
    staying = (CLIENTS - len(LEAVING)) * NEW_TOKENS
    assert drawn < staying + len(LEAVING) * NEW_TOKENS, "the clients that left had their generations run on"

    for k, (prompt, ids) in enumerate(zip(prompts, got)):
        expected, margins = alone(model, prompt, NEW_TOKENS)
        if k in LEAVING:
            assert LEAVE_AFTER <= len(ids) < NEW_TOKENS, f"client {k} left after {len(ids)} tokens"
        else:
            assert len(ids) == NEW_TOKENS, f"client {k} got {len(ids)} tokens"
        assert_greedy_equal(ids, expected, margins, f"client {k}")

    turn = prompts[0] + got[0] + random_ids(vocab, (6,), seed=99).tolist()
    reply = client.completions.create(model="demo", prompt=turn, max_tokens=NEW_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    # What client 0's request left cached: its prompt and every token drawn but the last (never fed back).
    assert reply.usage.prompt_tokens_details.cached_tokens == len(prompts[0]) + NEW_TOKENS - 1
    expected, margins = alone(model, turn, NEW_TOKENS)
    assert_greedy_equal(reply.choices[0].token_ids, expected, margins, "the next turn")
    assert len(reply.choices[0].token_ids) == NEW_TOKENS


def test_a_long_prompt_does_not_stall_the_others(server, client, model):
    """A newcomer's long prompt is computed in pieces between the running requests' steps: a stream running meanwhile
    keeps receiving tokens, its longest wait a fraction of the time the newcomer takes (computed whole, the prompt
    would hold the stream's next token back for nearly all of it)."""
    long_prompt = [9, *random_ids(model.args.vocab_size, (1799,), seed=5).tolist()]
    stream = client.completions.create(model="demo", prompt=[4] * 8, max_tokens=1500, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    with ThreadPoolExecutor(1) as pool:
        began = time.monotonic()
        newcomer = pool.submit(client.completions.create, model="demo", prompt=long_prompt, max_tokens=1)
        arrivals = [began]
        for _ in chunks:
            arrivals.append(time.monotonic())
            if newcomer.done():
                break
        assert newcomer.result().usage.prompt_tokens == len(long_prompt)
    stream.close()
    longest = max(b - a for a, b in zip(arrivals, arrivals[1:]))
    assert longest < (arrivals[-1] - began) / 2, f"the stream waited {longest:.3f} s of {arrivals[-1] - began:.3f} s"


def test_log_and_metrics(server, client):
    """One log line per request with its time to first token and speeds; /metrics in Prometheus' text format with a
    HELP and TYPE line before each sample, counting what the requests did."""
    before = server.settled_metrics()
    reply = client.completions.create(model="demo", prompt=[3, 4, 5, 6], max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    after = server.settled_metrics()
    assert after["k2_requests_total"] - before["k2_requests_total"] == 1
    assert after["k2_generated_tokens_total"] - before["k2_generated_tokens_total"] == 5
    assert after["k2_prompt_tokens_total"] - before["k2_prompt_tokens_total"] == reply.usage.prompt_tokens
    assert after["k2_time_to_first_token_seconds_count"] - before["k2_time_to_first_token_seconds_count"] == 1
    assert after["k2_slots"] == CLIENTS
    for family in server.metric_families():  # a family without a TYPE line parses as "unknown"
        assert family.type in ("counter", "gauge", "summary") and family.documentation, family
    time.sleep(0.2)  # the worker's line reaches the log
    line = [line for line in server.log.splitlines() if line.startswith("k2 serve: request ")][-1]
    assert "4 prompt tokens" in line and "first token" in line and "prefill" in line and "decode" in line, line
    assert line.endswith("5 tokens (done)"), line


# The queue and the budget -------------------------------------------------------------------------------------------

def test_full_queue_is_refused_at_once(demo_dir):
    """One slot, one place in the queue: a third request is a 429 in each API's error shape, at once, and the server
    serves again once the slot frees."""
    process = ServerProcess(str(demo_dir), "--dtype", "float32", "--quiet", "--ctx", "2048", "--max-batch", "1",
                            "--max-queue", "1")
    try:
        oai = openai.OpenAI(base_url=f"{process.url}/v1", api_key="unused", max_retries=0, timeout=60)
        claude = anthropic.Anthropic(base_url=process.url, api_key="unused", max_retries=0, timeout=60)
        running = oai.completions.create(model="demo", prompt=[5] * 8, max_tokens=2000, stream=True,
                                         extra_body={"ignore_eos": True})
        chunks = iter(running)
        next(chunks)
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(oai.completions.create, model="demo", prompt=[6] * 8, max_tokens=3)
            deadline = time.monotonic() + 30
            while process.metrics()["k2_queue_depth"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.01)

            for stream in (False, True):
                began = time.monotonic()
                with pytest.raises(openai.RateLimitError) as caught:
                    oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2, stream=stream)
                assert time.monotonic() - began < 2
                assert caught.value.body["type"] == "rate_limit_error" and "--max-queue" in caught.value.body["message"]
            with pytest.raises(anthropic.RateLimitError) as caught:
                claude.messages.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert caught.value.body["error"]["type"] == "rate_limit_error"
            response = httpx2.post(f"{process.url}/v1/completions", json={"prompt": [7], "max_tokens": 1})
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            assert set(response.json()) == {"error"}

            running.close()  # the slot frees: the queued request runs
            assert queued.result(timeout=60).usage.completion_tokens == 3
        assert process.settled_metrics()["k2_requests_rejected_total"] == 4
        assert oai.completions.create(model="demo", prompt=[8], max_tokens=1).usage.completion_tokens == 1
    finally:
        assert process.stop() == 0, process.log


def test_prefix_cache_stays_within_its_budget(demo_dir, model):
    """A budget of two finished requests' caches: the third one copied off the slot drops the least recently used,
    the bytes held never pass the budget, and what was dropped is computed again while what was kept is reused.

    A cache entry's size comes from the checkpoint's config alone: per token, every layer's compressed latent and
    rope key, in fp32."""
    config = json.loads((demo_dir / "config.json").read_text())
    bytes_per_token = config["num_hidden_layers"] * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 4
    prompt_len, new = 30, 4
    entry = (prompt_len + new - 1) * bytes_per_token  # a request's prompt and its tokens but the last
    budget = 2 * entry + bytes_per_token
    process = ServerProcess(str(demo_dir), "--dtype", "float32", "--quiet", "--ctx", "128", "--max-batch", "1",
                            "--cache-budget", str(budget))
    try:
        oai = openai.OpenAI(base_url=f"{process.url}/v1", api_key="unused", max_retries=0, timeout=60)
        prompts = {name: [k + 1, *random_ids(model.args.vocab_size, (prompt_len - 1,), seed=50 + k).tolist()]
                   for k, name in enumerate("ABCD")}

        def cached(name: str) -> int:
            reply = oai.completions.create(model="demo", prompt=prompts[name], max_tokens=new, temperature=0,
                                           extra_body={"ignore_eos": True})
            held = process.settled_metrics()
            assert held["k2_prefix_cache_bytes"] <= held["k2_prefix_cache_budget_bytes"] == budget
            return reply.usage.prompt_tokens_details.cached_tokens

        assert [cached(name) for name in "ABCD"] == [0, 0, 0, 0]
        held = process.metrics()  # D in the slot; B and C copied off it; A, the least recently used, dropped
        assert held["k2_prefix_cache_bytes"] == 2 * entry and held["k2_prefix_cache_entries"] == 2
        assert held["k2_prefix_cache_evictions_total"] == 1
        assert cached("A") == 0  # dropped: computed again; D goes to the store and B, now least recently used, out
        assert process.metrics()["k2_prefix_cache_evictions_total"] == 2
        assert cached("C") == prompt_len - 1  # kept: all of its prompt but the token that draws the first
        assert process.metrics()["k2_prefix_cache_evictions_total"] == 3  # A stored, D out
        assert cached("B") == 0
    finally:
        assert process.stop() == 0, process.log
