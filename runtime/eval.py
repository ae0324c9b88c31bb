"""How much a model (typically a quantized one) lost: perplexity over a text and, against a reference model,
the KL divergence of its next-token distributions and how often its top choice agrees.

The protocol is llama.cpp's perplexity tool (tools/perplexity/perplexity.cpp), so its numbers and ours compare: the
text's tokens, after a BOS when the vocabulary adds one, are cut into windows of exactly `ctx` tokens (a partial last
window is dropped); each window is one forward pass from an empty cache, its first token replaced by BOS when the
vocabulary adds one; only the second half is scored, positions ctx/2 .. ctx-2 each predicting the next token, so
every prediction sees at least half a window of context. KL and agreement take the same positions, as llama.cpp's
--kl-divergence does.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import K2Error


@dataclass
class WindowScore:
    index: int
    start_token: int
    tokens: int  # predicted positions in the window
    nll: float  # summed negative log-likelihood (nats)
    kl: float = 0.0  # summed KL(ref || model) over positions
    agree: int = 0  # positions where both models' argmax agree
    ref_nll: float = 0.0

    def as_dict(self) -> dict:
        return {"index": self.index, "start_token": self.start_token, "tokens": self.tokens,
                "perplexity": math.exp(self.nll / self.tokens), "kl_mean": self.kl / self.tokens,
                "top1_agreement": self.agree / self.tokens}


def read_text(path: Path) -> str:
    """A UTF-8 text file as llama.cpp reads it (no newline translation): what `k2 eval` scores and GPTQ calibrates on."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise K2Error(f"{path} not found") from None
    except IsADirectoryError:
        raise K2Error(f"{path} is a folder, not a text file") from None
    except UnicodeDecodeError as e:
        raise K2Error(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None


def windows(ids: list[int], ctx: int, bos_id: int | None = None) -> list[tuple[int, list[int]]]:
    """(start, ids) of each whole window of the text's `ids`, BOS first and first in every window with `bos_id`."""
    if ctx < 3:
        raise K2Error("--ctx must be at least 3 tokens: only the second half of a window is scored")
    stream = ids if bos_id is None else [bos_id] + ids
    starts = range(0, len(stream) - ctx + 1, ctx)
    if bos_id is None:
        return [(start, stream[start:start + ctx]) for start in starts]
    return [(start, [bos_id] + stream[start + 1:start + ctx]) for start in starts]


def _log_probs(model, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities float32 [T - 1 - T // 2, V] of the scored positions T//2 .. T-2 (each predicting the token
    after it)."""
    logits = model(tokens[None].to(model.device))[0, len(tokens) // 2:-1]
    return torch.log_softmax(logits.float().cpu(), dim=-1)


def divergence(ref_log_p: torch.Tensor, log_p: torch.Tensor) -> tuple[float, int]:
    """Log-probabilities [N, V] of a reference and a model at the same N positions -> KL(ref || model) summed over the
    positions, and the positions where both put the same token first."""
    return (ref_log_p.exp() * (ref_log_p - log_p)).sum().item(), (ref_log_p.argmax(-1) == log_p.argmax(-1)).sum().item()


@torch.inference_mode()
def evaluate(model, ids: list[int], ctx: int = 512, ref=None, max_windows: int | None = None, progress=None,
             bos_id: int | None = None) -> dict:
    """Perplexity of `model` over the text's `ids` (no BOS); with `ref`, also mean KL(ref || model), top-1
    agreement, the worst window. `bos_id`: the vocabulary's BOS when it adds one (llama.cpp's add_bos_token)."""
    vocab = model.args.vocab_size
    if ref is not None and ref.args.vocab_size != vocab:
        raise K2Error(f"the reference model has a vocabulary of {ref.args.vocab_size}, the model {vocab}")
    if ids and max(ids) >= vocab:
        raise K2Error(f"the text has token id {max(ids)}, beyond the model's vocabulary of {vocab}")
    chunks = windows(ids, ctx, bos_id)[:max_windows]
    if not chunks:
        raise K2Error(f"the text has {len(ids)} token(s), less than one window of --ctx {ctx}")
    scores = []
    for index, (start, window) in enumerate(progress(chunks) if progress else chunks):
        tokens = torch.tensor(window)
        log_p = _log_probs(model, tokens)
        target = tokens[len(window) // 2 + 1:, None]
        score = WindowScore(index, start, len(target), -log_p.gather(1, target).sum().item())
        if ref is not None:
            ref_log_p = _log_probs(ref, tokens)
            score.kl, score.agree = divergence(ref_log_p, log_p)
            score.ref_nll = -ref_log_p.gather(1, target).sum().item()
        scores.append(score)

    n = sum(s.tokens for s in scores)
    result = {"tokens": n, "windows": len(scores), "ctx": ctx,
              "perplexity": math.exp(sum(s.nll for s in scores) / n)}
    if ref is not None:
        worst = max(scores, key=lambda s: s.kl / s.tokens)
        result |= {"ref_perplexity": math.exp(sum(s.ref_nll for s in scores) / n),
                   "kl_mean": sum(s.kl for s in scores) / n,
                   "top1_agreement": sum(s.agree for s in scores) / n,
                   "worst_window": worst.as_dict()}
    return result
