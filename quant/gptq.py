"""GPTQ (Frantar et al. 2022): a weight's integers chosen column by column so the layer's output on calibration inputs
moves least, ||W X - Q X||^2, each column's rounding error spread over the columns not yet rounded through the
inverse of the inputs' Hessian H = 2 X^T X / n. Algorithm 1 of the paper: the upper Cholesky factor of H^-1 and
lazy batches of columns.

Scales are fixed before the columns are rounded (as llm-compressor fixes them, from the weight as given), so act order
(columns by decreasing H diagonal) still stores the natural groups, which compressed-tensors calls `actorder: weight`.
A column that no calibration token lights (H diagonal 0) keeps its round-to-nearest value and receives no error:
the reference code zeroes such columns, which would erase weights that real inputs do use.
Everything runs in float64: the damped Hessian of a few hundred tokens is ill-conditioned, and the integers must
not depend on summation order.
"""
import torch

from quant.int4 import Grid

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean (the paper's lambda)
BLOCK = 128  # columns per lazy batch
CHUNK = 4096  # input rows a Hessian adds at once


class Hessian:
    """H = 2 X^T X / n of a linear layer's n input rows, summed over batches of them (float64 [in, in])."""

    def __init__(self, features: int):
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.tokens = 0

    @classmethod
    def of(cls, x: torch.Tensor) -> "Hessian":
        return cls(x.shape[-1]).add(x)

    def add(self, x: torch.Tensor) -> "Hessian":
        """Input rows x [..., in] of one batch."""
        x = x.reshape(-1, x.shape[-1])
        for r0 in range(0, len(x), CHUNK):  # in float64 a chunk at a time, not a float64 copy of every row
            rows = x[r0:r0 + CHUNK].to(torch.float64)
            self.sum.addmm_(rows.T, rows)
        self.tokens += len(x)
        return self

    def value(self) -> torch.Tensor:
        assert self.tokens, "a Hessian of no inputs"
        return self.sum * (2 / self.tokens)


def inverse_factor(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, U^T U = H^-1; dead columns count as lit once.

    With J the reversal, JHJ = L L^T gives H = R R^T for the upper R = JLJ, so H^-1 = R^-T R^-1 and U = R^-1: one
    factorization and one triangular inverse instead of the reference's three factorizations.
    """
    h = h.to(torch.float64, copy=True)
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1
    diagonal += damp * diagonal.mean()
    lower = torch.linalg.cholesky(h.flip(0, 1))
    identity = torch.eye(len(h), dtype=torch.float64)
    return torch.linalg.solve_triangular(lower, identity, upper=False).flip(0, 1)


def act_order(h: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing Hessian diagonal (the most active inputs first); ties keep their order."""
    return torch.argsort(h.diagonal(), descending=True, stable=True)


def quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, grid: Grid, group_size: int,
             ordered: bool = False) -> torch.Tensor:
    """Weight w [rows, in], Hessian h [in, in], group scales [rows, groups] (BF16 as stored) -> int8 q
    [rows, groups, group_size] on `grid`; with `ordered`, columns are rounded in act order."""
    rows, cols = w.shape
    assert h.shape == (cols, cols) and cols % group_size == 0, (w.shape, h.shape, group_size)
    assert scale.shape == (rows, cols // group_size), (scale.shape, w.shape)
    order = act_order(h) if ordered else torch.arange(cols)
    u = inverse_factor(h[order][:, order])
    # Transposed, [cols, rows], so that the column being rounded and the updates to the next are contiguous rows.
    work = w.T.to(torch.float64)[order].contiguous()  # a copy: the working weight, updated as columns are rounded
    s = scale.T.to(torch.float64)[order // group_size].contiguous()  # each column's scales, in working order
    step = torch.where(s == 0, 1.0, s)  # a zero-scale group rounds to 0, as quantize_groups does
    q = torch.empty(cols, rows, dtype=torch.float64)
    for c0 in range(0, cols, BLOCK):
        c1 = min(c0 + BLOCK, cols)
        errors = torch.empty(c1 - c0, rows, dtype=torch.float64)
        for c in range(c0, c1):
            torch.div(work[c], step[c], out=q[c]).round_().clamp_(grid.qmin, grid.qmax)
            error = torch.sub(work[c], q[c] * s[c], out=errors[c - c0]).div_(u[c, c])
            work[c + 1:c1].addr_(u[c, c + 1:c1], error, alpha=-1)
        work[c1:].addmm_(u[c0:c1, c1:].T, errors, alpha=-1)
    restored = torch.empty_like(q)
    restored[order] = q
    return restored.T.to(torch.int8).contiguous().view(rows, cols // group_size, group_size)
