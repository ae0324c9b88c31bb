"""Fused routed experts for decode: one launch computes every selected expert's gate and up projections with the
SiLU product, one launch the down projections, for BF16/FP16 weights and for INT4 weights.
Dimensions are compile-time constants: a model has a handful of shapes, and fixed trip counts unroll.

Decode reads each selected expert once per (token, slot) pair, so the two launches are bandwidth-bound GEMVs: a
program owns one pair and BLOCK_N output rows and walks the input dimension. Ids < 0 are skipped (the experts
protocol of runtime/offload.py) and there is no host sync, so a CUDA graph can capture a decode step.
INT4 weights are repacked once at load from K2's row layout into tiles of BLOCK_N rows x BLOCK_K columns stored
contiguously (packed words, then the tile's scales), so every load of a program is one contiguous chunk.
Prefill (many tokens per expert) uses grouped matmuls instead: tokens sorted by expert, one matmul per expert.
"""
import torch
import torch.nn.functional as F
from torch import nn

from quant import int4
from runtime.kernels import say_once, triton_missing_reason, triton_runs_on
from runtime.models.experts import grouped_experts

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# A step with more tokens than this reads an expert's weights once per token in the decode kernels; grouped
# matmuls read them once per expert, which wins as soon as several tokens share an expert.
FUSED_MAX_TOKENS = 8
BLOCK_N = 32  # output rows per program: the INT4 tile height, and the BF16 kernels' block
INT4_BLOCK_KS = (256, 128, 64, 32)  # INT4 tile widths tried, widest first; one must divide the input dimension


# ---------------------------------------------------------------------------------------------------------------
# the math, in torch: the CPU's path, a GPU's without Triton, and what the kernels are tested against


