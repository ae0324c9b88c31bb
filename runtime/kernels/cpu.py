"""The CPU INT4 and int8 kernels (cpu_kernels.c, built by cpu_build.py), chosen by what this CPU runs.

`select(mode)` chooses what an INT4 (or int8) forward on the CPU runs from its next call: "auto" (the best variant this CPU
runs, the default; `K2_CPU_KERNEL` sets the starting mode), "exact" (the dequantizing torch path, the reference), or
a variant by name. Where no compiler is found or the build fails, INT4 forwards take the exact path, after a one-time
message saying why.

The kernels quantize activations to int16 in blocks of 32 (a step of 2^-16 of the block's largest value, finer than a
bf16 activation's own rounding) and multiply them with the nibbles in exact integer arithmetic, so they compute what
the exact path computes within fp32 rounding. llama.cpp's int8 activations (Q8_0) were tried first: `k2 check` measured
a mean KL of 3e-3 and 94-96% top-1 agreement with the exact path on SmolLM2, over its limits. `quantize_activations`
is the kernels' quantization in torch, the reference the tests hold them to; `k2 check` compares the kernels with the
exact path on the user's own machine.
"""
import ctypes
import functools
import os
import threading
from pathlib import Path

import torch

from runtime.errors import K2Error
from runtime.kernels import say_once
from runtime.kernels.cpu_build import VARIANTS, cpu_flags, load, runnable_variants
from runtime.models.experts import grouped_experts

SOURCE = Path(__file__).with_name("cpu_kernels.c")
BLOCK = 32  # inputs per activation scale and per 16 weight bytes: the unit a weight group must be a multiple of
LEVELS = 32767  # int16 activations: a block's largest value maps to this
MAX_BLOCKS = 8192  # blocks per row the kernels hold on their stack (cpu_kernels.c): 262,144 inputs
MODES = ("auto", "exact", *VARIANTS)
# Where a prompt gives a weight this many tokens or more, a CPU with native bf16 matrix multiplies (AMX or AVX-512
# BF16) multiplies a bf16 input by the dequantized weight (torch's matmul) rather than dotting each row with each
# token. The crossovers, measured here on one thread: an int8 7168 x 2048 layer at 4-5 tokens (at 64 tokens 6.3 ms
# against the kernel's 68 ms); an INT4 expert (7168 x 2048 x 3) at about 12 tokens (at 32 tokens 18 ms against 44 ms;
# the matmul reorders the weight it is given for AMX each time, which sets its floor).
INT8_MATMUL_TOKENS = 8
EXPERT_MATMUL_TOKENS = 16
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
CHUNK_WEIGHTS = 1 << 22  # int8 weights dequantized at a time: the scratch matrix's bound (8 MiB)
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class Kernels:
    """One built variant, loaded."""

    def __init__(self, variant: str):
        self.variant = variant
        self.library = load(SOURCE, variant)
        self.library.k2_isa.restype = ctypes.c_char_p
        self.library.k2_openmp.restype = ctypes.c_int
        self.library.k2_int4_linear.restype = ctypes.c_int
        self.library.k2_int4_linear.argtypes = [_I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, ctypes.c_int, _PTR,
                                                ctypes.c_int]
        self.library.k2_int4_moe.restype = ctypes.c_int
        self.library.k2_int4_moe.argtypes = [_I64] * 5 + [_PTR] * 9 + [_I64, ctypes.c_int, _PTR, ctypes.c_int]
        self.library.k2_int8_linear.restype = ctypes.c_int
        self.library.k2_int8_linear.argtypes = [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, ctypes.c_int]
        self.library.k2_int8_dense.argtypes = [_I64, _I64, _PTR, _PTR, _PTR, ctypes.c_int]
        self.library.k2_int4_dense.argtypes = [_I64, _I64, _PTR, _PTR, _I64, ctypes.c_int, _PTR, ctypes.c_int]
        self.openmp = bool(self.library.k2_openmp())

    def linear(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
               group_size: int) -> torch.Tensor:
        """x [N, in] float32 -> [N, out]."""
        out = packed.shape[0]
        y = torch.empty(x.shape[0], out, dtype=torch.float32)
        status = self.library.k2_int4_linear(x.shape[0], in_features, out, x.data_ptr(), packed.data_ptr(),
                                             scale.data_ptr(), group_size, scale.dtype == torch.float16, y.data_ptr(),
                                             torch.get_num_threads())
        if status:
            raise MemoryError("the INT4 CPU kernel could not allocate its buffers")
        return y

    def int8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [N, in] float32, int8 `weight` [out, in] with float32 `scale` [out] -> [N, out]."""
        y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
        status = self.library.k2_int8_linear(x.shape[0], weight.shape[1], weight.shape[0], x.data_ptr(),
                                             weight.data_ptr(), scale.data_ptr(), y.data_ptr(), torch.get_num_threads())
        if status:
            raise MemoryError("the int8 CPU kernel could not allocate its buffers")
        return y

    def int8_dense(self, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """int8 `weight` [out, in] times its rows' float32 `scale`, written into `out` (bfloat16)."""
        self.library.k2_int8_dense(weight.shape[0], weight.shape[1], weight.data_ptr(), scale.data_ptr(),
                                   out.data_ptr(), torch.get_num_threads())
        return out

    def int4_dense(self, packed: torch.Tensor, scale: torch.Tensor, group_size: int, out: torch.Tensor) -> torch.Tensor:
        """Packed INT4 rows [rows, in / 8] times their group scales, written into `out` [rows, in] (bfloat16)."""
        self.library.k2_int4_dense(out.shape[0], out.shape[1], packed.data_ptr(), scale.data_ptr(), group_size,
                                   scale.dtype == torch.float16, out.data_ptr(), torch.get_num_threads())
        return out

    def moe(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts) -> torch.Tensor:
        """x [N, dim] float32, routing weights float32 and ids int64 [N, k] -> [N, dim] float32."""
        gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
        y = torch.empty_like(x)
        status = self.library.k2_int4_moe(
            x.shape[0], x.shape[1], gate.packed.shape[1], ids.shape[1], gate.packed.shape[0], x.data_ptr(),
            ids.data_ptr(), weights.data_ptr(), gate.packed.data_ptr(), gate.scale.data_ptr(), up.packed.data_ptr(),
            up.scale.data_ptr(), down.packed.data_ptr(), down.scale.data_ptr(), gate.group_size,
            gate.scale.dtype == torch.float16, y.data_ptr(), torch.get_num_threads())
        if status:
            raise MemoryError("the INT4 CPU kernel could not allocate its buffers")
        return y


