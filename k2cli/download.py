"""`k2 download`: a model repo from the Hugging Face hub, resumable and verified."""
import json
import sys
from pathlib import Path

import typer

from k2cli.interrupt import resumable


def _print_files(result: dict):
    labels = {"done": "have", "check": "have", "partial": "partial", "missing": "to fetch"}
    for f in result["files"]:
        state = labels[f["status"]] + (f" {f['have'] / f['size']:.0%}" if f["status"] == "partial" else "")
        typer.echo(f"  {f['size']:>17,}  {state:<13} {f['path']}")


def _print_part(part: dict | None):
    if part:
        which = f"stage {part['stage']}/{part['stages']}: " if "stage" in part else ""
        typer.echo(f"{which}layers {part['layers'][0]}-{part['layers'][1]} of {part['num_layers']}, "
                   f"{len(part['shards'])} of {part['num_shards']} shards")


def download(repo_id: str = typer.Argument(..., help="Repo id on the hub, e.g. moonshotai/Kimi-K2-Instruct."),
             revision: str = typer.Option("main", "--revision", "-r", help="Branch, tag or commit."),
             include: list[str] = typer.Option(None, "--include", help="Fetch only the files matching this glob "
                                               "(repeatable) instead of what k2 needs: weights, index, configs, "
                                               "tokenizer, chat template. `*` stays within a folder, `**` crosses "
                                               "folders (huggingface_hub's `*` crosses them)."),
             exclude: list[str] = typer.Option(None, "--exclude", help="Skip the files matching this glob (repeatable; "
                                               "globs as for --include)."),
             local_dir: Path = typer.Option(None, "--local-dir", help="Download into this folder instead of the "
                                            "Hugging Face cache (where `k2 info REPO_ID` finds it)."),
             endpoint: str = typer.Option(None, "--endpoint", help="Hub or mirror URL (default: HF_ENDPOINT or "
                                          "https://huggingface.co)."),
             workers: int = typer.Option(8, "--workers", min=1, help="Files fetched at once."),
             stage: str = typer.Option(None, "--stage", help="I/N: only pipeline stage I of N (from 1): config, "
                                       "tokenizer and the shards holding its layers, split as `k2 plan --stages N`."),
             layers: str = typer.Option(None, "--layers", help="A-B: only the shards holding layers A to B."),
             verify: bool = typer.Option(False, "--verify", help="Hash the files already on disk against the hub's "
                                         "sha256 / git hash, and fetch again the missing and corrupt ones."),
             dry_run: bool = typer.Option(False, "--dry-run", help="List the files, sizes and plan; fetch nothing."),
             as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")):
    """Download a model from the Hugging Face hub: resumable, every file checked against the hub's hash."""
    from huggingface_hub.utils import logging as hf_logging

    from runtime.hub.download import DownloadRequest, download as run_download
    from runtime.units import format_bytes

    hf_logging.set_verbosity_error()  # the library's retry warnings would break into the progress bar
    request = DownloadRequest(repo_id, revision, include=include or None, exclude=exclude or None, local_dir=local_dir,
                              endpoint=endpoint, workers=workers, stage=stage, layers=layers, verify=verify,
                              dry_run=dry_run, progress=sys.stderr.isatty() and not as_json)
    with resumable("the files and partial files fetched so far are kept; the same command resumes them"):
        result = run_download(request)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    if result["corrupt"]:
        typer.echo(f"verify: {len(result['corrupt'])} corrupt, {', '.join(result['corrupt'])}"
                   + ("" if dry_run else ": deleted and fetched again"))
    elif verify:
        typer.echo(f"verify: {len(result['verified'])} files match the hub's hashes")
    if dry_run:
        _print_files(result)
        _print_part(result["part"])
        typer.echo(f"{len(result['files'])} files, {format_bytes(result['total_bytes'])}; "
                   f"{format_bytes(result['missing_bytes'])} to fetch into {result['folder']} "
                   f"({format_bytes(result['free_bytes'])} free)")
        return
    _print_part(result["part"])
    fetched, seconds = result["fetched_bytes"], result["seconds"]
    if fetched:
        done = f"fetched {format_bytes(fetched)} in {seconds:.1f} s ({fetched / seconds / 1e6:,.1f} MB/s)"
        if result["resumed_bytes"]:
            done += f", resumed from {format_bytes(result['resumed_bytes'])} already on disk"
    else:
        done = "all already on disk"
    typer.echo(f"{result['folder']}: {len(result['files'])} files, {format_bytes(result['total_bytes'])}; {done}")
    if result["part"]:
        typer.echo(f"next: run this part of the pipeline from {result['model']} (README: pipeline parallelism)")
    else:
        typer.echo(f"next: k2 info {result['model']}   then: k2 chat {result['model']}")
