"""`k2 convert --to gguf` of Llama, Qwen3 and Qwen3-MoE: llama.cpp (cyllama, tests/llama_cpp.py) loads each file,
tokenizes as the checkpoint's own tokenizer.json does and computes the logits our runtime computes on the checkpoint;
gguf-py reads back the tensors llama.cpp's loader creates (src/llama-model.cpp), the keys its converter writes
(convert_hf_to_gguf.py) and q / k rows in its rope order. F32 weights, so differences are llama.cpp's arithmetic.
"""
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import Regex, Tokenizer, pre_tokenizers

from runtime.loading import load_model
from tests.gguf_models import TEXTS, write_model
from tests.helpers import assert_one_line_error, run_k2_here
from tests.llama_cpp import LlamaCpp

pytestmark = pytest.mark.usefixtures("one_thread")
T = gguf.MODEL_TENSOR
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True)
CASES = {  # checkpoint overrides, tokenizer pre-tokenizer, llama.cpp architecture
    "qwen3": (dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True, rope_theta=1e6), "qwen2", "qwen3"),
    "qwen3-moe": (dict(model_type="qwen3_moe", **MOE, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}), "qwen2", "qwen3moe"),
    "llama": (dict(model_type="llama", rope_theta=5e5), "smollm", "llama"),
    "llama3": (dict(model_type="llama", num_key_value_heads=1, tie_word_embeddings=True, rope_theta=5e5,
                    rope_scaling=LLAMA3_ROPE), "llama-bpe", "llama"),
}


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    """(case, checkpoint folder, its config.json, the F32 GGUF `k2 convert` wrote)."""
    overrides, style, _ = CASES[request.param]
    folder = write_model(tmp_path_factory.mktemp(request.param) / request.param, overrides, style)
    out = folder.parent / f"{request.param}.gguf"
    result = run_k2_here("convert", folder, out, "--to", "gguf", "--type", "f32")
    assert result.returncode == 0, result.stderr
    return request.param, folder, json.loads((folder / "config.json").read_text()), out


def test_llama_cpp_runs_the_conversion_as_our_runtime_runs_the_checkpoint(converted):
    case, folder, _, path = converted
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    llm = LlamaCpp(path, n_ctx=128)
    try:
        for text in TEXTS:  # special and added tokens' text becomes their ids on both sides
            assert llm.tokenize(text, parse_special=True) == reference.encode(text).ids, text
        ids = reference.encode(" ".join(TEXTS)).ids[:120]
        theirs = torch.from_numpy(llm.logits(ids))
    finally:
        llm.close()
    with torch.no_grad():
        ours = load_model(folder, torch.float32)(torch.tensor([ids]))[0]
    # llama.cpp keeps its KV cache in f16: under 1e-2 of the largest logit here
    bound = 2e-2 * ours.abs().max()
    assert (theirs - ours).abs().max() <= bound, case
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9  # but where two logits nearly tie


def rope(c: dict) -> dict:
    """rope_theta and the scaling keys, which transformers 5 writes together as `rope_parameters`."""
    return c.get("rope_parameters") or {"rope_theta": c.get("rope_theta", 1e4), **(c.get("rope_scaling") or {})}


def experts(c: dict) -> int:
    return c.get("num_experts") or c["num_local_experts"]  # transformers 5 writes the latter


