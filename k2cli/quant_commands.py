"""`k2 quantize`, `k2 qat` and `k2 eval`: make an INT4 checkpoint (by rounding, GPTQ or training), then measure what
it lost against the original."""
import json
import sys
from pathlib import Path

import typer

from k2cli import options
from k2cli.interrupt import resumable
from runtime.errors import K2Error
from runtime.units import format_bytes


def quantize(model: str = options.REQUIRED_MODEL,
             out: Path = typer.Argument(..., help="Output folder (new or empty; see --resume and --force)."),
             int4: bool = typer.Option(False, "--int4", help="INT4 groups in Kimi K2-Thinking's compressed-tensors layout."),
             method: str = typer.Option("rtn", help="rtn (round to nearest), mse (per-group clipping search) or gptq "
                                                    "(error feedback over calibration text; needs --calib)."),
             grid: str = typer.Option("k2", help="k2: levels -7..7, scale absmax/7 (K2-Thinking's QAT grid, lossless on "
                                                 "its weights); ct: -8..7, absmax/7.5 (compressed-tensors' minmax)."),
             group_size: int = typer.Option(32, "--group-size", help="Weights per scale: 16, 32, 64 or 128."),
             scope: str = typer.Option("experts", help="experts (as K2-Thinking), experts+shared, or all-linear."),
             max_shard_size: str = options.size_option("5GB", "--max-shard-size", "Largest output shard, e.g. 5GB."),
             resume: bool = options.RESUME, force: bool = options.FORCE,
             report: Path = typer.Option(None, "--report", help="Write per-tensor SQNR (dB) and max error as JSON here."),
             calib: Path = typer.Option(None, "--calib", help="gptq: UTF-8 text to calibrate on (e.g. a wikitext-2 "
                                                              "train split), read with the model's tokenizer."),
             calib_tokens: int = typer.Option(262144, "--calib-tokens",
                                              help="gptq: use at most this many tokens of --calib (the GPTQ paper's "
                                                   "128 x 2048). Memory grows with it: the walk holds a few float32 "
                                                   "copies of their hidden states."),
             act_order: bool = typer.Option(None, "--act-order/--no-act-order",
                                            help="gptq: round columns by decreasing activation (groups stay as "
                                                 "stored). On by default, as in llm-compressor."),
             min_expert_tokens: int = typer.Option(128, "--min-expert-tokens",
                                                   help="gptq: a routed expert sent fewer calibration tokens falls "
                                                        "back to mse."),
             workers: int = options.WORKERS, as_json: bool = options.JSON):
    """Quantize a checkpoint tensor by tensor (gptq: layer by layer over calibration text); memory stays near one
    input shard plus one output shard (gptq: one layer's weights plus the calibration hidden states)."""
    from runtime.convert.quantize import QuantizeConfig, quantize_checkpoint
    from runtime.resolve import resolve_model
    from runtime.units import parse_size

    if not int4:
        raise K2Error("name the format: --int4 (the only one so far)")
    options.check_resume_force(resume, force)
    config = QuantizeConfig(method=method, grid=grid, group_size=group_size, scope=scope,
                            max_shard_bytes=parse_size(max_shard_size, "--max-shard-size"), report=report is not None,
                            calib=None if calib is None else str(calib), calib_tokens=calib_tokens,
                            act_order=act_order, min_expert_tokens=min_expert_tokens)
    with resumable(f"the finished shards are kept in {out}; the same command with --resume continues from them"):
        result = quantize_checkpoint(resolve_model(model), out, config, resume=resume, force=force, workers=workers,
                                     progress=sys.stderr.isatty())
    if report is not None:
        tmp = report.with_name(f".{report.name}.tmp")
        tmp.write_text(json.dumps(result["report"], indent=2))
        tmp.replace(report)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "report"}))
        return
    typer.echo(f"wrote {out}: {result['quantized_tensors']} INT4 tensors, {result['shards']} shards "
               f"({result['resumed_shards']} kept from the interrupted run), "
               f"{format_bytes(result['input_bytes'])} -> {format_bytes(result['output_bytes'])} in "
               f"{result['seconds']:.1f} s, peak memory {format_bytes(result['peak_rss_bytes'])}")
    if "calibration" in result:
        calibration = result["calibration"]
        typer.echo(f"calibrated on {calibration['tokens']:,} tokens ({calibration['sequences']} sequences): "
                   f"{calibration['gptq_tensors']} tensors by GPTQ, {calibration['fallback_tensors']} by the mse "
                   f"fallback ({len(calibration['fallback_experts'])} experts sent fewer than {min_expert_tokens} "
                   "tokens)")
    if report is not None:
        summary = result["report"]["summary"]
        median = summary["median_sqnr_db"]
        typer.echo(f"report {report}: {summary['tensors']} tensors, {summary['lossless']} lossless, median SQNR "
                   + (f"{median:.2f} dB" if median is not None else "n/a"))
        for s in summary["worst"]:
            typer.echo(f"  {s['sqnr_db']:7.2f} dB  max error {s['max_error']:.3e}  {s['name']}")


