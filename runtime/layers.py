"""Blocks shared by the architectures: RMSNorm, RoPE (YaRN, llama3 and linear scaling; interleaved and rotate-half
pairs), the SwiGLU MLP, sigmoid and softmax top-k routing."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config_schema import rope_type


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the same math in one call
        # Normalize in fp32, scale in the input dtype (as the reference does, so bf16 runs round alike).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense MLPs, routed experts and shared experts are all this."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] and the cos/sin magnitude for `rope_scaling` of config.json, as transformers
    computes them: default, linear, llama3 or yarn (the config schema refuses the other types)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    kind = rope_type(scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling), 1.0
    if kind != "yarn":
        return inv_freq, 1.0
    factor = scaling["factor"]
    original_len = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for the fast (high-frequency) dims kept as trained, 0 for the interpolated ones
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate

    magnitude = scaling.get("attention_factor")
    if magnitude is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            magnitude = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            magnitude = yarn_mscale(factor)
    return inv_freq, magnitude


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths longer than the original context / low_freq_factor are divided by `factor`,
    those shorter than it / high_freq_factor are kept, and the band between is interpolated smoothly."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original_len / wavelen - low) / (high - low)).clamp(0, 1)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > original_len / low, inv_freq / factor,
                       torch.where(wavelen < original_len / high, inv_freq, scaled))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, magnitude: float):
    """cos, sin [*positions.shape, dim // 2] in fp32 for integer positions of any shape."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    return angles.cos() * magnitude, angles.sin() * magnitude


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... (GPT-J / DeepSeek layout).

    The result is returned de-interleaved (all first elements, then all second elements): queries and keys are
    permuted alike, so their dot products are unchanged and no re-interleaving copy is needed.
    x: [..., T, heads, dim]; cos, sin: [..., T, dim // 2].
    """
    cos, sin = cos.to(x.dtype).unsqueeze(-2), sin.to(x.dtype).unsqueeze(-2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + dim/2}) (GPT-NeoX / Llama / Qwen layout, transformers' rotate_half).
    x: [..., T, heads, dim]; cos, sin: [..., T, dim // 2]."""
    cos, sin = cos.to(x.dtype).unsqueeze(-2), sin.to(x.dtype).unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def route_softmax_topk(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE / Mixtral routing. logits [N, E] -> (weights [N, k] fp32, expert ids [N, k]): softmax over all
    experts, the top k, renormalized to sum to one when `normalize`."""
    weights, ids = logits.float().softmax(dim=-1).topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def route_sigmoid_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / Kimi K2 routing. logits [N, E] fp32 -> (weights [N, k], expert ids [N, k]).

    Experts are *selected* by sigmoid score + correction bias (within the best `topk_group` groups when
    n_group > 1), but *weighted* by the unbiased sigmoid score.
    """
    scores = logits.sigmoid()
    biased = scores + correction_bias
    if n_group > 1:
        grouped = biased.view(biased.shape[0], n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, n_group]
        keep_groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
        biased = biased.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    ids = biased.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids
