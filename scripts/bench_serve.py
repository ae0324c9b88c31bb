"""`k2 serve` under concurrent clients: output tokens per second and time to first token (p50, p90, p99) at 1, 4 and
16 streaming clients, measured by the official openai client against one real server, in one run.

    python scripts/bench_serve.py [MODEL] [--clients 1,4,16] [--prompt-len 128] [--gen 128] [--requests 4]
                                  [--dtype auto] [--threads N]

Each client streams `--requests` /v1/completions one after another: random prompt ids with a first id of their own
(no cached prefix is reused) and ignore_eos, greedy, so every request decodes `--gen` tokens. Output tok/s is every
token the clients received over the level's wall time, from its first request sent to its last token; the
percentiles are over every request of the level. The server runs with --max-batch at the largest client count. Run it
on an idle machine.
"""
import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.serve_process import ServerProcess  # noqa: E402

PROMPT_IDS = 1000  # ids every vocabulary k2 runs has


def stream_once(client: openai.OpenAI, prompt: list[int], gen: int) -> tuple[float, int]:
    """(seconds to the first token, tokens received) of one streamed request."""
    start = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(model="k2", prompt=prompt, max_tokens=gen, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True, "return_token_ids": True}):
        for choice in chunk.choices:
            received = len(choice.model_extra.get("token_ids") or [])
            if received and first is None:
                first = time.perf_counter() - start
            tokens += received
    if tokens != gen:
        raise SystemExit(f"the server streamed {tokens} tokens; expected {gen}")
    return first, tokens


def level(client: openai.OpenAI, clients: int, requests: int, prompt_len: int, gen: int,
          first_ids) -> tuple[float, list[float]]:
    """(output tok/s, every request's time to first token) with `clients` clients streaming at once."""
    ttfts, tokens, lock = [], [0], threading.Lock()
    start = threading.Barrier(clients + 1)
    rng = random.Random(clients)

    def run(prompts):
        start.wait()
        for prompt in prompts:
            ttft, n = stream_once(client, prompt, gen)
            with lock:
                ttfts.append(ttft)
                tokens[0] += n

    threads = [threading.Thread(target=run, args=([[next(first_ids)] + [rng.randrange(PROMPT_IDS)
                                                                          for _ in range(prompt_len - 1)]
                                                   for _ in range(requests)],)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return tokens[0] / (time.perf_counter() - began), ttfts


def percentiles(values: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[89], cuts[98]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="demo")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if args.requests * min(levels) < 2:
        raise SystemExit("--requests: percentiles need two requests at least at each level")

    server_args = [args.model, "--dtype", args.dtype, "--quiet", "--ctx", str(args.prompt_len + args.gen + 1),
                   "--max-batch", str(max(levels)), *(["--threads", str(args.threads)] if args.threads else [])]
    print(f"k2 serve {' '.join(server_args)}; {args.requests} requests per client, prompt {args.prompt_len}, "
          f"{args.gen} new tokens each", flush=True)
    server = ServerProcess(*server_args)
    rows = []
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        first_ids = iter(range(1, 10**9))  # the first id of every prompt is its own: no prefix is shared
        stream_once(client, [next(first_ids)] * args.prompt_len, args.gen)  # warm-up
        for clients in levels:
            throughput, ttfts = level(client, clients, args.requests, args.prompt_len, args.gen, first_ids)
            rows.append((clients, len(ttfts), throughput, *percentiles(ttfts)))
            print(f"{clients} clients: {throughput:.1f} tok/s", flush=True)
    finally:
        server.stop()

    print("\n| clients | requests | output tok/s | per client tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for clients, n, throughput, p50, p90, p99 in rows:
        print(f"| {clients} | {n} | {throughput:.1f} | {throughput / clients:.1f} | {p50 * 1000:.1f} | "
              f"{p90 * 1000:.1f} | {p99 * 1000:.1f} |")
    if len(rows) > 1:
        print(f"\n{rows[-1][0]} clients / {rows[0][0]} client(s): {rows[-1][2] / rows[0][2]:.2f}x the output tok/s")


if __name__ == "__main__":
    main()