def qat(model: str = options.REQUIRED_MODEL,
        out: Path = typer.Argument(..., help="Output folder for the INT4 checkpoint (new or empty; see --resume and "
                                             "--force)."),
        steps: int = typer.Option(..., "--steps", min=1, help="Training steps (a few hundred)."),
        data: Path = typer.Option(..., "--data", help="UTF-8 text to train on, read with the model's tokenizer (e.g. "
                                                      "the model's kind of text; held-out text measures the result)."),
        lr: float = typer.Option(0.003, "--lr", help="Adam's step size, in units of each tensor's mean INT4 scale; "
                                                     "decays on a cosine to zero."),
        batch: int = typer.Option(16, "--batch", min=1, help="Sequences per step: more average out more of the "
                                                             "gradient's noise, in proportion more time."),
        seq_len: int = typer.Option(256, "--seq-len", min=2, help="Tokens per sequence."),
        group_size: int = typer.Option(32, "--group-size", help="Weights per scale: 16, 32, 64 or 128."),
        scope: str = typer.Option("experts", help="The weights trained and quantized: experts (as K2-Thinking), "
                                                  "experts+shared, or all-linear."),
        seed: int = typer.Option(0, "--seed", help="Seed of the batches' positions in --data."),
        save_every: int = typer.Option(50, "--save-every", min=1, help="Steps between saved training states."),
        max_shard_size: str = options.size_option("5GB", "--max-shard-size", "Largest output shard, e.g. 5GB."),
        device: str = options.DEVICE, threads: int = options.THREADS,
        resume: bool = options.RESUME, force: bool = options.FORCE,
        workers: int = options.WORKERS, as_json: bool = options.JSON):
    """Quantization-aware training: the weights --scope names learn to sit on K2's INT4 grid (levels -7..7, scale
    absmax/7) by distilling the original model's next-token distributions (KL) through a straight-through estimator;
    then the INT4 checkpoint, which `k2 quantize --int4` turns back into the same integers. Holds the model in float32
    plus four copies of the trained weights (original, gradient, Adam's two)."""
    from runtime.qat import QatConfig, qat as train
    from runtime.resolve import resolve_model
    from runtime.units import parse_size

    options.check_resume_force(resume, force)
    options.apply_threads(threads)
    config = QatConfig(steps=steps, lr=lr, batch=batch, seq_len=seq_len, group_size=group_size, scope=scope,
                       seed=seed, save_every=save_every)
    with resumable(f"the training state is saved in {out}; the same command with --resume continues from it"):
        result = train(resolve_model(model), out, data, config, parse_size(max_shard_size, "--max-shard-size"),
                       device=device, resume=resume, force=force, workers=workers, progress=sys.stderr.isatty())
    if as_json:
        typer.echo(json.dumps(result))
        return
    resumed = f", resumed at step {result['resumed_at_step']}" if result["resumed_at_step"] else ""
    typer.echo(f"trained {result['trained_tensors']} tensors ({result['trained_weights']:,} weights) for "
               f"{result['steps']} steps of {result['tokens_per_step']:,} tokens in {result['train_seconds']:.1f} s"
               f"{resumed}: mean KL {result['kl_first_step']:.4e} at step 1 (round to nearest), "
               f"{result['kl_last_steps']:.4e} over the last steps")
    typer.echo(f"wrote {out}: {result['quantized_tensors']} INT4 tensors, {result['shards']} shards, "
               f"{format_bytes(result['output_bytes'])}")


