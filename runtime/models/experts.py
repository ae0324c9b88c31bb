"""Routed experts held as stacked SwiGLU weights, and the grouped loop that runs them: shared by every MoE family.

`Experts` is the plain form of the routed-experts interface (runtime/models/family.py `RoutedExperts`); the packed
INT4 experts (runtime/int4.py) and the fused kernels' layouts (runtime/kernels/fused_moe.py) run the same
`grouped_experts` loop over their own weights.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """One layer's routed experts, stacked [E, out, in]; checkpoint tensor `experts.{e}.{proj}.weight` is slice e."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    @property
    def n_experts(self) -> int:
        return self.gate_proj.shape[0]

    def select(self, ids: list[int], device: torch.device | str) -> "Experts":
        """Experts `ids`, renumbered 0..len(ids)-1, copied to `device`: a placement splits a layer's experts so."""
        part = Experts.__new__(Experts)
        nn.Module.__init__(part)
        index = torch.tensor(ids, device=self.gate_proj.device)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(part, name, nn.Parameter(getattr(self, name).index_select(0, index).to(device), requires_grad=False))
        return part

    def load_slot(self, slot: int, source: "Experts", expert: int):
        """Overwrite expert `slot` with `source`'s expert `expert` (an expert cache refills itself so)."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self, name).data[slot].copy_(getattr(source, name).data[expert], non_blocking=True)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, dim], weights and ids [N, k] -> sum_k weights * expert_k(x). Ids < 0 are skipped: those slots'
        experts live elsewhere (see runtime/offload.py)."""
        return grouped_experts(x, weights, ids, self.n_experts, self.expert_weights)

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate_proj[e], self.up_proj[e], self.down_proj[e]


def grouped_experts(x, weights, ids, n_experts: int, expert_weights) -> torch.Tensor:
    """Routed experts with the (token, slot) pairs sorted by expert: each expert runs its rows as one contiguous
    slice, so its matmuls batch its tokens (prefill) and no per-expert search or scatter runs (decode).
    `expert_weights(e)` gives expert e's (gate, up, down) [out, in] matrices; ids < 0 are skipped."""
    if ids.shape[0] == 1:
        return _one_token_experts(x, weights, ids, expert_weights)
    k = ids.shape[1]
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat + 1, minlength=n_experts + 1).tolist()  # the one host sync; [0]: skipped slots
    pairs = order[counts[0]:]
    token = pairs // k
    xs = x[token]  # [pairs, dim], grouped by expert
    outs, start = [], 0
    for e, n in enumerate(counts[1:]):
        if n:
            gate, up, down = expert_weights(e)
            xe = xs[start:start + n]
            outs.append(F.linear(F.silu(F.linear(xe, gate)) * F.linear(xe, up), down))
            start += n
    y = torch.zeros_like(x)
    if not outs:
        return y
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return y.index_add_(0, token, (out * weights.flatten()[pairs, None]).to(y.dtype))


def _one_token_experts(x, weights, ids, expert_weights) -> torch.Tensor:
    """One token (decode at batch 1): its k experts in turn, mixed by one matmul with the routing weights."""
    outs, kept = [], []
    for slot, e in enumerate(ids[0].tolist()):  # the one host sync
        if e >= 0:
            gate, up, down = expert_weights(e)
            outs.append(F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down))
            kept.append(slot)
    if not outs:
        return torch.zeros_like(x)
    mix = weights[:, kept] if len(kept) < ids.shape[1] else weights
    return (mix @ torch.cat(outs).to(weights.dtype)).to(x.dtype)
