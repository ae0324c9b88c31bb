"""Sampling flags shared by `k2 chat` and `k2 generate` (None: not given, the command's default applies)."""
import typer

TEMPERATURE = typer.Option(None, "--temperature", "-t", min=0.0, help="Softmax temperature; 0 is greedy.")
TOP_K = typer.Option(None, "--top-k", min=0, help="Keep the k most likely tokens (0: off).")
TOP_P = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Keep the smallest set of tokens holding this much probability.")
MIN_P = typer.Option(None, "--min-p", min=0.0, max=1.0, help="Drop tokens less likely than this fraction of the top one.")
REPETITION_PENALTY = typer.Option(None, "--repetition-penalty", min=0.0,
                                  help="Divide the logits of tokens already in the context by this (1: off).")
SEED = typer.Option(None, "--seed", help="Seed of the draws: the same seed gives the same reply.")


def sampling_overrides(temperature, top_k, top_p, min_p, repetition_penalty, seed) -> dict:
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
            "repetition_penalty": repetition_penalty, "seed": seed}
