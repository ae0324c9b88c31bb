"""FP8 (e4m3) block quantization as DeepSeek-V3 and Kimi K2-Instruct store it.

`W[m, n] = fp8[m, n] * scale_inv[m // B0, n // B1]`, with `scale_inv` float32 `[ceil(out / B0), ceil(in / B1)]`.
"""
import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)


def _expand(scale_inv: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    return scale_inv.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block=DEFAULT_BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    assert weight.dim() == 2 and weight.dtype == torch.float8_e4m3fn, (weight.shape, weight.dtype)
    expected = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
    assert tuple(scale_inv.shape) == expected, f"scale_inv {tuple(scale_inv.shape)} != {expected} for {tuple(weight.shape)}"
    return (weight.float() * _expand(scale_inv.float(), weight.shape, block)).to(dtype)


def quantize_fp8_block(weight: torch.Tensor, block=DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (fp8 weight, float32 scale_inv): each block's absmax maps to the largest fp8 value."""
    assert weight.dim() == 2, weight.shape
    rows, cols = weight.shape
    padded = torch.zeros(-(-rows // block[0]) * block[0], -(-cols // block[1]) * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
    scale_inv = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    quantized = (weight.float() / _expand(scale_inv, weight.shape, block)).clamp(-FP8_MAX, FP8_MAX)
    return quantized.to(torch.float8_e4m3fn), scale_inv
