"""INT4 math against the compressed-tensors library, the k2 grid's losslessness, and the runtime's packed modules."""
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from safetensors.torch import load_file, save_file

from quant.int4 import (GRIDS, GROUP_SIZES, absmax_scale, dequantize, dequantize_groups, fake_quant_int4, grouped,
                        pack, quantize_groups, unpack)
from quant.methods import ClipSearch, Int4Spec, RoundToNearest
from runtime.convert.quantize import QuantizeConfig, quantize_checkpoint
from runtime.int4 import Int4Experts, Int4Linear, held_bytes
from runtime.loading import load_model
from tests.helpers import run_k2_here

pytestmark = pytest.mark.usefixtures("one_thread")


ODD_SHAPES = [(1, 1), (3, 7), (5, 13), (17, 33), (2, 1000), (64, 256), (9, 7168)]


def random_levels(shape, seed, low=-8, high=8) -> torch.Tensor:
    return torch.randint(low, high, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def random_weight(shape, seed) -> torch.Tensor:
    return 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_pack_and_unpack_equal_compressed_tensors(shape):
    q = random_levels(shape, seed=shape[1])
    packed = pack(q)
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(unpack(packed, shape[1]), unpack_from_int32(packed, 4, torch.Size(shape)))
    assert torch.equal(unpack(packed, shape[1]), q)


def test_unpack_of_stacked_experts_equals_compressed_tensors():
    q = random_levels((4, 6, 40), seed=1)
    packed = pack_to_int32(q, 4)  # the library packs 3-D (MoE) weights slice by slice
    assert torch.equal(unpack(packed, 40), unpack_from_int32(packed, 4, torch.Size(q.shape)))


def test_reference_vectors_of_compressed_tensors_tests():
    assert pack(torch.tensor([[1, 2, 3, 4]], dtype=torch.int8)).item() == 52137
    assert pack(torch.arange(-8, 0, dtype=torch.int8)[None]).item() == 1985229328
    assert pack(torch.tensor([[1]], dtype=torch.int8)).item() == 9


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_ct_grid_equals_compressed_tensors_minmax_quantizer(group_size):
    """The `ct` grid is compressed-tensors' own: its observer's scale, its rounding and clamping, its dequantization."""
    w = random_weight((24, 256), seed=group_size)
    w_groups = grouped(w, group_size)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    ct_scale, zero_point = calculate_qparams(w_groups.amin(-1), w_groups.amax(-1), args)
    scale = absmax_scale(w_groups, GRIDS["ct"])
    assert torch.equal(ct_scale.to(torch.bfloat16), scale)
    q = quantize_groups(w_groups, scale, GRIDS["ct"])
    assert torch.equal(ct_quantize(w, scale, zero_point, args, dtype=torch.int8), q.view(w.shape))
    ours = dequantize_groups(q, scale).view(w.shape).bfloat16()
    assert torch.equal(ct_dequantize(q.view(w.shape), scale, None, args), ours)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_k2_grid_weights_requantize_bit_exact(group_size):
    """Weights made by fake_quant_int4 (as QAT leaves them) give back the same integers and scales, by either method."""
    w = random_weight((48, 7168 // 4), seed=group_size)
    on_grid = fake_quant_int4(w, group_size, "k2")
    spec = Int4Spec.of(group_size, "k2")
    q_first, scale_first = RoundToNearest().quantize("w", w, spec)
    for method in (RoundToNearest(), ClipSearch()):
        q, scale = method.quantize("w", on_grid, spec)
        assert torch.equal(q, q_first) and torch.equal(scale, scale_first), method.name
        assert q.abs().max() <= 7
        assert torch.equal(dequantize(pack(q.view(w.shape)), scale, w.shape[1], group_size), on_grid)
    # Every group of a QAT weight reaches +-7: absmax / 7 is exactly the scale it was trained with.
    assert (q_first.abs().amax(-1) == 7).all()


def test_fake_quant_gradient_is_straight_through():
    w = random_weight((8, 64), seed=3).requires_grad_()
    upstream = torch.randn(8, 64)
    (fake_quant_int4(w, 32) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_mse_never_worse_than_rtn_per_group():
    w = torch.distributions.StudentT(3.0).sample((64, 512)) * 0.02  # heavy tails: where clipping pays
    spec = Int4Spec.of(32, "ct")
    errors = {}
    for method in (RoundToNearest(), ClipSearch()):
        q, scale = method.quantize("w", w, spec)
        errors[method.name] = (dequantize_groups(q, scale) - grouped(w, 32)).square().sum(-1)
    assert (errors["mse"] <= errors["rtn"]).all()
    assert (errors["mse"] < errors["rtn"]).float().mean() > 0.2


def test_zero_groups_quantize_to_zero():
    w = torch.zeros(4, 64)
    w[0, 40] = 7 * 2.0**-4  # scale 2^-4, exact in BF16
    q, scale = RoundToNearest().quantize("w", w, Int4Spec.of(32, "k2"))
    assert scale[1:].eq(0).all() and scale[0, 0] == 0
    w_back = dequantize(pack(q.view(4, 64)), scale, 64, 32)
    assert not w_back.isnan().any() and torch.equal(w_back, w)


# ---------------------------------------------------------------------------------------------------------------
# runtime


@pytest.fixture(scope="module")
def int4_demo(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "demo-int4"
    result = run_k2_here("quantize", demo_dir, out, "--int4")
    assert result.returncode == 0, result.stderr
    return out


def dequantized_twin(int4_dir, twin_dir):
    """The INT4 checkpoint with every packed weight replaced by its float32 dequantization: same model, dense."""
    twin_dir.mkdir()
    for shard in int4_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in [n for n in tensors if n.endswith(".weight_packed")]:
            prefix = name[: -len("_packed")]
            out_features, in_features = tensors.pop(prefix + "_shape").tolist()
            tensors[prefix] = dequantize(tensors.pop(name), tensors.pop(prefix + "_scale"), in_features, 32)
        save_file(tensors, twin_dir / shard.name)
    index = json.loads((int4_dir / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n.removesuffix("_packed"): f for n, f in index["weight_map"].items()
                           if not n.endswith(("_scale", "_shape"))}
    (twin_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((int4_dir / "config.json").read_text())
    del config["quantization_config"]
    (twin_dir / "config.json").write_text(json.dumps(config))
    return twin_dir


@pytest.mark.parametrize("scope", ["experts", "all-linear"])
@pytest.mark.usefixtures("exact_int4")
def test_int4_model_equals_its_dequantized_twin(demo_dir, int4_demo, tmp_path, scope):
    folder = int4_demo
    if scope != "experts":  # attention, dense and shared MLPs packed too: Int4Linear modules
        folder = tmp_path / "int4"
        quantize_checkpoint(demo_dir, folder, QuantizeConfig(scope=scope), progress=False)
    twin = load_model(dequantized_twin(folder, tmp_path / "twin"), dtype=torch.float32)
    model = load_model(folder, dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.q_b_proj, Int4Linear) == (scope == "all-linear")
    ids = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, ref = model(ids), twin(ids)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # Incremental decode over the latent cache runs the same experts one token at a time.
    cache = model.new_cache(2, 24)
    model(ids[:, :20], cache)
    step = torch.cat([model(ids[:, i:i + 1], cache) for i in range(20, 24)], dim=1)
    assert ((step - ref[:, 20:]).abs().max() / ref.abs().max()).item() < 1e-4


def test_int4_model_holds_packed_weights_only(int4_demo):
    model = load_model(int4_demo)
    n_experts = model.args.n_routed_experts
    layers = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert layers and all(isinstance(e, Int4Experts) for e in layers)
    dense = [n for n, t in model.state_dict().items() if ".experts." in n and t.dtype not in (torch.int32, torch.bfloat16)]
    assert not dense
    held = held_bytes(model)
    expected_weights = len(layers) * n_experts * 3 * model.args.hidden_size * model.args.moe_intermediate_size
    assert held["int4_weights"] == expected_weights
    assert held["int4_bytes"] == expected_weights // 2 + expected_weights // 32 * 2  # 4 bits + a BF16 per 32


def test_int32_weight_shape_as_in_some_k2_thinking_shards(int4_demo, tmp_path):
    """weight_shape may be stored as int32: the loader reads its values, not its dtype."""
    folder = tmp_path / "i32"
    folder.mkdir()
    for item in int4_demo.iterdir():
        if item.suffix == ".safetensors":
            tensors = load_file(item)
            save_file({n: t.int() if n.endswith("weight_shape") else t for n, t in tensors.items()}, folder / item.name)
        else:
            (folder / item.name).write_bytes(item.read_bytes())
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(load_model(folder, dtype=torch.float32)(ids), load_model(int4_demo, dtype=torch.float32)(ids))