@functools.cache
def _kernels(variant: str) -> Kernels | str:
    """The variant loaded, or why it cannot be."""
    try:
        return Kernels(variant)
    except (K2Error, OSError) as e:
        return str(e)


_mode: list[str | None] = [None]  # None: K2_CPU_KERNEL's, checked when first asked


def _checked(mode: str, source: str = "") -> str:
    if mode not in MODES:
        raise K2Error(f"{source}unknown CPU kernel mode {mode!r} (one of {', '.join(MODES)})")
    if mode in VARIANTS and mode not in runnable_variants():
        raise K2Error(f"{source}this CPU cannot run the {mode} kernels (it runs {', '.join(runnable_variants())})")
    return mode


def select(mode: str) -> str:
    """Make INT4 forwards on the CPU run `mode` from their next call; returns the name now in use (see active())."""
    _mode[0] = _checked(mode)
    return active()


def mode() -> str:
    """The mode last selected (what `select` was given, or `K2_CPU_KERNEL`, "auto" where unset)."""
    if _mode[0] is None:
        _mode[0] = _checked(os.environ.get("K2_CPU_KERNEL", "auto"), "K2_CPU_KERNEL: ")
    return _mode[0]


def current() -> Kernels | None:
    """The kernels INT4 forwards on the CPU run now; None: the exact path."""
    mode_now = mode()
    if mode_now == "exact":
        return None
    variant = runnable_variants()[0] if mode_now == "auto" else mode_now
    kernels = _kernels(variant)
    if isinstance(kernels, str):
        say_once(f"CPU INT4 kernels unavailable ({kernels}); INT4 weights run on the exact, slower path")
        return None
    return kernels


def active() -> str:
    """What INT4 forwards on the CPU run now: a variant's name, or "exact"."""
    kernels = current()
    return "exact" if kernels is None else kernels.variant


def fits(in_features: int, group_size: int, scale: torch.Tensor) -> bool:
    """Whether the kernels read weights of this shape and scale type."""
    return (group_size % BLOCK == 0 and in_features % group_size == 0 and in_features // BLOCK <= MAX_BLOCKS
            and scale.dtype in (torch.bfloat16, torch.float16))


