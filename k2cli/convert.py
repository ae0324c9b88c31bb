"""`k2 convert`: a checkpoint in another runtime's format (llama.cpp's GGUF), or a GGUF as a Hugging Face folder."""
import json
import sys
from pathlib import Path

import typer

from k2cli import options
from k2cli.interrupt import resumable
from runtime.errors import K2Error
from runtime.units import format_bytes

FORMATS = ("gguf", "hf")


def convert(model: str = options.REQUIRED_MODEL,
            out: Path = typer.Argument(..., help="The .gguf file to write (a split conversion writes "
                                                 "OUT-00001-of-0000N.gguf files next to it instead), or with --to hf "
                                                 "the folder."),
            to: str = typer.Option(..., "--to", help="Output format: gguf (llama.cpp's llama, qwen3, qwen3moe or "
                                                     "deepseek2 architecture), or hf (MODEL a .gguf file: a Hugging "
                                                     "Face folder of safetensors)."),
            weights_type: str = typer.Option("bf16", "--type",
                                             help="Embeddings, attention, dense and shared-expert weights: bf16, "
                                                  "f16, f32, q8_0 or q4_0 (norms and the router stay f32); with "
                                                  "--to hf every weight, bf16, f16 or f32."),
            experts_type: str = typer.Option("auto", "--experts-type",
                                             help="Routed experts: auto (INT4 experts copied into Q4_0 with no "
                                                  "rounding, others as --type), bf16, f16, f32, q8_0 or q4_0."),
            split_max_size: str = options.size_option(None, "--split-max-size",
                                                      "Largest file, e.g. 50G: llama.cpp's split files past it."),
            force: bool = options.FORCE, resume: bool = options.RESUME, workers: int = options.WORKERS,
            as_json: bool = options.JSON):
    """Convert a checkpoint (Kimi K2, DeepSeek-V3, Qwen3, Qwen3-MoE, Llama) for llama.cpp, tensor by tensor; or a
    GGUF back into a Hugging Face folder."""
    if to not in FORMATS:
        raise K2Error(f"--to must be one of {', '.join(FORMATS)}, not {to!r}")
    from runtime.resolve import resolve_model

    if to == "hf":
        if experts_type != "auto" or split_max_size is not None or resume:
            raise K2Error("--experts-type, --split-max-size and --resume apply to --to gguf")
        from runtime.convert.hf import convert_to_hf

        result = convert_to_hf(resolve_model(model), out, weights_type, force=force, progress=sys.stderr.isatty())
        typer.echo(json.dumps(result) if as_json else
                   f"wrote {result['output']}: {result['tensors']} tensors, {format_bytes(result['bytes'])} in "
                   f"{result['seconds']:.1f} s")
        return
    from runtime.convert.gguf import ConvertConfig, convert_checkpoint
    from runtime.units import parse_size

    split_max_bytes = parse_size(split_max_size, "--split-max-size") if split_max_size is not None else 0
    config = ConvertConfig(type=weights_type, experts_type=experts_type, split_max_bytes=split_max_bytes)
    with resumable(f"the tensors written so far are kept next to {out}; the same command with --resume continues "
                   f"from them"):
        result = convert_checkpoint(resolve_model(model), out, config, force=force, resume=resume, workers=workers,
                                    progress=sys.stderr.isatty())
    if as_json:
        typer.echo(json.dumps(result))
        return
    types = ", ".join(f"{n} {name}" for name, n in result["types"].items())
    resumed = f", {result['resumed_tensors']} kept from the interrupted run" if result["resumed_tensors"] else ""
    typer.echo(f"wrote {', '.join(result['output'])}: {result['tensors']} tensors ({types}{resumed}), "
               f"{format_bytes(result['input_bytes'])} -> {format_bytes(result['bytes'])} in {result['seconds']:.1f} s")
    if result["int4_copied_tensors"]:
        typer.echo(f"INT4 -> Q4_0 without rounding: {result['int4_copied_tensors']} tensors, {result['int4_groups']:,} "
                   f"groups, {result['inexact_scale_groups']:,} with a scale fp16 cannot hold exactly"
                   + (f" (largest weight change {result['max_int4_weight_error']:.3e})"
                      if result["inexact_scale_groups"] else ""))
    for note, tensors in result["notes"].items():
        typer.echo(f"note: {note} ({len(tensors)} tensors, e.g. {tensors[0]})", err=True)
