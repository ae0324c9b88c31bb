"""`k2 quantize --int4` as a user runs it, checked against compressed-tensors, transformers and real processes."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import CompressedTensorsConfig, DeepseekV3Config, DeepseekV3ForCausalLM

from quant.fp8 import dequantize_fp8_block
from quant.int4 import dequantize
from runtime import models
from runtime.convert import quantize as quantize_module
from runtime.convert.quantize import QuantizeConfig, quantize_checkpoint
from runtime.errors import K2Error
from runtime.info import is_linear_weight
from runtime.models.deepseek_v3_demo import DEMO_BPE_RANKS, demo_config, write_sharded
from tests.helpers import assert_one_line_error, copy_checkpoint, run_k2, run_k2_here

transformers.logging.set_verbosity_error()

# Kimi-K2-Thinking's config.json `quantization_config`, as published (KIMI_K2.md, section 2).
K2_THINKING_QUANTIZATION = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                  "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                              "group_size": 32, "dynamic": False, "actorder": None,
                                              "block_structure": None, "observer": "minmax", "observer_kwargs": {}}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None,
}


def quantize(*args) -> subprocess.CompletedProcess:
    result = run_k2("quantize", *args)
    assert result.returncode == 0, result.stderr
    return result


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def rtn_dir(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtn") / "int4"
    quantize(demo_dir, out, "--int4", "--max-shard-size", "2MB", "--report", out.parent / "report.json")
    return out


def test_output_is_k2_thinking_layout(demo_dir, rtn_dir):
    config = json.loads((rtn_dir / "config.json").read_text())
    assert config["quantization_config"] == K2_THINKING_QUANTIZATION
    source = json.loads((demo_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (rtn_dir / name).read_bytes() == (demo_dir / name).read_bytes()
    assert not [p.name for p in rtn_dir.iterdir() if p.name.startswith(".")]  # no temporaries, no manifest

    index = json.loads((rtn_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in rtn_dir.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(set(index["weight_map"].values()))
    original = stored_tensors(demo_dir)
    dtypes = {}
    for shard in shards:
        with safe_open(rtn_dir / shard, framework="pt") as f:  # the safetensors library reads every shard
            for name in f.keys():
                assert index["weight_map"][name] == shard
                tensor = f.get_tensor(name)
                dtypes[name] = tensor.dtype
                if ".mlp.experts." in name:
                    out_features, in_features = original[name.rsplit(".", 1)[0] + ".weight"].shape
                    expected = {"weight_packed": (torch.int32, (out_features, in_features // 8)),
                                "weight_scale": (torch.bfloat16, (out_features, in_features // 32)),
                                "weight_shape": (torch.int64, (2,))}[name.rsplit(".", 1)[1]]
                    assert (tensor.dtype, tuple(tensor.shape)) == expected, name
                    if name.endswith("weight_shape"):
                        assert tensor.tolist() == [out_features, in_features]
                else:
                    assert torch.equal(tensor, original[name]), name  # BF16 (and the FP32 router bias) untouched
    assert index["metadata"]["total_size"] == sum(
        (rtn_dir / s).stat().st_size for s in shards) - sum(_header_bytes(rtn_dir / s) for s in shards)
    experts = [n for n in original if ".mlp.experts." in n]
    assert sum(n.endswith("weight_packed") for n in dtypes) == len(experts)
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == torch.float32


def _header_bytes(shard: Path) -> int:
    with shard.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def linear_stand_in(demo_dir: Path) -> nn.Module:
    """A module tree with one nn.Linear per linear weight of the demo, named as in the checkpoint."""
    root = nn.Module()
    config = json.loads((demo_dir / "config.json").read_text())
    for name, shape in models.build_on_meta(config).checkpoint_shapes().items():
        if not is_linear_weight(name):
            continue
        *path, leaf = name.removesuffix(".weight").split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16))
    return root


@pytest.mark.parametrize("scope", ["experts", "experts+shared", "all-linear"])
def test_compressed_tensors_selects_and_decompresses_our_weights(demo_dir, rtn_dir, tmp_path, scope):
    """Our config's targets + ignore list select exactly the linears we packed, and the library's ModelCompressor
    rebuilds each weight exactly as our dequantization does."""
    out = rtn_dir
    if scope != "experts":
        out = tmp_path / "int4"
        result = run_k2_here("quantize", demo_dir, out, "--int4", "--scope", scope)
        assert result.returncode == 0, result.stderr
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    model = linear_stand_in(demo_dir)
    apply_quantization_config(model, config)
    selected = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    stored = stored_tensors(out)
    packed = {n.removesuffix(".weight_packed") for n in stored if n.endswith(".weight_packed")}
    assert selected == packed and packed
    assert any(".self_attn." in n for n in packed) == (scope == "all-linear")
    assert any(".shared_experts." in n for n in packed) == (scope != "experts")

    ModelCompressor(quantization_config=config).compress_model(model)
    result = model.load_state_dict({n: t for n, t in stored.items() if n.rsplit(".", 1)[0] in packed}, strict=False)
    assert not result.unexpected_keys
    ModelCompressor(quantization_config=config).decompress_model(model)
    for name in packed:
        ours = dequantize(stored[f"{name}.weight_packed"], stored[f"{name}.weight_scale"],
                          int(stored[f"{name}.weight_shape"][1]), 32, torch.bfloat16)
        assert torch.equal(model.get_submodule(name).weight, ours), name


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # ours only adds dequantize=True
def test_transformers_loads_our_checkpoint(rtn_dir):
    """transformers' compressed-tensors loader (the path vLLM-style servers share) reads the output and dequantizes
    every routed expert to exactly our values."""
    config = DeepseekV3Config.from_pretrained(rtn_dir)
    config.model_type = "deepseek_v3"  # kimi_k2 would skip transformers' per-expert -> stacked conversion
    model = DeepseekV3ForCausalLM.from_pretrained(rtn_dir, config=config, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    state = model.state_dict()
    stored = stored_tensors(rtn_dir)
    for layer in range(config.first_k_dense_replace, config.num_hidden_layers):
        for e in range(config.n_routed_experts):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            ours = {p: dequantize(stored[f"{prefix}.{p}.weight_packed"], stored[f"{prefix}.{p}.weight_scale"],
                                  int(stored[f"{prefix}.{p}.weight_shape"][1]), 32, torch.bfloat16)
                    for p in ("gate_proj", "up_proj", "down_proj")}
            gate_up = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]
            assert torch.equal(gate_up, torch.cat([ours["gate_proj"], ours["up_proj"]]))
            assert torch.equal(state[f"model.layers.{layer}.mlp.experts.down_proj"][e], ours["down_proj"])


def test_requantizing_an_int4_checkpoint_is_bit_exact(rtn_dir, tmp_path):
    """An INT4 checkpoint on the k2 grid (K2-Thinking's case) comes back byte for byte."""
    again = tmp_path / "again"
    result = run_k2_here("quantize", rtn_dir, again, "--int4", "--max-shard-size", "2MB")
    assert result.returncode == 0, result.stderr
    assert file_digests(again) == file_digests(rtn_dir)


def test_fp8_input(demo_fp8_dir, tmp_path):
    out = tmp_path / "from-fp8"
    result = run_k2_here("quantize", demo_fp8_dir, out, "--int4")
    assert result.returncode == 0, result.stderr
    fp8, stored = stored_tensors(demo_fp8_dir), stored_tensors(out)
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    assert stored[name].dtype == torch.bfloat16
    # torch's own float8 conversion, block scales applied, rounded once to BF16.
    assert torch.equal(stored[name], dequantize_fp8_block(fp8[name], fp8[name + "_scale_inv"]).bfloat16())
    assert not [n for n in stored if n.endswith("_scale_inv")]
    prefix = "model.layers.3.mlp.experts.7.down_proj"
    expert = dequantize_fp8_block(fp8[prefix + ".weight"], fp8[prefix + ".weight_scale_inv"])
    int4 = dequantize(stored[prefix + ".weight_packed"], stored[prefix + ".weight_scale"], expert.shape[1], 32)
    assert ((int4 - expert).norm() / expert.norm()).item() < 0.15  # 4-bit noise: SQNR about 20 dB


def test_mse_is_never_worse_than_rtn(demo_dir, rtn_dir, tmp_path):
    result = run_k2_here("quantize", demo_dir, tmp_path / "mse", "--int4", "--method", "mse", "--report",
                         tmp_path / "mse.json")
    assert result.returncode == 0, result.stderr
    rtn = {t["name"]: t for t in json.loads((rtn_dir.parent / "report.json").read_text())["tensors"]}
    mse = {t["name"]: t for t in json.loads((tmp_path / "mse.json").read_text())["tensors"]}
    assert rtn.keys() == mse.keys() and len(rtn) == 3 * 3 * 16
    for name in rtn:
        assert mse[name]["mean_sq_error"] <= rtn[name]["mean_sq_error"] * (1 + 1e-9), name
    assert sum(mse[n]["mean_sq_error"] < rtn[n]["mean_sq_error"] for n in rtn) > len(rtn) // 2
    # The SQNR reported is the one the stored checkpoint has.
    stored = stored_tensors(tmp_path / "mse")
    original = stored_tensors(demo_dir)
    name = "model.layers.2.mlp.experts.4.up_proj"
    w = original[name + ".weight"].float()
    noise = dequantize(stored[name + ".weight_packed"], stored[name + ".weight_scale"], w.shape[1], 32) - w
    sqnr = 10 * torch.log10(w.square().sum() / noise.square().sum()).item()
    assert sqnr == pytest.approx(mse[name + ".weight"]["sqnr_db"], abs=1e-3)

    # Both judged against the original with k2 eval (its numbers are checked in test_eval.py). One thread: on a busy
    # machine, intra-op threads spinning over the demo's tiny matmuls cost ten times the work.
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Expert {i} of layer {i % 3} sees token {i * 7 % 11}." for i in range(40)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = [run_k2_here("eval", folder, "--text", text, "--ref", demo_dir, "--ctx", "64", "--json")
                   for folder in (rtn_dir, tmp_path / "mse")]
    finally:
        torch.set_num_threads(threads)
    for result in results:
        assert result.returncode == 0, result.stderr
        scores = json.loads(result.stdout)
        assert 0 < scores["kl_mean"] < 0.01 and 0.5 < scores["top1_agreement"] <= 1
        assert scores["int4_bytes_per_weight"] == 4.5 / 8  # 4 bits + one BF16 scale per 32 weights


