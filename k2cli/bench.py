"""`k2 bench`: measured prefill and decode speed, memory, and the fraction of the memory-bandwidth roofline."""
import json
from pathlib import Path

import typer

from k2cli.model_commands import MODEL_HELP
from runtime.errors import K2Error


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.1f} MiB"


def _row(name: str, row: dict) -> str:
    def cell(key: str, fmt: str) -> str:
        return f"{format(row[key]['mean'], fmt)} ± {format(row[key]['std'], fmt)}"
    return (f"  {name:<14} {cell('prefill_tok_s', ',.1f'):>22} {cell('decode_tok_s', ',.2f'):>20} "
            f"{cell('ttft_s', '.4f'):>20}")


def print_bench(result: dict):
    typer.echo(f"{result['model']} on {result['device']} ({result['dtype']}, {result['threads']} threads, "
               f"decoder {result['decoder']}): batch {result['batch']}, prompt {result['prompt_len']}, "
               f"{result['gen']} new tokens, {result['reps']} reps after {result['warmup']} warm-up")
    typer.echo(f"  {'':<14} {'prefill tok/s':>22} {'decode tok/s':>20} {'first token s':>20}")
    typer.echo(_row("k2", result))
    if "compare" in result:
        compare = result["compare"]
        typer.echo(_row("transformers", compare["transformers"]))
        typer.echo(f"  k2 / transformers: decode {compare['decode_ratio']:.2f}x, prefill {compare['prefill_ratio']:.2f}x")
    typer.echo(f"  memory peak: device {_gib(result['peak_device_bytes'])}, host {_gib(result['peak_host_bytes'])}")
    typer.echo(f"  decode reads {_gib(result['weight_bytes_per_token'])} of weights per token "
               f"({result['experts_read_per_step']:.1f} routed experts per step); copy bandwidth "
               f"{result['copy_bandwidth_bytes_s'] / 1e9:,.1f} GB/s -> roofline {result['roofline_decode_tok_s']:,.1f} tok/s, "
               f"achieved {100 * result['bandwidth_fraction']:.1f}%")


def bench(model: str = typer.Argument("demo", help=MODEL_HELP),
          prompt_len: int = typer.Option(512, "--prompt-len", min=1, help="Prompt tokens (random ids)."),
          gen: int = typer.Option(128, "--gen", min=2, help="New tokens per rep; decode speed excludes the first."),
          batch: int = typer.Option(1, "--batch", min=1, help="Sequences decoded together."),
          reps: int = typer.Option(5, "--reps", min=1, help="Measured repetitions (mean ± stddev)."),
          warmup: int = typer.Option(1, "--warmup", min=0, help="Unmeasured repetitions first."),
          device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
          dtype: str = typer.Option("auto", help="auto (the checkpoint's), float32, bfloat16 or float16."),
          threads: int = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's choice)."),
          plan: Path = typer.Option(None, "--plan", help="Run placed as a `k2 plan --json` file says."),
          device_map: str = typer.Option(None, "--device-map", help="Rename the plan's devices: cuda:0=cuda:1,..."),
          compare: str = typer.Option(None, "--compare", help="'transformers': also run transformers' model on the "
                                                              "same checkpoint, reps alternating, and print the ratio."),
          eager: bool = typer.Option(False, "--eager", help="Decode with the model's own forward even on CUDA "
                                                           "(no fused experts, no CUDA graph)."),
          as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")):
    """Measure prefill and decode speed, time to first token, peak memory and the achieved share of the bandwidth."""
    import torch

    from runtime.bench import BenchSettings, run_bench
    from runtime.loader import load
    from runtime.offload import parse_device_map
    from runtime.pipeline import in_pipeline

    if in_pipeline():
        raise K2Error("k2 bench runs in one process; bench a one-stage plan without torchrun")
    if compare not in (None, "transformers"):
        raise K2Error(f"--compare takes 'transformers', not {compare!r}")
    if compare:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise K2Error("--compare transformers needs the transformers package (pip install 'k2[test]')") from None
    if threads:
        torch.set_num_threads(threads)
    loaded = load(model, device=device, dtype=dtype, plan=plan, device_map=parse_device_map(device_map))
    settings = BenchSettings(prompt_len=prompt_len, gen=gen, batch=batch, reps=reps, warmup=warmup)
    result = run_bench(loaded, settings, compare=compare, eager=eager)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_bench(result)
