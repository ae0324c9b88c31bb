"""Generation over the latent cache: prompt ids in, new ids out (greedy, or sampled by runtime/sampling.py). Chat builds on top."""
from collections.abc import Iterator

import torch


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (tokens [B, T_max] left-padded, pad lengths [B])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt)
    return tokens, torch.tensor([width - len(p) for p in prompts])


@torch.inference_mode()
def greedy_steps(model, tokens: torch.Tensor, pad: torch.Tensor, max_new_tokens: int) -> Iterator[torch.Tensor]:
    """Yield the argmax next id of every row [B], one step at a time: one prefill, then one token per step."""
    tokens = tokens.to(model.device)
    cache = model.new_cache(tokens.shape[0], tokens.shape[1] + max_new_tokens, pad)
    logits = model(tokens, cache, last_only=True)
    for step in range(max_new_tokens):
        next_ids = logits[:, -1].argmax(dim=-1)
        yield next_ids
        if step + 1 < max_new_tokens:
            logits = model(next_ids[:, None], cache)


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, stop_ids=()) -> list[list[int]]:
    """New ids per prompt, each ending at (and including) its first stop id, or after `max_new_tokens`."""
    tokens, pad = left_pad(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for next_ids in greedy_steps(model, tokens, pad, max_new_tokens):
        for row, token in enumerate(next_ids.tolist()):
            if not finished[row]:
                outputs[row].append(token)
                finished[row] = token in stop_ids
        if all(finished):
            break
    return outputs


PREFILL_CHUNK = 2048  # prompt tokens per forward: bounds the per-head K/V a long prompt's prefill materializes


@torch.inference_mode()
def prefill(model, cache, ids: list[int]) -> torch.Tensor:
    """Append `ids` after what `cache` already holds; logits of the last one [1, V]."""
    if not ids:
        raise ValueError("prefill needs at least one token")
    tokens = torch.tensor([ids], device=model.device)
    for start in range(0, len(ids), PREFILL_CHUNK):
        logits = model(tokens[:, start:start + PREFILL_CHUNK], cache, last_only=True)
    return logits[:, -1]


@torch.inference_mode()
def sample_steps(model, cache, logits: torch.Tensor, sampler, max_new_tokens: int, stop_ids=()) -> Iterator[int]:
    """From the prefill's last logits [1, V], yield up to `max_new_tokens` ids, the last one a stop id if one came.
    Each id but the last is appended to the cache before the next is drawn, so the cache holds all but the last."""
    for step in range(max_new_tokens):
        next_id = sampler(logits)  # [1], still on the device
        token = int(next_id)  # the one host sync per token: the caller needs the id to print it and to stop
        yield token
        if token in stop_ids or step + 1 == max_new_tokens:
            return
        logits = model(next_id[:, None], cache)[:, -1]


def sample_generate(model, prompt: list[int], sampler, max_new_tokens: int, stop_ids=()) -> list[int]:
    """New ids for one prompt, sampled; ends at (and includes) the first stop id, or after `max_new_tokens`."""
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    sampler.observe(torch.tensor([prompt], device=model.device))
    return list(sample_steps(model, cache, prefill(model, cache, prompt), sampler, max_new_tokens, stop_ids))
