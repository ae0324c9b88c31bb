"""A full-width Kimi K2 slice on one GPU: our BF16 decode, our INT4-experts decode and transformers', at batch 1.

The slice has K2's exact widths (hidden 7168, 64 heads, MLA ranks 1536/512, 384 experts of 2048, top-8, one shared
expert, vocab 163840) and 1 dense + N MoE layers of random weights, written once as a safetensors checkpoint
(weights drawn on the GPU, about 40 GB on disk for N = 1). Prints decode tok/s, time to first token and the share of
the bandwidth roofline: weight bytes a decode step reads over the copy bandwidth measured on the GPU in this run.
Also a 2048-token prefill against the bf16 matmul peak measured the same way.

    python scripts/gpu_bench_k2_slice.py                        # everything (write, ours BF16, ours INT4, transformers)
    python scripts/gpu_bench_k2_slice.py --only ours --folder /tmp/k2-slice   # reuse a written slice, one row

Targets (issue 7): BF16 decode >= 50% of the roofline; INT4 >= 1.6x our BF16 decode; prefill >= 30% of the peak.
Needs torch with CUDA, triton and transformers; no network.
"""
import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import int4  # noqa: E402
from runtime import models  # noqa: E402
from runtime.bench import (BenchSettings, EngineRun, copy_bandwidth,  # noqa: E402
                           distinct_experts_per_step, random_prompts, time_reps, weight_bytes_per_step)
from runtime.engine import Engine, select_decoder  # noqa: E402
from runtime.models.deepseek_v3_demo import demo_config  # noqa: E402
from runtime.int4 import Int4Experts  # noqa: E402
from runtime.loader import load  # noqa: E402
from runtime.loading import load_model  # noqa: E402
from runtime.peers import TransformersEngine  # noqa: E402
from runtime.sampling import Sampler  # noqa: E402

K2_WIDTHS = {
    "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 384,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.827, "rope_theta": 50000.0, "bos_token_id": 163584, "eos_token_id": 163585,
    "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
}
SHARD_BYTES = 4 << 30


def write_slice(folder: Path, moe_layers: int, seed: int = 0):
    """config.json and shards of random BF16 weights (drawn on the GPU: minutes faster than the CPU)."""
    from safetensors.torch import save_file

    config = demo_config(1024) | K2_WIDTHS | {"num_hidden_layers": 1 + moe_layers}
    shapes = models.build_on_meta(config).checkpoint_shapes()
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator("cuda").manual_seed(seed)
    weight_map, shard, shard_bytes, total = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
            shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=generator, device="cuda")
        elif name.endswith("e_score_correction_bias"):
            t = 0.05 * torch.randn(shape, generator=generator, device="cuda")
        elif name.endswith("mlp.gate.weight"):
            t = 0.2 * torch.randn(shape, generator=generator, device="cuda")
        else:
            t = 0.02 * torch.randn(shape, generator=generator, device="cuda")
        t = (t if name.endswith("e_score_correction_bias") else t.bfloat16()).cpu()
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    print(f"wrote {total / 2**30:.1f} GiB to {folder}", flush=True)


def quantize_experts_int4(model, group_size: int = int4.DEFAULT_GROUP_SIZE):
    """Every MoE layer's experts -> INT4 (K2's grid and layout), on the GPU, replacing the BF16 ones."""
    grid = int4.GRIDS[int4.DEFAULT_GRID]
    for block in model.moe_blocks().values():
        source = block.experts
        n_experts, hidden, dim = source.gate_proj.shape
        with torch.device("cuda"):
            packed = Int4Experts(n_experts, dim, hidden, group_size)
        for name in ("gate_proj", "up_proj", "down_proj"):
            weights, part = getattr(source, name).data, getattr(packed, name)
            for e in range(n_experts):
                w_groups = int4.grouped(weights[e], group_size)
                scale = int4.absmax_scale(w_groups, grid)
                q = int4.ungroup(int4.quantize_groups(w_groups, scale, grid), weights.shape[2])
                part.packed[e], part.scale[e] = int4.pack(q), scale
        block.experts = packed
        del source
        gc.collect()
        torch.cuda.empty_cache()


def matmul_peak_flops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def prefill_flops(model, tokens: int) -> float:
    """2 x the weights a token multiplies (attention projections, dense MLP, shared + top-k experts, head), plus
    attention's scores and values in the expanded (naive) form, causal."""
    args = model.args
    active = 0
    moe_blocks = model.moe_blocks()
    for i, layer in enumerate(model.model.layers):
        for name, p in layer.named_parameters():
            if "experts." in name and "shared" not in name:
                continue
            if p.dim() == 2:
                active += p.numel()
        if i in moe_blocks:
            active += args.num_experts_per_tok * 3 * args.hidden_size * args.moe_intermediate_size
    active += model.lm_head.weight.numel() / tokens  # the head runs for the last token only
    attention = 2 * args.num_hidden_layers * args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) * tokens * tokens / 2
    return 2 * active * tokens + attention


