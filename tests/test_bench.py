"""`k2 bench` as a user runs it: every field present and positive, transformers in the same run, the weight bytes a
decode step reads recounted from the checkpoint's safetensors headers, and one-line errors. No timing thresholds."""
import json
import os
import sys
from pathlib import Path

from safetensors import safe_open

from runtime.kernels import cpu
from tests.helpers import assert_one_line_error, lscpu_nodes, run_k2_here

SMALL = ("--prompt-len", "16", "--gen", "5", "--reps", "2", "--warmup", "0", "--threads", "1")
RATES = ("prefill_tok_s", "decode_tok_s", "ttft_s")
POSITIVE = ("peak_device_bytes", "peak_host_bytes", "weight_bytes_per_step", "weight_bytes_per_token",
            "experts_read_per_step", "copy_bandwidth_bytes_s", "roofline_decode_tok_s", "bandwidth_fraction")


def bench_json(*args: str) -> dict:
    result = run_k2_here("bench", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_rates_positive(row: dict):
    for key in RATES:
        assert row[key]["mean"] > 0 and row[key]["std"] >= 0, (key, row[key])


INT8_LINEARS = ("q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "o_proj.weight",
                "gate_proj.weight", "up_proj.weight", "down_proj.weight", "lm_head.weight")


def checkpoint_decode_bytes(folder: Path, batch: int, int8: bool = False) -> int:
    """Bytes a batch-1 decode step must read, from the headers alone: every tensor but the routed experts and the
    embedding, `top_k` experts of each MoE layer, one embedding row per sequence. With `int8`, the dense linears but
    MLA's kv_b_proj at a byte per weight and four per row."""
    config = json.loads((folder / "config.json").read_text())
    sizes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                int8_linear = int8 and ".mlp.experts." not in name and name.endswith(INT8_LINEARS)
                sizes[name] = tensor.numel() + 4 * tensor.shape[0] if int8_linear else \
                    tensor.numel() * tensor.element_size()
    experts = {n: b for n, b in sizes.items() if ".mlp.experts." in n}
    n_moe_layers = len({n.split(".mlp.")[0] for n in experts})
    per_expert = sum(experts.values()) / (n_moe_layers * config["n_routed_experts"])
    embed = sizes["model.embed_tokens.weight"]
    rest = sum(sizes.values()) - sum(experts.values()) - embed
    return int(rest + batch * embed / config["vocab_size"] + n_moe_layers * config["num_experts_per_tok"] * per_expert)


def test_bench_json_on_cpu_reports_every_field_positive(demo_dir):
    result = bench_json(str(demo_dir), *SMALL)
    assert (result["device"], result["dtype"], result["decoder"], result["threads"]) == ("cpu", "bfloat16", "eager", 1)
    assert (result["prompt_len"], result["gen"], result["reps"], result["batch"]) == (16, 5, 2, 1)
    assert {n["node"]: n["cpus"] for n in result["numa_nodes"]} == lscpu_nodes()
    assert result["cpus"] == sorted(os.sched_getaffinity(0))  # one node here: nothing pinned
    assert result["cpu_kernel"] is None  # BF16 weights: no CPU kernel runs
    assert_rates_positive(result)
    for key in POSITIVE:
        assert result[key] > 0, key
    assert result["weight_bytes_per_token"] == checkpoint_decode_bytes(demo_dir, batch=1)
    assert result["roofline_decode_tok_s"] == result["copy_bandwidth_bytes_s"] / result["weight_bytes_per_step"]
    assert result["bandwidth_fraction"] == result["decode_tok_s"]["mean"] / result["roofline_decode_tok_s"]


def test_bench_int8_reads_a_byte_per_dense_weight_through_the_kernels(demo_dir):
    result = bench_json(str(demo_dir), *SMALL, "--int8")
    assert result["weight_bytes_per_token"] == checkpoint_decode_bytes(demo_dir, batch=1, int8=True)
    assert result["cpu_kernel"].startswith(cpu.active())


def test_bench_compares_with_transformers_in_the_same_run(demo_dir):
    result = bench_json(str(demo_dir), *SMALL, "--dtype", "float32", "--batch", "2", "--compare", "transformers")
    theirs = result["compare"]["transformers"]
    assert_rates_positive(result)
    assert_rates_positive(theirs)
    assert result["compare"]["decode_ratio"] == result["decode_tok_s"]["mean"] / theirs["decode_tok_s"]["mean"]
    assert result["compare"]["prefill_ratio"] == result["prefill_tok_s"]["mean"] / theirs["prefill_tok_s"]["mean"]
    # Two sequences pick up to 2 * top_k distinct experts per layer, and never fewer than top_k.
    config = json.loads((demo_dir / "config.json").read_text())
    moe_layers = config["num_hidden_layers"] - config["first_k_dense_replace"]
    k = config["num_experts_per_tok"]
    assert moe_layers * k <= result["experts_read_per_step"] <= moe_layers * 2 * k


def test_bench_table_for_people(demo_dir):
    result = run_k2_here("bench", str(demo_dir), *SMALL)
    assert result.returncode == 0, result.stderr
    assert "decode tok/s" in result.stdout and "roofline" in result.stdout and "±" in result.stdout
    assert "NUMA node" in result.stdout and "this process runs on CPUs" in result.stdout


def test_compare_without_transformers_installed_is_one_line_error(demo_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # an import of it raises ImportError, as when it is missing
    assert_one_line_error(run_k2_here("bench", str(demo_dir), *SMALL, "--compare", "transformers"), "transformers")


def test_bad_options_are_one_line_errors(demo_dir):
    assert_one_line_error(run_k2_here("bench", str(demo_dir), "--compare", "vllm"), "--compare")
    assert_one_line_error(run_k2_here("bench", str(demo_dir), *SMALL, "--compare", "llama.cpp"), "GGUF file")
    assert_one_line_error(run_k2_here("bench", str(demo_dir), "--dtype", "int3"), "--dtype")
    assert_one_line_error(run_k2_here("bench", str(demo_dir), "--device", "cuda:0", *SMALL), "cuda")
