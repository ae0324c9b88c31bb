"""Weights from untrusted sources: a NaN or infinity anywhere (weights, FP8 and INT4 scales), or an integer tensor
where the model holds floats (or the reverse), is refused by the tensor's name; float to float is a conversion."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.checkpoint import INDEX_FILE
from runtime.convert.quantize import QuantizeConfig, quantize_checkpoint
from runtime.errors import K2Error
from runtime.loading import load_model
from tests.helpers import assert_one_line_error, copy_checkpoint, run_k2_here, stored_tensors

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only stalls


@pytest.fixture(scope="module")
def int4_dir(demo_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int4") / "m"
    quantize_checkpoint(demo_dir, folder, QuantizeConfig(), progress=False)
    return folder


def rewrite_tensor(folder, name: str, change):
    """Replace tensor `name` in its shard by `change(tensor)`, written by the safetensors library."""
    shard = folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][name]
    tensors = {key: value.clone() for key, value in load_file(shard).items()}
    tensors[name] = change(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})


def poison(value: float, at: int = 1):
    def change(tensor):
        tensor.view(-1)[at] = value
        return tensor
    return change


def non_finite(folder) -> set[str]:
    """The oracle: the tensors the safetensors library reads back with a value torch says is not finite."""
    return {name for name, t in stored_tensors(folder).items() if t.is_floating_point()
            and not torch.isfinite(t.float()).all()}


@pytest.mark.parametrize("checkpoint, name, value", [
    ("demo_dir", "model.layers.2.mlp.experts.5.down_proj.weight", float("nan")),
    ("demo_dir", "model.norm.weight", float("-inf")),
    ("demo_dir", "model.layers.1.mlp.gate.e_score_correction_bias", float("nan")),
    ("demo_fp8_dir", "model.layers.1.self_attn.q_b_proj.weight_scale_inv", float("inf")),
    ("demo_fp8_dir", "model.layers.3.mlp.experts.0.up_proj.weight", float("nan")),
    ("int4_dir", "model.layers.2.mlp.experts.7.gate_proj.weight_scale", float("nan")),
    ("int4_dir", "model.layers.3.mlp.experts.15.down_proj.weight_scale", float("inf")),
])
def test_a_non_finite_value_is_refused_by_name(request, tmp_path, checkpoint, name, value):
    folder = copy_checkpoint(request.getfixturevalue(checkpoint), tmp_path / "m")
    rewrite_tensor(folder, name, poison(value))
    assert non_finite(folder) == {name}
    with pytest.raises(K2Error, match=f"tensor {name} holds NaN or infinite values"):
        load_model(folder)


def test_the_cli_refuses_nan_weights_in_one_line(demo_dir, tmp_path):
    """Loaded, the NaN made every logit NaN and the model generated token 0 forever, with exit status 0."""
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    rewrite_tensor(folder, "model.layers.0.self_attn.o_proj.weight", poison(float("nan")))
    assert_one_line_error(run_k2_here("generate", folder, "--ids", "1,2", "-n", "2"),
                          "tensor model.layers.0.self_attn.o_proj.weight holds NaN")


@pytest.mark.parametrize("checkpoint, name, dtype", [
    ("demo_dir", "model.norm.weight", torch.int16),
    ("demo_dir", "model.layers.1.self_attn.q_a_proj.weight", torch.int32),
    ("demo_dir", "model.layers.2.mlp.experts.3.gate_proj.weight", torch.bool),
    ("demo_fp8_dir", "model.layers.1.self_attn.o_proj.weight_scale_inv", torch.int32),
    ("int4_dir", "model.layers.2.mlp.experts.7.gate_proj.weight_packed", torch.float32),
    ("int4_dir", "model.layers.2.mlp.experts.7.gate_proj.weight_packed", torch.int64),
    ("int4_dir", "model.layers.2.mlp.experts.7.gate_proj.weight_scale", torch.int16),
])
def test_an_integer_float_mismatch_is_refused_by_name(request, tmp_path, checkpoint, name, dtype):
    folder = copy_checkpoint(request.getfixturevalue(checkpoint), tmp_path / "m")
    rewrite_tensor(folder, name, lambda tensor: tensor.to(dtype))
    with pytest.raises(K2Error, match=f"tensor {name} is stored as"):
        load_model(folder)


def test_the_cli_refuses_an_integer_norm_in_one_line(demo_dir, tmp_path):
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    rewrite_tensor(folder, "model.layers.3.post_attention_layernorm.weight", lambda tensor: tensor.to(torch.int16))
    assert_one_line_error(run_k2_here("generate", folder, "--ids", "1,2", "-n", "2"),
                          "tensor model.layers.3.post_attention_layernorm.weight is stored as I16")


def test_float_to_float_is_a_conversion(demo_dir, tmp_path):
    """BF16, F16 and F32 checkpoints are all legitimate: a tensor stored wider loads to the same model."""
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    rewrite_tensor(folder, "model.layers.1.self_attn.kv_b_proj.weight", lambda tensor: tensor.to(torch.float32))
    rewrite_tensor(folder, "model.norm.weight", lambda tensor: tensor.to(torch.float64))
    expected, widened = load_model(demo_dir).state_dict(), load_model(folder).state_dict()
    assert expected.keys() == widened.keys()
    for name in expected:
        assert torch.equal(expected[name], widened[name]), name
