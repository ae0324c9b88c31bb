"""`k2 quantize --int4` on Qwen3-MoE (a random checkpoint transformers wrote, with a dense layer): the compressed-tensors
library selects exactly the linears we packed, transformers' compressed-tensors loader rebuilds our weights bit for
bit, and our INT4 runtime gives the logits of transformers' model holding the dequantized float weights."""
import json

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, apply_quantization_config
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from quant.int4 import dequantize
from runtime.info import is_linear_weight
from runtime.int4 import Int4Experts
from runtime.loading import load_model
from tests.helpers import assert_one_line_error, run_k2_here
from tests.reference_runs import assert_close, random_ids, run_ours, run_ref
from tests.test_families import write_random

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

GROUP = 32
CONFIG = dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64,
              norm_topk_prob=True, mlp_only_layers=[1])
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(the BF16 source, its INT4 output)."""
    root = tmp_path_factory.mktemp("qwen3-moe")
    source = write_random(root / "source", CONFIG, seed=3)
    out = root / "int4"
    result = run_k2_here("quantize", source, out, "--int4", "--json")
    assert result.returncode == 0, result.stderr
    return source, out


def stored_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (transformers writes one `model.safetensors`), read with the
    safetensors library."""
    return {name: tensor for shard in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(shard).items()}


def packed_names(stored: dict) -> set[str]:
    return {n.removesuffix(".weight_packed") for n in stored if n.endswith(".weight_packed")}


def test_only_routed_experts_are_packed(checkpoints):
    source, out = checkpoints
    original, stored = stored_tensors(source), stored_tensors(out)
    experts = {n.removesuffix(".weight") for n in original if ".mlp.experts." in n}
    assert packed_names(stored) == experts and len(experts) == 2 * 8 * 3  # layers 0 and 2
    for name, tensor in original.items():
        if ".mlp.experts." not in name:  # router, attention, layer 1's dense MLP, norms, embedding, head
            assert stored[name].dtype == torch.bfloat16 and torch.equal(stored[name], tensor.bfloat16()), name
    assert {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate_proj.weight"} <= stored.keys()


def linear_stand_in(folder) -> nn.Module:
    """A module tree with one nn.Linear per linear weight of the source, named as in the checkpoint."""
    root = nn.Module()
    for name, tensor in stored_tensors(folder).items():
        if not is_linear_weight(name):
            continue
        *path, leaf = name.removesuffix(".weight").split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, dtype=torch.bfloat16))
    return root


def test_compressed_tensors_selects_what_we_packed(checkpoints):
    """The config's targets and ignore list pick the experts' linears, not attention or the dense layer's MLP."""
    source, out = checkpoints
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    model = linear_stand_in(source)
    apply_quantization_config(model, config)
    selected = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert selected == packed_names(stored_tensors(out))


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # ours only adds dequantize=True
def test_transformers_rebuilds_our_weights(checkpoints):
    _, out = checkpoints
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    state, stored = model.state_dict(), stored_tensors(out)
    for layer in (0, 2):
        for e in range(8):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            ours = {p: dequantize(stored[f"{prefix}.{p}.weight_packed"], stored[f"{prefix}.{p}.weight_scale"],
                                  int(stored[f"{prefix}.{p}.weight_shape"][1]), GROUP, torch.bfloat16)
                    for p in PROJECTIONS}
            gate_up = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]
            assert torch.equal(gate_up, torch.cat([ours["gate_proj"], ours["up_proj"]]))
            assert torch.equal(state[f"model.layers.{layer}.mlp.experts.down_proj"][e], ours["down_proj"])
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.2.self_attn.q_proj.weight"):
        assert torch.equal(state[name], stored[name].float()), name


def float32_expert(stored: dict, prefix: str) -> torch.Tensor:
    """One INT4 weight dequantized by the compressed-tensors library, in float32 (exact: a 4-bit level times a BF16
    scale)."""
    shape = torch.Size(stored[f"{prefix}.weight_shape"].tolist())
    q = unpack_from_int32(stored[f"{prefix}.weight_packed"], 4, shape)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP)
    return ct_dequantize(q, stored[f"{prefix}.weight_scale"].float(), None, args, dtype=torch.float32)


@pytest.mark.usefixtures("exact_int4")
def test_int4_runtime_equals_the_dequantized_float_model(checkpoints):
    """Prefill and cached decode of our packed experts against transformers' Qwen3-MoE holding the float32
    dequantization of the same stored tensors (rel 1e-4)."""
    _, out = checkpoints
    ours = load_model(out, dtype=torch.float32)
    assert isinstance(ours.model.layers[0].mlp.experts, Int4Experts)
    config = transformers.AutoConfig.from_pretrained(out)
    del config.quantization_config  # the float model: every weight as the checkpoint stores it, experts filled below
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stored = stored_tensors(out)
    state = {n: t.float() for n, t in stored.items() if n in ref.state_dict()}
    for layer in (0, 2):
        experts = [{p: float32_expert(stored, f"model.layers.{layer}.mlp.experts.{e}.{p}") for p in PROJECTIONS}
                   for e in range(8)]
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w["gate_proj"], w["up_proj"]]) for w in experts])
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([w["down_proj"] for w in experts])
    ref.load_state_dict(state, strict=True)
    prompt, steps = random_ids(300, (1, 24), 0), random_ids(300, (1, 4), 1)
    got, want = run_ours(ours, prompt.tolist(), steps), run_ref(ref, prompt, steps)
    assert_close(got[0][0], want[0][0], "prefill of 24 tokens")
    for i, (o, r) in enumerate(zip(got[1:], want[1:])):
        assert_close(o, r, f"decode step {i}")


def test_a_dense_model_under_the_experts_scope_is_one_line_error(tmp_path):
    dense = write_random(tmp_path / "qwen3", dict(model_type="qwen3", head_dim=16), seed=0)
    result = run_k2_here("quantize", dense, tmp_path / "out", "--int4")
    assert_one_line_error(result, "--scope experts quantizes no weight", "--scope all-linear")
    assert not (tmp_path / "out").exists()
