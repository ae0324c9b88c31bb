"""Our runtime and a transformers reference run side by side on the same prompts: prefill into slots of our cache,
then decode steps, against transformers with its DynamicCache (and left padding for a batch of unequal prompts).

The metric is rel = max|ours - ref| / max|ref| over the compared logits.
"""
import torch
from transformers import DynamicCache

TOL = 1e-4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: rel {err:.3e} > {tol:.0e}"


def random_ids(vocab_size: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def run_ours(model, prompts: list[list[int]], steps: torch.Tensor) -> list:
    """Prefill each prompt into its own slot of one cache, then feed `steps` [B, n] to all slots together,
    one token at a time. Returns the prefill logits of each prompt ([T_b, V] each), then one [B, V] per step (T == 1:
    the decode path, e.g. absorbed MLA)."""
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + steps.shape[1])
    logits = [[model(torch.tensor([p]), cache.rows(b))[0] for b, p in enumerate(prompts)]]
    logits += [model(steps[:, i:i + 1], cache)[:, -1] for i in range(steps.shape[1])]
    assert cache.lengths.tolist() == [len(p) + steps.shape[1] for p in prompts]
    return logits


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (tokens [B, T_max] left-padded with 0, pad lengths [B]): transformers' way."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt)
    return tokens, torch.tensor([width - len(p) for p in prompts])


@torch.inference_mode()
def run_ref(ref, prompt: torch.Tensor, steps: torch.Tensor, pad: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The same as `run_ours` in transformers: DynamicCache, attention mask 0 on left padding, positions from it."""
    pad = torch.zeros(prompt.shape[0], dtype=torch.long) if pad is None else pad
    mask = (torch.arange(prompt.shape[1]) >= pad[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=ref.config)
    out = ref(input_ids=prompt, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    logits = [out.logits]
    for i in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        out = ref(input_ids=steps[:, i:i + 1], attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True)
        logits.append(out.logits[:, -1])
    return logits
