"""`k2 bench`: measured prefill and decode speed, memory, and the fraction of the memory-bandwidth roofline."""
import json
from pathlib import Path

import typer

from k2cli import options
from runtime.errors import K2Error
from runtime.numa import describe, format_id_list
from runtime.units import format_bytes


def _row(name: str, row: dict) -> str:
    def cell(key: str, fmt: str) -> str:
        return f"{format(row[key]['mean'], fmt)} ± {format(row[key]['std'], fmt)}"
    return (f"  {name:<14} {cell('prefill_tok_s', ',.1f'):>22} {cell('decode_tok_s', ',.2f'):>20} "
            f"{cell('ttft_s', '.4f'):>20}")


def print_bench(result: dict):
    typer.echo(f"{result['model']} on {result['device']} ({result['dtype']}, {result['threads']} threads, "
               f"decoder {result['decoder']}): batch {result['batch']}, prompt {result['prompt_len']}, "
               f"{result['gen']} new tokens, {result['reps']} reps after {result['warmup']} warm-up")
    typer.echo(f"  {describe(result['numa_nodes'])}; this process runs on CPUs {format_id_list(result['cpus'])}")
    if result["cpu_kernel"]:
        typer.echo(f"  CPU kernels (INT4 and int8 weights): {result['cpu_kernel']}")
    typer.echo(f"  {'':<14} {'prefill tok/s':>22} {'decode tok/s':>20} {'first token s':>20}")
    typer.echo(_row("k2", result))
    if "compare" in result:
        compare = result["compare"]
        peer = compare["engine"]
        typer.echo(_row(peer, compare[peer]))
        typer.echo(f"  k2 / {peer}: decode {compare['decode_ratio']:.2f}x, prefill {compare['prefill_ratio']:.2f}x")
    typer.echo(f"  memory peak: device {format_bytes(result['peak_device_bytes'])}, "
               f"host {format_bytes(result['peak_host_bytes'])}")
    typer.echo(f"  decode reads {format_bytes(result['weight_bytes_per_token'])} of weights per token "
               f"({result['experts_read_per_step']:.1f} routed experts per step); copy bandwidth "
               f"{result['copy_bandwidth_bytes_s'] / 1e9:,.1f} GB/s -> roofline {result['roofline_decode_tok_s']:,.1f} tok/s, "
               f"achieved {100 * result['bandwidth_fraction']:.1f}%")


def bench(model: str = options.MODEL,
          prompt_len: int = typer.Option(512, "--prompt-len", min=1, help="Prompt tokens (random ids)."),
          gen: int = typer.Option(128, "--gen", min=2, help="New tokens per rep; decode speed excludes the first."),
          batch: int = options.BATCH,
          reps: int = typer.Option(5, "--reps", min=1, help="Measured repetitions (mean ± stddev)."),
          warmup: int = typer.Option(1, "--warmup", min=0, help="Unmeasured repetitions first."),
          device: str = options.DEVICE, dtype: str = options.DTYPE,
          threads: int = options.THREADS, int8: bool = options.INT8,
          plan: Path = options.PLAN, device_map: str = options.DEVICE_MAP,
          compare: str = typer.Option(None, "--compare", help="'transformers' (a model folder) or 'llama.cpp' (a GGUF "
                                                              "file): also run that engine on the same checkpoint, reps "
                                                              "alternating, and print the ratio."),
          eager: bool = options.EAGER, as_json: bool = options.JSON):
    """Measure prefill and decode speed, time to first token, peak memory and the achieved share of the bandwidth."""
    from runtime import peers
    from runtime.bench import BenchSettings, run_bench
    from runtime.loader import load
    from runtime.offload import parse_device_map
    from runtime.pipeline import in_pipeline

    if in_pipeline():
        raise K2Error("k2 bench runs in one process; bench a one-stage plan without torchrun")
    if compare:
        peers.peer(compare)  # a missing package is an error before the model loads
    options.apply_threads(threads)
    loaded = load(model, device=device, dtype=dtype, plan=plan, device_map=parse_device_map(device_map), int8=int8)
    settings = BenchSettings(prompt_len=prompt_len, gen=gen, batch=batch, reps=reps, warmup=warmup)
    result = run_bench(loaded, settings, compare=compare, eager=eager)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_bench(result)
