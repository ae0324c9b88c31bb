"""A placement run in one process gives the unplaced model's logits: experts split, streamed, or elsewhere."""
import json

import pytest
import torch

from runtime.loading import load_model
from runtime.offload import ExpertStats, PlacedExperts, StreamedExperts, apply_placement
from tests.helpers import run_k2_here


def stage_plan(n_layers: int, n_experts: int, on_gpu: int, cache: int = 0) -> dict:
    """One stage as `k2 plan --json` writes it: attention on cuda:0, the first `on_gpu` experts there, the rest on
    the CPU, or (cache > 0) all experts on the CPU streamed through a cache of `cache` slots."""
    layers = []
    for i in range(n_layers):
        experts = {} if i == 0 else (
            {"cpu": list(range(n_experts))} if cache else
            {"cuda:0": list(range(on_gpu)), "cpu": list(range(on_gpu, n_experts))})
        layers.append({"layer": i, "device": "cuda:0", "components": {}, "experts": experts,
                       "expert_cache": cache if i else 0})
    return {"layers": layers, "embeddings": "cpu", "lm_head": "cuda:0"}


def run(model, tokens: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Prefill then greedy decode steps; the logits of every step, concatenated."""
    cache = model.new_cache(tokens.shape[0], tokens.shape[1] + steps)
    out = [model(tokens, cache)]
    for _ in range(steps):
        out.append(model(out[-1][:, -1:].argmax(-1), cache))
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def reference(demo_dir):
    tokens = torch.randint(0, 700, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return tokens, run(load_model(demo_dir, dtype=torch.float32), tokens)


def test_experts_split_between_devices_match(demo_dir, reference):
    tokens, expected = reference
    model = load_model(demo_dir, dtype=torch.float32)
    apply_placement(model, stage_plan(4, 16, on_gpu=5), device_map={"cuda:0": "cpu"})
    assert isinstance(model.model.layers[1].mlp.experts, PlacedExperts)
    with torch.inference_mode():
        torch.testing.assert_close(run(model, tokens), expected, rtol=1e-5, atol=1e-5)


def test_placement_puts_every_part_on_its_device(demo_dir):
    """Where no GPU exists, the meta device stands in for it: nothing of the GPU's share may stay on the CPU."""
    model = load_model(demo_dir, dtype=torch.float32)
    apply_placement(model, stage_plan(4, 16, on_gpu=5), device_map={"cuda:0": "meta"})
    layer = model.model.layers[2]
    assert {p.device.type for p in layer.self_attn.parameters()} == {"meta"}
    assert {p.device.type for p in layer.mlp.shared_experts.parameters()} == {"meta"}
    gpu_part, cpu_part = layer.mlp.experts.parts
    assert gpu_part.gate_proj.shape[0] == 5 and gpu_part.gate_proj.is_meta
    assert cpu_part.gate_proj.shape[0] == 11 and cpu_part.gate_proj.device.type == "cpu"
    assert model.model.embed_tokens.weight.device.type == "cpu" and model.lm_head.weight.is_meta


def test_streamed_experts_match_and_count_hits(demo_dir, reference):
    tokens, expected = reference
    model = load_model(demo_dir, dtype=torch.float32)
    streamed = apply_placement(model, stage_plan(4, 16, on_gpu=0, cache=6), device_map={"cuda:0": "cpu"})
    assert len(streamed) == 3 and all(isinstance(s, StreamedExperts) for s in streamed)
    stats = ExpertStats(model)
    with torch.inference_mode():
        torch.testing.assert_close(run(model, tokens), expected, rtol=1e-5, atol=1e-5)
    for s in streamed:
        assert s.misses >= 6 and s.hits > 0  # the cache filled, then served repeats
        assert len(s.slot_of) <= 6
    # Every token chose k experts in every MoE layer.
    for counts in stats.counts.values():
        assert counts.sum().item() == 2 * (20 + 6) * 4


def test_generate_with_a_plan_records_stats_that_plan_reads(demo_dir, tmp_path):
    plan = tmp_path / "plan.json"
    result = run_k2_here("plan", demo_dir, "--gpu", "2G", "--cpu-mem", "8G", "--offload", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    plan.write_text(result.stdout)
    stats = tmp_path / "stats.json"
    plain = run_k2_here("generate", demo_dir, "--ids", "3,4,5,6", "-n", "8", "--json", "--dtype", "float32")
    placed = run_k2_here("generate", demo_dir, "--ids", "3,4,5,6", "-n", "8", "--json", "--dtype", "float32",
                         "--plan", plan, "--device-map", "cuda:0=cpu", "--expert-stats", stats)
    assert placed.returncode == 0, placed.stderr
    assert json.loads(placed.stdout)["new_ids"] == json.loads(plain.stdout)["new_ids"]
    recorded = json.loads(stats.read_text())["layers"]
    assert sorted(recorded) == ["1", "2", "3"] and all(len(c) == 16 for c in recorded.values())
    replanned = run_k2_here("plan", demo_dir, "--gpu", "2G", "--cpu-mem", "8G", "--expert-stats", stats, "--json")
    assert replanned.returncode == 0, replanned.stderr


@pytest.mark.usefixtures("exact_int4")
def test_int4_experts_stay_packed_when_split_or_streamed(demo_dir, tmp_path):
    """K2-Thinking's case: INT4 experts on the CPU (or streamed) are computed packed, and give the unplaced logits."""
    from runtime.convert.quantize import QuantizeConfig, quantize_checkpoint
    from runtime.int4 import Int4Experts

    int4_dir = tmp_path / "int4"
    quantize_checkpoint(demo_dir, int4_dir, QuantizeConfig(), progress=False)
    tokens = torch.randint(0, 700, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = run(load_model(int4_dir, dtype=torch.float32), tokens, steps=4)
    for plan in (stage_plan(4, 16, on_gpu=5), stage_plan(4, 16, on_gpu=0, cache=5)):
        model = load_model(int4_dir, dtype=torch.float32)
        apply_placement(model, plan, device_map={"cuda:0": "cpu"})
        experts = model.model.layers[1].mlp.experts
        parts = experts.parts if isinstance(experts, PlacedExperts) else [experts.source, experts.cache]
        assert all(isinstance(part, Int4Experts) for part in parts)
        with torch.inference_mode():
            torch.testing.assert_close(run(model, tokens, steps=4), expected, rtol=1e-5, atol=1e-5)
