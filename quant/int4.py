"""INT4 symmetric group quantization in compressed-tensors' `pack-quantized` layout (Kimi K2-Thinking's format).

`W[r, c] = q[r, c] * scale[r, c // group]`, no zero point. `q` is stored offset-binary (`q + 8`, 0..15) in int32
words, eight per word, element `8j + i` of a row in bits `[4i, 4i + 3]` of word `j` (low nibble first).
Everything here is a pure function of tensors; reading and writing checkpoints lives in runtime/convert/quantize.py.
"""
import math
import sys
from dataclasses import dataclass

import torch

from quant.errors import K2Error

BITS = 4
PER_WORD = 32 // BITS  # nibbles in one int32 word
OFFSET = 1 << (BITS - 1)  # offset-binary: stored nibble = q + 8
GROUP_SIZES = (16, 32, 64, 128)
DEFAULT_GROUP_SIZE = 32
SCALE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Grid:
    """Integer levels [qmin, qmax] and the divisor that maps a group's absmax onto them (`scale = absmax / divisor`)."""

    name: str
    qmin: int
    qmax: int
    divisor: float


GRIDS = {
    # Kimi K2-Thinking's quantization-aware training grid: symmetric, -8 unused, so QAT weights re-quantize losslessly.
    "k2": Grid("k2", -7, 7, 7.0),
    # compressed-tensors' `minmax` observer: the full signed range, absmax lands half a step outside it.
    "ct": Grid("ct", -8, 7, 7.5),
}
DEFAULT_GRID = "k2"


@dataclass(frozen=True)
class TensorSpec:
    suffix: str  # appended to the linear's module name, e.g. `model.layers.5.mlp.experts.17.gate_proj`
    dtype: str  # safetensors dtype
    torch_dtype: torch.dtype


# The format as data: the tensors that replace one linear's `weight`. Shapes are given by `stored_shapes`.
FORMAT = (
    TensorSpec("weight_packed", "I32", torch.int32),  # [out, ceil(in / 8)]
    TensorSpec("weight_scale", "BF16", SCALE_DTYPE),  # [out, ceil(in / group)]
    TensorSpec("weight_shape", "I64", torch.int64),  # [2] = (out, in); K2-Thinking may use I32: read values, not dtype
)


def compressed_tensors_config(group_size: int, observer: str, ignore: list[str],
                              actorder: str | None = None) -> dict:
    """config.json's `quantization_config`, key for key as Kimi K2-Thinking ships it (what vLLM and SGLang read).

    `actorder` is "weight" for GPTQ in act order (compressed-tensors' name for an order that changed how the integers
    were chosen but not the stored groups, so readers need no `g_idx`), else None as in K2-Thinking's."""
    weights = {"num_bits": BITS, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
               "dynamic": False, "actorder": actorder, "block_structure": None, "observer": observer,
               "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                          "weights": weights}},
            "ignore": list(ignore), "kv_cache_scheme": None}


