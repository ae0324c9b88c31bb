"""`k2 quantize --method gptq`: the layer-by-layer walk against transformers, which runs each layer on the
calibration tokens with the layers before it already quantized (it loads our output); every routed expert's Hessians
must come from exactly the tokens transformers' router sends it, and experts sent too few must fall back to mse. The
output against compressed-tensors' and transformers' readers; resume against an uninterrupted run."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, DeepseekV3Config, DeepseekV3ForCausalLM

from quant.int4 import dequantize
from quant.methods import Gptq
from runtime.convert import calibrated
from runtime.convert import quantize as quantize_module
from runtime.convert.quantize import QuantizeConfig, quantize_checkpoint
from runtime.tokenizer import Tokenizer
from tests.helpers import assert_one_line_error, run_k2_here
from tests.test_families import SMALL, write_random
from tests.test_quantize import K2_THINKING_QUANTIZATION, file_digests, linear_stand_in, stored_tensors
from tests.test_quantize_qwen3_moe import float32_expert

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:You passed `quantization_config`")]  # ours only adds dequantize=True

CALIB = Path(__file__).parent / "data" / "wikitext2-raw-test-head.txt"
CALIB_TOKENS = 1024  # two sequences of 512
GROUP = 32
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# K2-Thinking's quantization_config but for the observer that chose the scales and the act order GPTQ ran in
ACT_ORDERED = json.loads(json.dumps(K2_THINKING_QUANTIZATION).replace('"observer": "minmax"', '"observer": "mse"')
                         .replace('"actorder": null', '"actorder": "weight"'))


def recording_gptq(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (weight, Hessian) GPTQ is given, in call order."""
    calls, quantize = [], Gptq.quantize

    def record(self, w, hessian, spec):
        calls.append((w.clone(), hessian.clone()))
        return quantize(self, w, hessian, spec)

    monkeypatch.setattr(Gptq, "quantize", record)
    return calls