def name(kind, bid=None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def llama_cpp_tensors(c: dict, arch: str) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape (ggml order) of every tensor llama.cpp's llama / qwen3 / qwen3moe loader creates."""
    embd, vocab, heads, kv = c["hidden_size"], c["vocab_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or embd // heads
    shapes = {name(T.TOKEN_EMBD): (embd, vocab), name(T.OUTPUT_NORM): (embd,)}
    if not c["tie_word_embeddings"]:
        shapes[name(T.OUTPUT)] = (embd, vocab)
    if rope(c).get("rope_type") == "llama3":
        shapes[name(T.ROPE_FREQS)] = (head_dim // 2,)
    for i in range(c["num_hidden_layers"]):
        layer = {T.ATTN_NORM: (embd,), T.ATTN_Q: (embd, heads * head_dim), T.ATTN_K: (embd, kv * head_dim),
                 T.ATTN_V: (embd, kv * head_dim), T.ATTN_OUT: (heads * head_dim, embd), T.FFN_NORM: (embd,)}
        if arch.startswith("qwen3"):
            layer |= {T.ATTN_Q_NORM: (head_dim,), T.ATTN_K_NORM: (head_dim,)}
        if arch == "qwen3moe":
            ff, n = c["moe_intermediate_size"], experts(c)
            layer |= {T.FFN_GATE_INP: (embd, n), T.FFN_GATE_EXP: (embd, ff, n), T.FFN_UP_EXP: (embd, ff, n),
                      T.FFN_DOWN_EXP: (ff, embd, n)}
        else:
            ff = c["intermediate_size"]
            layer |= {T.FFN_GATE: (embd, ff), T.FFN_UP: (embd, ff), T.FFN_DOWN: (ff, embd)}
        shapes |= {name(kind, i): shape for kind, shape in layer.items()}
    return shapes


def llama_cpp_rope_factors(c: dict) -> np.ndarray:
    """rope_freqs as llama.cpp's converter computes it for Llama 3 (LlamaModel.generate_extra_tensors)."""
    scaling = rope(c)
    dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    freqs = 1.0 / (scaling["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low_factor, high_factor = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                          "high_freq_factor"))
    low, high = old / low_factor, old / high_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high:
            factors.append(1)
        elif wavelen > low:
            factors.append(scaling["factor"])
        else:
            smooth = (old / wavelen - low_factor) / (high_factor - low_factor)
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def test_gguf_py_reads_back_what_llama_cpp_loads(converted):
    case, folder, c, path = converted
    arch = CASES[case][2]
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == arch
    assert {n: tuple(int(d) for d in t.shape) for n, t in tensors.items()} == llama_cpp_tensors(c, arch)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())

    def key(k):
        return reader.fields[k.format(arch=arch)].contents()

    keys = gguf.Keys
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    expected = {keys.LLM.BLOCK_COUNT: c["num_hidden_layers"], keys.LLM.CONTEXT_LENGTH: c["max_position_embeddings"],
                keys.LLM.EMBEDDING_LENGTH: c["hidden_size"], keys.LLM.FEED_FORWARD_LENGTH: c["intermediate_size"],
                keys.Attention.HEAD_COUNT: c["num_attention_heads"],
                keys.Attention.HEAD_COUNT_KV: c["num_key_value_heads"], keys.Attention.KEY_LENGTH: head_dim,
                keys.Attention.VALUE_LENGTH: head_dim, "tokenizer.ggml.pre": CASES[case][1]}
    if arch == "qwen3moe":
        expected |= {keys.LLM.EXPERT_COUNT: experts(c), keys.LLM.EXPERT_USED_COUNT: c["num_experts_per_tok"],
                     keys.LLM.EXPERT_FEED_FORWARD_LENGTH: c["moe_intermediate_size"],
                     keys.Rope.SCALING_TYPE: "yarn",
                     keys.Rope.SCALING_ORIG_CTX_LEN: rope(c)["original_max_position_embeddings"]}
    for k, v in expected.items():
        assert key(k) == v, k
    assert key(keys.Rope.FREQ_BASE) == pytest.approx(rope(c)["rope_theta"], rel=1e-6)
    assert key(keys.Attention.LAYERNORM_RMS_EPS) == pytest.approx(c["rms_norm_eps"], rel=1e-6)

    with safe_open(folder / "model.safetensors", framework="np") as f:
        for i in range(c["num_hidden_layers"]):
            for proj, heads in (("q_proj", c["num_attention_heads"]), ("k_proj", c["num_key_value_heads"])):
                hf = f.get_tensor(f"model.layers.{i}.self_attn.{proj}.weight")
                if arch == "llama":  # llama.cpp's converter `permute`: each head's halves interleaved
                    hf = hf.reshape(heads, 2, hf.shape[0] // heads // 2, hf.shape[1]).swapaxes(1, 2).reshape(hf.shape)
                stored = tensors[name(T.ATTN_Q if proj == "q_proj" else T.ATTN_K, i)]
                assert np.array_equal(stored.data, hf), (i, proj)
    if name(T.ROPE_FREQS) in tensors:
        assert np.allclose(tensors[name(T.ROPE_FREQS)].data, llama_cpp_rope_factors(c), rtol=1e-6)


def test_what_llama_cpp_cannot_run_is_refused(converted, tmp_path):
    case, folder, c, _ = converted
    if case == "qwen3-moe":
        for change, words in (({"norm_topk_prob": False}, "norm_topk_prob"), ({"mlp_only_layers": [1]}, "dense MLP")):
            model = shutil.copytree(folder, tmp_path / f"{case}-{len(words)}")
            (model / "config.json").write_text(json.dumps(c | change))
            assert_one_line_error(run_k2_here("convert", model, tmp_path / "x.gguf", "--to", "gguf"), words)
    if case != "llama":
        return
    sentencepiece = shutil.copytree(folder, tmp_path / "sentencepiece")
    (sentencepiece / "tokenizer.json").rename(sentencepiece / "tokenizer.model")
    assert_one_line_error(run_k2_here("convert", sentencepiece, tmp_path / "x.gguf", "--to", "gguf"), "SentencePiece")
    unknown = shutil.copytree(folder, tmp_path / "unknown-split")
    tokenizer = Tokenizer.from_file(str(unknown / "tokenizer.json"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\w+|\W"), behavior="isolated"),
                                                       pre_tokenizers.ByteLevel(use_regex=False)])
    tokenizer.save(str(unknown / "tokenizer.json"))
    assert_one_line_error(run_k2_here("convert", unknown, tmp_path / "x.gguf", "--to", "gguf"), "none of llama.cpp's")
    assert not list(tmp_path.glob("*.gguf"))
