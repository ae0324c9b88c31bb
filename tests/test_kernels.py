"""The decode fast path against the obvious code: grouped, one-token and fused experts against the per-expert loop
on random routings (skipped slots, experts no token picks); INT4 tiles against compressed-tensors' packing and
dequantization; the fixed-shape decode step against the eager decoder; the Triton kernels where Triton runs (a CUDA
GPU, or its interpreter when TRITON_INTERPRET=1 and triton is installed).
"""
import os
import subprocess
import sys

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

from runtime.engine import Engine, fuse_experts
from runtime.int4 import Int4Experts
from runtime.kernels import triton_missing_reason
from runtime.kernels.fused_moe import FusedExperts, FusedInt4Experts, fused_moe_int4_torch, fused_moe_torch, unpack_tiles
from runtime.loading import load_model
from runtime.models.experts import Experts
from runtime.sampling import Sampler
from tests.helpers import experts_loop

E, DIM, HIDDEN, TOP_K, GROUP = 12, 256, 96, 4, 32
BF16_TOL = 1e-2  # the acceptance bound for kernels that accumulate in fp32 what the loop rounds to bf16 per matmul


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def random_experts(dtype: torch.dtype, seed: int = 0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    experts = Experts(E, DIM, HIDDEN)
    for name, param in experts.named_parameters():
        param.data = (0.05 * torch.randn(param.shape, generator=g)).to(dtype)
        param.requires_grad_(False)
    return experts


def random_routing(n_tokens: int, seed: int, skip_some: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, DIM], weights and ids [N, TOP_K]: distinct experts per token drawn from the first E - 3 (so the last
    three get no token), and with `skip_some` a few slots -1 (experts that live elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, DIM, generator=g)
    ids = torch.stack([torch.randperm(E - 3, generator=g)[:TOP_K] for _ in range(n_tokens)])
    if skip_some:
        ids[torch.rand(ids.shape, generator=g) < 0.2] = -1
    return x, torch.rand(n_tokens, TOP_K, generator=g), ids


@pytest.mark.parametrize("n_tokens", [1, 3, 40], ids=lambda n: f"{n}tok")
def test_grouped_experts_equal_per_expert_loop(n_tokens):
    experts = random_experts(torch.float32)
    x, weights, ids = random_routing(n_tokens, seed=n_tokens)
    with torch.inference_mode():
        torch.testing.assert_close(experts(x, weights, ids), experts_loop(experts, x, weights, ids), rtol=1e-5, atol=1e-6)


def test_experts_with_every_slot_skipped_give_zero():
    experts = random_experts(torch.float32)
    x, weights, ids = random_routing(2, seed=5)
    ids[:] = -1
    with torch.inference_mode():
        assert torch.equal(experts(x, weights, ids), torch.zeros_like(x))
        assert torch.equal(fused_moe_torch(x, weights, ids, experts.gate_proj, experts.up_proj, experts.down_proj),
                           torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_torch_path_equals_per_expert_loop(dtype):
    experts = random_experts(dtype)
    x, weights, ids = random_routing(4, seed=7)
    x = x.to(dtype)
    fused = FusedExperts(experts.gate_proj.data, experts.up_proj.data, experts.down_proj.data)
    with torch.inference_mode():
        err = rel_err(fused(x, weights, ids), experts_loop(experts, x, weights, ids))
    assert err < (1e-5 if dtype == torch.float32 else BF16_TOL), err


def int4_experts_and_dense(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Int4Experts, Experts]:
    """Random INT4 experts packed by compressed-tensors, and the same weights as compressed-tensors dequantizes them
    with the scales in `dtype` (in bf16 each product rounds, as a bf16 model's dequantization does)."""
    g = torch.Generator().manual_seed(seed)
    packed_experts, dense = Int4Experts(E, DIM, HIDDEN, GROUP), Experts(E, DIM, HIDDEN)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP)
    for name in ("gate_proj", "up_proj", "down_proj"):
        out, inp = getattr(dense, name).shape[1:]
        q = torch.randint(-8, 8, (E, out, inp), generator=g, dtype=torch.int8)
        scale = (0.002 + 0.01 * torch.rand(E, out, inp // GROUP, generator=g)).to(torch.bfloat16)
        part = getattr(packed_experts, name)
        part.packed, part.scale = pack_to_int32(q, 4), scale
        weight = torch.stack([ct_dequantize(q[e], scale[e].to(dtype), None, args) for e in range(E)])
        setattr(dense, name, torch.nn.Parameter(weight, requires_grad=False))
    return packed_experts, dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int4_tiles_hold_compressed_tensors_weights(dtype):
    packed_experts, dense = int4_experts_and_dense(dtype=dtype)
    fused = FusedInt4Experts.repack(packed_experts)
    assert fused is not None
    for name in ("gate_proj", "up_proj", "down_proj"):
        tiles, scales = getattr(fused, f"{name}_tiles"), getattr(fused, f"{name}_scales")
        assert tiles.is_contiguous() and tiles.dim() == 5
        assert torch.equal(unpack_tiles(tiles, scales, dtype), getattr(dense, name).data), name
        assert torch.equal(unpack_tiles(tiles[5], scales[5], dtype), getattr(dense, name).data[5]), name


@pytest.mark.parametrize("n_tokens", [1, 5, 30], ids=lambda n: f"{n}tok")
def test_int4_fused_module_equals_per_expert_loop_on_dequantized_weights(n_tokens):
    packed_experts, dense = int4_experts_and_dense()
    fused = FusedInt4Experts.repack(packed_experts)
    x, weights, ids = random_routing(n_tokens, seed=11 + n_tokens)
    with torch.inference_mode():
        err = rel_err(fused(x, weights, ids), experts_loop(dense, x, weights, ids))
    assert err < 1e-5, err


def test_int4_experts_selected_and_slot_loaded_keep_their_weights():
    """The experts protocol of runtime/offload.py on tiles: select renumbers, load_slot copies one expert."""
    packed_experts, dense = int4_experts_and_dense()
    fused = FusedInt4Experts.repack(packed_experts)
    part = fused.select([7, 2], "cpu")
    assert part.n_experts == 2
    part.load_slot(0, fused, 4)
    x, weights, _ = random_routing(3, seed=3, skip_some=False)
    ids = torch.tensor([[0, 1, -1, -1]] * 3)
    with torch.inference_mode():
        expected = experts_loop(dense, x, weights, torch.tensor([[4, 2, -1, -1]] * 3))
        assert rel_err(part(x, weights, ids), expected) < 1e-5


def decode_in_slots(engine: Engine, prompts: list[list[int]], steps: int, leave_after: dict[int, int] | None = None):
    """First ids [B] and the next `steps` ids [B, steps] of greedy decoding with each prompt in its own slot; slot s
    leaves after `leave_after[s]` steps (its later ids are then meaningless)."""
    sampler = Sampler.greedy(engine.model.args.vocab_size, engine.model.device,
                             suppress_ids=[engine.model.args.vocab_size - 1])
    first = torch.cat([engine.start(slot, prompt, sampler) for slot, prompt in enumerate(prompts)])
    rest = []
    for step in range(steps):
        for slot, n in (leave_after or {}).items():
            if step == n:
                engine.finish(slot)
        rest.append(engine.step())
    return first, torch.stack(rest, dim=1)


def test_fixed_shape_decode_step_equals_eager_decoding(demo_dir):
    """The CUDA graph decoder's step (positions as tensors, attention over the whole buffer, fused experts, sampling
    on the device) runs uncaptured off CUDA; its ids must be the eager decoder's, for two slots of different
    lengths, also after one of them leaves the batch."""
    model = load_model(demo_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.args.vocab_size - 1, (n,), generator=g).tolist() for n in (24, 17)]
    with torch.inference_mode():
        first, rest = decode_in_slots(Engine(model, 2, 48, "eager"), prompts, 20)
        assert fuse_experts(model) is None
        assert isinstance(model.model.layers[1].mlp.experts, FusedExperts)
        static = Engine(model, 2, 48, "static")
        for _ in range(2):  # the second run reuses the cache and buffers of the first
            static_first, static_rest = decode_in_slots(static, prompts, 20)
            assert torch.equal(static_first, first) and torch.equal(static_rest, rest)
        _, left = decode_in_slots(static, prompts, 20, leave_after={1: 6})
        assert torch.equal(left[0], rest[0]) and torch.equal(left[1, :6], rest[1, :6])
        assert static.length(1) == len(prompts[1]) + 6


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels: on a CUDA GPU, or in Triton's interpreter on the CPU


def _skip_reason() -> str | None:
    reason = triton_missing_reason()
    if reason is None and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        reason = "no CUDA device (the interpreter run covers the kernels' logic on the CPU)"
    return reason


def _skip_loudly(reason: str):
    print(f"\ntests/test_kernels.py: Triton kernel test skipped: {reason}", file=sys.__stderr__)
    pytest.skip(reason)


@pytest.fixture
def kernel_device() -> str:
    reason = _skip_reason()
    if reason:
        _skip_loudly(reason)
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n_tokens", [1, 4], ids=lambda n: f"{n}tok")
def test_triton_bf16_fused_moe_equals_per_expert_loop(kernel_device, n_tokens):
    from runtime.kernels.fused_moe import fused_moe_triton

    experts = random_experts(torch.bfloat16).to(kernel_device)
    x, weights, ids = (t.to(kernel_device) for t in random_routing(n_tokens, seed=20 + n_tokens))
    x = x.bfloat16()
    with torch.inference_mode():
        fused = fused_moe_triton(x, weights, ids, experts.gate_proj, experts.up_proj, experts.down_proj)
        err = rel_err(fused, experts_loop(experts, x, weights, ids))
    assert err < BF16_TOL, err


@pytest.mark.parametrize("n_tokens", [1, 4], ids=lambda n: f"{n}tok")
def test_triton_int4_fused_moe_equals_dequantized_loop(kernel_device, n_tokens):
    from runtime.kernels.fused_moe import fused_moe_int4_triton

    packed_experts, dense = int4_experts_and_dense(dtype=torch.bfloat16)
    fused = FusedInt4Experts.repack(packed_experts).to(kernel_device)
    dense = dense.to(kernel_device)
    x, weights, ids = (t.to(kernel_device) for t in random_routing(n_tokens, seed=30 + n_tokens))
    x = x.bfloat16()
    parts = [fused._pair(name) for name in ("gate_proj", "up_proj", "down_proj")]
    with torch.inference_mode():
        err = rel_err(fused_moe_int4_triton(x, weights, ids, *parts, group_size=GROUP), experts_loop(dense, x, weights, ids))
        assert rel_err(fused_moe_int4_torch(x, weights, ids, *parts), experts_loop(dense, x, weights, ids)) < BF16_TOL
    assert err < BF16_TOL, err


def test_triton_kernels_in_the_interpreter_on_cpu():
    """Where triton is installed but no GPU is, run the kernel tests above in Triton's interpreter (numpy on the CPU)."""
    if triton_missing_reason() == "Triton is not installed":
        _skip_loudly("Triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device runs the kernels themselves")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", __file__,
                             "-k", "triton_bf16 or triton_int4"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "4 passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decoder_equals_eager_decoding(demo_dir):
    model = load_model(demo_dir, dtype=torch.bfloat16, device="cuda")
    prompt = torch.randint(0, model.args.vocab_size - 1, (32,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.inference_mode():
        first, rest = decode_in_slots(Engine(model, 1, 64, "eager"), [prompt], 24)
        graph = Engine(model, 1, 64, "cuda-graph")
        assert graph.decoder == "cuda-graph"
        graph_first, decoded = decode_in_slots(graph, [prompt], 24)
        assert torch.equal(graph_first, first) and graph._step.graph is not None
    # bf16 kernels accumulate differently from cuBLAS: ids may part ways after a near tie, but not at the start.
    assert torch.equal(decoded[:, :8], rest[:, :8]), (decoded, rest)
