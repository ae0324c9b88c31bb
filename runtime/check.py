"""`k2 check`: does the CPU kernel this machine selects compute what the exact path computes, on this model?

Users of other engines find out that an INT4 kernel is wrong on their CPU from repeated tokens or gibberish; this
says so in seconds. One loaded model serves both runs: runtime.kernels.cpu.select switches every INT4 (and, with
--int8, int8) forward on the CPU between the exact path (dequantize, then torch) and the kernel. Each prompt runs through both teacher-forced:
the prefill's logits at every position (the kernel's tokens-grouped-by-expert path), then DECODE_STEPS steps of one
token each (its single-token path, through the cache as the engine decodes), fed the tokens the exact path picks
greedily, so both paths see the same inputs and one disagreement cannot cascade into the rest.
"""
import math
import time
from dataclasses import dataclass

import torch

from runtime.errors import K2Error
from runtime.eval import divergence
from runtime.int4 import Int4Experts, Int4Linear
from runtime.int8 import Int8Linear

KL_LIMIT = 1e-3  # mean KL(exact || fast) in nats per position
AGREEMENT_LIMIT = 0.99  # share of positions whose top token agrees
DECODE_STEPS = 4
# Prompts for a model with a tokenizer: a real model is sure of its next token in plain prose, so a top-1 flip means
# an error, not a near tie between two guesses at random ids. Repeated where prompts x tokens asks for more.
TEXT = ("The river rises in the hills north of the town and reaches the sea after two days of slow travel. In spring "
        "the melting snow fills it to the banks, and the farmers along its course wait for the water to fall before "
        "they plant. The old bridge was built of stone more than three hundred years ago; it has survived every flood "
        "since, although the road that crosses it has been widened twice. Children from the villages on both sides "
        "walk over it to school each morning, and in the evening the fishermen stand on it with their lines. A new "
        "bridge downstream now carries the heavy trucks, so the old one is quiet for most of the day. Visitors who "
        "come in summer often ask why the town never grew beyond the river, and the answer is simple: the land on "
        "the far side floods every few years, and nobody wants to rebuild a house after each one.")


@dataclass
class CheckSettings:
    prompts: int = 4
    tokens: int = 32  # prompt tokens; DECODE_STEPS more positions follow each
    seed: int = 0  # of the random prompts of a model without a tokenizer


def cpu_kernel_modules(model) -> int:
    """The INT4 and int8 modules whose weights are on the CPU: where the CPU kernels run."""
    held = [m.gate_proj.packed if isinstance(m, Int4Experts) else m.weight.packed if isinstance(m, Int4Linear)
            else m.weight for m in model.modules() if isinstance(m, (Int4Experts, Int4Linear, Int8Linear))]
    return sum(1 for t in held if t.device.type == "cpu")