def fused_moe_torch(x, weights, ids, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """x [N, dim], weights and ids [N, k], experts [E, out, in] -> [N, dim]: the selected experts gathered and run
    as batched matmuls. Fixed shapes and no host sync (capturable), at the cost of copying the selected weights."""
    flat = ids.clamp(min=0).flatten()
    return _per_pair_moe(x, weights, ids, gate_proj[flat], up_proj[flat], down_proj[flat])


def _per_pair_moe(x, weights, ids, gate, up, down) -> torch.Tensor:
    """Weights already gathered per (token, slot) pair: gate and up [N*k, hidden, dim], down [N*k, dim, hidden]."""
    N, k = ids.shape
    xk = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N*k, dim, 1]
    h = F.silu(torch.bmm(gate, xk)) * torch.bmm(up, xk)  # [N*k, hidden, 1]
    out = torch.bmm(down, h).view(N, k, -1)
    return (out * (weights * (ids >= 0)).unsqueeze(-1)).sum(1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# BF16 / FP16 kernels

if triton is not None:

    @triton.jit
    def _gate_up_kernel(x_ptr, ids_ptr, gate_ptr, up_ptr, act_ptr,
                        dim: tl.constexpr, hidden: tl.constexpr, top_k: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pair = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < hidden
        expert = tl.load(ids_ptr + pair)
        token = pair // top_k
        acc_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
        if expert >= 0:
            base = expert.to(tl.int64) * hidden * dim
            for k0 in range(0, dim, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_ok = cols < dim
                xk = tl.load(x_ptr + token * dim + cols, mask=col_ok, other=0.0).to(tl.float32)
                offsets = base + rows[:, None] * dim + cols[None, :]
                ok = row_ok[:, None] & col_ok[None, :]
                gate = tl.load(gate_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
                up = tl.load(up_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
                acc_gate += tl.sum(gate * xk[None, :], axis=1)
                acc_up += tl.sum(up * xk[None, :], axis=1)
        act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        tl.store(act_ptr + pair * hidden + rows, act, mask=row_ok)

    @triton.jit
    def _down_kernel(act_ptr, ids_ptr, weights_ptr, down_ptr, out_ptr, dim: tl.constexpr, hidden: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pair = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < dim
        expert = tl.load(ids_ptr + pair)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        if expert >= 0:
            base = expert.to(tl.int64) * dim * hidden
            for k0 in range(0, hidden, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_ok = cols < hidden
                act = tl.load(act_ptr + pair * hidden + cols, mask=col_ok, other=0.0)
                w = tl.load(down_ptr + base + rows[:, None] * hidden + cols[None, :],
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * act[None, :], axis=1)
            acc = acc * tl.load(weights_ptr + pair).to(tl.float32)
        tl.store(out_ptr + pair * dim + rows, acc, mask=row_ok)


def fused_moe_triton(x, weights, ids, gate_proj, up_proj, down_proj, block_k: int = 128) -> torch.Tensor:
    """`fused_moe_torch` in two Triton launches, reading the selected experts where they lie."""
    N, k = ids.shape
    E, hidden, dim = gate_proj.shape
    x, ids, weights = x.contiguous(), ids.flatten().to(torch.int32).contiguous(), weights.flatten().contiguous()
    act = torch.empty(N * k, hidden, dtype=torch.float32, device=x.device)
    out = torch.empty(N * k, dim, dtype=torch.float32, device=x.device)
    _gate_up_kernel[(N * k, triton.cdiv(hidden, BLOCK_N))](x, ids, gate_proj, up_proj, act, dim, hidden, k,
                                                          BLOCK_N=BLOCK_N, BLOCK_K=block_k)
    _down_kernel[(N * k, triton.cdiv(dim, BLOCK_N))](act, ids, weights, down_proj, out, dim, hidden,
                                                    BLOCK_N=BLOCK_N, BLOCK_K=block_k)
    return out.view(N, k, dim).sum(1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# INT4: K2's layout -> tiles, and the kernels that read them


def int4_block_k(in_features: int, group_size: int) -> int | None:
    """The widest tile width that divides the input dimension into whole groups and whole words, or None."""
    for block_k in INT4_BLOCK_KS:
        if in_features % block_k == 0 and block_k % group_size == 0 and block_k % int4.PER_WORD == 0:
            return block_k
    return None


def repack_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int, block_k: int):
    """K2 rows (packed [E, out, in/8] int32, scale [E, out, in/group]) -> tiles: packed [E, out/BN, in/BK, BN, BK/8]
    and scale [E, out/BN, in/BK, BN, BK/group], each tile contiguous. Nibble order and offset stay K2's."""
    E, out, words = packed.shape
    assert out % BLOCK_N == 0 and (words * int4.PER_WORD) % block_k == 0, (packed.shape, block_k)
    n_tiles, k_tiles = out // BLOCK_N, words * int4.PER_WORD // block_k
    tiles = packed.view(E, n_tiles, BLOCK_N, k_tiles, block_k // int4.PER_WORD).transpose(2, 3).contiguous()
    scales = scale.view(E, n_tiles, BLOCK_N, k_tiles, block_k // group_size).transpose(2, 3).contiguous()
    return tiles, scales


def unpack_tiles(tiles: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tiles [..., out/BN, in/BK, BN, BK/8] and their scales -> dense weights [..., out, in]: the torch path."""
    *lead, n_tiles, k_tiles, block_n, words = tiles.shape
    q = int4.unpack(tiles.reshape(-1, words), words * int4.PER_WORD).to(dtype)  # [all tile rows, BK]
    groups = scales.shape[-1]
    w = q.view(-1, groups, q.shape[-1] // groups) * scales.reshape(-1, groups, 1).to(dtype)
    w = w.view(*lead, n_tiles, k_tiles, block_n, -1).transpose(-3, -2)
    return w.reshape(*lead, n_tiles * block_n, -1)


def fused_moe_int4_torch(x, weights, ids, gate, up, down) -> torch.Tensor:
    """`fused_moe_torch` on tiles ((tiles, scales) pairs): the selected experts gathered and dequantized, sync-free."""
    flat = ids.clamp(min=0).flatten()
    return _per_pair_moe(x, weights, ids, *(unpack_tiles(tiles[flat], scales[flat], x.dtype) for tiles, scales in (gate, up, down)))


if triton is not None:

    @triton.jit
    def _int4_tile_dot(tiles_ptr, scales_ptr, tile, xk,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        """One tile [BLOCK_N, BLOCK_K] times xk [BLOCK_K] -> [BLOCK_N] in fp32."""
        WORDS: tl.constexpr = BLOCK_K // 8
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        words = tl.load(tiles_ptr + tile * (BLOCK_N * WORDS)
                        + tl.arange(0, BLOCK_N)[:, None] * WORDS + tl.arange(0, WORDS)[None, :])
        shifts = tl.arange(0, 8) * 4
        # Element 8j + i of a row is nibble i (low first) of word j, stored as q + 8.
        q = ((words[:, :, None] >> shifts[None, None, :]) & 0xF) - 8
        q = tl.reshape(q, (BLOCK_N, BLOCK_K)).to(tl.float32)
        partial = tl.sum(tl.reshape(q * xk[None, :], (BLOCK_N, GROUPS, GROUP)), axis=2)  # [BLOCK_N, GROUPS]
        scale = tl.load(scales_ptr + tile * (BLOCK_N * GROUPS)
                        + tl.arange(0, BLOCK_N)[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]).to(tl.float32)
        return tl.sum(partial * scale, axis=1)

    @triton.jit
    def _int4_gate_up_kernel(x_ptr, ids_ptr, gate_ptr, gate_scale_ptr, up_ptr, up_scale_ptr, act_ptr,
                             dim: tl.constexpr, hidden: tl.constexpr, top_k: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        pair = tl.program_id(0)
        n_tile = tl.program_id(1)
        n_tiles = hidden // BLOCK_N
        k_tiles = dim // BLOCK_K
        expert = tl.load(ids_ptr + pair)
        token = pair // top_k
        acc_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
        if expert >= 0:
            first = (expert.to(tl.int64) * n_tiles + n_tile) * k_tiles
            for k0 in range(0, dim, BLOCK_K):
                xk = tl.load(x_ptr + token * dim + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
                acc_gate += _int4_tile_dot(gate_ptr, gate_scale_ptr, first + k0 // BLOCK_K, xk, BLOCK_N, BLOCK_K, GROUP)
                acc_up += _int4_tile_dot(up_ptr, up_scale_ptr, first + k0 // BLOCK_K, xk, BLOCK_N, BLOCK_K, GROUP)
        act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        tl.store(act_ptr + pair * hidden + n_tile * BLOCK_N + tl.arange(0, BLOCK_N), act)

    @triton.jit
    def _int4_down_kernel(act_ptr, ids_ptr, weights_ptr, down_ptr, down_scale_ptr, out_ptr,
                          dim: tl.constexpr, hidden: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        pair = tl.program_id(0)
        n_tile = tl.program_id(1)
        n_tiles = dim // BLOCK_N
        k_tiles = hidden // BLOCK_K
        expert = tl.load(ids_ptr + pair)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        if expert >= 0:
            first = (expert.to(tl.int64) * n_tiles + n_tile) * k_tiles
            for k0 in range(0, hidden, BLOCK_K):
                act = tl.load(act_ptr + pair * hidden + k0 + tl.arange(0, BLOCK_K))
                acc += _int4_tile_dot(down_ptr, down_scale_ptr, first + k0 // BLOCK_K, act, BLOCK_N, BLOCK_K, GROUP)
            acc = acc * tl.load(weights_ptr + pair).to(tl.float32)
        tl.store(out_ptr + pair * dim + n_tile * BLOCK_N + tl.arange(0, BLOCK_N), acc)


def fused_moe_int4_triton(x, weights, ids, gate, up, down, group_size: int) -> torch.Tensor:
    """`gate`, `up`, `down`: (tiles, scales) pairs from `repack_int4`. Two launches, as `fused_moe_triton`."""
    N, k = ids.shape
    dim, hidden = x.shape[1], gate[0].shape[1] * BLOCK_N
    x, ids, weights = x.contiguous(), ids.flatten().to(torch.int32).contiguous(), weights.flatten().contiguous()
    act = torch.empty(N * k, hidden, dtype=torch.float32, device=x.device)
    out = torch.empty(N * k, dim, dtype=torch.float32, device=x.device)
    block_k_in, block_k_hidden = gate[0].shape[-1] * int4.PER_WORD, down[0].shape[-1] * int4.PER_WORD
    _int4_gate_up_kernel[(N * k, hidden // BLOCK_N)](x, ids, *gate, *up, act, dim, hidden, k, BLOCK_N=BLOCK_N,
                                                     BLOCK_K=block_k_in, GROUP=group_size)
    _int4_down_kernel[(N * k, dim // BLOCK_N)](act, ids, weights, *down, out, dim, hidden, BLOCK_N=BLOCK_N,
                                               BLOCK_K=block_k_hidden, GROUP=group_size)
    return out.view(N, k, dim).sum(1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# modules swapped in for a model's experts (runtime/fast_decode.py), with the experts protocol of runtime/offload.py


def _kernel_or_fallback(device: torch.device) -> bool:
    if triton_runs_on(device):
        return True
    say_once(f"fused MoE kernels unavailable ({triton_missing_reason() or 'tensors not on a CUDA device'}); "
             "decode computes the selected experts with batched torch matmuls")
    return False


class FusedExperts(nn.Module):
    """BF16/FP16 routed experts [E, out, in] (the model's `Experts` tensors, shared, not copied)."""

    def __init__(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (nn.Parameter(t, requires_grad=False)
                                                        for t in (gate_proj, up_proj, down_proj))

    @property
    def n_experts(self) -> int:
        return self.gate_proj.shape[0]

    def select(self, ids: list[int], device) -> "FusedExperts":
        index = torch.tensor(ids, device=self.gate_proj.device)
        return FusedExperts(*(t.index_select(0, index).to(device) for t in (self.gate_proj, self.up_proj, self.down_proj)))

    def load_slot(self, slot: int, source: "FusedExperts", expert: int):
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self, name).data[slot].copy_(getattr(source, name).data[expert], non_blocking=True)

    def expert_weights(self, e: int):
        return self.gate_proj[e], self.up_proj[e], self.down_proj[e]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > FUSED_MAX_TOKENS:
            return grouped_experts(x, weights, ids, self.n_experts, self.expert_weights)
        if _kernel_or_fallback(x.device):
            return fused_moe_triton(x, weights, ids, self.gate_proj, self.up_proj, self.down_proj)
        return fused_moe_torch(x, weights, ids, self.gate_proj, self.up_proj, self.down_proj)


class FusedInt4Experts(nn.Module):
    """INT4 routed experts in kernel tiles, repacked once from an `Int4Experts` (whose packed tensors are dropped)."""

    def __init__(self, tiles: dict[str, tuple[torch.Tensor, torch.Tensor]], group_size: int):
        super().__init__()
        self.group_size = group_size
        for name, (packed, scale) in tiles.items():
            self.register_buffer(f"{name}_tiles", packed)
            self.register_buffer(f"{name}_scales", scale)

    @classmethod
    def repack(cls, experts) -> "FusedInt4Experts | None":
        """From a loaded `runtime.int4.Int4Experts`; None when its dimensions admit no tiling."""
        group_size = experts.gate_proj.packed.shape[-1] * int4.PER_WORD // experts.gate_proj.scale.shape[-1]
        tiles = {}
        for name in ("gate_proj", "up_proj", "down_proj"):
            part = getattr(experts, name)
            block_k = int4_block_k(part.in_features, group_size)
            if block_k is None or part.packed.shape[1] % BLOCK_N or part.in_features % int4.PER_WORD:
                return None
            tiles[name] = repack_int4(part.packed, part.scale, group_size, block_k)
        return cls(tiles, group_size)

    def _pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_tiles"), getattr(self, f"{name}_scales")

    @property
    def n_experts(self) -> int:
        return self.gate_proj_tiles.shape[0]

    def select(self, ids: list[int], device) -> "FusedInt4Experts":
        index = torch.tensor(ids, device=self.gate_proj_tiles.device)
        tiles = {name: tuple(t.index_select(0, index).to(device) for t in self._pair(name))
                 for name in ("gate_proj", "up_proj", "down_proj")}
        return FusedInt4Experts(tiles, self.group_size)

    def load_slot(self, slot: int, source: "FusedInt4Experts", expert: int):
        for name, tensor in self.named_buffers():
            tensor[slot].copy_(source.get_buffer(name)[expert], non_blocking=True)

    def expert_weights(self, e: int, dtype: torch.dtype = torch.bfloat16):
        return tuple(unpack_tiles(*(t[e] for t in self._pair(name)), dtype) for name in ("gate_proj", "up_proj", "down_proj"))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > FUSED_MAX_TOKENS:
            return grouped_experts(x, weights, ids, self.n_experts, lambda e: self.expert_weights(e, x.dtype))
        parts = [self._pair(name) for name in ("gate_proj", "up_proj", "down_proj")]
        if _kernel_or_fallback(x.device):
            return fused_moe_int4_triton(x, weights, ids, *parts, group_size=self.group_size)
        return fused_moe_int4_torch(x, weights, ids, *parts)