def bench_row(name, engine, model, settings, experts, bandwidth) -> dict:
    device = torch.device("cuda")
    prompts = random_prompts(model.args.vocab_size, [K2_WIDTHS["eos_token_id"]], settings)
    torch.cuda.reset_peak_memory_stats()
    row = time_reps([engine], prompts, settings, device)[engine.kind]
    per_step = weight_bytes_per_step(model, settings.batch, experts)
    roofline = bandwidth / per_step
    row.update(name=name, decoder=engine.kind, weight_bytes_per_token=per_step, roofline_tok_s=roofline,
               roofline_fraction=row["decode_tok_s"]["mean"] / roofline, peak_gpu_bytes=torch.cuda.max_memory_allocated())
    print(f"{name:<18} decode {row['decode_tok_s']['mean']:8.2f} ± {row['decode_tok_s']['std']:.2f} tok/s   "
          f"{100 * row['roofline_fraction']:5.1f}% of {roofline:,.0f} tok/s roofline   "
          f"({per_step / 2**30:.2f} GiB/token, ttft {row['ttft_s']['mean']:.3f} s, {engine.kind})", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "k2-slice")
    parser.add_argument("--moe-layers", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--only", choices=["write", "ours", "int4", "transformers"], action="append",
                        help="run only these parts (repeatable); default: all")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    opts = parser.parse_args()
    parts = set(opts.only or ["write", "ours", "int4", "transformers"])
    if not torch.cuda.is_available():
        sys.exit("error: this script needs a CUDA GPU")
    if "write" in parts and not (opts.folder / "config.json").exists():
        write_slice(opts.folder, opts.moe_layers)
    settings = BenchSettings(prompt_len=opts.prompt_len, gen=opts.gen, batch=1, reps=opts.reps, warmup=1)
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)
    rows, experts = [], None
    if parts & {"ours", "int4", "transformers"}:
        with torch.inference_mode():
            model = load_model(opts.folder, torch.bfloat16, "cuda")
            sampler = Sampler.greedy(model.args.vocab_size, device, suppress_ids=[K2_WIDTHS["eos_token_id"]])
            prompts = random_prompts(model.args.vocab_size, [K2_WIDTHS["eos_token_id"]], settings)
            max_len = opts.prompt_len + opts.gen

            def engine_run():  # what `k2 bench --device cuda` runs
                return EngineRun(Engine(model, 1, max_len, select_decoder(device)), sampler)

            experts = distinct_experts_per_step(model, prompts, max_len, sampler, 16)
            bf16_bytes = weight_bytes_per_step(model, 1, experts)  # what transformers reads too
            if "ours" in parts:
                peak = matmul_peak_flops()
                tokens = torch.randint(0, 160000, (1, opts.prefill_len), device=device)
                cache = model.new_cache(1, opts.prefill_len)
                model(tokens, model.new_cache(1, opts.prefill_len), last_only=True)  # warm-up
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(tokens, cache, last_only=True)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                achieved = prefill_flops(model, opts.prefill_len) / seconds
                print(f"prefill {opts.prefill_len} tokens: {opts.prefill_len / seconds:,.0f} tok/s, "
                      f"{achieved / 1e12:.0f} TFLOP/s = {100 * achieved / peak:.1f}% of the {peak / 1e12:.0f} TFLOP/s "
                      "bf16 matmul peak", flush=True)
                del cache
                rows.append(bench_row("ours BF16", engine_run(), model, settings, experts, bandwidth))
            if "int4" in parts:
                quantize_experts_int4(model)
                rows.append(bench_row("ours INT4 experts", engine_run(), model, settings, experts, bandwidth))
            if "transformers" in parts:
                del model
                gc.collect()
                torch.cuda.empty_cache()
                engine = TransformersEngine(load(opts.folder, weights=False), torch.bfloat16, device, sampler)
                row = time_reps([engine], prompts, settings, device)["transformers"]
                roofline = bandwidth / bf16_bytes
                row.update(name="transformers", roofline_fraction=row["decode_tok_s"]["mean"] / roofline,
                           roofline_tok_s=roofline)
                print(f"{'transformers':<18} decode {row['decode_tok_s']['mean']:8.2f} ± {row['decode_tok_s']['std']:.2f}"
                      f" tok/s   {100 * row['roofline_fraction']:5.1f}% of {roofline:,.0f} tok/s roofline", flush=True)
                rows.append(row)
    by_name = {r["name"]: r["decode_tok_s"]["mean"] for r in rows}
    if "ours BF16" in by_name and "ours INT4 experts" in by_name:
        print(f"INT4 / BF16 decode: {by_name['ours INT4 experts'] / by_name['ours BF16']:.2f}x (target >= 1.6x)")
    if "ours BF16" in by_name and "transformers" in by_name:
        print(f"ours BF16 / transformers decode: {by_name['ours BF16'] / by_name['transformers']:.2f}x")
    if opts.json:
        opts.json.write_text(json.dumps({"copy_bandwidth_bytes_s": bandwidth, "rows": rows}, indent=2))



if __name__ == "__main__":
    main()