def test_bad_invocations_give_one_error_line(demo_dir, rtn_dir, tmp_path):
    assert_one_line_error(run_k2_here("quantize", demo_dir, rtn_dir, "--int4"), "not empty", "--resume")
    assert_one_line_error(run_k2_here("quantize", demo_dir, rtn_dir, "--int4", "--resume"), "no unfinished")
    with pytest.raises(K2Error, match="--group-size must be one of 16, 32, 64, 128"):
        QuantizeConfig(group_size=48)
    with pytest.raises(K2Error, match="--grid must be one of k2, ct"):
        QuantizeConfig(grid="nf4")
    with pytest.raises(K2Error, match="--scope"):
        QuantizeConfig(scope="attention")
    with pytest.raises(K2Error, match="down_proj.weight has 96 input features, not a multiple of --group-size 64"):
        quantize_checkpoint(demo_dir, tmp_path / "g64", QuantizeConfig(group_size=64), progress=False)
    assert not (tmp_path / "g64").exists()
    broken = copy_checkpoint(demo_dir, tmp_path / "broken")
    shard = broken / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_one_line_error(run_k2_here("quantize", broken, tmp_path / "o2", "--int4"), "model-00002-of-00003", "truncated")


def test_full_disk(demo_dir, tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    quantize_checkpoint(demo_dir, tmp_path / "whole", QuantizeConfig(), progress=False)
    needed = sum(p.stat().st_size for p in (tmp_path / "whole").glob("*.safetensors"))
    monkeypatch.setattr(quantize_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=needed - 1))
    with pytest.raises(K2Error, match=rf"not enough space in {tmp_path / 'a'} for the remaining shards: .* 1 B short"):
        quantize_checkpoint(demo_dir, tmp_path / "a", QuantizeConfig(), progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(K2Error, match="No space left on device"):
        quantize_checkpoint(demo_dir, tmp_path / "b", QuantizeConfig(), progress=False)
    assert not list((tmp_path / "b").glob(".*.tmp"))
    monkeypatch.undo()

    def full_mid_shard(fd, data, offset):  # a disk that promised the space (or a quota) and then refuses it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full_mid_shard)
    with pytest.raises(K2Error, match=rf"cannot write {tmp_path / 'd'}/model-\S+\.safetensors: No space left"):
        quantize_checkpoint(demo_dir, tmp_path / "d", QuantizeConfig(), progress=False)
    monkeypatch.undo()

    copyfile = shutil.copyfile

    def full_after_the_weights(source, target):  # what shutil reports: the source's name, not the file being written
        if Path(source).parent == demo_dir:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))
        return copyfile(source, target)

    monkeypatch.setattr(shutil, "copyfile", full_after_the_weights)
    out = tmp_path / "c"
    with pytest.raises(K2Error, match=rf"cannot write {out}: No space left on device; .* --resume continues"):
        quantize_checkpoint(demo_dir, out, QuantizeConfig(), progress=False)
    assert not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# streaming: memory and resume on a checkpoint larger than the memory bound


