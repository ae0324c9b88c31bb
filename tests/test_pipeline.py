"""Pipeline parallelism with real processes over gloo: the same tokens as one process, each rank holding its own layers."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from runtime.loading import load_model
from tests.helpers import assert_one_line_error, run_k2_here

PROMPT, NEW_TOKENS = "5,6,7,8,9,10,11", 16


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
               str(free_port()), "-m", "k2cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(demo_dir):
    """The tokens of `k2 generate` in one process, by dtype: what every pipeline run must reproduce. Run in this
    process, once per dtype; the pipelines are the real processes."""
    new_ids = {}

    def generated(dtype: str) -> list[int]:
        if dtype not in new_ids:
            result = run_k2_here("generate", demo_dir, "--ids", PROMPT, "-n", NEW_TOKENS, "--dtype", dtype, "--json")
            assert result.returncode == 0, result.stderr
            new_ids[dtype] = json.loads(result.stdout)["new_ids"]
        return new_ids[dtype]

    return generated


def assert_stages_hold_only_their_layers(demo_dir, layout: list[dict], dtype: str):
    """Each rank materialized only its own layers: the stages' weights partition the model's."""
    assert layout[0]["layers"][0] == 0 and layout[-1]["layers"][1] == 3
    assert all(a["layers"][1] + 1 == b["layers"][0] for a, b in zip(layout, layout[1:]))
    whole = load_model(demo_dir, dtype=getattr(torch, dtype))
    total = sum(p.numel() * p.element_size() for p in whole.parameters())
    assert sum(r["weight_bytes"] for r in layout) == total
    assert max(r["weight_bytes"] for r in layout) < total * 0.75


# Two float32 ranks run in test_pipeline_follows_a_two_stage_plan.
@pytest.mark.parametrize("ranks,dtype", [(3, "float32"), (2, "bfloat16")])
def test_pipeline_matches_one_process(demo_dir, one_process, ranks, dtype):
    result = torchrun(ranks, "generate", demo_dir, "--ids", PROMPT, "-n", NEW_TOKENS, "--dtype", dtype, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["new_ids"] == one_process(dtype)
    assert [r["rank"] for r in out["pipeline"]] == list(range(ranks))
    assert_stages_hold_only_their_layers(demo_dir, out["pipeline"], dtype)


def test_a_dead_rank_is_an_error_not_a_hang(demo_dir):
    port = free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", K2_PIPELINE_TIMEOUT="20")
    command = [sys.executable, "-m", "k2cli", "generate", demo_dir, "--ids", PROMPT, "-n", "4000", "--dtype", "float32"]
    ranks = [subprocess.Popen(command, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    time.sleep(8)  # usually into generation; on a loaded machine maybe still forming the group: an error either way
    ranks[1].send_signal(signal.SIGKILL)
    try:
        _, stderr = ranks[0].communicate(timeout=90)
    finally:
        ranks[0].kill()
    assert_one_line_error(subprocess.CompletedProcess(command, ranks[0].returncode, "", stderr), "pipeline")


def test_pipeline_follows_a_two_stage_plan(demo_dir, one_process, tmp_path):
    planned = run_k2_here("plan", demo_dir, "--cpu-mem", "8G", "--stages", "2", "--json")
    assert planned.returncode == 0, planned.stderr
    plan = tmp_path / "plan.json"
    plan.write_text(planned.stdout)
    stages = json.loads(planned.stdout)["stages"]
    result = torchrun(2, "generate", demo_dir, "--ids", PROMPT, "-n", NEW_TOKENS, "--dtype", "float32", "--json",
                      "--plan", plan)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["new_ids"] == one_process("float32")
    assert [r["layers"] for r in out["pipeline"]] == [[s["first_layer"], s["last_layer"]] for s in stages]
    assert [r["rank"] for r in out["pipeline"]] == [0, 1]
    assert_stages_hold_only_their_layers(demo_dir, out["pipeline"], "float32")
    wrong = run_k2_here("generate", demo_dir, "--ids", PROMPT, "--plan", plan)
    assert_one_line_error(wrong, "torchrun --nproc-per-node 2")
