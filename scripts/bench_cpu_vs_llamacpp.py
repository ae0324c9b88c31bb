"""k2 against llama.cpp on the CPU, on the same weights: a Kimi K2-width slice decoded by both in one run.

The slice has K2's widths (hidden 7168; MLA ranks q 1536, kv 512, rope 64, nope 128, v 128; 64 heads) and 2 MoE
layers (first_k_dense_replace 0: both layers routed) of 32 experts of 2048, top-8, one shared expert; the demo's
tokenizer (K2's format, a small vocabulary); random BF16 weights of the demo's scale. It is written with the
project's own tools, into --out (kept and reused by later runs):

    bf16/                 write_demo (runtime/models/deepseek_v3_demo.py) with K2's widths
    int4/                 k2 quantize bf16 int4 --int4                    (experts INT4, the rest BF16: K2-Thinking's)
    q4_0-bf16.gguf        k2 convert int4 q4_0-bf16.gguf --to gguf        (INT4 experts copied losslessly into Q4_0)
    q4_0-q8_0.gguf        k2 convert int4 q4_0-q8_0.gguf --to gguf --type q8_0

Then five rows, reps alternating so background load falls on every row alike, all on --threads threads: llama.cpp
(the cyllama wheel: runtime/peers.py's LlamaCppEngine, what `k2 bench --compare llama.cpp` runs) on both GGUF files,
and k2 (the engine `k2 bench` times) on int4/ (as stored, and with --int8: the dense weights in int8, against
llama.cpp's Q8_0 row) and bf16/. Prefill is one prompt of --prompt-len random ids, decode
--gen tokens; min and median over --reps. Each is set against the copy bandwidth measured in this run
(runtime/bench.py's copy_bandwidth, what `k2 bench` reports): decode against the weights one token reads (attention,
shared expert, router, 8 of 32 experts per layer, an embedding row, the head), prefill against every weight read
once (the memory floor of a prompt; the longer the prompt, the more compute bounds it instead).

    python scripts/bench_cpu_vs_llamacpp.py                         # build (first run: minutes), then the table
    python scripts/bench_cpu_vs_llamacpp.py --threads 1 --reps 5 --json
    python scripts/bench_cpu_vs_llamacpp.py --kernel                # the INT4 expert projection alone

--kernel times one 2048 x 7168 expert projection at batch 1, cycling over distinct weights that total at least 4x
the last-level cache, so no figure comes from cache: F.linear on fp32 and bf16 matrices, k2's INT4 experts as the
model calls them (one expert per call: gate, up and down, so per projection is a third of it), and torch's
_weight_int4pack_mm_for_cpu where this torch has it.

Needs cyllama==0.2.18 (pip install 'k2[bench]') for the llama.cpp rows; about 13 GB of disk in --out and 15 GB of
memory. Run it on an idle machine: other processes' load shows up in every row.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.bench import (BenchSettings, EngineRun, copy_bandwidth, random_prompts, time_reps,  # noqa: E402
                           weight_bytes_per_step)
from runtime.errors import K2Error  # noqa: E402
from runtime.files import read_json  # noqa: E402
from runtime.loader import load  # noqa: E402
from runtime.models.deepseek_v3_demo import write_demo  # noqa: E402
from runtime.peers import peer  # noqa: E402
from runtime.sampling import Sampler  # noqa: E402

# Kimi K2's widths (KIMI_K2.md) over the demo's config: two routed layers of `--experts` experts.
K2_WIDTHS = {
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 2,
    "num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0,
}
SLICE_SHARDS = 8  # write_demo holds one shard's bytes twice while saving: keep each under 1 GB
VARIANTS = {  # row label: what it runs on, in --out, and whether k2 loads it with --int8
    "llama.cpp, Q4_0 experts + bf16 rest": ("q4_0-bf16.gguf", False),
    "llama.cpp, Q4_0 experts + Q8_0 rest": ("q4_0-q8_0.gguf", False),
    "k2, INT4 experts + bf16 rest": ("int4", False),
    "k2 --int8, INT4 experts + int8 rest": ("int4", True),
    "k2, BF16": ("bf16", False),
}
FALLBACK_LLC_BYTES = 64 << 20
PROJECTION = (2048, 7168)  # an expert's gate (or up) projection, [out, in]


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def k2(*args: str | Path):
    """Run the k2 CLI of this checkout; its one-line error becomes ours."""
    command = ["k2", *map(str, args)]
    log(f"$ {' '.join(command)}")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "k2cli", *command[1:]], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise K2Error(f"{' '.join(command[:2])}: {lines[-1].removeprefix('error: ')}")
    log(done.stdout.strip())


def build_slice(out: Path, n_experts: int, ggufs: bool) -> dict[str, Path]:
    """The slice's folders (and with `ggufs` its GGUF files) in `out`: each reused when complete, else (re)built."""
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now, not after the weights are drawn
    paths = {name: out / name for name, _ in VARIANTS.values()}
    if not (paths["bf16"] / "config.json").exists():  # write_demo renames a finished folder into place
        log(f"writing the BF16 slice ({n_experts} experts) to {paths['bf16']}")
        write_demo(paths["bf16"], config_overrides=K2_WIDTHS | {"n_routed_experts": n_experts}, n_shards=SLICE_SHARDS)
    built = read_json(paths["bf16"] / "config.json")["n_routed_experts"]
    if built != n_experts:
        raise K2Error(f"{out} holds a slice of {built} experts per layer, not {n_experts}: pass another --out")
    # k2 quantize removes its progress manifest last; without one and with config.json the folder is complete.
    if not (paths["int4"] / "config.json").exists() or (paths["int4"] / ".k2-quantize.json").exists():
        k2("quantize", paths["bf16"], paths["int4"], "--int4", "--force")
    if ggufs:
        for name, weights_type in (("q4_0-bf16.gguf", "bf16"), ("q4_0-q8_0.gguf", "q8_0")):
            if not paths[name].exists():  # k2 convert renames a finished file into place
                k2("convert", paths["int4"], paths[name], "--to", "gguf", "--type", weights_type, "--force")
    return paths


