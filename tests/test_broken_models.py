"""Every command that reads a model, run on deliberately broken model folders: a refusal is one line on stderr that
names what is wrong and a non-zero exit; never a traceback, never k2's "internal error" path, never a silent exit 0
where the model cannot be what it claims, and nothing written into the output folder named."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers import assert_one_line_error, copy_checkpoint, edit_json, run_k2_here

SHARD_1, SHARD_2 = "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"
INDEX = "model.safetensors.index.json"

# command -> its arguments after MODEL; OUT is replaced by a path in the test's folder.
COMMANDS = {
    "info": ["info"],
    "plan": ["plan", "--gpu", "80G"],
    "generate": ["generate", "--ids", "1,2,3", "-n", "2"],
    "generate-text": ["generate", "--prompt", "hi", "-n", "2"],
    "chat": ["chat", "-p", "hi", "-n", "2"],
    "bench": ["bench", "--prompt-len", "4", "--gen", "2", "--reps", "1", "--warmup", "0"],
    "eval": ["eval", "--text", "TEXT", "--ctx", "8", "--max-windows", "1"],
    "quantize": ["quantize", "OUT", "--int4"],
    "convert": ["convert", "OUT.gguf", "--to", "gguf"],
}
READ_HEADERS = set(COMMANDS)  # every command opens config.json, the index and the shard headers
READ_WEIGHTS = {"generate", "generate-text", "chat", "bench", "eval"}  # ... these load every weight
READ_TOKENIZER = {"generate-text", "chat", "eval", "convert"}
READ_TEMPLATE = {"chat"}
READ_SAMPLING = {"generate", "generate-text", "chat"}  # generation_config.json: sampling defaults and stop ids


def rewrite_header(shard, edit):
    """The shard with its JSON header replaced by edit(header) (the data section kept)."""
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
    shard.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])


def rewrite_tensor(folder, name, edit):
    """The shard holding `name` written again by the safetensors library with that tensor replaced by edit(t)."""
    shard = folder / json.loads((folder / INDEX).read_text())["weight_map"][name]
    with safe_open(shard, "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    tensors[name] = edit(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})


def nan_in(t):
    t = t.clone()
    t.view(-1)[t.numel() // 2] = float("nan")
    return t


BREAKAGES = {  # name -> (how, a fragment the one line must contain, the commands that must refuse)
    "config-not-json": (lambda m: (m / "config.json").write_text("{not json"), "config.json", READ_HEADERS),
    "no-config": (lambda m: (m / "config.json").unlink(), "config.json", READ_HEADERS),
    "config-wrong-type": (lambda m: edit_json(m / "config.json", num_hidden_layers="4"), "num_hidden_layers",
                          READ_HEADERS),
    "config-negative": (lambda m: edit_json(m / "config.json", hidden_size=-64), "hidden_size", READ_HEADERS),
    "unknown-model-type": (lambda m: edit_json(m / "config.json", model_type="gpt9"), "gpt9", READ_HEADERS),
    "index-not-json": (lambda m: (m / INDEX).write_text("[]"), INDEX, READ_HEADERS),
    "index-outside": (lambda m: edit_json(m / INDEX, weight_map={
        **json.loads((m / INDEX).read_text())["weight_map"], "lm_head.weight": "../elsewhere.safetensors"}),
        "../elsewhere.safetensors", READ_HEADERS),
    "shard-missing": (lambda m: (m / SHARD_2).unlink(), SHARD_2, READ_HEADERS - {"info", "plan"}),  # a stage's folder
    "shard-truncated": (lambda m: (m / SHARD_2).write_bytes((m / SHARD_2).read_bytes()[:-1000]), SHARD_2,
                        READ_HEADERS),
    "header-a-list": (lambda m: rewrite_header(m / SHARD_1, lambda h: [h]), SHARD_1, READ_HEADERS),
    "header-no-offsets": (lambda m: rewrite_header(m / SHARD_1, lambda h: {
        k: {f: v for f, v in e.items() if f != "data_offsets"} if k != "__metadata__" else e for k, e in h.items()}),
        SHARD_1, READ_HEADERS),
    "norm-as-int16": (lambda m: rewrite_tensor(m, "model.norm.weight", lambda t: t.to(torch.int16)),
                      "model.norm.weight", READ_WEIGHTS),
    "nan-weight": (lambda m: rewrite_tensor(m, "model.layers.0.self_attn.o_proj.weight", nan_in),
                   "model.layers.0.self_attn.o_proj.weight", READ_WEIGHTS),
    "generation-config-wrong-type": (lambda m: edit_json(m / "generation_config.json", temperature="0.6"),
                                     "generation_config.json: temperature", READ_SAMPLING),
    "generation-config-a-list": (lambda m: (m / "generation_config.json").write_text("[1]"),
                                 "generation_config.json", READ_SAMPLING),
    "no-tokenizer": (lambda m: (m / "tiktoken.model").unlink(), "tiktoken.model", READ_TOKENIZER),
    "tokenizer-not-utf8": (lambda m: (m / "tiktoken.model").write_bytes(b"\xff\xfe not base64 \x80\n"),
                           "tiktoken.model", READ_TOKENIZER),
    "tokenizer-config-not-json": (lambda m: (m / "tokenizer_config.json").write_text("{"), "tokenizer_config.json",
                                  READ_TOKENIZER),
    "template-recursive": (lambda m: (m / "chat_template.jinja").write_text(
        "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}"), "template", READ_TEMPLATE),
}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    return path


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_every_command_refuses_a_broken_model_in_one_line(demo_dir, text_file, tmp_path, breakage):
    how, fragment, must_refuse = BREAKAGES[breakage]
    model = copy_checkpoint(demo_dir, tmp_path / "model")
    how(model)
    for name, args in COMMANDS.items():
        out = tmp_path / f"out-{name}"
        args = [str(out) if a == "OUT" else f"{out}.gguf" if a == "OUT.gguf" else str(text_file) if a == "TEXT"
                else a for a in args]
        result = run_k2_here(args[0], model, *args[1:], home=tmp_path / "home")
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr, (name, result.stderr)
        if name in must_refuse:
            assert_one_line_error(result, fragment)
        elif result.returncode:
            assert_one_line_error(result)
        if result.returncode:
            assert not out.exists() or not any(out.iterdir()), (name, sorted(out.iterdir()))
            assert not list(tmp_path.glob(f"out-{name}*.gguf")), name
