"""Reading model folders: every broken folder gives one clear error line, never a traceback."""
import json

import pytest
import torch
from safetensors import safe_open

from runtime.checkpoint import Checkpoint
from runtime.errors import K2Error
from runtime.loading import load_model
from tests.helpers import assert_one_line_error, copy_checkpoint, edit_json, run_k2_here


def test_header_reader_agrees_with_safetensors(demo_fp8_dir):
    ckpt = Checkpoint.open(demo_fp8_dir)
    seen = 0
    for shard in sorted(demo_fp8_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                info = ckpt.tensors[name]
                assert info.shard == shard and info.shape == tuple(tensor.shape)
                assert info.nbytes == tensor.numel() * tensor.element_size()
                seen += 1
    assert seen == len(ckpt.tensors)


def test_truncated_shard(demo_dir, tmp_path):
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(K2Error, match="truncated"):
        load_model(folder)
    assert_one_line_error(run_k2_here("generate", folder, "--ids", "1,2", "-n", "2"), "model-00002-of-00003",
                          "truncated")


def test_missing_shard(demo_dir, tmp_path):
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    (folder / "model-00003-of-00003.safetensors").unlink()
    assert_one_line_error(run_k2_here("generate", folder, "--ids", "1,2", "-n", "2"),
                          "model-00003-of-00003.safetensors", "missing")


def test_tensor_missing_from_index(demo_dir, tmp_path):
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.experts.5.up_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(run_k2_here("generate", folder, "--ids", "1,2", "-n", "2"),
                          "model.layers.2.mlp.experts.5.up_proj.weight")


def test_index_pointing_at_wrong_shard(demo_dir, tmp_path):
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(K2Error, match="does not contain"):
        Checkpoint.open(folder)


def test_unsupported_model_type(demo_dir, tmp_path):
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    edit_json(folder / "config.json", model_type="mistral")
    assert_one_line_error(run_k2_here("info", folder), "unsupported model_type 'mistral'")


def test_config_contradicting_weights(demo_dir, tmp_path):
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    edit_json(folder / "config.json", moe_intermediate_size=64)
    assert_one_line_error(run_k2_here("generate", folder, "--ids", "1,2", "-n", "2"), "shape", "config.json implies")
    edit_json(folder / "config.json", moe_intermediate_size=96, num_hidden_layers=5)
    assert_one_line_error(run_k2_here("generate", folder, "--ids", "1,2", "-n", "2"), "lacks", "model.layers.4")
    # A layer past the last one is only skipped when the config declares it a multi-token-prediction layer.
    edit_json(folder / "config.json", num_hidden_layers=3, num_nextn_predict_layers=0)
    assert_one_line_error(run_k2_here("generate", folder, "--ids", "1,2", "-n", "2"), "model.layers.3", "disagree")
    edit_json(folder / "config.json", num_nextn_predict_layers=1)
    assert run_k2_here("generate", folder, "--ids", "1,2", "-n", "2").returncode == 0


def test_not_a_model_folder(tmp_path):
    assert_one_line_error(run_k2_here("info", tmp_path / "nope"), "no such folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_k2_here("info", tmp_path / "empty"), "config.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert_one_line_error(run_k2_here("info", tmp_path / "bad"), "not valid JSON")


def test_remote_code_is_never_executed(demo_dir, tmp_path):
    """Real K2 repos ship tokenization_kimi.py and configuration code; loading must not import them."""
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    marker = tmp_path / "executed"
    for name in ("configuration_deepseek.py", "modeling_deepseek.py", "tokenization_kimi.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    edit_json(folder / "config.json", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    result = run_k2_here("generate", folder, "--prompt", "hello", "-n", "3")
    assert result.returncode == 0, result.stderr
    assert run_k2_here("info", folder).returncode == 0
    assert not marker.exists()


def test_loader_keeps_router_bias_fp32_and_materializes_everything(demo_fp8_dir):
    model = load_model(demo_fp8_dir, dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert not tensor.is_meta, name
        expected = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert tensor.dtype == expected, name


def test_a_pipeline_stage_folder_without_other_stages_shards(demo_dir, tmp_path):
    """`k2 download --stage` leaves out the shards of other stages: a stage still loads, the rest is a clear error."""
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    last = "model-00003-of-00003.safetensors"
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    (folder / last).unlink()
    in_last = {int(n.split(".")[2]) for n, shard in weight_map.items() if shard == last and n.startswith("model.layers.")}
    own = [i for i in range(4) if i not in in_last and i < min(in_last)]
    assert own, "the demo's first layers are not in its last shard"
    model = load_model(folder, layer_ids=own, embed=True, head=False)
    assert not model.model.layers[own[-1]].input_layernorm.weight.is_meta
    with pytest.raises(K2Error, match=f"{last} is missing"):
        load_model(folder)
    info = run_k2_here("info", folder, "--json")
    assert info.returncode == 0, info.stderr
    assert "1 shard(s) missing" in json.loads(info.stdout)["bytes_source"]
