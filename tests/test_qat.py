"""`k2 qat`: the student's forward, loss and straight-through gradient against transformers' DeepSeek-V3 on the same
weights (the original as teacher, the round-to-nearest INT4 checkpoint as the student's first step); the export
against compressed-tensors' reader and against `k2 quantize`, which must give back its integers bit for bit; resume
against an uninterrupted run; bad inputs."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from quant.int4 import dequantize
from runtime.convert.quantize import SCOPES, QuantizeConfig, Roles, quantize_checkpoint
from runtime.convert.sources import collect_sources
from runtime.loader import load
from runtime.qat import STATE, QatConfig, Run, Student, batch_at, kl_divergence, trained_tensors
from runtime.safetensors_io import MappedShards
from tests.helpers import assert_one_line_error, run_k2_here
from tests.test_quantize import K2_THINKING_QUANTIZATION, file_digests, linear_stand_in, stored_tensors
from tests.test_quantize_gptq import deepseek_int4, dequantized_float_model

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data" / "wikitext2-raw-test-head.txt"
SETTINGS = ("--steps", "4", "--batch", "2", "--seq-len", "64", "--save-every", "2", "--lr", "0.5",
            "--max-shard-size", "2MB")
MOE_LAYERS = (1, 2, 3)


def qat(*args):
    return run_k2_here("qat", *map(str, args))


@pytest.fixture(scope="module")
def qat_dir(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "int4"
    result = qat(demo_dir, out, "--data", DATA, *SETTINGS, "--json")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


def test_first_step_and_its_gradient_are_transformers(demo_dir, tmp_path):
    """Step 1's teacher is transformers' model of the original, its student transformers' model of the rtn
    checkpoint (the grid values before any update), its loss their KL, and the latents' gradient (straight through
    the grid) transformers' gradient with respect to the rtn model's expert weights."""
    rtn = tmp_path / "rtn"
    quantize_checkpoint(demo_dir, rtn, QuantizeConfig(), progress=False)
    loaded = load(demo_dir, dtype="float32")
    meta = load(demo_dir, weights=False, complete=True)
    roles = Roles.of(meta, collect_sources(meta.checkpoint, MappedShards()), SCOPES["experts"])
    student = Student(loaded.model, trained_tensors(loaded, roles), 32)
    config = QatConfig(steps=1, batch=2, seq_len=64)
    tokens = batch_at(torch.tensor(loaded.tokenizer.encode_document(DATA.read_text())), 0, config, None)
    with torch.no_grad(), student.as_teacher():
        teacher = student.logits(tokens)
    ours = student.logits(tokens)
    loss = kl_divergence(teacher, ours)
    loss.backward()

    original = deepseek_int4(demo_dir)  # a BF16 folder: transformers' float32 model of it
    grid = dequantized_float_model(rtn, DeepseekV3ForCausalLM, DeepseekV3Config.from_pretrained(rtn))
    with torch.no_grad():
        their_teacher = original(tokens).logits
    their_student = grid(tokens).logits
    assert torch.allclose(teacher, their_teacher, atol=1e-4, rtol=1e-4)
    assert torch.allclose(ours, their_student, atol=1e-4, rtol=1e-4)
    their_loss = F.kl_div(F.log_softmax(their_student.flatten(0, 1), -1), F.log_softmax(their_teacher.flatten(0, 1), -1),
                          log_target=True, reduction="batchmean")
    assert loss.item() == pytest.approx(their_loss.item(), rel=1e-3) and loss.item() > 0
    their_loss.backward()
    for layer in MOE_LAYERS:
        experts = grid.model.layers[layer].mlp.experts
        inner = experts.down_proj.shape[-1]
        theirs = {"gate_proj": experts.gate_up_proj.grad[:, :inner], "up_proj": experts.gate_up_proj.grad[:, inner:],
                  "down_proj": experts.down_proj.grad}
        for proj, grad in theirs.items():
            mine = student.latents[f"model.layers.{layer}.mlp.experts.{proj}"].grad
            assert grad.abs().max() > 0
            assert torch.allclose(mine, grad, atol=1e-3 * grad.abs().max().item(), rtol=1e-3), (layer, proj)
    assert not any(p.grad is not None for n, p in loaded.model.named_parameters() if "experts" not in n)


def test_export_is_what_the_readers_read_and_requantizes_bit_exactly(demo_dir, qat_dir, tmp_path):
    """K2-Thinking's quantization_config; compressed-tensors selects and decompresses exactly our weights; the frozen
    tensors are the input's; `k2 quantize --int4` of the export gives back the same bytes; training moved integers."""
    out, result = qat_dir
    assert json.loads((out / "config.json").read_text())["quantization_config"] == K2_THINKING_QUANTIZATION
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no state, no export folder, no temporaries
    assert result["steps"] == 4 and len(result["kl"]) == 4 and result["trained_tensors"] == 9

    stored, original = stored_tensors(out), stored_tensors(demo_dir)
    packed = {n.removesuffix(".weight_packed") for n in stored if n.endswith(".weight_packed")}
    assert packed == {n.removesuffix(".weight") for n in original if ".mlp.experts." in n}
    for name, tensor in original.items():
        if ".mlp.experts." not in name:
            assert torch.equal(stored[name], tensor), name
    config = QuantizationConfig.model_validate(K2_THINKING_QUANTIZATION)
    model = linear_stand_in(demo_dir)
    apply_quantization_config(model, config)
    ModelCompressor(quantization_config=config).compress_model(model)
    assert not model.load_state_dict({n: t for n, t in stored.items() if n.rsplit(".", 1)[0] in packed},
                                     strict=False).unexpected_keys
    ModelCompressor(quantization_config=config).decompress_model(model)
    for name in packed:
        ours = dequantize(stored[f"{name}.weight_packed"], stored[f"{name}.weight_scale"],
                          int(stored[f"{name}.weight_shape"][1]), 32, torch.bfloat16)
        assert torch.equal(model.get_submodule(name).weight, ours), name

    again = tmp_path / "again"
    assert run_k2_here("quantize", out, again, "--int4", "--max-shard-size", "2MB").returncode == 0
    assert file_digests(again) == file_digests(out)
    rtn = tmp_path / "rtn"
    quantize_checkpoint(demo_dir, rtn, QuantizeConfig(max_shard_bytes=2_000_000), progress=False)
    rtn_stored = stored_tensors(rtn)
    changed = [n for n in packed if not torch.equal(stored[f"{n}.weight_packed"], rtn_stored[f"{n}.weight_packed"])]
    assert changed