def int4_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts) -> torch.Tensor | None:
    """The routed experts of `experts` (an Int4Experts) through the kernels, or None where they do not apply (the
    exact path, tensors off the CPU, shapes they do not take). An expert that EXPERT_MATMUL_TOKENS or more of the
    tokens chose is multiplied as matrices instead where `_matmul_applies`: dequantized by the kernels, then torch's
    matmul."""
    kernels = current()
    gate, down = experts.gate_proj, experts.down_proj
    if kernels is None or x.device.type != "cpu" or x.shape[0] == 0 or not (
            fits(gate.in_features, gate.group_size, gate.scale) and fits(down.in_features, down.group_size,
                                                                          down.scale)):
        return None
    ids, x32, w32 = ids.long(), x.float().contiguous(), weights.float().contiguous()
    if x.shape[0] < EXPERT_MATMUL_TOKENS or not _matmul_applies(x):  # decode: no expert has that many tokens
        return kernels.moe(x32, w32, ids.contiguous(), experts).to(x.dtype)
    many = torch.bincount(ids[ids >= 0], minlength=experts.n_experts) >= EXPERT_MATMUL_TOKENS
    matmul = (ids >= 0) & many[ids.clamp_min(0)]
    y = kernels.moe(x32, w32, ids.masked_fill(matmul, -1), experts)
    if matmul.any():
        y += grouped_experts(x, weights, ids.masked_fill(~matmul, -1), experts.n_experts,
                             lambda e: _int4_matrices(kernels, experts, e)).float()
    return y.to(x.dtype)


def _int4_matrices(kernels: Kernels, experts, e: int) -> list[torch.Tensor]:
    """Expert e's gate, up and down as bf16 matrices, each in a scratch matrix of its own (valid until the next
    expert's)."""
    matrices = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        weight = getattr(experts, name)
        rows = weight.packed.shape[1]
        out = _scratch(name, rows * weight.in_features).view(rows, weight.in_features)
        matrices.append(kernels.int4_dense(weight.packed[e], weight.scale[e], weight.group_size, out))
    return matrices


def _matmul_applies(x: torch.Tensor) -> bool:
    """Whether a prompt's tokens go through torch's matmul: bf16 inputs (multiplied in bf16, as the model's own bf16
    layers are) on a CPU with native bf16 matrix multiplies. Elsewhere the kernels are as fast or faster."""
    return x.dtype == torch.bfloat16 and bool(NATIVE_BF16_FLAGS & cpu_flags())


def int4_linear(x: torch.Tensor, weight) -> torch.Tensor | None:
    """x [..., in] through an INT4 linear's packed `weight` (a PackedInt4), or None where the kernels do not apply."""
    kernels = current()
    if kernels is None or x.device.type != "cpu" or not fits(weight.in_features, weight.group_size, weight.scale):
        return None
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        return None
    y = kernels.linear(flat.float().contiguous(), weight.packed, weight.scale, weight.in_features, weight.group_size)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x [..., in] through int8 `weight` [out, in] with per-row float32 `scale`, or None where the kernels do not
    apply. From INT8_MATMUL_TOKENS tokens on, as a matrix multiply where `_matmul_applies` (`_int8_matmul`)."""
    kernels = current()
    if kernels is None or x.device.type != "cpu" or weight.shape[1] % BLOCK or weight.shape[1] // BLOCK > MAX_BLOCKS:
        return None
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        return None
    if flat.shape[0] >= INT8_MATMUL_TOKENS and _matmul_applies(x):
        y = _int8_matmul(kernels, flat, weight, scale)
    else:
        y = kernels.int8_linear(flat.float().contiguous(), weight, scale)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _int8_matmul(kernels: Kernels, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [N, in] (bf16) times the int8 weight's matrix: CHUNK_WEIGHTS weights dequantized at a time into a scratch
    matrix, so an output head of any size needs no copy of itself."""
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    rows = max(1, CHUNK_WEIGHTS // weight.shape[1])
    scratch = _scratch("int8", min(rows, weight.shape[0]) * weight.shape[1])
    for first in range(0, weight.shape[0], rows):
        part = weight[first:first + rows]
        dense = kernels.int8_dense(part, scale[first:first + rows], scratch[:part.numel()].view(part.shape))
        y[:, first:first + part.shape[0]] = x @ dense.T
    return y


_scratch_buffers = threading.local()  # per thread: the server's model thread and a test's main thread never share


def _scratch(use: str, numel: int) -> torch.Tensor:
    """A bf16 matrix's worth of memory for `use`, kept between calls: a fresh one per call costs its page faults each
    time (a 29 MB matrix took 10x as long to fill the first time as the next)."""
    buffers = _scratch_buffers.__dict__.setdefault("buffers", {})
    if use not in buffers or buffers[use].numel() < numel:
        buffers[use] = torch.empty(numel, dtype=torch.bfloat16)
    return buffers[use]


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] (n a multiple of 32) as the kernels see it: int16 in blocks of 32, scale absmax / 32767, rounded half
    to even, dequantized back to float32."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / LEVELS
    inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


def describe() -> str:
    """One line: what runs, and why, for `k2 check`, `k2 bench` and the tests' output."""
    kernels = current()
    if kernels is None:
        return "exact (dequantizing torch path)" if mode() == "exact" else "exact (no kernels could be built)"
    threads = f"{torch.get_num_threads()} threads" if kernels.openmp else "1 thread (built without OpenMP)"
    return f"{kernels.variant} ({threads}; this CPU runs {', '.join(runnable_variants())})"

