"""`k2 info`: numbers from config.json and headers, checked against published figures and the safetensors library."""
import json
import shutil

import pytest
from safetensors import safe_open

from tests.helpers import run_k2_here
from tests.k2_configs import KIMI_K2_CONFIG, KIMI_K2_THINKING_CONFIG, config_only_folder

def info_json(folder, tmp_path) -> dict:
    result = run_k2_here("info", folder, "--json", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_real_kimi_k2_from_config_only(tmp_path):
    (tmp_path / "k2").mkdir()
    (tmp_path / "k2" / "config.json").write_text(json.dumps(KIMI_K2_CONFIG))
    info = info_json(tmp_path / "k2", tmp_path)
    # Moonshot's model card: 1.03 T total, 32.9 B activated (embeddings and lm_head included).
    assert info["parameters"]["total"] == pytest.approx(1.03e12, rel=0.01)
    assert info["parameters"]["active_per_token"] == pytest.approx(32.9e9, rel=0.01)
    assert info["kv_cache"]["bytes_per_token"] == 61 * (512 + 64) * 2 == 70_272
    assert info["dense_layers"] == 1 and info["moe_layers"] == 60
    # K2-Instruct's FP8 release is about 1.03 TB on disk.
    assert info["total_bytes"] == pytest.approx(1.03e12, rel=0.02)
    assert set(info["components"]["routed_experts"]["bytes_by_dtype"]) == {"F8_E4M3", "F32"}
    assert set(info["components"]["embeddings"]["bytes_by_dtype"]) == {"BF16"}


def stored_with_safetensors(folder) -> tuple[int, int]:
    """(elements, bytes) of every tensor in the folder's shards, read with the safetensors library."""
    numel = nbytes = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                numel += t.numel()
                nbytes += t.numel() * t.element_size()
    return numel, nbytes


def test_demo_totals_match_the_shards(demo_dir, tmp_path):
    info = info_json(demo_dir, tmp_path)
    numel, nbytes = stored_with_safetensors(demo_dir)
    assert info["parameters"]["total"] == numel
    assert info["total_bytes"] == nbytes
    assert info["bytes_source"] == "safetensors headers"
    config = json.loads((demo_dir / "config.json").read_text())
    assert info["kv_cache"]["bytes_per_token"] == config["num_hidden_layers"] * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 2


@pytest.mark.parametrize("fixture", ["demo_dir", "demo_fp8_dir"])
def test_config_only_estimate_equals_real_bytes(fixture, request, tmp_path):
    """What info predicts before the download is what the download holds, component by component."""
    folder = request.getfixturevalue(fixture)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(folder / "config.json", config_only / "config.json")
    predicted, actual = info_json(config_only, tmp_path), info_json(folder, tmp_path)
    assert predicted["bytes_source"].startswith("estimated")
    assert predicted["components"] == actual["components"]
    assert predicted["total_bytes"] == actual["total_bytes"] == stored_with_safetensors(folder)[1]


def test_real_kimi_k2_thinking_int4_size(tmp_path):
    """Moonshot ships K2-Thinking's INT4 checkpoint as about 594 GB of safetensors."""
    info = info_json(config_only_folder(tmp_path, KIMI_K2_THINKING_CONFIG), tmp_path)
    assert info["total_bytes"] == pytest.approx(594e9, rel=0.01)
    assert set(info["components"]["routed_experts"]["bytes_by_dtype"]) == {"I32", "BF16", "I64"}
    assert set(info["components"]["attention"]["bytes_by_dtype"]) == {"BF16"}