def test_an_interrupted_run_resumes_to_the_same_bytes(demo_dir, qat_dir, tmp_path, monkeypatch):
    """Ctrl-C at step 3 keeps the state of the steps done; --resume continues to what an uninterrupted run wrote."""
    out = tmp_path / "int4"
    step = Run.train_step

    def interrupted(self, tokens):
        if self.step == 3:
            raise KeyboardInterrupt
        return step(self, tokens)

    monkeypatch.setattr(Run, "train_step", interrupted)
    result = qat(demo_dir, out, "--data", DATA, *SETTINGS)
    assert result.returncode == 130 and "--resume" in result.stderr, result.stderr
    assert torch.load(out / STATE, weights_only=True)["step"] == 3
    assert not list(out.glob("*.safetensors"))
    monkeypatch.setattr(Run, "train_step", step)
    result = qat(demo_dir, out, "--data", DATA, *SETTINGS, "--resume")
    assert result.returncode == 0, result.stderr
    assert "resumed at step 3" in result.stdout
    assert file_digests(out) == file_digests(qat_dir[0])


def test_bad_invocations_give_one_error_line(demo_dir, qat_dir, tmp_path):
    out = qat_dir[0]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    short = tmp_path / "short.txt"
    short.write_text("A few words.")
    fresh = tmp_path / "fresh"
    cases = [
        ((demo_dir, busy, "--data", DATA, "--steps", "2"), ("not empty",)),
        ((demo_dir, busy, "--data", DATA, "--steps", "2", "--resume"), ("no interrupted qat run",)),
        ((demo_dir, fresh, "--data", short, "--steps", "2"), ("needs at least",)),
        ((demo_dir, fresh, "--data", tmp_path / "missing.txt", "--steps", "2"), ("not found",)),
        ((out, fresh, "--data", DATA, "--steps", "2"), ("already INT4",)),
        ((demo_dir, fresh, "--data", DATA, "--steps", "2", "--lr", "-1"), ("--lr",)),
        ((demo_dir, fresh, "--data", DATA, "--steps", "2", "--group-size", "48"), ("--group-size",)),
        ((demo_dir, fresh, "--data", DATA, "--steps", "2", "--scope", "everything"), ("--scope",)),
        ((demo_dir, demo_dir, "--data", DATA, "--steps", "2", "--force"), ("differ",)),
        ((demo_dir, fresh, "--data", DATA, "--steps", "2", "--resume", "--force"), ("exclude",)),
    ]
    for args, fragments in cases:
        assert_one_line_error(qat(*args), *fragments)
    assert (busy / "notes.txt").read_text() == "mine" and not fresh.exists()

    started = tmp_path / "started"
    (started).mkdir()
    torch.save({"fingerprint": {"settings": "other"}}, started / STATE)
    assert_one_line_error(qat(demo_dir, started, "--data", DATA, *SETTINGS, "--resume"), "another model, data or")
    (started / STATE).write_bytes(b"not a torch file")
    assert_one_line_error(qat(demo_dir, started, "--data", DATA, *SETTINGS, "--resume"), "cannot be read")
    shutil.rmtree(started)
