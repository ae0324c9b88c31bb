"""The arguments and options more than one command takes, each defined here once so they read and behave alike.

Values are checked where they are used, once: --device by runtime.devices.check_device, --dtype by
runtime.loader.torch_dtype, sizes by runtime.units.parse_size.
"""
import typer

from runtime.errors import K2Error
from runtime.units import SIZE_RULE

MODEL_HELP = ("Model folder, a .gguf file (the first of a split set), a Hugging Face repo id already downloaded, or "
              "'demo' (the trained demo, a small Kimi K2 written on first use).")
MODEL = typer.Argument("demo", help=MODEL_HELP)
REQUIRED_MODEL = typer.Argument(..., help=MODEL_HELP)

# Where and how a model runs: `k2 generate`, `k2 chat`, `k2 serve`, `k2 bench`, `k2 check`.
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps, ...")
DTYPE = typer.Option("auto", "--dtype", help="auto (the checkpoint's), float32, bfloat16 or float16.")
# `k2 eval`'s --dtype: no "auto", since both models must compute alike.
COMPUTE_DTYPE = typer.Option("float32", "--dtype", help="Compute dtype for both models: float32 (so differences are "
                                                        "the weights', not arithmetic's), bfloat16 or float16.")
PLAN = typer.Option(None, "--plan", help="Run placed as a `k2 plan --json` file says (layers on GPUs, experts on the "
                                         "CPU or streamed).")
DEVICE_MAP = typer.Option(None, "--device-map", help="Rename the plan's devices: cuda:0=cuda:1,...")
EAGER = typer.Option(False, "--eager", help="Decode with the model's own forward even on CUDA (no fused experts, no "
                                            "CUDA graph).")
BATCH = typer.Option(1, "--batch", min=1, help="Sequences decoded together.")
THREADS = typer.Option(None, "--threads", min=1, help="CPU threads torch computes with (default: torch's choice, one "
                                                      "per core); kept on one NUMA node where they fit one.")

INT8 = typer.Option(False, "--int8", help="Quantize the dense weights (attention, shared experts, dense layers, the "
                                          "output head) to int8 with a scale per output row as the model loads, for "
                                          "the CPU kernels: half a BF16 layer's bytes per token (llama.cpp's Q8_0). "
                                          "CPU only.")


def apply_threads(threads: int | None):
    """Set the CPU threads before the model loads (its weights then land on the threads' NUMA node); print what was
    done or warned."""
    from runtime.threads import use_threads

    for note in use_threads(threads):
        typer.echo(note, err=True)


def load_to_run(model: str, device: str, dtype: str, plan, device_map: str | None, threads: int | None,
                int8: bool = False):
    """The model loaded and placed as `k2 generate`, `k2 chat` and `k2 serve` run it, after --threads (so the weights
    land on the threads' NUMA node); None on a pipeline rank other than 0, which served rank 0 until the end."""
    import sys

    from runtime.loader import load
    from runtime.offload import parse_device_map

    apply_threads(threads)
    return load(model, device=device, dtype=dtype, plan=plan, device_map=parse_device_map(device_map),
                progress=sys.stderr.isatty(), int8=int8)


def max_tokens(default: int):
    return typer.Option(default, "--max-tokens", "-n", min=1,
                        help="At most this many new tokens (per reply, in a chat).")


# Sampling (`k2 chat`, `k2 generate`); None: not given, the command's default applies.
TEMPERATURE = typer.Option(None, "--temperature", "-t", min=0.0, help="Softmax temperature; 0 is greedy.")
TOP_K = typer.Option(None, "--top-k", min=0, help="Keep the k most likely tokens (0: off).")
TOP_P = typer.Option(None, "--top-p", min=0.0, max=1.0,
                     help="Keep the smallest set of tokens holding this much probability.")
MIN_P = typer.Option(None, "--min-p", min=0.0, max=1.0,
                     help="Drop tokens less likely than this fraction of the top one.")
REPETITION_PENALTY = typer.Option(None, "--repetition-penalty", min=0.0,
                                  help="Divide the logits of tokens already in the context by this (1: off).")
SEED = typer.Option(None, "--seed", help="Seed of the draws: the same seed gives the same reply.")


def sampling_overrides(temperature, top_k, top_p, min_p, repetition_penalty, seed) -> dict:
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
            "repetition_penalty": repetition_penalty, "seed": seed}


# Checkpoint conversions: `k2 quantize`, `k2 qat`, `k2 convert`.
RESUME = typer.Option(False, "--resume", help="Continue the interrupted run that was writing OUT.")
FORCE = typer.Option(False, "--force", help="Overwrite what is already at OUT (weights, earlier split files).")
WORKERS = typer.Option(None, "--workers", min=1, help="Worker threads (default: every core).")


def check_resume_force(resume: bool, force: bool):
    if resume and force:
        raise K2Error("--resume and --force exclude each other")


def size_option(default, flag: str, help: str):
    # Every size flag states the rule: G alone is 10^9 bytes here, where some tools read it as 2^30.
    return typer.Option(default, flag, help=f"{help} Units: {SIZE_RULE}.")


def json_flag(help: str = "Print machine-readable JSON."):
    return typer.Option(False, "--json", help=help)


JSON = json_flag()