def by_weight(calls, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The recorded Hessians by the name of the checkpoint weight each call quantized."""
    hessians = {}
    for w, h in calls:
        names = [n for n, t in original.items() if t.shape == w.shape and torch.equal(t.float(), w)]
        assert len(names) == 1, names
        hessians[names[0]] = h
    return hessians


def transformers_hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2 * x.T @ x / len(x)


def assert_hessian(ours: torch.Tensor, x: torch.Tensor, what: str):
    theirs = transformers_hessian(x)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item()), what


def dequantized(stored: dict, prefix: str) -> torch.Tensor:
    return dequantize(stored[f"{prefix}.weight_packed"], stored[f"{prefix}.weight_scale"],
                      int(stored[f"{prefix}.weight_shape"][1]), GROUP)


def calibration_ids(folder: Path) -> torch.Tensor:
    """The calibration sequences as `k2 quantize` cuts them ([2, 512]; the demo's vocabulary adds no BOS)."""
    ids = Tokenizer.from_folder(folder).encode_document(CALIB.read_bytes().decode())[:CALIB_TOKENS]
    return torch.tensor(ids).view(2, 512)


def deepseek_int4(folder: Path) -> DeepseekV3ForCausalLM:
    """transformers' model of a demo folder, through its compressed-tensors loader where the folder is INT4."""
    config = DeepseekV3Config.from_pretrained(folder)
    config.model_type = "deepseek_v3"  # kimi_k2 would skip transformers' per-expert -> stacked conversion
    quantized = "quantization_config" in json.loads((folder / "config.json").read_text())
    return DeepseekV3ForCausalLM.from_pretrained(
        folder, config=config, dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True) if quantized else None).eval()


def dequantized_float_model(folder: Path, model_class, config) -> torch.nn.Module:
    """transformers' float32 model holding every INT4 weight as the compressed-tensors library dequantizes it in
    float32 (exact, as the walk computes; its loader rounds to the model's BF16): what the walk ran on."""
    del config.quantization_config
    model = model_class(config).eval()
    stored = stored_tensors(folder)
    state = {n: t.float() for n, t in stored.items() if n in model.state_dict()}
    packed = sorted({n.removesuffix(".weight_packed") for n in stored if n.endswith(".weight_packed")})
    experts = {}
    for prefix in packed:
        if ".mlp.experts." in prefix:
            layer, e, proj = prefix.rsplit(".", 2)
            experts.setdefault(layer.removesuffix(".experts"), {}).setdefault(int(e), {})[proj] = \
                float32_expert(stored, prefix)
        else:
            state[f"{prefix}.weight"] = float32_expert(stored, prefix)
    for mlp, by_expert in experts.items():
        ordered = [by_expert[e] for e in range(len(by_expert))]
        state[f"{mlp}.experts.gate_up_proj"] = torch.stack([torch.cat([w["gate_proj"], w["up_proj"]]) for w in ordered])
        state[f"{mlp}.experts.down_proj"] = torch.stack([w["down_proj"] for w in ordered])
    model.load_state_dict(state, strict=True)
    return model


def routing(model, tokens: torch.Tensor, layers) -> dict[int, dict]:
    """Per MoE layer, what transformers' router saw and chose: its input x [N, hidden], expert ids [N, k], and the gap
    between the k-th and the next biased score of each token (how far each choice is from a tie)."""
    seen = {}

    def hook(layer):
        def record(module, args, output):
            logits, _, ids = output
            biased = logits.sigmoid() + module.e_score_correction_bias
            top = biased.topk(ids.shape[1] + 1, dim=-1).values
            seen[layer] = {"x": args[0].reshape(-1, args[0].shape[-1]), "ids": ids, "gap": top[:, -2] - top[:, -1]}
        return record

    hooks = [model.model.layers[i].mlp.gate.register_forward_hook(hook(i)) for i in layers]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def gptq_run(demo_dir, tmp_path_factory):
    """(output folder, result, Hessians by weight name, min_expert_tokens): the demo quantized with GPTQ, the threshold
    chosen so that layer 1's three least-routed experts fall back."""
    layer1 = routing(deepseek_int4(demo_dir), calibration_ids(demo_dir), [1])[1]
    threshold = sorted(torch.bincount(layer1["ids"].flatten(), minlength=16).tolist())[3]
    out = tmp_path_factory.mktemp("gptq") / "int4"
    config = QuantizeConfig(method="gptq", calib=str(CALIB), calib_tokens=CALIB_TOKENS, min_expert_tokens=threshold,
                            report=True, max_shard_bytes=400_000)
    with pytest.MonkeyPatch.context() as patch:
        calls = recording_gptq(patch)
        result = quantize_checkpoint(demo_dir, out, config, progress=False)
    return out, result, by_weight(calls, stored_tensors(demo_dir)), config


def test_expert_hessians_are_the_tokens_the_router_sent(demo_dir, gptq_run):
    """Layer by layer, on hidden states transformers computes through our quantized earlier layers: gate and up
    projections from the tokens routed to the expert, down from the quantized gate and up applied to them; experts
    sent fewer than the threshold fall back to mse, reported with their token counts."""
    out, result, hessians, config = gptq_run
    model = dequantized_float_model(out, DeepseekV3ForCausalLM, DeepseekV3Config.from_pretrained(out))
    seen = routing(model, calibration_ids(demo_dir), [1, 2, 3])
    stored = stored_tensors(out)
    fallback = {f["expert"]: f["tokens"] for f in result["calibration"]["fallback_experts"]}
    report = {t["name"]: t for t in result["report"]["tensors"]}
    expected_fallback = {}
    for layer, chosen in seen.items():
        assert chosen["gap"].min() > 1e-5  # no near-ties: float noise between the two forwards cannot flip a choice
        for e in range(16):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            rows = (chosen["ids"] == e).any(-1)
            x = chosen["x"][rows]
            if len(x) < config.min_expert_tokens:
                expected_fallback[prefix] = len(x)
                assert not any(f"{prefix}.{p}.weight" in hessians for p in PROJECTIONS)
                assert {report[f"{prefix}.{p}.weight"]["method"] for p in PROJECTIONS} == {"mse"}
                continue
            assert_hessian(hessians[f"{prefix}.gate_proj.weight"], x, f"{prefix} gate_proj")
            assert torch.equal(hessians[f"{prefix}.up_proj.weight"], hessians[f"{prefix}.gate_proj.weight"])
            gate, up = (dequantized(stored, f"{prefix}.{p}") for p in PROJECTIONS[:2])
            inner = F.silu(x @ gate.T) * (x @ up.T)
            assert_hessian(hessians[f"{prefix}.down_proj.weight"], inner, f"{prefix} down_proj")
            assert report[f"{prefix}.down_proj.weight"]["calibration_tokens"] == len(x)
    assert fallback == expected_fallback and len([p for p in fallback if ".layers.1." in p]) == 3
    assert result["calibration"] | {"fallback_experts": None} == {
        "gptq_tensors": len(hessians), "fallback_tensors": 3 * len(fallback), "fallback_experts": None,
        "sequences": 2, "tokens": CALIB_TOKENS}
    assert len(hessians) + 3 * len(fallback) == 3 * 3 * 16


def test_output_is_what_the_readers_read(demo_dir, gptq_run):
    """The rtn output's format exactly: K2-Thinking's quantization_config (but for the observer that chose the
    scales and the act order), compressed-tensors selecting and decompressing our weights to our dequantization,
    transformers loading them."""
    out, _, _, _ = gptq_run
    assert json.loads((out / "config.json").read_text())["quantization_config"] == ACT_ORDERED
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no manifest, no saved hidden states
    config = QuantizationConfig.model_validate(ACT_ORDERED)
    model = linear_stand_in(demo_dir)
    apply_quantization_config(model, config)
    stored = stored_tensors(out)
    packed = {n.removesuffix(".weight_packed") for n in stored if n.endswith(".weight_packed")}
    ModelCompressor(quantization_config=config).compress_model(model)
    model.load_state_dict({n: t for n, t in stored.items() if n.rsplit(".", 1)[0] in packed}, strict=False)
    ModelCompressor(quantization_config=config).decompress_model(model)
    state = deepseek_int4(out).state_dict()
    for name in packed:
        ours = dequantized(stored, name).bfloat16()
        assert torch.equal(model.get_submodule(name).weight, ours), name
        layer, e, proj = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
        stacked = "down_proj" if proj == "down_proj" else "gate_up_proj"
        theirs = state[f"model.layers.{layer}.mlp.experts.{stacked}"][e]
        half = theirs.shape[0] // 2
        theirs = {"gate_proj": theirs[:half], "up_proj": theirs[half:], "down_proj": theirs}[proj]
        assert torch.equal(theirs, ours.float()), name


def test_resume_after_an_interrupt(demo_dir, gptq_run, tmp_path, monkeypatch):
    """Interrupted after layer 1, the run keeps its finished shards and the hidden states entering the first layer
    with a tensor in an unfinished shard (here layer 1: a shard holds the end of layer 1 and the start of layer 2);
    `--resume` starts there and writes the uninterrupted run's bytes."""
    full, _, _, config = gptq_run
    out = tmp_path / "resumed"
    layer_done = quantize_module.CalibratedOutput.layer_done

    def stop_after_layer_1(self, i, hidden):
        layer_done(self, i, hidden)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(quantize_module.CalibratedOutput, "layer_done", stop_after_layer_1)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(demo_dir, out, config, progress=False)
    finished = json.loads((out / quantize_module.MANIFEST).read_text())["shards"]
    states = sorted(p.name for p in out.glob(".k2-quantize-hidden-*"))
    assert len(finished) == 4 and states == [".k2-quantize-hidden-00001.safetensors",
                                             ".k2-quantize-hidden-00002.safetensors"]
    monkeypatch.undo()

    walked, layer = [], calibrated.CalibratedWalk._layer
    monkeypatch.setattr(calibrated.CalibratedWalk, "_layer", lambda self, i, h: walked.append(i) or layer(self, i, h))
    result = quantize_checkpoint(demo_dir, out, config, resume=True, progress=False)
    assert walked == [1, 2, 3] and result["resumed_shards"] == len(finished)
    assert file_digests(out) == file_digests(full)


def test_one_shard_keeps_no_hidden_states(demo_dir, gptq_run, tmp_path, monkeypatch):
    """With every tensor in one shard a resumed walk starts from the embedding, so no layer's hidden states stay on
    disk (every layer's did before: 10 GB for SmolLM2-135M); `--resume` walks every layer again."""
    config = dataclasses.replace(gptq_run[3], max_shard_bytes=5 * 10**9)
    out = tmp_path / "one-shard"
    on_disk, layer_done = [], quantize_module.CalibratedOutput.layer_done

    def stop_after_layer_2(self, i, hidden):
        layer_done(self, i, hidden)
        on_disk.append(sorted(p.name for p in out.glob(".k2-quantize-hidden-*")))
        if i == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(quantize_module.CalibratedOutput, "layer_done", stop_after_layer_2)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(demo_dir, out, config, progress=False)
    assert on_disk == [[], [], []]
    monkeypatch.undo()

    walked, layer = [], calibrated.CalibratedWalk._layer
    monkeypatch.setattr(calibrated.CalibratedWalk, "_layer", lambda self, i, h: walked.append(i) or layer(self, i, h))
    result = quantize_checkpoint(demo_dir, out, config, resume=True, progress=False)
    assert walked == [0, 1, 2, 3] and result["resumed_shards"] == 0
    assert not list(out.glob(".k2-quantize-hidden-*"))


def test_weights_on_the_grid_come_back_byte_for_byte(demo_dir, tmp_path):
    """An INT4 checkpoint on the k2 grid (K2-Thinking's case) through GPTQ: every group keeps its exact scale, every
    column rounds without error, so nothing is fed back and the weights come back as they were, as with rtn."""
    rtn = tmp_path / "rtn"
    quantize_checkpoint(demo_dir, rtn, QuantizeConfig(), progress=False)
    again = tmp_path / "again"
    quantize_checkpoint(rtn, again, QuantizeConfig(method="gptq", calib=str(CALIB), calib_tokens=512,
                                                   min_expert_tokens=1), progress=False)
    digests, expected = file_digests(again), file_digests(rtn)
    assert digests.pop("config.json") != expected.pop("config.json") and digests == expected
    config = json.loads((again / "config.json").read_text())
    assert config["quantization_config"] == ACT_ORDERED  # the observer that would have chosen the scales


def test_bad_invocations_give_one_error_line(demo_dir, tmp_path):
    def quantize(*args):
        return run_k2_here("quantize", demo_dir, tmp_path / "out", "--int4", *args)

    assert_one_line_error(quantize("--method", "gptq"), "--method gptq calibrates on text", "--calib FILE")
    for misplaced in (("--calib", CALIB), ("--no-act-order",)):
        assert_one_line_error(quantize(*misplaced),
                              "--calib and --act-order/--no-act-order are for --method gptq, not rtn")
    assert_one_line_error(quantize("--method", "gptq", "--calib", tmp_path / "missing.txt"), "missing.txt not found")
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert_one_line_error(quantize("--method", "gptq", "--calib", short), "token(s); GPTQ needs at least 16")
    assert not (tmp_path / "out").exists()
    no_tokenizer = shutil.copytree(demo_dir, tmp_path / "no-tokenizer")
    (no_tokenizer / "tiktoken.model").unlink()
    result = run_k2_here("quantize", no_tokenizer, tmp_path / "out", "--int4", "--method", "gptq", "--calib", CALIB)
    assert_one_line_error(result, "has no tokenizer to read the calibration text with")


# ---------------------------------------------------------------------------------------------------------------
# Qwen3-MoE, every linear: attention and the dense layer's MLP get GPTQ too, in act order on the ct grid

QWEN3_MOE = dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64,
                 norm_topk_prob=True, mlp_only_layers=[1])


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    """(source, GPTQ output, Hessians by weight name) of a random Qwen3-MoE with a byte-level BPE trained here."""
    root = tmp_path_factory.mktemp("qwen3-moe-gptq")
    source = write_random(root / "source", QWEN3_MOE, seed=5)
    text = CALIB.read_bytes().decode()
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=SMALL["vocab_size"], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (source / "tokenizer.json").write_text(tokenizer.to_str())
    out = root / "int4"
    with pytest.MonkeyPatch.context() as patch:
        calls = recording_gptq(patch)
        result = run_k2_here("quantize", source, out, "--int4", "--method", "gptq", "--calib", CALIB,
                             "--calib-tokens", "256", "--min-expert-tokens", "1", "--scope", "all-linear",
                             "--act-order", "--grid", "ct", "--json")
    assert result.returncode == 0, result.stderr
    return source, out, json.loads(result.stdout), by_weight(calls, stored_tensors(source))