def gguf_bytes_read(path: Path, experts_read: int, n_experts: int) -> int:
    """Weight bytes a token reads from a GGUF file: every tensor but the routed experts (`experts_read` of each
    layer's `n_experts`: that share of the stacked `*_exps` tensors) and the token embedding (one row); the same
    count as runtime/bench.py's weight_bytes_per_step on k2's models."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    total = 0
    for tensor in reader.tensors:
        if "_exps." in tensor.name:
            total += tensor.n_bytes * experts_read / n_experts
        elif tensor.name == "token_embd.weight":
            total += tensor.n_bytes / math.prod(tensor.shape[1:].tolist())  # ggml order: [row length, rows]
        else:
            total += tensor.n_bytes
    return int(total)


def open_rows(paths: dict[str, Path], max_len: int) -> list[dict]:
    """Each row's engine and the weight bytes its token reads (decode) and its prompt reads (prefill)."""
    llama_cpp = peer("llama.cpp")
    rows = []
    for label, (name, int8) in VARIANTS.items():
        loaded = load(paths[name], weights=not name.endswith(".gguf"), int8=int8)
        if loaded.gguf_file is not None:
            engine = llama_cpp(loaded, torch.device("cpu"), None, 1, max_len)  # its own greedy sampler
            args = loaded.args
            decode_bytes, prompt_bytes = (gguf_bytes_read(loaded.gguf_file, k, args.n_routed_experts)
                                          for k in (args.num_experts_per_tok, args.n_routed_experts))
        else:
            model = loaded.model
            vocab = model.args.vocab_size
            suppressed = sorted(i for i in loaded.eos_ids if i < vocab)
            sampler = Sampler.greedy(vocab, torch.device("cpu"), suppress_ids=suppressed)
            engine = EngineRun(loaded.engine(1, max_len), sampler)  # what `k2 bench` times
            blocks = model.moe_blocks()
            decode_bytes = weight_bytes_per_step(model, 1, {i: model.args.num_experts_per_tok for i in blocks})
            prompt_bytes = weight_bytes_per_step(model, 1, {i: b.experts.n_experts for i, b in blocks.items()})
        engine.kind = label
        rows.append({"engine": label, "path": str(paths[name]), "runner": engine, "eos_ids": loaded.eos_ids,
                     "vocab_size": loaded.args.vocab_size, "weight_bytes_per_token": decode_bytes,
                     "weight_bytes": prompt_bytes})
        log(f"{label}: {decode_bytes / 1e9:.3f} GB read per token ({paths[name].name})")
    return rows


def bench_end_to_end(opts) -> dict:
    peer("llama.cpp")  # a missing cyllama is an error before minutes of building
    paths = build_slice(opts.out, opts.experts, ggufs=True)
    settings = BenchSettings(prompt_len=opts.prompt_len, gen=opts.gen, batch=1, reps=opts.reps, warmup=opts.warmup)
    bandwidth = copy_bandwidth(torch.device("cpu"))
    with torch.inference_mode():
        rows = open_rows(paths, opts.prompt_len + opts.gen)
        vocab, eos = rows[0]["vocab_size"], set().union(*(r["eos_ids"] for r in rows))
        prompts = random_prompts(vocab, [i for i in eos if i < vocab], settings)
        times = time_reps([r["runner"] for r in rows], prompts, settings, torch.device("cpu"))
    result = {"threads": torch.get_num_threads(), "copy_bandwidth_bytes_s": bandwidth, **asdict(settings), "rows": []}
    for row in rows:
        t = times[row["engine"]]
        roofline = bandwidth / row["weight_bytes_per_token"]
        prefill_roofline = bandwidth * opts.prompt_len / row["weight_bytes"]
        result["rows"].append({
            "engine": row["engine"], "path": row["path"], "weight_bytes_per_token": row["weight_bytes_per_token"],
            "weight_bytes": row["weight_bytes"], **t, "roofline_decode_tok_s": roofline,
            "decode_bandwidth_fraction": t["decode_tok_s"]["median"] / roofline,
            "prefill_bandwidth_fraction": t["prefill_tok_s"]["median"] / prefill_roofline})
    return result


