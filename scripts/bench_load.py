"""Benchmark loading a K2-layout checkpoint into memory, and what the finite-values check of every tensor costs.

Builds a checkpoint with Kimi K2's full-width shapes (scripts/bench_quantize.py's builder), then loads it with
runtime.loading.load_model, alternating runs with the check and runs with it switched off, and reports min and
median seconds of each, the check's share of the load, and the floor: the bytes copied at the copy bandwidth
runtime/bench.py measures in the same run.

    python scripts/bench_load.py [--experts 8] [--layers 1] [--reps 5] [--threads N]

The checkpoint was just written, so it is read from the page cache: this measures the loader, not the disk (a load
from disk is slower, and the check's share smaller).
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_quantize import build_checkpoint  # noqa: E402

from runtime import loading  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402


def timed_load(folder: Path) -> float:
    start = time.perf_counter()
    model = loading.load_model(folder)
    seconds = time.perf_counter() - start
    del model
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8, help="Routed experts per layer (K2: 384).")
    parser.add_argument("--layers", type=int, default=1, help="MoE layers (K2: 60).")
    parser.add_argument("--reps", type=int, default=5, help="Loads of each kind, alternating.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="k2-bench-load-"))
    try:
        built = build_checkpoint(root / "model", args.layers, args.experts)
        timed_load(root / "model")  # warm: the page cache, the allocator
        checked, unchecked = [], []
        require_finite = loading._require_finite
        for _ in range(args.reps):
            loading._require_finite = require_finite
            checked.append(timed_load(root / "model"))
            loading._require_finite = lambda name, tensor: None
            unchecked.append(timed_load(root / "model"))
        loading._require_finite = require_finite
        bandwidth = copy_bandwidth(torch.device("cpu"))
        report = {
            "checkpoint_gb": built["bytes"] / 1e9, "threads": torch.get_num_threads(),
            "load_s_min": min(checked), "load_s_median": statistics.median(checked),
            "load_without_check_s_min": min(unchecked), "load_without_check_s_median": statistics.median(unchecked),
            "check_share_of_load_median": 1 - statistics.median(unchecked) / statistics.median(checked),
            "copy_bandwidth_gb_s": bandwidth / 1e9,
            # Floor: every byte read from the page cache once and written into the model once (the bandwidth counts
            # a copy's read and write).
            "floor_s": 2 * built["bytes"] / bandwidth,
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
