"""What the HTTP layer of `k2 serve` costs: time to first token and decode speed of a streamed request, measured by the
official openai client against a real server, next to `k2 bench` on the same model in the same run (the same engine
without the server).

    python scripts/bench_serve.py MODEL [--prompt-len 512] [--gen 128] [--reps 5] [--dtype auto]

Each request streams /v1/completions with random prompt ids (a different first id each time, so no cached prefix is
reused) and `ignore_eos`, greedy, as `k2 bench` decodes. Reported: min and median over the reps. Run it on an idle
machine.
"""
import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.serve_process import ServerProcess  # noqa: E402


PROMPT_IDS = 1000


def stream_once(client, prompt: list[int], gen: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens per second after it) of one streamed request."""
    start = time.perf_counter()
    times = []
    for chunk in client.completions.create(model="k2", prompt=prompt, max_tokens=gen, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
        if chunk.choices:
            times.append(time.perf_counter())
    if len(times) < 2:
        raise SystemExit(f"the server streamed {len(times)} tokens; expected {gen}")
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    bench = subprocess.run([sys.executable, "-m", "k2cli", "bench", args.model, "--prompt-len", str(args.prompt_len),
                            "--gen", str(args.gen), "--reps", str(args.reps), "--dtype", args.dtype, "--json"],
                           capture_output=True, text=True, check=True)
    engine = json.loads(bench.stdout)
    ttft, decode = engine["ttft_s"], engine["decode_tok_s"]
    print(f"k2 bench (the engine alone): first token min {ttft['min'] * 1000:.1f} ms / median "
          f"{ttft['median'] * 1000:.1f} ms; decode max {decode['max']:.1f} / median {decode['median']:.1f} tok/s",
          flush=True)

    server = ServerProcess(args.model, "--dtype", args.dtype, "--quiet", "--ctx", str(args.prompt_len + args.gen + 1))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        vocab = PROMPT_IDS  # ids every vocabulary k2 runs has
        rng = random.Random(0)
        stream_once(client, [rng.randrange(vocab) for _ in range(args.prompt_len)], args.gen)  # warm-up
        ttfts, speeds = [], []
        for rep in range(args.reps):
            prompt = [rep + 1] + [rng.randrange(vocab) for _ in range(args.prompt_len - 1)]
            ttft, speed = stream_once(client, prompt, args.gen)
            ttfts.append(ttft)
            speeds.append(speed)
            print(f"rep {rep}: first token {ttft * 1000:.1f} ms, decode {speed:.1f} tok/s", flush=True)
    finally:
        server.stop()
    print(f"k2 serve (streamed, openai client): first token min {min(ttfts) * 1000:.1f} ms / median "
          f"{statistics.median(ttfts) * 1000:.1f} ms; decode max {max(speeds):.1f} / median "
          f"{statistics.median(speeds):.1f} tok/s")


if __name__ == "__main__":
    main()