def print_end_to_end(result: dict):
    print(f"{result['threads']} threads, copy bandwidth {result['copy_bandwidth_bytes_s'] / 1e9:.1f} GB/s, "
          f"{result['prompt_len']}-token prompt, {result['gen']} tokens, {result['reps']} reps (+{result['warmup']} "
          f"warm-up)\n")
    print("| engine | GB read per token | decode tok/s median (min) | share of roofline | "
          f"prefill tok/s median (min), {result['prompt_len']}-token prompt | prefill share of roofline |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        d, p = r["decode_tok_s"], r["prefill_tok_s"]
        print(f"| {r['engine']} | {r['weight_bytes_per_token'] / 1e9:.3f} | {d['median']:.2f} ({d['min']:.2f}) | "
              f"{100 * r['decode_bandwidth_fraction']:.1f}% | {p['median']:.1f} ({p['min']:.1f}) | "
              f"{100 * r['prefill_bandwidth_fraction']:.1f}% |")
    decode = {r["engine"]: r["decode_tok_s"]["median"] for r in result["rows"]}
    int4, bf16 = decode["k2, INT4 experts + bf16 rest"], decode["k2, BF16"]
    print(f"\nk2 INT4 decode: {int4 / decode['llama.cpp, Q4_0 experts + bf16 rest']:.2f}x llama.cpp on the same "
          f"weights (target >= 1), {int4 / bf16:.2f}x k2 BF16 (target >= 1.6)")
    int8 = decode["k2 --int8, INT4 experts + int8 rest"]
    print(f"k2 --int8 decode: {int8 / decode['llama.cpp, Q4_0 experts + Q8_0 rest']:.2f}x llama.cpp with Q8_0 dense "
          "weights (target >= 1)")


def llc_bytes() -> int:
    """The last-level cache of cpu0 as sysfs reports it, or 64 MiB where it does not."""
    levels = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            levels.append((int((index / "level").read_text()), int(size.rstrip("KMG")) * unit))
        except (OSError, ValueError):
            continue
    return max(levels)[1] if levels else FALLBACK_LLC_BYTES


def time_cycled(call, operands: list, cycles: int) -> list[float]:
    """Seconds of each call of `call(operand)` over `cycles` passes through `operands`, after one untimed pass."""
    for operand in operands:
        call(operand)
    seconds = []
    for _ in range(cycles):
        for operand in operands:
            start = time.perf_counter()
            call(operand)
            seconds.append(time.perf_counter() - start)
    return seconds


def kernel_row(name: str, seconds: list[float], nbytes: float, bandwidth: float, distinct: int,
               per_call: int = 1) -> dict:
    median = statistics.median(seconds) / per_call
    return {"path": name, "ms_median": 1e3 * median, "ms_min": 1e3 * min(seconds) / per_call,
            "bytes": nbytes, "gb_s": nbytes / median / 1e9, "bandwidth_fraction": nbytes / median / bandwidth,
            "distinct_weights": distinct}


def bench_kernel(opts) -> dict:
    out_features, in_features = PROJECTION
    paths = build_slice(opts.out, opts.experts, ggufs=False)
    llc = llc_bytes()
    needed = 4 * llc
    bandwidth = copy_bandwidth(torch.device("cpu"))
    rows = []
    with torch.inference_mode():
        # Every weight drawn anew, not cloned: a hypervisor that merges equal pages (KSM) would hand clones one
        # physical page, and the cache would serve them all.
        for dtype in (torch.float32, torch.bfloat16):
            nbytes = out_features * in_features * dtype.itemsize
            weights = [0.02 * torch.randn(PROJECTION, dtype=dtype) for _ in range(math.ceil(needed / nbytes))]
            x = torch.randn(1, in_features, dtype=dtype)
            seconds = time_cycled(lambda w: F.linear(x, w), weights, opts.reps)
            name = f"{str(dtype).removeprefix('torch.')} F.linear"
            rows.append(kernel_row(name, seconds, nbytes, bandwidth, len(weights)))
            del weights

        # k2's INT4 experts as loaded by the runtime (any repacking included) and called by the model's MoE block.
        model = load(paths["int4"]).model
        blocks = list(model.moe_blocks().values())
        one_per_layer = {i: 1 for i in model.moe_blocks()}
        one_per_layer_bytes = weight_bytes_per_step(model, 1, one_per_layer) - weight_bytes_per_step(model, 1, {})
        expert_bytes = one_per_layer_bytes / len(blocks)
        total = expert_bytes * sum(b.experts.n_experts for b in blocks)
        if total < needed:
            raise K2Error(f"the slice's INT4 experts hold {total / 2**20:.0f} MiB, under 4x this CPU's last-level "
                          f"cache ({llc / 2**20:.0f} MiB): build one with more, --experts "
                          f"{math.ceil(needed / expert_bytes / len(blocks))} --out A_NEW_FOLDER")
        x = torch.randn(1, in_features, dtype=model.model.embed_tokens.weight.dtype)
        route = torch.ones(1, 1)
        operands = [(b.experts, torch.tensor([[e]])) for b in blocks for e in range(b.experts.n_experts)]
        seconds = time_cycled(lambda op: op[0](x, route, op[1]), operands, opts.reps)
        rows.append(kernel_row(f"k2 {type(blocks[0].experts).__name__}, one expert / 3 (gate, up, down)", seconds,
                               expert_bytes / 3, bandwidth, len(operands), per_call=3))
        del model, blocks, operands

        if hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            group = 32
            levels = torch.zeros(PROJECTION, dtype=torch.int32)
            packed_shape = torch._convert_weight_to_int4pack_for_cpu(levels, 1).shape
            scales_shape = (in_features // group, out_features, 2)
            nbytes = math.prod(packed_shape) + 2 * math.prod(scales_shape)  # two nibbles a byte; bf16 scales, zeros
            n = math.ceil(needed / nbytes)
            # any byte is two valid nibbles of the packed layout ([out, in / 2] uint8)
            operands = [(torch.randint(0, 256, packed_shape, dtype=torch.uint8),
                         torch.rand(scales_shape, dtype=torch.bfloat16)) for _ in range(n)]
            x = torch.randn(1, in_features, dtype=torch.bfloat16)
            seconds = time_cycled(lambda op: torch._weight_int4pack_mm_for_cpu(x, op[0], group, op[1]), operands,
                                  opts.reps)
            rows.append(kernel_row(f"torch _weight_int4pack_mm_for_cpu (group {group})", seconds, nbytes, bandwidth, n))
    return {"threads": torch.get_num_threads(), "copy_bandwidth_bytes_s": bandwidth, "llc_bytes": llc,
            "cycles": opts.reps, "projection": list(PROJECTION), "rows": rows}


def print_kernel(result: dict):
    print(f"one {result['projection'][0]} x {result['projection'][1]} projection at batch 1, {result['threads']} "
          f"threads, weights cycled over >= 4x the {result['llc_bytes'] / 2**20:.0f} MiB last-level cache, "
          f"{result['cycles']} cycles; copy bandwidth {result['copy_bandwidth_bytes_s'] / 1e9:.1f} GB/s\n")
    print("| path | ms median (min) | MB read | effective GB/s | share of copy bandwidth | distinct weights |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['path']} | {r['ms_median']:.2f} ({r['ms_min']:.2f}) | {r['bytes'] / 1e6:.1f} | {r['gb_s']:.1f} | "
              f"{100 * r['bandwidth_fraction']:.0f}% | {r['distinct_weights']} |")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "k2-cpu-slice",
                        help="where the slice and its conversions are written, and reused from (default: %(default)s)")
    parser.add_argument("--experts", type=int, default=32, help="routed experts per layer (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of both engines (default: every core, %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--gen", type=int, default=16,
                        help="tokens per rep; decode excludes the first (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3,
                        help="measured reps; with --kernel, passes over the weights (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured reps first (default: %(default)s)")
    parser.add_argument("--kernel", action="store_true", help="the INT4 expert projection microbenchmark instead")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    opts = parser.parse_args()
    for flag in ("experts", "threads", "prompt_len", "reps"):
        if getattr(opts, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if opts.gen < 2:
        parser.error("--gen must be at least 2: decode speed excludes the first token")
    if opts.experts < K2_WIDTHS["num_experts_per_tok"]:
        parser.error(f"--experts must be at least top-k, {K2_WIDTHS['num_experts_per_tok']}")
    return opts


def main():
    opts = parse_args()
    torch.set_num_threads(opts.threads)
    try:
        result = bench_kernel(opts) if opts.kernel else bench_end_to_end(opts)
    except K2Error as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    if opts.json:
        print(json.dumps(result, indent=2))
    elif opts.kernel:
        print_kernel(result)
    else:
        print_end_to_end(result)


if __name__ == "__main__":
    main()