def test_qwen3_moe_attention_and_dense_mlp_hessians(qwen3_moe):
    """Layer 0's attention sees the embedding; layer 1 (dense) sees layer 0 quantized, and its MLP sees its own
    quantized attention. transformers, loading our output, computes those inputs."""
    source, out, result, hessians = qwen3_moe
    ids = Tokenizer.from_folder(source).encode_document(CALIB.read_bytes().decode())[:256]
    model = dequantized_float_model(out, lambda config: AutoModelForCausalLM.from_config(config, dtype=torch.float32),
                                    transformers.AutoConfig.from_pretrained(out))
    inputs = {}
    targets = {"model.layers.0.self_attn.q_proj": model.model.layers[0].self_attn.q_proj,
               "model.layers.1.self_attn.k_proj": model.model.layers[1].self_attn.k_proj,
               "model.layers.1.mlp.gate_proj": model.model.layers[1].mlp.gate_proj}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.update({name: args[0][0]}))
             for name, module in targets.items()]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    for name, x in inputs.items():
        assert_hessian(hessians[f"{name}.weight"], x, name)
    stored = stored_tensors(out)
    packed = {n.removesuffix(".weight_packed") for n in stored if n.endswith(".weight_packed")}
    assert {n.removesuffix(".weight") for n in hessians} == packed  # every linear but lm_head, all by GPTQ
    assert result["calibration"]["fallback_tensors"] == 0 and result["calibration"]["tokens"] == 256
    state = AutoModelForCausalLM.from_pretrained(  # transformers' compressed-tensors loader reads attention's too
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).state_dict()
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        assert torch.equal(state[f"{name}.weight"], dequantized(stored, name).bfloat16().float()), name
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]
    assert (weights["observer"], weights["actorder"]) == ("mse", "weight")