def group_size_of(quant_config: dict) -> int:
    """The group size of a compressed-tensors config, after checking it describes weights this module can read."""
    groups = quant_config.get("config_groups") or {}
    schemes = [g.get("weights") or {} for g in groups.values()]
    if quant_config.get("format") != "pack-quantized" or len(schemes) != 1:
        raise K2Error(f"compressed-tensors checkpoints are read in the pack-quantized format with one config group "
                      f"(got format {quant_config.get('format')!r}, {len(schemes)} group(s))")
    w = schemes[0]
    if (w.get("num_bits"), w.get("type"), w.get("symmetric"), w.get("strategy")) != (BITS, "int", True, "group"):
        raise K2Error(f"only symmetric int4 group quantization is supported, not {w.get('type')}{w.get('num_bits')} "
                      f"{'symmetric' if w.get('symmetric') else 'asymmetric'} {w.get('strategy')}")
    if not isinstance(w.get("group_size"), int) or w["group_size"] <= 0:
        raise K2Error(f"invalid group_size {w.get('group_size')!r} in quantization_config")
    return w["group_size"]


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def stored_shapes(out_features: int, in_features: int, group_size: int) -> dict[str, tuple[int, ...]]:
    return {"weight_packed": (out_features, -(-in_features // PER_WORD)),
            "weight_scale": (out_features, n_groups(in_features, group_size)),
            "weight_shape": (2,)}


def stored_nbytes(out_features: int, in_features: int, group_size: int) -> dict[str, int]:
    shapes = stored_shapes(out_features, in_features, group_size)
    return {spec.suffix: math.prod(shapes[spec.suffix]) * spec.torch_dtype.itemsize for spec in FORMAT}


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, in] -> float32 [rows, groups, group_size], zero-padded past `in` (zeros change no absmax)."""
    assert w.dim() == 2, w.shape
    rows, cols = w.shape
    groups = n_groups(cols, group_size)
    if groups * group_size != cols:
        w = torch.nn.functional.pad(w.float(), (0, groups * group_size - cols))
    return w.float().reshape(rows, groups, group_size)


def absmax_scale(w_groups: torch.Tensor, grid: Grid, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The stored (BF16) scale of each group: its absmax, shrunk by `clip`, over the grid's divisor. [rows, groups]"""
    return (w_groups.abs().amax(dim=-1) * clip / grid.divisor).to(SCALE_DTYPE)


def quantize_groups(w_groups: torch.Tensor, scale: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round each value to its group's grid: int8 [rows, groups, group_size]. Zero-scale groups quantize to 0.

    Divides by the BF16 scale as stored, so dequantizing what was written reproduces exactly what was rounded.
    """
    assert scale.shape == w_groups.shape[:-1], (scale.shape, w_groups.shape)
    s = scale.float().unsqueeze(-1)
    q = torch.div(w_groups, torch.where(s == 0, 1.0, s)).round_().clamp_(grid.qmin, grid.qmax)
    return q.to(torch.int8)


def dequantize_groups(q_groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [rows, groups, group_size] x scale [rows, groups] -> float32 [rows, groups, group_size]."""
    return q_groups.float() * scale.float().unsqueeze(-1)


def ungroup(x_groups: torch.Tensor, in_features: int) -> torch.Tensor:
    """[rows, groups, group_size] -> [rows, in_features], dropping the padding of the last group."""
    return x_groups.reshape(x_groups.shape[0], -1)[:, :in_features]


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, in] in [-8, 7] -> int32 [rows, ceil(in / 8)]; padding nibbles are 0, as compressed-tensors pads."""
    assert q.dim() == 2 and q.dtype == torch.int8, (q.shape, q.dtype)
    rows, cols = q.shape
    words = -(-cols // PER_WORD)
    if cols == words * PER_WORD:
        nibbles = (q + OFFSET).view(torch.uint8)
    else:
        nibbles = torch.zeros(rows, words * PER_WORD, dtype=torch.uint8)
        nibbles[:, :cols] = (q + OFFSET).view(torch.uint8)
    if sys.byteorder == "little":
        # Each little-endian int16 holds elements (2k, 2k+1) as u0 + 256 u1; its low byte after `x | x >> 4` is
        # u0 | u1 << 4: two nibbles per byte, the even element low, so four bytes make a word "low nibble first".
        pairs = nibbles.view(torch.int16)
        return (pairs | (pairs >> 4)).to(torch.uint8).view(torch.int32)
    packed_bytes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return _bytes_as_words(packed_bytes.contiguous())


def unpack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [..., rows, words] -> int8 [..., rows, in_features] in [-8, 7]."""
    assert packed.dtype == torch.int32 and packed.shape[-1] * PER_WORD >= in_features, (packed.shape, in_features)
    packed_bytes = _words_as_bytes(packed.contiguous())
    nibbles = torch.stack((packed_bytes & 0xF, packed_bytes >> 4), dim=-1).flatten(-2)
    return (nibbles[..., :in_features].to(torch.int8) - OFFSET)


def _bytes_as_words(packed_bytes: torch.Tensor) -> torch.Tensor:
    if sys.byteorder == "big":
        packed_bytes = packed_bytes.view(*packed_bytes.shape[:-1], -1, 4).flip(-1).flatten(-2).contiguous()
    return packed_bytes.view(torch.int32)


def _words_as_bytes(packed: torch.Tensor) -> torch.Tensor:
    packed_bytes = packed.view(torch.uint8)
    if sys.byteorder == "big":
        packed_bytes = packed_bytes.view(*packed_bytes.shape[:-1], -1, 4).flip(-1).flatten(-2)
    return packed_bytes


def dequantize(packed: torch.Tensor, scale: torch.Tensor, in_features: int, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored tensors -> weight [..., out, in]: what every consumer of the checkpoint computes."""
    q = unpack(packed, in_features)
    groups = n_groups(in_features, group_size)
    assert scale.shape == (*packed.shape[:-1], groups), (scale.shape, packed.shape, in_features, group_size)
    pad = groups * group_size - in_features
    q = torch.nn.functional.pad(q, (0, pad)) if pad else q
    w = q.view(*q.shape[:-1], groups, group_size).to(dtype) * scale.to(dtype).unsqueeze(-1)
    return w.flatten(-2)[..., :in_features]


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized weight. Backward: the gradient passes unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, group_size: int, grid: Grid) -> torch.Tensor:
        w_groups = grouped(w.detach(), group_size)
        scale = absmax_scale(w_groups, grid)
        dq = dequantize_groups(quantize_groups(w_groups, scale, grid), scale)
        return ungroup(dq, w.shape[1]).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quant_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, grid: str = DEFAULT_GRID) -> torch.Tensor:
    """W -> dequantize(quantize(W)) on the same grid and rounding the packer uses, with a straight-through gradient.

    For quantization-aware training, and to make weights that lie exactly on the grid.
    """
    assert w.dim() == 2, w.shape
    assert group_size in GROUP_SIZES, group_size
    return _StraightThrough.apply(w, group_size, GRIDS[grid])