def eval(models: list[str] = typer.Argument(None, help=options.MODEL_HELP + " Several (candidates, e.g. rtn, mse and "
                                                                            "gptq outputs) need --ref. Default: demo."),
         text: Path = typer.Option(..., "--text", help="UTF-8 text file to score (e.g. a wikitext-2 test split)."),
         ref: str = typer.Option(None, "--ref", help="Reference model (the original of a quantized one) for KL and agreement."),
         ctx: int = typer.Option(512, "--ctx", min=2, help="Tokens per window."),
         max_windows: int = typer.Option(None, "--max-windows", min=1, help="Score only the first N windows."),
         dtype: str = options.COMPUTE_DTYPE, as_json: bool = options.JSON):
    """Perplexity over a text; with --ref, mean KL(ref || model), top-1 agreement and the worst window of each model,
    one model held at a time beside the reference."""
    from runtime.eval import evaluate, read_text
    from runtime.int4 import held_bytes
    from runtime.loader import load, torch_dtype

    models = models or ["demo"]
    if dtype == "auto" or torch_dtype(dtype) is None:
        raise K2Error("--dtype must be float32, bfloat16 or float16")
    if len(models) > 1 and not ref:
        raise K2Error(f"{len(models)} models are compared against a reference: name it with --ref")
    content = read_text(text)
    progress = sys.stderr.isatty()
    windows = None
    if progress:
        from tqdm import tqdm

        def windows(chunks):
            return tqdm(chunks, desc="scoring", unit="window")
    ref_obj = load(ref, dtype=dtype, progress=progress).model if ref else None
    results, ids = [], None
    for model in models:
        loaded = load(model, dtype=dtype, progress=progress)
        if ids is None:  # the first model's tokenizer: every model is scored on the same ids
            ids, bos_id = loaded.tokenizer.encode_document(content), loaded.tokenizer.bos_id
        result = evaluate(loaded.model, ids, ctx, ref_obj, max_windows, windows, bos_id)
        held = held_bytes(loaded.model)
        if held["int4_weights"]:
            result["int4_bytes_per_weight"] = held["int4_bytes"] / held["int4_weights"]
        results.append(result)
        del loaded  # one candidate at a time beside the reference
    if len(models) > 1:
        _print_comparison(ref, dict(zip(models, results)), ctx, as_json)
        return
    result = results[0]
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{result['tokens']:,} tokens in {result['windows']} windows of {ctx}: "
               f"perplexity {result['perplexity']:.4f}")
    if "int4_bytes_per_weight" in result:
        typer.echo(f"INT4 weights held packed: {result['int4_bytes_per_weight']:.4f} bytes per weight")
    if ref:
        worst = result["worst_window"]
        typer.echo(f"vs {ref} (perplexity {result['ref_perplexity']:.4f}): mean KL {result['kl_mean']:.5f} nats, "
                   f"top-1 agreement {100 * result['top1_agreement']:.2f}%")
        typer.echo(f"worst window #{worst['index']} (from token {worst['start_token']}): "
                   f"mean KL {worst['kl_mean']:.5f}, agreement {100 * worst['top1_agreement']:.2f}%")


def _print_comparison(ref: str, results: dict[str, dict], ctx: int, as_json: bool):
    first = next(iter(results.values()))
    if as_json:
        typer.echo(json.dumps({"reference": ref, "ref_perplexity": first["ref_perplexity"], "tokens": first["tokens"],
                               "windows": first["windows"], "ctx": ctx,
                               "candidates": [{"model": m} | r for m, r in results.items()]}))
        return
    typer.echo(f"{first['tokens']:,} tokens in {first['windows']} windows of {ctx}; reference {ref}: perplexity "
               f"{first['ref_perplexity']:.4f}")
    rows = [("model", "perplexity", "mean KL", "top-1", "worst window: KL, top-1")]
    for model, r in results.items():
        worst = r["worst_window"]
        rows.append((model, f"{r['perplexity']:.4f}", f"{r['kl_mean']:.4g}", f"{100 * r['top1_agreement']:.2f}%",
                     f"#{worst['index']} (token {worst['start_token']}): {worst['kl_mean']:.4g}, "
                     f"{100 * worst['top1_agreement']:.2f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        typer.echo("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:4], widths[1:])), row[4]]))