def make_prompts(loaded, settings: CheckSettings) -> list[list[int]]:
    """`prompts` prompts of `tokens` ids: consecutive pieces of TEXT (BOS first where the vocabulary adds one), or
    random ids without end-of-sequence for a model without a tokenizer."""
    from runtime.bench import BenchSettings, random_prompts

    n, length, vocab = settings.prompts, settings.tokens, loaded.args.vocab_size
    if not loaded.has_tokenizer:
        suppressed = [i for i in loaded.eos_ids if 0 <= i < vocab]
        shape = BenchSettings(prompt_len=length, batch=n, seed=settings.seed)
        return random_prompts(vocab, suppressed, shape).tolist()
    bos = loaded.tokenizer.bos_id
    body = length - (bos is not None)
    text = loaded.tokenizer.encode(TEXT)
    stream = text * -(-n * body // len(text))
    prompts = [[bos] * (bos is not None) + stream[i * body:(i + 1) * body] for i in range(n)]
    if max(max(p) for p in prompts) >= vocab:
        raise K2Error(f"the tokenizer gives ids beyond the model's vocabulary of {vocab}")
    return prompts


@torch.inference_mode()
def teacher_forced_logits(model, prompt: list[int], feed: list[int] | None) -> tuple[torch.Tensor, list[int]]:
    """Logits float32 [len(prompt) + DECODE_STEPS, V]: the prefill's at every position, then one decode step at a
    time through the cache, each fed `feed`'s next id, or without `feed` the top id of the step before; and the ids
    fed."""
    cache = model.new_cache(1, len(prompt) + DECODE_STEPS)
    rows = [model(torch.tensor([prompt], device=model.device), cache)[0]]
    fed = []
    for step in range(DECODE_STEPS):
        fed.append(feed[step] if feed is not None else int(rows[-1][-1].argmax()))
        rows.append(model(torch.tensor([[fed[-1]]], device=model.device), cache)[0])
    return torch.cat(rows).float().cpu(), fed


def compare_logits(exact: list[torch.Tensor], fast: list[torch.Tensor]) -> dict:
    """Logits [N_i, V] of the same positions by the two paths -> max |difference|, mean KL(exact || fast), top-1
    agreement; KL and difference None where the fast path gave non-finite logits."""
    exact_all, fast_all = torch.cat(exact), torch.cat(fast)
    positions = exact_all.shape[0]
    non_finite = int((~torch.isfinite(fast_all)).any(-1).sum())
    kl, agree = divergence(torch.log_softmax(exact_all, -1), torch.log_softmax(fast_all, -1))
    return {"positions": positions, "non_finite_positions": non_finite,
            "max_logit_diff": (exact_all - fast_all).abs().max().item() if not non_finite else None,
            "kl_mean": kl / positions if not non_finite else None, "top1_agreement": agree / positions}


def _verdict(result: dict) -> tuple[bool, str]:
    kernel = result["kernel"]
    if result["non_finite_positions"]:
        return False, (f"the {kernel} CPU kernel gave non-finite logits at {result['non_finite_positions']} of "
                       f"{result['positions']} positions; the exact path did not")
    kl, agreement = result["kl_mean"], result["top1_agreement"]
    numbers = f"mean KL {kl:.2e} (limit {KL_LIMIT:g}), top-1 agreement {100 * agreement:.2f}% " \
              f"(limit {100 * AGREEMENT_LIMIT:g}%)"
    if math.isfinite(kl) and kl <= KL_LIMIT and agreement >= AGREEMENT_LIMIT:
        return True, f"the {kernel} CPU kernel matches the exact path: {numbers}"
    return False, f"the {kernel} CPU kernel disagrees with the exact path on this machine: {numbers}"


def run_check(loaded, settings: CheckSettings) -> dict:
    """Compare the CPU kernel INT4 forwards run (the variant selected, or "auto"'s) with the exact path on `loaded`'s
    model. The result's "ok" and "verdict" (one line) say whether it passed; "compared" is False where there was
    nothing to compare: no INT4 weights on the CPU, or no kernel built on this machine."""
    from runtime.kernels import cpu

    model = loaded.model
    result = {"model": str(loaded.folder), "device": str(loaded.device), "threads": torch.get_num_threads(),
              "kernel_modules_on_cpu": cpu_kernel_modules(model)}
    previous = cpu.mode()
    try:
        # What the user's runs use (K2_CPU_KERNEL may name a variant), or the best variant where that is "exact".
        kernel = result["kernel"] = cpu.select("auto" if previous == "exact" else previous)
        if not result["kernel_modules_on_cpu"]:
            return result | {"compared": False, "ok": True,
                             "verdict": f"{loaded.folder} holds no INT4 or int8 weights on the CPU, the only weights "
                                        "the CPU kernels compute with: nothing to compare"}
        if kernel == "exact":
            return result | {"compared": False, "ok": True,
                             "verdict": "no CPU kernel could be built on this machine, so k2 computes with the exact "
                                        "path: nothing to compare"}
        context = loaded.context()
        if settings.tokens + DECODE_STEPS > context:
            raise K2Error(f"--tokens {settings.tokens} plus {DECODE_STEPS} decode steps exceed the model's context "
                          f"of {context}")
        prompts = make_prompts(loaded, settings)
        exact, fast, fed = [], [], []
        cpu.select("exact")
        start = time.perf_counter()
        for prompt in prompts:
            logits, ids = teacher_forced_logits(model, prompt, None)
            exact.append(logits)
            fed.append(ids)
        exact_s = time.perf_counter() - start
        cpu.select(kernel)
        start = time.perf_counter()
        fast = [teacher_forced_logits(model, prompt, ids)[0] for prompt, ids in zip(prompts, fed)]
        fast_s = time.perf_counter() - start
        result |= {"kernel_detail": cpu.describe(), "compared": True, "prompts": settings.prompts,
                   "tokens": settings.tokens, "decode_steps": DECODE_STEPS, **compare_logits(exact, fast),
                   "exact_s": exact_s, "fast_s": fast_s,
                   "limits": {"kl_mean": KL_LIMIT, "top1_agreement": AGREEMENT_LIMIT}}
        result["ok"], result["verdict"] = _verdict(result)
        return result
    finally:
        cpu.select(previous)
