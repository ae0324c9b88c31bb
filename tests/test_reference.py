"""Our DeepSeek-V3 / Kimi K2 runtime against the transformers implementation, on small random checkpoints.

Both sides load the same folder in float32; the metric is rel = max|ours - ref| / max|ref| over the compared logits.
transformers is the oracle: it has its own MLA (non-absorbed, its own cache), its own MoE and routing, its own YaRN
and its own FP8 dequantization.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig

from runtime.cache import SlotCache
from runtime.loading import load_model
from runtime.models.deepseek_v3 import Attention
from runtime.models.deepseek_v3_demo import DEMO_BPE_RANKS, demo_config, write_demo
from tests.helpers import generate
from tests.reference_runs import assert_close, left_pad, random_ids, run_ours, run_ref

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


# DeepSeek-V3's own routing and rope settings (config.json of deepseek-ai/DeepSeek-V3), on the demo's sizes.
DEEPSEEK_V3_OVERRIDES = {
    "model_type": "deepseek_v3", "n_group": 4, "topk_group": 2, "first_k_dense_replace": 2,
    "routed_scaling_factor": 2.5, "num_experts_per_tok": 4,
    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
}


# ---------------------------------------------------------------------------------------------------------------
# helpers


def load_reference(folder: Path) -> DeepseekV3ForCausalLM:
    # model_type kimi_k2 must be overridden, or transformers skips its per-expert -> stacked weight conversion.
    config = DeepseekV3Config.from_pretrained(folder)
    config.model_type = "deepseek_v3"
    return DeepseekV3ForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval().float()


@dataclass
class Pair:
    """Our model and the transformers reference, loaded from one checkpoint folder."""

    folder: Path
    ours: torch.nn.Module
    ref: DeepseekV3ForCausalLM

    @classmethod
    def load(cls, folder: Path) -> "Pair":
        return cls(folder, load_model(folder, dtype=torch.float32), load_reference(folder))

    @property
    def config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text())

    def ids(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return random_ids(self.config["vocab_size"], shape, seed)


def assert_prefill_decode_match(pair: Pair, prompt_len: int, n_steps: int, seed: int = 0):
    prompt, steps = pair.ids((1, prompt_len), seed), pair.ids((1, n_steps), seed + 1)
    ours, ref = run_ours(pair.ours, prompt.tolist(), steps), run_ref(pair.ref, prompt, steps)
    assert_close(ours[0][0], ref[0][0], f"prefill of {prompt_len} tokens")
    for i, (o, r) in enumerate(zip(ours[1:], ref[1:])):
        assert_close(o, r, f"decode step {i} (position {prompt_len + i})")


def write_variant(tmp_path_factory, name: str, **kwargs) -> Path:
    return write_demo(tmp_path_factory.mktemp("variants") / name, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# fixtures: each checkpoint is loaded once per module, on both sides


@pytest.fixture(scope="module")
def demo(demo_dir) -> Pair:
    return Pair.load(demo_dir)


@pytest.fixture(scope="module")
def demo_fp8(demo_fp8_dir) -> Pair:
    return Pair.load(demo_fp8_dir)


@pytest.fixture(scope="module", params=[1, 32], ids=lambda b: f"beta_fast{b}")
def yarn_short_context(request, tmp_path_factory) -> Pair:
    """YaRN factor 32 over an original context of 32 positions, so a 64-token prompt runs past it."""
    scaling = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 32, "beta_fast": request.param,
               "beta_slow": 1, "mscale": 1, "mscale_all_dim": 1}
    return Pair.load(write_variant(tmp_path_factory, f"yarn-{request.param}", config_overrides={"rope_scaling": scaling}))


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory) -> Pair:
    return Pair.load(write_variant(tmp_path_factory, "deepseek-v3", config_overrides=DEEPSEEK_V3_OVERRIDES))


def add_mtp_layer(folder: Path):
    """Turn a checkpoint of N + 1 layers into DeepSeek-V3's layout: N layers plus one MTP layer stored as layer N.

    The last layer's tensors stay in the shards, joined by the MTP-only tensors (enorm, hnorm, eh_proj, shared_head),
    and config.json says N layers and num_nextn_predict_layers 1, as in deepseek-ai/DeepSeek-V3.
    """
    config = json.loads((folder / "config.json").read_text())
    n, hidden, vocab = config["num_hidden_layers"] - 1, config["hidden_size"], config["vocab_size"]
    generator = torch.Generator().manual_seed(1)
    extra = {f"model.layers.{n}.{name}": (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
             for name, shape in [("enorm.weight", (hidden,)), ("hnorm.weight", (hidden,)),
                                 ("eh_proj.weight", (hidden, 2 * hidden)), ("embed_tokens.weight", (vocab, hidden)),
                                 ("shared_head.norm.weight", (hidden,)), ("shared_head.head.weight", (vocab, hidden))]}
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last_shard = sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(folder / last_shard) | extra
    save_file(tensors, folder / last_shard, metadata={"format": "pt"})
    index["weight_map"].update({name: last_shard for name in extra})
    index_path.write_text(json.dumps(index, indent=2))
    config.update(num_hidden_layers=n, num_nextn_predict_layers=1)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def deepseek_v3_mtp(tmp_path_factory) -> Pair:
    n_layers = demo_config(DEMO_BPE_RANKS)["num_hidden_layers"]
    folder = write_variant(tmp_path_factory, "deepseek-v3-mtp",
                           config_overrides=DEEPSEEK_V3_OVERRIDES | {"num_hidden_layers": n_layers + 1})
    add_mtp_layer(folder)
    return Pair.load(folder)


# ---------------------------------------------------------------------------------------------------------------
# (a), (b): prefill and decode through the compressed cache on the demo


def test_prefill_48_tokens_matches_transformers(demo):
    prompt = demo.ids((1, 48), seed=0)
    with torch.inference_mode():
        assert_close(demo.ours(prompt), demo.ref(prompt).logits, "48-token prefill")


def test_decode_16_steps_through_latent_cache_matches_transformers(demo, monkeypatch):
    absorbed_calls = []
    attend_absorbed = Attention.attend_absorbed

    def spy(self, *args):
        absorbed_calls.append(args[0].shape[1])  # T of the query
        return attend_absorbed(self, *args)

    monkeypatch.setattr(Attention, "attend_absorbed", spy)
    assert_prefill_decode_match(demo, prompt_len=48, n_steps=16)
    assert absorbed_calls.count(1) == 16 * len(demo.ours.model.layers), "every decode step must attend absorbed"


# ---------------------------------------------------------------------------------------------------------------
# (c) YaRN past original_max_position_embeddings


def test_yarn_beyond_original_context_matches_transformers(yarn_short_context):
    assert yarn_short_context.config["rope_scaling"]["original_max_position_embeddings"] == 32
    assert_prefill_decode_match(yarn_short_context, prompt_len=64, n_steps=4)


# ---------------------------------------------------------------------------------------------------------------
# (d) DeepSeek-V3's config: group-limited routing, two dense layers, its YaRN; and its MTP layer


def test_deepseek_v3_config_matches_transformers(deepseek_v3):
    gate = deepseek_v3.ours.model.layers[2].mlp.gate
    assert (gate.n_group, gate.topk_group) == (4, 2)
    assert not hasattr(deepseek_v3.ours.model.layers[1].mlp, "gate"), "layers 0 and 1 must be dense"
    assert_prefill_decode_match(deepseek_v3, prompt_len=40, n_steps=8)


def test_deepseek_v3_checkpoint_with_mtp_layer_loads_and_matches(deepseek_v3_mtp):
    # The MTP tensors are really in the checkpoint, and ours builds only the N main layers.
    n = deepseek_v3_mtp.config["num_hidden_layers"]
    assert deepseek_v3_mtp.config["num_nextn_predict_layers"] == 1
    weight_map = json.loads((deepseek_v3_mtp.folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert f"model.layers.{n}.eh_proj.weight" in weight_map and f"model.layers.{n}.mlp.gate.weight" in weight_map
    assert len(deepseek_v3_mtp.ours.model.layers) == n
    # transformers also ignores the MTP layer (unexpected keys), so it is an oracle on the same folder.
    assert len(deepseek_v3_mtp.ref.model.layers) == n
    assert_prefill_decode_match(deepseek_v3_mtp, prompt_len=24, n_steps=4)


# ---------------------------------------------------------------------------------------------------------------
# (e) a batch of prompts of different lengths: ours in slots of their own lengths, transformers left-padded


def test_slots_of_different_lengths_match_a_left_padded_transformers_batch(demo):
    lengths = (5, 17, 30)
    prompts = [demo.ids((n,), seed=10 + i).tolist() for i, n in enumerate(lengths)]
    tokens, pad = left_pad(prompts)
    assert pad.tolist() == [25, 13, 0]
    steps = demo.ids((len(prompts), 4), seed=20)
    ours, ref = run_ours(demo.ours, prompts, steps), run_ref(demo.ref, tokens, steps, pad)
    for row, n in enumerate(lengths):
        assert_close(ours[0][row], ref[0][row, tokens.shape[1] - n:], f"prefill of row {row} ({n} tokens)")
    for i, (o, r) in enumerate(zip(ours[1:], ref[1:])):
        assert_close(o, r, f"batch decode step {i}")


def test_slots_decoded_together_match_their_runs_alone(demo):
    """Sharing a decode step must be invisible: each slot's logits are those of its sequence run alone."""
    prompts = [demo.ids((n,), seed=30 + n).tolist() for n in (3, 11)]
    steps = demo.ids((2, 1), seed=31)
    with torch.inference_mode():
        batch = run_ours(demo.ours, prompts, steps)[1]
        for row, prompt in enumerate(prompts):
            alone = demo.ours(torch.tensor([prompt + steps[row].tolist()]))
            assert_close(batch[row], alone[0, -1], f"row {row}", tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# greedy generation


def test_greedy_generate_32_tokens_matches_transformers_generate(demo):
    prompt = demo.ids((1, 12), seed=40)
    ours = generate(demo.ours, prompt.tolist(), max_new_tokens=32)[0]
    # Plain argmax on both sides, no stop token. min_new_tokens is left out on purpose: it would set <|im_end|>'s
    # logit to -inf (transformers merges the folder's eos id back in), which changes the argmax whenever it wins.
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        ref = demo.ref.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    ref = ref[0, prompt.shape[1]:].tolist()
    assert len(ours) == len(ref) == 32
    assert ours == ref


# ---------------------------------------------------------------------------------------------------------------
# FP8


def test_fp8_matches_transformers_dequantizing_load(demo_fp8):
    assert {p.dtype for p in demo_fp8.ref.parameters()} == {torch.float32}, "transformers must have dequantized"
    assert_prefill_decode_match(demo_fp8, prompt_len=48, n_steps=4)


@pytest.fixture(scope="module")
def fp8_dequantized_twin(demo_fp8, tmp_path_factory) -> Path:
    """A plain float32 checkpoint of transformers' own dequantization of the FP8 demo, written by save_pretrained.

    Loaded with dequantization, the model holds plain float32 weights, and save_pretrained splits its stacked experts
    back into per-expert tensors. The twin keeps the config.json transformers writes, in its own layout
    (`rope_parameters`, not `rope_scaling`).
    """
    folder = tmp_path_factory.mktemp("fp8-twin")
    demo_fp8.ref.save_pretrained(folder)
    assert "rope_parameters" in json.loads((folder / "config.json").read_text())
    return folder


def test_fp8_matches_our_load_of_transformers_dequantized_twin(demo_fp8, fp8_dequantized_twin):
    with safe_open(fp8_dequantized_twin / "model.safetensors", "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F32"}, "the twin must hold plain weights"
    twin = load_model(fp8_dequantized_twin, dtype=torch.float32)
    ours_weights, twin_weights = demo_fp8.ours.state_dict(), twin.state_dict()
    assert ours_weights.keys() == twin_weights.keys()
    for name, weight in ours_weights.items():
        assert_close(weight, twin_weights[name], f"dequantized {name}", tol=1e-6)
    prompt = demo_fp8.ids((1, 48), seed=0)
    with torch.inference_mode():
        assert_close(demo_fp8.ours(prompt), twin(prompt), "FP8 vs dequantized twin")


# ---------------------------------------------------------------------------------------------------------------
# attention internals and the cache


def test_absorbed_attention_equals_naive_attention(demo):
    attn = demo.ours.model.layers[1].self_attn
    B, T, S, H = 3, 5, 12, attn.n_heads
    g = torch.Generator().manual_seed(50)
    q_nope = 3 * torch.randn(B, T, H, attn.nope_dim, generator=g)
    q_pe = 3 * torch.randn(B, T, H, attn.rope_dim, generator=g)
    latent = torch.randn(B, S, attn.kv_lora_rank + attn.rope_dim, generator=g)
    # Causal with the T queries at the end, each row blind to its own left padding.
    pad = torch.tensor([0, 4, 7])
    slots, keys = torch.arange(S - T, S), torch.arange(S)
    mask = (keys <= slots[:, None]) & (keys >= pad[:, None, None])
    assert mask.any(-1).all() and not mask.all()
    with torch.inference_mode():
        naive = attn.attend_naive(q_nope, q_pe, latent, mask)
        absorbed = attn.attend_absorbed(q_nope, q_pe, latent, mask)
    assert naive.shape == (B, T, H, attn.v_dim)
    assert_close(absorbed, naive, "absorbed vs naive", tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cache_holds_only_the_latent_and_rope_key(demo_dir, dtype):
    config = json.loads((demo_dir / "config.json").read_text())
    element = torch.empty((), dtype=dtype).element_size()
    expected = (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * element
    model = load_model(demo_dir, dtype=dtype)
    batch, max_len = 2, 10
    cache = model.new_cache(batch, max_len)
    assert isinstance(cache, SlotCache) and {t.dtype for t in cache.buffers.values()} == {dtype}
    assert {t.shape[-1] * t.element_size() for t in cache.buffers.values()} == {expected}
    stored = sum(t.untyped_storage().nbytes() for t in cache.buffers.values())
    # One column past max_len per slot: where a decode step over every slot writes the slots not running.
    assert stored == expected * config["num_hidden_layers"] * batch * (max_len + 1)
    with torch.inference_mode():
        model(random_ids(config["vocab_size"], (batch, max_len), seed=60), cache)
    assert sum(t.untyped_storage().nbytes() for t in cache.buffers.values()) == stored, "the cache must not grow"