def write_large_checkpoint(folder: Path, n_shards: int) -> Path:
    """A K2-layout checkpoint of about 1.4 GB in `n_shards` shards (one random block reused: memory is what counts)."""
    config = demo_config(DEMO_BPE_RANKS) | {"hidden_size": 1024, "moe_intermediate_size": 1024, "n_routed_experts": 76,
                                            "intermediate_size": 2048, "q_lora_rank": 256, "kv_lora_rank": 128}
    shapes = models.build_on_meta(config).checkpoint_shapes()
    largest = max(torch.Size(s).numel() for s in shapes.values())
    pool = (0.02 * torch.randn(largest, generator=torch.Generator().manual_seed(0))).bfloat16()
    tensors = {n: pool[: torch.Size(s).numel()].view(s).to(torch.float32 if n.endswith("bias") else torch.bfloat16,
                                                             copy=True) for n, s in shapes.items()}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    write_sharded(folder, tensors, n_shards)
    return folder


# Runs a command and prints its peak RSS. A small process in between matters: a child's ru_maxrss starts from its
# parent's RSS at fork, and this test process holds the checkpoint it just wrote.
MEASURE = ("import resource, subprocess, sys; "
           "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
           "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")


def run_measured(*args) -> tuple[int, int]:
    """Run `k2 quantize` in a child process: (exit code, its peak resident memory in bytes)."""
    result = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "k2cli", "quantize", *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    code, peak = result.stdout.split()
    return int(code), int(peak)


