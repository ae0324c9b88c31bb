"""Benchmark `k2 quantize --int4` on a multi-GB K2-layout checkpoint with Kimi K2's full-width shapes.

Builds the checkpoint (random BF16 weights; hidden 7168, experts 2048 wide, real attention shapes, a small vocabulary
so that the routed experts dominate as they do in K2), runs the real command in a child process and reports input
GB/s per core and peak RSS against the bound: largest input shard + largest output shard + 1 GiB.

    python scripts/bench_quantize.py [--experts 16] [--layers 2] [--method rtn] [--workers N] [--keep]

The input was just written, so it is read from the page cache: this measures the quantizer, not the disk.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime import models  # noqa: E402

# Kimi K2's config.json with fewer layers and experts, and a small vocabulary.
K2_SHAPES = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 4096, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_attention_heads": 64, "num_key_value_heads": 64,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "routed_scaling_factor": 2.827, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 0, "moe_layer_freq": 1, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-06,
    "rope_theta": 50000.0, "tie_word_embeddings": False, "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16",
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}
SHARD_BYTES = 500 * 10**6
MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)")


def build_checkpoint(folder: Path, n_layers: int, n_experts: int) -> dict:
    config = K2_SHAPES | {"num_hidden_layers": n_layers, "n_routed_experts": n_experts}
    shapes = models.build_on_meta(config).checkpoint_shapes()
    # One random pool, sliced at varying offsets: random values without paying torch.randn per weight.
    pool = (0.02 * torch.randn(2 * 7168 * 2048, generator=torch.Generator().manual_seed(0))).bfloat16()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weight_map, shard, shard_size, files = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update({n: name for n in shard})
        shard, shard_size = {}, 0

    for i, (name, shape) in enumerate(shapes.items()):
        numel = torch.Size(shape).numel()
        if name.endswith("e_score_correction_bias"):
            tensor = torch.zeros(shape)
        elif numel <= pool.numel() // 2:
            start = (i * 7919) % (pool.numel() - numel)
            tensor = pool[start:start + numel].view(shape).clone()
        else:
            tensor = pool.repeat(-(-numel // pool.numel()))[:numel].view(shape).clone()
        shard[name] = tensor
        shard_size += tensor.numel() * tensor.element_size()
        if shard_size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum((folder / f).stat().st_size for f in files)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"files": len(files), "bytes": total, "largest_shard": max((folder / f).stat().st_size for f in files)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=16, help="Routed experts per layer (K2: 384).")
    parser.add_argument("--layers", type=int, default=2, help="MoE layers (K2: 60).")
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--workers", type=int, default=None, help="Worker threads (default: every core).")
    parser.add_argument("--dir", type=Path, default=None, help="Where to build (default: a temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoints afterwards.")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="k2-bench-quantize-"))
    model, out = root / "model", root / "int4"
    cores = args.workers or len(os.sched_getaffinity(0))
    try:
        start = time.perf_counter()
        built = build_checkpoint(model, args.layers, args.experts)
        print(f"built {model}: {built['bytes'] / 1e9:.2f} GB in {built['files']} shards "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        command = [sys.executable, "-m", "k2cli", "quantize", str(model), str(out), "--int4", "--method", args.method,
                   "--max-shard-size", "250MB", "--workers", str(cores), "--json"]
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        code, peak = map(int, result.stderr.split()[-2:])
        if code != 0:
            sys.exit(f"k2 quantize failed:\n{result.stderr}")
        largest_out = max(p.stat().st_size for p in out.glob("*.safetensors"))
        bound = built["largest_shard"] + largest_out + 2**30
        done = json.loads(result.stdout)
        report = {
            "input_gb": built["bytes"] / 1e9, "output_gb": done["output_bytes"] / 1e9,
            "method": args.method, "workers": cores,
            # The command as a user runs it (Python and torch start-up included), and the quantizer's own time.
            "command_seconds": seconds, "quantize_seconds": done["seconds"],
            "input_gb_per_s_per_core": built["bytes"] / 1e9 / done["seconds"] / cores,
            "command_input_gb_per_s_per_core": built["bytes"] / 1e9 / seconds / cores,
            "peak_rss_gib": peak / 2**30, "rss_bound_gib": bound / 2**30, "within_bound": peak < bound,
        }
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
