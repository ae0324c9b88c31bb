"""`k2 check`: the CPU kernel this machine selects against the exact path, on a model, in seconds."""
import json

import typer

from k2cli import options
from runtime.errors import K2Error


def print_check(result: dict):
    if result["compared"]:
        typer.echo(f"{result['model']} on {result['device']} ({result['threads']} threads): the {result['kernel']} "
                   f"kernel against the exact path, {result['prompts']} prompts of {result['tokens']} tokens and "
                   f"{result['decode_steps']} decode steps ({result['positions']} positions)")
        typer.echo(f"  kernel: {result['kernel_detail']}")
        if result["non_finite_positions"]:
            typer.echo(f"  non-finite logits at {result['non_finite_positions']} positions")
        else:
            typer.echo(f"  max |logit difference| {result['max_logit_diff']:.3e}, mean KL(exact || fast) "
                       f"{result['kl_mean']:.3e} nats")
        typer.echo(f"  top-1 agreement {100 * result['top1_agreement']:.2f}%; exact path {result['exact_s']:.2f} s, "
                   f"{result['kernel']} kernel {result['fast_s']:.2f} s")


def check(model: str = options.MODEL,
          prompts: int = typer.Option(4, "--prompts", min=1, help="Prompts run through both paths."),
          tokens: int = typer.Option(32, "--tokens", min=1, help="Tokens per prompt (its prefill; a few decode steps "
                                                                 "follow)."),
          threads: int = options.THREADS, int8: bool = options.INT8, device: str = options.DEVICE,
          dtype: str = options.COMPUTE_DTYPE, as_json: bool = options.JSON):
    """Check the CPU kernel this machine selects against the exact path: max logit difference, KL, greedy agreement.

    Exits 1 with a one-line verdict when the mean KL(exact || fast) exceeds 1e-3 or the top-1 agreement falls below
    99%. The model computes in float32 by default, so the differences are the kernels': in bfloat16, two exact
    computations that differ only in fp32 rounding (the dequantizing path in fp32 and in fp64) already measure a mean
    KL of 1.7e-3 and 97% agreement on SmolLM2, as bfloat16 rounds them apart over the layers."""
    from runtime.check import CheckSettings, run_check
    from runtime.loader import load
    from runtime.pipeline import in_pipeline

    if in_pipeline():
        raise K2Error("k2 check runs in one process, without torchrun")
    options.apply_threads(threads)
    loaded = load(model, device=device, dtype=dtype, int8=int8)
    result = run_check(loaded, CheckSettings(prompts=prompts, tokens=tokens))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_check(result)
    if not result["ok"]:
        raise K2Error(result["verdict"])
    if not as_json:
        typer.echo(f"ok: {result['verdict']}")
