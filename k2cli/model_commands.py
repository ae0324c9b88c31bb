"""`k2 info`, `k2 init-demo`, `k2 generate`: inspect, create and run a checkpoint."""
import json
from pathlib import Path

import typer

from k2cli import options
from runtime.errors import K2Error
from runtime.units import format_bytes


def _count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def info(model: str = options.MODEL, as_json: bool = options.JSON):
    """Architecture, parameters, bytes by component and dtype, KV cache: from config.json and headers only."""
    from runtime.info import model_info
    from runtime.loader import load

    result = model_info(load(model, weights=False))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    params, kv = result["parameters"], result["kv_cache"]
    typer.echo(f"{result['model']}")
    typer.echo(f"  {result['architecture']} ({result['model_type']}): {result['layers']} layers "
               f"({result['dense_layers']} dense, {result['moe_layers']} MoE), hidden {result['hidden_size']}, "
               f"{result['attention_heads']} heads, vocab {result['vocab_size']:,}")
    if result["routed_experts"]:
        typer.echo(f"  experts: {result['routed_experts']} routed, {result['experts_per_token']} per token, "
                   f"{result['shared_experts']} shared")
    typer.echo(f"  parameters: {_count(params['total'])} total, {_count(params['active_per_token'])} active per token")
    typer.echo(f"  quantization: {result['quantization']}")
    typer.echo(f"  bytes ({result['bytes_source']}):")
    for name, comp in result["components"].items():
        dtypes = ", ".join(f"{d} {format_bytes(b)}" for d, b in comp["bytes_by_dtype"].items())
        typer.echo(f"    {name:<15} {_count(comp['parameters']):>10}  {format_bytes(comp['bytes']):>14}   "
                   f"{dtypes}")
    typer.echo(f"    {'total':<15} {_count(params['total']):>10}  {format_bytes(result['total_bytes']):>14}")
    typer.echo(f"  KV cache ({kv['dtype']}, {kv['kind']}): {kv['bytes_per_token']:,} bytes per token, "
               f"{format_bytes(kv['bytes_at_max_context'])} at the max context of {result['max_context']:,}")


def init_demo(folder: Path = typer.Argument(..., help="Where to write the checkpoint (must not exist)."),
              fp8: bool = typer.Option(False, "--fp8", help="Store the linear weights as FP8 blocks, as K2-Instruct does."),
              random: bool = typer.Option(False, "--random", help="Random weights (a fixed seed) and a tiny tokenizer "
                                                                  "instead of the trained demo: the test suite's model.")):
    """Write the demo checkpoint: a small Kimi K2 trained on Shakespeare and Wikipedia (scripts/train_demo.py), in the
    real layout (config, shards, index, tokenizer, template)."""
    from runtime.models import write_demo

    if folder.exists():
        raise K2Error(f"{folder} already exists")
    write_demo(folder, fp8=fp8, random=random)
    typer.echo(f"wrote {folder}; try: k2 info {folder}")


def generate(model: str = options.MODEL,
             prompt: str = typer.Option("The quick brown fox", "--prompt", "-p", help="Prompt text (tokenized as plain text)."),
             ids: str = typer.Option(None, "--ids", help="Comma-separated prompt token ids, instead of --prompt."),
             max_tokens: int = options.max_tokens(32),
             device: str = options.DEVICE, dtype: str = options.DTYPE, plan: Path = options.PLAN,
             device_map: str = options.DEVICE_MAP,
             expert_stats: Path = typer.Option(None, "--expert-stats", help="Record how often each expert is chosen "
                                                                            "into this file, for `k2 plan`."),
             temperature: float = options.TEMPERATURE, top_k: int = options.TOP_K, top_p: float = options.TOP_P,
             min_p: float = options.MIN_P, repetition_penalty: float = options.REPETITION_PENALTY,
             seed: int = options.SEED, eager: bool = options.EAGER, threads: int = options.THREADS,
             int8: bool = options.INT8, as_json: bool = options.JSON):
    """Raw completion without a chat template: greedy unless --temperature is above 0 (or a repetition penalty is
    set). For a conversation use `k2 chat`."""
    import time

    from runtime.engine import new_token_budget
    from runtime.offload import ExpertStats, expert_cache_hit_rate
    from runtime.sampling import Sampler, SamplingParams

    overrides = options.sampling_overrides(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    params = SamplingParams(**{"temperature": 0.0} | {k: v for k, v in overrides.items() if v is not None})
    if ids is not None:
        try:
            prompt_ids = [int(i) for i in ids.split(",")]
        except ValueError:
            raise K2Error(f"--ids must be comma-separated integers, got {ids!r}") from None
    loaded = options.load_to_run(model, device, dtype, plan, device_map, threads, int8)
    if loaded is None:
        return
    try:
        if ids is None:
            if not loaded.has_tokenizer:
                raise K2Error(f"{loaded.folder} has no tokenizer (tiktoken.model or tokenizer.json); pass --ids")
            prompt_ids = loaded.tokenizer.encode(prompt)
        if not prompt_ids:
            raise K2Error("the prompt is empty: there is nothing to continue")
        vocab = loaded.args.vocab_size
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise K2Error(f"prompt ids must lie in [0, {vocab})")
        context = loaded.context()
        budget = new_token_budget(len(prompt_ids), max_tokens, context)
        if budget < max_tokens:
            typer.echo(f"warning: the prompt's {len(prompt_ids)} tokens plus --max-tokens {max_tokens} exceed the "
                       f"model's context of {context} (max_position_embeddings): stopping after {budget} new tokens",
                       err=True)
        local_model = loaded.pipeline.stage.model if loaded.pipeline else loaded.model
        stats = ExpertStats(local_model) if expert_stats else None
        engine = loaded.engine(1, len(prompt_ids) + budget, eager=eager)
        start = time.perf_counter()
        sampler = Sampler(params, vocab, device=loaded.device)
        new_ids = list(engine.stream(0, prompt_ids, sampler, budget, loaded.eos_ids))
        seconds = time.perf_counter() - start
    finally:
        loaded.close()  # releases the other pipeline ranks, also when rank 0 fails
    text = loaded.tokenizer.decode(new_ids) if loaded.has_tokenizer else None
    if stats:
        stats.save(expert_stats)
    if as_json:
        typer.echo(json.dumps({"prompt_ids": prompt_ids, "new_ids": new_ids, "text": text, "seconds": seconds,
                               "decoder": engine.decoder, "pipeline": loaded.pipeline.layout if loaded.pipeline else None,
                               "expert_cache_hit_rate": expert_cache_hit_rate(local_model)}))
        return
    if text is not None:
        typer.echo(f"{prompt}{text}" if ids is None else text)
    typer.echo(f"[{len(prompt_ids)} prompt + {len(new_ids)} new tokens in {seconds:.2f} s: {new_ids}]", err=True)
