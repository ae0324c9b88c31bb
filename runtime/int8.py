"""int8 dense weights, quantized at load (`--int8`): what llama.cpp users get from Q8_0, for the CPU.

Every dense linear layer of a model on the CPU (attention, shared experts, dense MLPs, the output head; not the routed
experts, which are INT4 or stay as they are, and not the linears a model reads as matrices, such as MLA's kv_b_proj)
becomes an `Int8Linear`: int8 weights with one float32 scale per output row, absmax / 127, rounded half to even. That
halves what a BF16 model's dense layers read per token, and the CPU kernels (runtime/kernels/cpu_kernels.c) read the
int8 rows as stored. Elsewhere, and on the exact path, the forward multiplies by the dequantized matrix in float32.
"""
import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import K2Error
from runtime.kernels import cpu

LEVELS = 127


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 [out, in] times a float32 `scale` [out]; the bias, if any, stays as it was."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def quantize(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1) / LEVELS
        inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.round(w * inverse[:, None]).clamp_(-LEVELS, LEVELS).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, bias)

    def dense(self) -> torch.Tensor:
        """The weight as float32 [out, in]: what the int8 stands for."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu.int8_linear(x, self.weight, self.scale)
        if y is None:
            y = F.linear(x.float(), self.dense()).to(x.dtype)
        return y if self.bias is None else (y + self.bias).to(x.dtype)


def quantize_dense_int8(model: nn.Module):
    """Replace, in place, every dense linear of `model` held on the CPU with its int8 form (one layer at a time, so the
    peak is one layer's float32 copy)."""
    keep = getattr(model, "dense_linears", ())
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and not name.endswith(keep) and module.weight.device.type == "cpu"]
    if not names:
        raise K2Error("--int8: the model has no dense linear layer on the CPU to quantize")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, Int8Linear.quantize(getattr(owner, leaf)))
