"""Throughput and resume savings of `k2 download` against the fake hub on 127.0.0.1 (tests/hub_server.py).

    python scripts/bench_download.py [--shards 4] [--shard-mb 256] [--workers 8]

Serves a repo of random LFS shards plus a config, then times, each in a fresh cache:
  1. huggingface_hub's own snapshot_download in a child process (the reference client: plain HTTP, no hashing),
  2. `k2 download` (the same transfers, every byte hashed as it lands),
  3. `k2 download` killed when half the bytes are on disk, then run again: the bytes the server sent twice.
The numbers are loopback numbers: they measure the client's own overhead, not a network.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hub_server import FakeHub  # noqa: E402

REPO = "bench/random-shards"


def make_repo(folder: Path, shards: int, shard_bytes: int):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": shards}))
    block = os.urandom(1 << 20)
    for i in range(1, shards + 1):
        with (folder / f"model-{i:05d}-of-{shards:05d}.safetensors").open("wb") as f:
            for _ in range(shard_bytes >> 20):
                f.write(block[i:] + block[:i])  # distinct contents per shard


def k2(hub: FakeHub, env: dict, workers: int) -> list[str]:
    return [sys.executable, "-m", "k2cli", "download", REPO, "--endpoint", hub.endpoint, "--workers", str(workers),
            "--json"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="k2-bench-download-"))
    try:
        make_repo(work / "repo", args.shards, args.shard_mb << 20)
        total = sum(p.stat().st_size for p in (work / "repo").iterdir())
        with FakeHub() as hub:
            hub.add_repo(REPO, work / "repo")

            def fresh_env(name: str) -> dict:
                return dict(os.environ, HF_HOME=str(work / name), K2_HOME=str(work / name / "k2"))

            env = fresh_env("ref")
            reference = (f"from huggingface_hub import snapshot_download; snapshot_download({REPO!r}, "
                         f"endpoint={hub.endpoint!r}, max_workers={args.workers})")
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", reference], env=env, capture_output=True, check=True)
            ref_s = time.perf_counter() - start
            print(f"huggingface_hub snapshot_download: {total / 1e6:,.0f} MB in {ref_s:.2f} s = "
                  f"{total / ref_s / 1e6:,.0f} MB/s (process wall time, no hashing)")

            env = fresh_env("k2")
            start = time.perf_counter()
            out = subprocess.run(k2(hub, env, args.workers), env=env, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            result = json.loads(out.stdout)
            print(f"k2 download: {result['fetched_bytes'] / 1e6:,.0f} MB in {result['seconds']:.2f} s = "
                  f"{result['fetched_bytes'] / result['seconds'] / 1e6:,.0f} MB/s "
                  f"(process wall time {wall:.2f} s, hashes verified)")

            env = fresh_env("resume")
            hub.reset_counts()
            child = subprocess.Popen(k2(hub, env, args.workers), env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            blobs = work / "resume" / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"

            def on_disk() -> int:
                return sum(p.stat().st_size for p in blobs.glob("*")) if blobs.exists() else 0

            while on_disk() < total // 2 and child.poll() is None:
                time.sleep(0.01)
            child.send_signal(signal.SIGKILL)
            child.wait()
            kept, sent_before = on_disk(), sum(hub.sent.values())
            hub.reset_counts()
            out = subprocess.run(k2(hub, env, args.workers), env=env, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout)
            sent_after = sum(hub.sent.values())
            print(f"killed with {kept / 1e6:,.0f} MB on disk ({sent_before / 1e6:,.0f} MB sent); the second run "
                  f"fetched {sent_after / 1e6:,.0f} MB (resumed {result['resumed_bytes'] / 1e6:,.0f} MB): "
                  f"{(sent_before + sent_after - total) / 1e6:,.1f} MB sent twice, "
                  f"{(total - sent_after) / 1e6:,.0f} MB not re-sent")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
