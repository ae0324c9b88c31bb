"""GGML encodings of weight rows: gguf-py's quantizers and dequantizers for float weights, and INT4 copied into Q4_0
(and Q4_0 back into INT4) without rounding.

Q4_0 stores 32 weights as an fp16 scale `d` and 32 nibbles `n`, `w = d * (n - 8)`; byte j of a block holds element j
in its low nibble and element j + 16 in its high one. compressed-tensors' symmetric INT4 stores `w = scale * q`, q in
[-8, 7] (K2-Thinking's weights lie on [-7, 7]), one bf16 scale per group. A group of 32 (or a multiple of 32) is one
or more Q4_0 blocks with that scale and `n = q + 8`: the same numbers, wherever fp16 holds the scale exactly.
"""
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from quant import int4

Q = gguf.GGMLQuantizationType
Q4_0_BLOCK, Q4_0_BYTES = gguf.GGML_QUANT_SIZES[Q.Q4_0]  # 32 weights in 18 bytes
Q4_0_OFFSET = 8  # n = q + 8, the same offset-binary nibble compressed-tensors stores
# The encodings a GGUF tensor is read from: gguf-py's dequantizers (llama.cpp's reference code in numpy).
READABLE = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
                      Q.Q6_K})


def block_size(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def nbytes(qtype: Q, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `shape` (numpy order, rows last) in `qtype`."""
    size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (shape[-1] // size) * type_size


def byte_shape(qtype: Q, shape: tuple[int, ...]) -> tuple[int, ...]:
    return gguf.quant_shape_to_byte_shape(shape, qtype)


def encode(rows: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 [rows, cols] -> uint8 [rows, row bytes], by gguf-py's reference quantizer for `qtype`."""
    return np.ascontiguousarray(gguf.quants.quantize(rows.astype(np.float32, copy=False), qtype)).view(np.uint8)


def decode(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 rows as stored -> float32 of `shape` (numpy order), by gguf-py's dequantizer for `qtype`."""
    return gguf.quants.dequantize(data, qtype).reshape(shape)


def int4_groups(in_features: int, n_groups: int) -> int | None:
    """The group size of an INT4 weight whose groups map onto whole Q4_0 blocks, else None."""
    if in_features % n_groups or (in_features // n_groups) % Q4_0_BLOCK:
        return None
    return in_features // n_groups


@dataclass
class ScaleReport:
    """INT4 groups copied into Q4_0, and those whose bf16 scale fp16 cannot hold (out of range, or too precise)."""

    groups: int = 0
    inexact: int = 0
    max_weight_error: float = 0.0  # largest |Q4_0 weight - INT4 weight| over the inexact groups

    def add(self, other: "ScaleReport"):
        self.groups += other.groups
        self.inexact += other.inexact
        self.max_weight_error = max(self.max_weight_error, other.max_weight_error)


def int4_to_q4_0(packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> tuple[np.ndarray, ScaleReport]:
    """INT4 rows (packed int32 [rows, in / 8], bf16 scale [rows, groups]) -> Q4_0 rows uint8 [rows, in / 32 * 18]."""
    rows, n_groups = scale.shape
    group = int4_groups(in_features, n_groups)
    assert group is not None, (in_features, n_groups)
    n_blocks = in_features // Q4_0_BLOCK
    q = int4.unpack(packed, in_features)  # int8 [rows, in]
    scale32 = scale.float()
    fp16_max = torch.finfo(torch.float16).max
    d16 = scale32.clamp(-fp16_max, fp16_max).to(torch.float16)  # saturated, never inf: an inf scale makes NaNs
    inexact = d16.float() != scale32  # [rows, groups]
    report = ScaleReport(groups=scale.numel(), inexact=int(inexact.sum()))
    if report.inexact:
        # Each weight moves by q * (d16 - scale); the group's largest |q| bounds it.
        q_max = q.view(rows, n_groups, group).abs().amax(dim=-1).float()
        report.max_weight_error = float(((d16.float() - scale32).abs() * q_max)[inexact].max())
    nibbles = (q + Q4_0_OFFSET).view(torch.uint8).view(rows, n_blocks, 2, Q4_0_BLOCK // 2)
    packed_nibbles = nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)  # [rows, blocks, 16]
    d_blocks = d16.repeat_interleave(group // Q4_0_BLOCK, dim=1).numpy().astype("<f2")  # GGUF is little-endian
    d_bytes = torch.from_numpy(d_blocks.view(np.uint8).reshape(rows, n_blocks, 2))
    blocks = torch.cat([d_bytes, packed_nibbles], dim=-1)  # [rows, blocks, 18]
    return blocks.reshape(rows, n_blocks * Q4_0_BYTES).numpy(), report


def q4_0_to_int4(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 rows uint8 [rows, in / 32 * 18] -> INT4 packed int32 [rows, in / 8] and fp16 scale [rows, in / 32]: the
    same weights, group 32 (`w = d * (n - 8)` is `scale * q`); the fp16 scales are kept as they are, exactly."""
    rows = data.shape[0]
    blocks = torch.from_numpy(data).view(rows, -1, Q4_0_BYTES)  # [rows, blocks, 18]
    scale = blocks[:, :, :2].contiguous().view(torch.float16).view(rows, -1)
    nibbles = blocks[:, :, 2:]  # [rows, blocks, 16]: element j low, element j + 16 high
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).view(torch.int8) - Q4_0_OFFSET  # [rows, blocks, 32]
    return int4.pack(q.view(rows, -1)), scale
