"""The CPU INT4 and int8 kernels (runtime/kernels/cpu_kernels.c) against the dequantized reference, every variant
this CPU runs: INT4 weights packed by compressed-tensors' own packer, activations quantized as the kernels document
(int16 blocks of 32), the products in float64. Random shapes with odd group counts, experts no token picks, skipped
(negative) ids, batches of 1 to 64, bf16 and fp16 scales, group sizes 32 to 128. And the fallback: no compiler, the
exact path, one message."""
import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from runtime.errors import K2Error
from runtime.int4 import Int4Experts, Int4Linear
from runtime.int8 import Int8Linear
from runtime.kernels import cpu
from runtime.models.experts import grouped_experts

VARIANTS = cpu.runnable_variants()
REL_TOL = 1e-5  # fp32 sums of up to 384 products in another order than float64's


def _packed(shape, group: int, scale_dtype, generator):
    """Random INT4 weights [*lead, out, in]: the stored words and scales, and the float64 matrix they stand for."""
    q = torch.randint(-8, 8, shape, generator=generator, dtype=torch.int8)
    scale = (torch.rand(*shape[:-1], shape[-1] // group, generator=generator) * 0.02 + 0.005).to(scale_dtype)
    words = torch.stack([pack_to_int32(w, 4) for w in q.reshape(-1, *shape[-2:])]).reshape(*shape[:-1], -1)
    dense = q.double() * scale.double().repeat_interleave(group, dim=-1)
    return words, scale, dense


def _experts(n_experts, dim, hidden, group, scale_dtype, generator):
    experts = Int4Experts(n_experts, dim, hidden, group)
    dense = {}
    for name, shape in (("gate_proj", (n_experts, hidden, dim)), ("up_proj", (n_experts, hidden, dim)),
                        ("down_proj", (n_experts, dim, hidden))):
        words, scale, dense[name] = _packed(shape, group, scale_dtype, generator)
        module = getattr(experts, name)
        module.packed, module.scale = words, scale
    return experts, dense


def _reference_moe(x, weights, ids, dense, quantize=cpu.quantize_activations):
    """The experts in float64 on the dequantized weights and on the activations `quantize` gives each projection (the
    kernels' int16 blocks; the identity for the exact path); slots with a negative id are skipped."""
    x = quantize(x).double()
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot, e in enumerate(ids[t].tolist()):
            if e >= 0:
                h = F.silu(dense["gate_proj"][e] @ x[t]) * (dense["up_proj"][e] @ x[t])
                y[t] += weights[t, slot].double() * (dense["down_proj"][e] @ quantize(h.float()).double())
    return y


def _exact(x):
    return x


def _relative_error(y, reference) -> float:
    return float((y.double() - reference).norm() / reference.norm())


@pytest.fixture(params=VARIANTS)
def variant(request):
    previous = cpu.active()
    assert cpu.select(request.param) == request.param, cpu.describe()
    print(f"CPU INT4 kernels: {cpu.describe()}")
    yield request.param
    cpu.select("auto" if previous != "exact" else "exact")


# (experts, dim, hidden, group, tokens, top-k, scale dtype): odd group counts (96 / 32 = 3, 160 / 32 = 5), group sizes
# up to 128, one token (decode) to 64 (prefill), fp16 scales (a GGUF's Q4_0).
SHAPES = [(8, 96, 160, 32, 1, 2, torch.bfloat16), (5, 256, 64, 64, 7, 3, torch.bfloat16),
          (16, 128, 384, 128, 64, 4, torch.float16), (3, 224, 96, 32, 2, 1, torch.float16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"-{str(s[6])[6:]}")
def test_moe_kernel_equals_the_dequantized_reference(variant, shape):
    n_experts, dim, hidden, group, tokens, k, scale_dtype = shape
    generator = torch.Generator().manual_seed(sum(shape[:6]))
    experts, dense = _experts(n_experts, dim, hidden, group, scale_dtype, generator)
    x = torch.randn(tokens, dim, generator=generator)
    # Each token's k distinct experts, from the first half only (the rest receive no tokens); one slot skipped.
    ids = torch.stack([torch.randperm(max(k, n_experts // 2), generator=generator)[:k] for _ in range(tokens)])
    ids[0, -1] = -1
    weights = torch.rand(tokens, k, generator=generator)
    y = experts(x, weights, ids)
    assert _relative_error(y, _reference_moe(x, weights, ids, dense)) < REL_TOL


@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_linear_kernel_equals_the_dequantized_reference(variant, tokens):
    generator = torch.Generator().manual_seed(tokens)
    linear = Int4Linear(80, 192, 64)
    linear.weight.packed, linear.weight.scale, dense = _packed((80, 192), 64, torch.bfloat16, generator)
    x = torch.randn(2, tokens, 192, generator=generator)
    y = linear(x)
    assert y.shape == (2, tokens, 80)
    assert _relative_error(y, cpu.quantize_activations(x).double() @ dense.T) < REL_TOL


def _int8_linear(rows: int, generator) -> Int8Linear:
    return Int8Linear(torch.randint(-127, 128, (rows, 224), generator=generator, dtype=torch.int8),
                      torch.rand(rows, generator=generator) * 0.01, torch.randn(rows, generator=generator))


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_int8_linear_kernel_equals_the_dequantized_reference(variant, tokens):
    """int8 rows with one scale each (runtime/int8.py), inputs of 7 blocks (odd), a bias."""
    generator = torch.Generator().manual_seed(100 + tokens)
    linear = _int8_linear(48, generator)
    x = torch.randn(tokens, 224, generator=generator)
    dense = linear.weight.double() * linear.scale.double()[:, None]
    assert _relative_error(linear(x), cpu.quantize_activations(x).double() @ dense.T + linear.bias.double()) < REL_TOL


@pytest.fixture
def prompt_matmul(monkeypatch):
    """A prompt's bf16 tokens through torch's matmul, whatever this CPU's bf16 support (slow without, not wrong)."""
    monkeypatch.setattr(cpu, "_matmul_applies", lambda x: x.dtype == torch.bfloat16)


def test_int8_prompt_multiplies_by_the_dequantized_matrix(variant, prompt_matmul, monkeypatch):
    """From INT8_MATMUL_TOKENS bf16 tokens on: F.linear by the matrix rounded to bf16, a few rows at a time."""
    monkeypatch.setattr(cpu, "CHUNK_WEIGHTS", 224 * 10)  # 48 rows in chunks of 10: the last one partial
    generator = torch.Generator().manual_seed(7)
    linear = _int8_linear(48, generator)
    x = torch.randn(2, cpu.INT8_MATMUL_TOKENS, 224, generator=generator).bfloat16()
    dense = (linear.weight.float() * linear.scale[:, None]).bfloat16()
    torch.testing.assert_close(linear(x), (F.linear(x, dense) + linear.bias).bfloat16(), rtol=0, atol=0)


def test_int4_prompt_experts_multiply_by_the_dequantized_matrices(variant, prompt_matmul, monkeypatch):
    """Experts EXPERT_MATMUL_TOKENS or more bf16 tokens chose run as torch matmuls by their matrices rounded to bf16
    (what compressed-tensors' packed integers times the scales give); the others, and skipped slots, the kernel's
    way, in the same call."""
    n_experts, dim, hidden, k = 6, 96, 64, 2
    generator = torch.Generator().manual_seed(3)
    experts, dense = _experts(n_experts, dim, hidden, 32, torch.bfloat16, generator)
    tokens = cpu.EXPERT_MATMUL_TOKENS + 3
    ids = torch.stack([torch.tensor([0, 1 + t % 5]) for t in range(tokens)])  # expert 0: every token; 1-5: few
    ids[1, 1] = -1
    weights = torch.rand(tokens, k, generator=generator)
    x = torch.randn(tokens, dim, generator=generator).bfloat16()
    dequantized = []
    matrices_of = cpu._int4_matrices
    monkeypatch.setattr(cpu, "_int4_matrices", lambda *a: dequantized.append(a[-1]) or matrices_of(*a))
    y = experts(x, weights, ids)
    assert dequantized == [0]
    first = torch.where(ids == 0, ids, -1)
    rest = torch.where(ids == 0, -1, ids)
    matrices = {name: m[0].bfloat16() for name, m in dense.items()}
    expected = grouped_experts(x, weights, first, n_experts,
                               lambda e: (matrices["gate_proj"], matrices["up_proj"], matrices["down_proj"])).float()
    expected += _reference_moe(x.float(), weights, rest, dense).float()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected.bfloat16())


def test_variants_agree_with_each_other():
    """Every variant this CPU runs gives the same output, up to the order fp32 sums in."""
    generator = torch.Generator().manual_seed(0)
    experts, _ = _experts(8, 256, 128, 32, torch.bfloat16, generator)
    x, ids = torch.randn(4, 256, generator=generator), torch.randint(0, 8, (4, 2), generator=generator)
    weights = torch.rand(4, 2, generator=generator)
    outputs = {}
    for name in VARIANTS:
        cpu.select(name)
        outputs[name] = experts(x, weights, ids)
    cpu.select("auto")
    for name, y in outputs.items():
        assert _relative_error(y, outputs["scalar"].double()) < REL_TOL, name


def test_without_a_compiler_the_exact_path_runs_after_one_message(monkeypatch, tmp_path, capsys):
    generator = torch.Generator().manual_seed(1)
    experts, dense = _experts(4, 64, 64, 32, torch.bfloat16, generator)
    x, ids, weights = torch.randn(3, 64, generator=generator), torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.rand(3, 2)
    monkeypatch.setenv("K2_HOME", str(tmp_path))  # no cached build to find
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu._kernels.cache_clear()
    try:
        assert cpu.select("auto") == "exact"
        y = experts(x, weights, ids)
        experts(x, weights, ids)
    finally:
        cpu._kernels.cache_clear()
    assert capsys.readouterr().err.count("CPU INT4 kernels unavailable") == 1
    assert _relative_error(y, _reference_moe(x, weights, ids, dense, _exact)) < REL_TOL


def test_exact_mode_is_the_dequantizing_path():
    generator = torch.Generator().manual_seed(2)
    experts, dense = _experts(4, 64, 96, 32, torch.bfloat16, generator)
    x, ids, weights = torch.randn(2, 64, generator=generator), torch.tensor([[0, 3], [1, 2]]), torch.rand(2, 2)
    assert cpu.select("exact") == "exact"
    try:
        y = experts(x, weights, ids)
    finally:
        cpu.select("auto")
    assert _relative_error(y, _reference_moe(x, weights, ids, dense, _exact)) < REL_TOL


def test_a_wrong_k2_cpu_kernel_is_a_one_line_error(monkeypatch):
    """K2_CPU_KERNEL is read when a kernel is first asked for: a mode that does not exist is refused by name."""
    monkeypatch.setenv("K2_CPU_KERNEL", "avx9000")
    monkeypatch.setattr(cpu, "_mode", [None])
    with pytest.raises(K2Error, match="K2_CPU_KERNEL: unknown CPU kernel mode 'avx9000'"):
        cpu.active()
