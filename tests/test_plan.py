"""`k2 plan`: placements of the real K2-Thinking on the setups people own, checked for completeness and budgets."""
import itertools
import json
import random

import pytest
from safetensors import safe_open

from runtime.placement import GB, gpu_bandwidth_for, stage_layer_ranges
from runtime.units import parse_size
from tests.helpers import assert_one_line_error, run_k2_here
from tests.k2_configs import KIMI_K2_THINKING_CONFIG, config_only_folder

SETUPS = {  # GPUs and DIMMs hold binary sizes (80GiB); 8x141G reads the H200's 141 GB as decimal, on the safe side
    "8x H200": ["--gpu", "8x141G", "--cpu-mem", "1TiB"],
    "1x H100 + 512G RAM": ["--gpu", "80GiB", "--cpu-mem", "512GiB"],
    "2x M3 Ultra, pipelined": ["--mps", "512GiB", "--stages", "2"],
    "4x RTX 4090 + 384G RAM": ["--gpu", "24GiB", "--gpu", "24GiB", "--gpu", "2x24GiB", "--cpu-mem", "384GiB"],
}


@pytest.fixture(scope="module")
def k2_thinking(tmp_path_factory):
    return config_only_folder(tmp_path_factory.mktemp("k2t"), KIMI_K2_THINKING_CONFIG)


def plan_json(folder, *flags) -> dict:
    result = run_k2_here("plan", folder, *flags, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_complete_and_within_budget(plan: dict, n_layers: int, n_experts: int):
    layers = [entry for stage in plan["stages"] for entry in stage["layers"]]
    assert [entry["layer"] for entry in layers] == list(range(n_layers)), "every layer exactly once, in order"
    for entry in layers:
        if entry["layer"] == 0:
            assert entry["experts"] == {}  # K2's first layer is dense
            continue
        ids = [e for device_ids in entry["experts"].values() for e in device_ids]
        assert sorted(ids) == list(range(n_experts)), f"layer {entry['layer']}: every expert exactly once"
    for stage in plan["stages"]:
        for device in stage["devices"]:
            used = sum(device[k] for k in ("weights_bytes", "experts_bytes", "kv_cache_bytes", "expert_cache_bytes"))
            if device["budget_bytes"] is not None:
                assert used <= device["budget_bytes"], (stage["stage"], device)
    placed = sum(d["weights_bytes"] + d["experts_bytes"] for s in plan["stages"] for d in s["devices"])
    assert placed == plan["model_bytes"]
    assert plan["prediction"]["tokens_per_s"] > 0


@pytest.mark.parametrize("setup", SETUPS)
def test_real_k2_thinking_setups(k2_thinking, setup):
    plan = plan_json(k2_thinking, *SETUPS[setup])
    assert_complete_and_within_budget(plan, 61, 384)
    devices = {d["device"] for s in plan["stages"] for d in s["devices"]}
    if setup == "8x H200":
        assert devices >= {f"cuda:{i}" for i in range(8)}
        assert all("cpu" not in entry["experts"] for entry in plan["stages"][0]["layers"]), "all experts fit on GPUs"
    if setup == "2x M3 Ultra, pipelined":
        first, second = plan["stages"]
        assert first["first_layer"] == 0 and first["last_layer"] + 1 == second["first_layer"] and second["last_layer"] == 60
        assert first["embeddings"] and second["lm_head"] and not first["lm_head"]
    if setup == "1x H100 + 512G RAM":
        cuda = plan["stages"][0]["layers"][5]
        assert cuda["device"] == "cuda:0" and len(cuda["experts"]["cpu"]) > len(cuda["experts"]["cuda:0"]) > 0


def test_impossible_setup_is_refused(k2_thinking):
    assert_one_line_error(run_k2_here("plan", k2_thinking, "--gpu", "24G", "--cpu-mem", "64G"), "does not fit",
                          "short by")


def test_hot_experts_stay_on_the_gpu(k2_thinking, tmp_path):
    hot = {layer: [0] * 384 for layer in range(1, 61)}
    for counts in hot.values():
        counts[7], counts[300] = 1000, 500
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"layers": {str(k): v for k, v in hot.items()}}))
    plan = plan_json(k2_thinking, "--gpu", "32G", "--cpu-mem", "600G", "--expert-stats", stats)
    for entry in plan["stages"][0]["layers"][1:]:
        on_gpu = entry["experts"].get(entry["device"], [])
        assert {7, 300} <= set(on_gpu), entry["layer"]


def test_plan_bytes_match_the_real_shards(demo_dir):
    plan = plan_json(demo_dir, "--gpu", "2G", "--cpu-mem", "8G")
    stored = 0
    for shard in demo_dir.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            stored += sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())
    assert plan["model_bytes"] == stored
    assert_complete_and_within_budget(plan, 4, 16)
    # One taxonomy: layer 0's dense MLP (`mlp.gate_proj`) is a dense MLP, not the router (`mlp.gate`) of the rest.
    layers = {entry["layer"]: set(entry["components"]) for entry in plan["stages"][0]["layers"]}
    assert layers[0] == {"attention", "dense_mlp", "norms"}
    assert layers[1] == {"attention", "norms", "router", "shared_experts"}


def test_stage_split_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n, stages = rng.randint(1, 9), rng.randint(1, 4)
        if stages > n:
            continue
        costs = [rng.uniform(0.1, 10) for _ in range(n)]
        ranges = stage_layer_ranges(costs, stages)
        assert [i for r in ranges for i in r] == list(range(n)) and all(len(r) for r in ranges)
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
                   for cuts in itertools.combinations(range(1, n), stages - 1))
        assert max(sum(costs[i] for i in r) for r in ranges) == pytest.approx(best)


def test_gpu_bandwidth_guess_reads_card_sizes_as_written():
    """The guess's thresholds (>=40G...) follow the size rule: an A100 40GB given as --gpu 40G is a 1500 GB/s card."""
    guesses = {"24GiB": 900, "40G": 1500, "80G": 2600, "80GiB": 2600, "141G": 4000}
    assert {text: gpu_bandwidth_for(parse_size(text, "--gpu")) / GB for text in guesses} == guesses


def test_bad_flags(k2_thinking):
    assert_one_line_error(run_k2_here("plan", k2_thinking, "--gpu", "eighty"), "cannot read")
    assert_one_line_error(run_k2_here("plan", k2_thinking, "--gpu", "80G", "--offload", "stream"), "--cpu-mem")
    assert_one_line_error(run_k2_here("plan", k2_thinking), "no devices")


@pytest.mark.parametrize("flags, fragment", [(["--gpu", "0"], "--gpu 0 B leaves cuda:0 nothing"),
                                             (["--gpu", "80G", "--gpu", "1GiB"], "--gpu 1.00 GiB leaves cuda:1"),
                                             (["--cpu-mem", "4GiB"], "--cpu-mem 4.00 GiB leaves cpu nothing"),
                                             (["--mps", "1G"], "--mps 953.67 MiB leaves mps")])
def test_a_device_smaller_than_what_k2_keeps_of_it_is_refused_by_flag(k2_thinking, flags, fragment):
    """It used to plan with a negative budget ('-1.00 GiB budget')."""
    assert_one_line_error(run_k2_here("plan", k2_thinking, *flags), fragment)
