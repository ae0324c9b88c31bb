"""How the integers and scales of one weight are chosen. The format (grid, packing) is quant/int4.py's.

A method turns rows of a weight into (q, scale) on the grid it is given. Rows are independent for every method here
and for GPTQ (whose error feedback runs along a row's columns, with one Hessian shared by all rows), so the driver
hands methods row blocks and never a whole trillion-parameter tensor. GPTQ needs the Hessian of each weight's inputs,
which exists only once the layers before it have run on the calibration tokens, so the calibrated walk
(runtime/convert/calibrated.py) hands it whole weights with their Hessian as it reaches them.
"""
from dataclasses import dataclass
from typing import Protocol

import torch

from quant import gptq
from quant.int4 import GRIDS, Grid, absmax_scale, dequantize_groups, grouped, quantize_groups

# Clipping ratios the mse search tries, largest first: 1.0 is rtn, so mse can only match or beat it.
MSE_CLIPS = tuple(1.0 - 0.01 * i for i in range(26))


@dataclass(frozen=True)
class Int4Spec:
    group_size: int
    grid: Grid

    @classmethod
    def of(cls, group_size: int, grid: str) -> "Int4Spec":
        return cls(group_size, GRIDS[grid])


class Method(Protocol):
    name: str
    observer: str  # what config.json's `observer` field says produced the scales (compressed-tensors' names)

    def quantize(self, name: str, w: torch.Tensor, spec: Int4Spec) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of tensor `name`, float32 [rows, in] -> (q int8 [rows, groups, group_size], BF16 scale [rows, groups])."""


class RoundToNearest:
    name, observer = "rtn", "minmax"

    def quantize(self, name: str, w: torch.Tensor, spec: Int4Spec) -> tuple[torch.Tensor, torch.Tensor]:
        w_groups = grouped(w, spec.group_size)
        scale = absmax_scale(w_groups, spec.grid)
        return quantize_groups(w_groups, scale, spec.grid), scale


def clip_search(w_groups: torch.Tensor, grid: Grid,
                importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of w_groups [rows, groups, group_size], the clipping of the absmax scale that minimizes the squared
    reconstruction error, each input's weighted by `importance` [groups, group_size] when given -> (q, scale).

    Only a strictly smaller error replaces the unclipped candidate, so weights already on the grid (error 0) keep
    their exact scale and re-quantize losslessly.
    """
    best_scale = best_q = best_err = None
    for clip in MSE_CLIPS:
        scale = absmax_scale(w_groups, grid, clip)
        q = quantize_groups(w_groups, scale, grid)
        err = (dequantize_groups(q, scale) - w_groups).square_()
        err = (err if importance is None else err.mul_(importance)).sum(-1)  # [rows, groups]
        if best_err is None:
            best_scale, best_q, best_err = scale, q, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
    return best_q, best_scale


class ClipSearch:
    """Per group, the clipping of the absmax scale that minimizes squared reconstruction error."""

    name, observer = "mse", "mse"

    def quantize(self, name: str, w: torch.Tensor, spec: Int4Spec) -> tuple[torch.Tensor, torch.Tensor]:
        return clip_search(grouped(w, spec.group_size), spec.grid)


class Gptq:
    """GPTQ (quant/gptq.py), optionally in act order, on scales from a clip search whose error weighs each input by its
    Hessian diagonal (its mean squared activation): the layer's output error as if its inputs were uncorrelated.

    Measured on SmolLM2-135M (every linear, act order, mean KL over 4 windows of held-out wikitext): these scales
    took GPTQ from 0.82x round-to-nearest's KL (on its absmax scales) to 0.49x; unweighted mse scales gave 0.68x.
    """

    name, observer = "gptq", "mse"

    def __init__(self, act_order: bool = False):
        self.act_order = act_order

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor, spec: Int4Spec) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight w [out, in] and the Hessian of its inputs [in, in] -> (q, scale) as `Method.quantize` gives them."""
        importance = grouped(hessian.diagonal().float()[None], spec.group_size)[0]
        _, scale = clip_search(grouped(w, spec.group_size), spec.grid, importance)
        return gptq.quantize(w, hessian, scale, spec.grid, spec.group_size, self.act_order), scale


METHODS: dict[str, type] = {"rtn": RoundToNearest, "mse": ClipSearch}
CALIBRATED_METHODS: dict[str, type] = {"gptq": Gptq}
FALLBACK = ClipSearch  # for weights GPTQ has too few calibration tokens for
