"""Plan files from untrusted sources (`--plan`): what `k2 plan --json` writes reads back; any other shape, or a plan
for another model, is one error line, never a crash or experts silently skipped."""
import copy
import json

import pytest
import torch

from runtime.errors import K2Error
from runtime.loading import load_model
from runtime.offload import apply_placement, read_plan
from tests.helpers import assert_one_line_error, run_k2_here

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only stalls


@pytest.fixture(scope="module")
def demo_plan(demo_dir, tmp_path_factory) -> dict:
    result = run_k2_here("plan", demo_dir, "--gpu", "2G", "--cpu-mem", "8G", "--offload", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def demo_model(demo_dir):
    return load_model(demo_dir, dtype=torch.float32)


def write(tmp_path, plan) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


def test_a_written_plan_reads_back(demo_plan, tmp_path):
    assert read_plan(write(tmp_path, demo_plan)) == demo_plan


def with_layer(plan: dict, **entry) -> dict:
    plan = json.loads(json.dumps(plan))
    plan["stages"][0]["layers"][1].update(entry)
    return plan


BAD_SHAPES = [
    (lambda plan: [plan], "expected an object"),
    (lambda plan: {"stage": plan["stages"]}, "stages: missing"),
    (lambda plan: {"stages": []}, "stages: list should have at least 1 item"),
    (lambda plan: {"stages": [{"layers": {"0": "cpu"}}]}, "stages[0].layers: expected a list"),
    (lambda plan: with_layer(plan, layer="1"), "stages[0].layers[1].layer: expected an integer, got '1'"),
    (lambda plan: with_layer(plan, device=None), "stages[0].layers[1].device: expected a string, got None"),
    (lambda plan: with_layer(plan, experts={"cpu": [0, -1]}), "stages[0].layers[1].experts.cpu[1]: must be at least 0"),
    (lambda plan: with_layer(plan, expert_cache=True), "stages[0].layers[1].expert_cache: expected an integer"),
]


@pytest.mark.parametrize("change, message", BAD_SHAPES, ids=[message.split(":")[0] for _, message in BAD_SHAPES])
def test_a_plan_of_the_wrong_shape_names_the_file_and_field(demo_plan, tmp_path, change, message):
    path = write(tmp_path, change(demo_plan))
    with pytest.raises(K2Error) as error:
        read_plan(path)
    assert str(error.value).startswith(f"plan {path}: {message}"), str(error.value)


@pytest.mark.parametrize("change, message", [
    (lambda plan: with_layer(plan, layer=7), "places layer 7, but the model has 4 layers"),
    (lambda plan: with_layer(plan, experts={"cpu": list(range(15))}), "does not place expert 15 of layer 1"),
    (lambda plan: with_layer(plan, experts={"cpu": list(range(16)), "cuda:0": [3]}),
     "places expert 3 of layer 1 2 times"),
    (lambda plan: with_layer(plan, experts={"cpu": list(range(17))}), "places expert 16 of layer 1, which has 16"),
    (lambda plan: with_layer(plan, expert_cache=17), "a cache of 17 experts; it has 16"),
])
def test_a_plan_for_another_model_is_refused(demo_model, demo_plan, change, message):
    """Experts a plan leaves out would be skipped: the run would answer, wrongly."""
    with pytest.raises(K2Error, match=message):
        apply_placement(copy.deepcopy(demo_model), change(demo_plan)["stages"][0], device_map={"cuda:0": "cpu"})


def test_the_cli_refuses_a_bad_plan_in_one_line(demo_dir, demo_plan, tmp_path):
    path = write(tmp_path, with_layer(demo_plan, layer="1"))
    assert_one_line_error(run_k2_here("generate", demo_dir, "--ids", "1,2", "-n", "2", "--plan", path,
                                      "--device-map", "cuda:0=cpu"),
                          f"plan {path}: stages[0].layers[1].layer: expected an integer, got '1'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_plan_for_a_gpu_this_machine_lacks(demo_dir, demo_plan, tmp_path):
    gpu_plan = json.loads(json.dumps(demo_plan))
    gpu_plan["stages"][0]["layers"][1]["device"] = "cuda:0"
    path = write(tmp_path, gpu_plan)
    assert_one_line_error(run_k2_here("generate", demo_dir, "--ids", "1,2", "-n", "2", "--plan", path),
                          "the plan's device cuda:0: ", "--device-map cuda:0=cpu")
