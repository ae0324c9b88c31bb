"""Llama, Qwen3 and Qwen3-MoE against transformers' own classes on small random checkpoints (float32, rel 1e-4):
prefill, decode through our per-head KV cache, and slots of unequal length against a left-padded transformers batch.

transformers writes each checkpoint (its save_pretrained: its tensor names and config.json), and both sides load it.
"""
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from runtime.loading import load_model
from tests.reference_runs import assert_close, left_pad, random_ids, run_ours, run_ref

transformers.logging.set_verbosity_error()

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48)

CONFIGS = {
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=False, rope_theta=1e6),
    "qwen3-tied": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3-yarn": dict(model_type="qwen3", head_dim=16, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen3-moe-norm": dict(model_type="qwen3_moe", **MOE, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen3-moe-raw": dict(model_type="qwen3_moe", **MOE, norm_topk_prob=False, decoder_sparse_step=2),
    "llama-llama3": dict(model_type="llama", num_key_value_heads=1, tie_word_embeddings=True, rope_theta=5e5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def write_random(folder: Path, overrides: dict, seed: int) -> Path:
    """A random checkpoint written by transformers itself; weights scaled up from its tiny init so logits differ."""
    settings = SMALL | overrides
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = write_random(tmp_path_factory.mktemp(request.param), CONFIGS[request.param], seed=len(request.param))
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return load_model(folder, dtype=torch.float32), ref


def test_prefill_and_cached_decode_match_transformers(pair):
    ours, ref = pair
    prompt, steps = random_ids(300, (1, 40), 0), random_ids(300, (1, 6), 1)
    got, want = run_ours(ours, prompt.tolist(), steps), run_ref(ref, prompt, steps)
    assert_close(got[0][0], want[0][0], "prefill of 40 tokens")
    for i, (o, r) in enumerate(zip(got[1:], want[1:])):
        assert_close(o, r, f"decode step {i}")


def test_slots_of_unequal_length_match_a_left_padded_batch(pair):
    ours, ref = pair
    prompts = [random_ids(300, (n,), n).tolist() for n in (21, 9, 14)]
    steps = random_ids(300, (3, 4), 7)
    tokens, pad = left_pad(prompts)
    got, want = run_ours(ours, prompts, steps), run_ref(ref, tokens, steps, pad)
    for b, prompt in enumerate(prompts):
        assert_close(got[0][b], want[0][b, pad[b]:], f"prefill of slot {b}")
    for i, (o, r) in enumerate(zip(got[1:], want[1:])):
        assert_close(o, r, f"batched decode step {i}")
