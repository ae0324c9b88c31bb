"""GPTQ's arithmetic (quant/gptq.py) against the paper's own update, written here in float64 in its explicit form, and
the scales it rounds on against an exhaustive search written here.

llm-compressor, the reference implementation, does not install beside the transformers this project pins (its
releases require transformers <= 5.17), so the oracle is Frantar et al. 2022 as printed: the optimal-brain-surgeon
update of equation (2), w_F -= (w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_{:,q}, with H_F^-1 itself updated by
Gaussian elimination (equation (3)) after every column, instead of quant/gptq.py's Cholesky factor and lazy batches.
Both in float64, on the same scales, they must choose identical integers.
"""
import pytest
import torch

from quant.gptq import Hessian
from quant.int4 import GRIDS, ungroup
from quant.methods import MSE_CLIPS, Gptq, Int4Spec, RoundToNearest

pytestmark = pytest.mark.usefixtures("one_thread")  # column-long ops: as the walk runs them
GROUP = 32


def correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Activations as a transformer's look: a few shared directions, and some channels far larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 8, generator=g) @ torch.randn(8, features, generator=g)
    x += 0.3 * torch.randn(tokens, features, generator=g)
    return x * torch.exp(torch.randn(features, generator=g))


def weight(rows: int, features: int, seed: int) -> torch.Tensor:
    return (0.02 * torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))).bfloat16().float()


def paper_gptq(w: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, grid: str, act_order: bool) -> torch.Tensor:
    """Integers [rows, in] by the paper's equations (2) and (3), on group scales [rows, in / GROUP]."""
    qmin, qmax = GRIDS[grid].qmin, GRIDS[grid].qmax
    rows, cols = w.shape
    scale = scale.double()
    x = x.double()
    h = 2 * x.T @ x / len(x)
    for c in range(cols):
        if h[c, c] == 0:
            h[c, c] = 1
    h += 0.01 * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=torch.float64)
    order = sorted(range(cols), key=lambda c: -h[c, c].item()) if act_order else list(range(cols))
    h_inv = torch.linalg.inv(h)
    work = w.double().clone()
    q = torch.zeros(rows, cols, dtype=torch.int64)
    remaining = list(order)
    for c in order:
        s = scale[:, c // GROUP]
        level = torch.where(s > 0, (work[:, c] / s).round(), torch.zeros_like(s)).clamp(qmin, qmax)
        q[:, c] = level.long()
        remaining.remove(c)
        error = (work[:, c] - level * s) / h_inv[c, c]
        work[:, remaining] -= error[:, None] * h_inv[c, remaining][None, :]
        h_inv = h_inv - torch.outer(h_inv[:, c], h_inv[c, :]) / h_inv[c, c]
    return q


@pytest.mark.parametrize("grid, act_order, tokens", [("k2", False, 512), ("k2", True, 512), ("ct", True, 512),
                                                     ("k2", False, 48)])  # 48 < 160 inputs: a rank-deficient H
def test_integers_are_the_papers(grid, act_order, tokens):
    features = 160  # two lazy batches of 128, the second partial
    x = correlated_inputs(tokens, features, seed=1)
    x[:, 37] = 0  # an input no calibration token lights
    w = weight(48, features, seed=2)
    q, scale = Gptq(act_order).quantize(w, Hessian.of(x).value(), Int4Spec.of(GROUP, grid))
    ours = ungroup(q, features).long()
    assert torch.equal(ours, paper_gptq(w, x, scale, grid, act_order))
    assert scale.dtype == torch.bfloat16 and ours.min() >= GRIDS[grid].qmin and ours.max() <= GRIDS[grid].qmax
    dead = w[:, 37] / scale[:, 1].float()
    assert torch.equal(ours[:, 37], dead.round().clamp(GRIDS[grid].qmin, GRIDS[grid].qmax).long())  # not zeroed
    assert not torch.equal(ours, ungroup(RoundToNearest().quantize("w", w, Int4Spec.of(GROUP, grid))[0], features))


@pytest.mark.parametrize("grid", ["k2", "ct"])
def test_scales_minimize_the_activation_weighted_error(grid):
    """Each group's scale is, of absmax x (1 - 0.01 i) / divisor for i = 0..25, the first with the least error
    summed over the group's inputs weighted by the Hessian diagonal."""
    x = correlated_inputs(256, 64, seed=5)
    w = weight(16, 64, seed=6)
    h = Hessian.of(x).value()
    _, scale = Gptq().quantize(w, h, Int4Spec.of(GROUP, grid))
    qmin, qmax, divisor = GRIDS[grid].qmin, GRIDS[grid].qmax, GRIDS[grid].divisor
    for r in range(16):
        for g in range(64 // GROUP):
            values, importance = w[r, g * GROUP:(g + 1) * GROUP], h.diagonal()[g * GROUP:(g + 1) * GROUP]
            errors = []
            for i in range(26):
                s = (values.abs().max() * (1 - 0.01 * i) / divisor).bfloat16().float()
                levels = (values / s).round().clamp(qmin, qmax)
                errors.append((((levels * s - values) ** 2).double() * importance).sum().item())
            best = min(range(26), key=lambda i: (errors[i], i))
            assert scale[r, g].item() == (values.abs().max() * MSE_CLIPS[best] / divisor).bfloat16().item()
    assert (scale != RoundToNearest().quantize("w", w, Int4Spec.of(GROUP, grid))[1]).any()


@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_is_below_round_to_nearest(act_order):
    """On correlated inputs GPTQ's layer output is far closer to the original than RTN's."""
    x = correlated_inputs(1024, 256, seed=3)
    w = weight(96, 256, seed=4)
    spec = Int4Spec.of(GROUP, "k2")
    q, scale = Gptq(act_order).quantize(w, Hessian.of(x).value(), spec)
    rtn_q, rtn_scale = RoundToNearest().quantize("w", w, spec)

    def output_error(q, scale):
        dq = ungroup(q.float() * scale.float().unsqueeze(-1), w.shape[1])
        return ((dq - w) @ x.T).square().sum().item()

    assert output_error(q, scale) < 0.5 * output_error(rtn_q, rtn_scale)
