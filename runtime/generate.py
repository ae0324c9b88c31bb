"""Greedy generation over the latent cache: prompt ids in, new ids out. Sampling and chat build on top."""
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
