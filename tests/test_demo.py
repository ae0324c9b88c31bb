"""The demo checkpoint is a real Kimi K2 layout: what transformers, safetensors and tiktoken read it as."""
import json

import tiktoken
import torch

from runtime.models.deepseek_v3_demo import write_demo
from runtime.tokenizer import K2_SPLIT_PATTERN, Tokenizer, read_ranks
from tests.helpers import run_k2_here, stored_tensors


def test_layout_is_kimi_k2s(demo_dir):
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["model_type"] == "kimi_k2" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["rope_scaling"]["type"] == "yarn" and config["first_k_dense_replace"] == 1
    assert config["num_experts_per_tok"] > 1 and config["n_shared_experts"] == 1
    shards = sorted(demo_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((demo_dir / "model.safetensors.index.json").read_text())
    tensors = stored_tensors(demo_dir)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (config["hidden_size"], config["moe_intermediate_size"])
    assert "model.layers.0.mlp.gate_proj.weight" in tensors and "model.layers.0.mlp.gate.weight" not in tensors
    assert {t.dtype for n, t in tensors.items() if not n.endswith("bias")} == {torch.bfloat16}


def test_fp8_variant_is_the_same_weights(demo_dir, demo_fp8_dir):
    config = json.loads((demo_fp8_dir / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    bf16, fp8 = stored_tensors(demo_dir), stored_tensors(demo_fp8_dir)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.mlp.gate.weight", "model.norm.weight"):
        assert torch.equal(fp8[name], bf16[name]), name
    weight, scale = fp8["model.layers.0.mlp.down_proj.weight"], fp8["model.layers.0.mlp.down_proj.weight_scale_inv"]
    assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (-(-weight.shape[0] // 128), -(-weight.shape[1] // 128))
    # FP8 keeps 3 mantissa bits: every weight within 1/16 relative of its BF16 original.
    original = bf16["model.layers.0.mlp.down_proj.weight"].float()
    restored = weight.float() * scale.repeat_interleave(128, 0)[: weight.shape[0]].repeat_interleave(128, 1)[:, : weight.shape[1]]
    assert ((restored - original).abs() <= original.abs() / 16 + 1e-6).all()


def test_deterministic(tmp_path):
    a, b = write_demo(tmp_path / "a"), write_demo(tmp_path / "b")
    for file in a.iterdir():
        assert file.read_bytes() == (b / file.name).read_bytes(), file.name


def test_tokenizer_files(demo_dir):
    ranks = read_ranks(demo_dir / "tiktoken.model")
    assert sorted(ranks.values()) == list(range(len(ranks))) and all(bytes([i]) in ranks for i in range(256))
    config = json.loads((demo_dir / "config.json").read_text())
    added = json.loads((demo_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert len(ranks) + 256 == config["vocab_size"] and len(added) == 256
    # K2's specials sit at the same offsets after the ranks as 163584 [BOS], 163586 <|im_end|>, 163601 <|im_middle|>.
    names = {int(i) - len(ranks): entry["content"] for i, entry in added.items()}
    assert (names[0], names[2], names[3], names[4], names[17]) == ("[BOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>")
    assert config["eos_token_id"] == len(ranks) + 2
    assert "<|im_assistant|>assistant<|im_middle|>" in (demo_dir / "chat_template.jinja").read_text()


def test_tokenizer_matches_tiktoken_and_keeps_user_text_ordinary(demo_dir):
    tokenizer = Tokenizer.from_folder(demo_dir)
    reference = tiktoken.Encoding("ref", pat_str=K2_SPLIT_PATTERN, mergeable_ranks=read_ranks(demo_dir / "tiktoken.model"),
                                  special_tokens={})
    text = "Hello, how are you today? 你好，世界 🙂 <|im_end|> It's 1234567 tokens."
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.special_tokens["<|im_end|>"] not in ids


def test_init_demo_command(demo_dir, tmp_path):
    result = run_k2_here("init-demo", tmp_path / "d", "--fp8")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "d" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    again = run_k2_here("init-demo", tmp_path / "d")
    assert again.returncode == 1 and "already exists" in again.stderr
    # --random is the test suite's fixture model, file for file.
    assert run_k2_here("init-demo", tmp_path / "r", "--random").returncode == 0
    assert sorted(f.name for f in (tmp_path / "r").iterdir()) == sorted(f.name for f in demo_dir.iterdir())
    for file in demo_dir.iterdir():
        assert file.read_bytes() == (tmp_path / "r" / file.name).read_bytes(), file.name