def test_peak_memory_bound_and_resume_after_kill(tmp_path):
    model = write_large_checkpoint(tmp_path / "big", n_shards=10)
    inputs = sorted(model.glob("*.safetensors"))
    total_input = sum(p.stat().st_size for p in inputs)
    assert len(inputs) >= 8

    args = ["--int4", "--max-shard-size", "100MB"]
    code, peak = run_measured(model, tmp_path / "full", *args)
    assert code == 0
    outputs = sorted((tmp_path / "full").glob("*.safetensors"))
    bound = max(p.stat().st_size for p in inputs) + max(p.stat().st_size for p in outputs) + 2**30
    assert total_input > bound  # holding the model, or even a quarter of the output, would break it
    assert peak < bound, f"peak RSS {peak / 2**20:.0f} MiB over the bound {bound / 2**20:.0f} MiB"

    # Kill the run as soon as its manifest records a finished shard, then resume: same bytes as an uninterrupted run.
    interrupted = tmp_path / "interrupted"
    manifest = interrupted / quantize_module.MANIFEST
    process = subprocess.Popen([sys.executable, "-m", "k2cli", "quantize", model, interrupted, *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (manifest.exists() and json.loads(manifest.read_text())["shards"]):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = json.loads(manifest.read_text())["shards"]
    assert 0 < len(finished) < len(outputs), "the run finished before it could be interrupted"

    assert_one_line_error(run_k2_here("quantize", model, interrupted, "--int4", "--max-shard-size", "50MB", "--resume"),
                          "other settings")
    result = run_k2_here("quantize", model, interrupted, *args, "--resume", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["resumed_shards"] == len(finished)
    assert file_digests(interrupted) == file_digests(tmp_path / "full")
