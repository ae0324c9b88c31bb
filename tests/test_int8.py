"""`--int8`: dense linears quantized at load as torch's own per-channel symmetric int8 observer quantizes them, every
dense linear but those a model reads as matrices, close to the model it came from, and checked by `k2 check`."""
import json

import pytest
import torch
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from runtime.int8 import Int8Linear
from runtime.loader import load
from tests.helpers import assert_one_line_error, run_k2_here

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantization_is_torch_per_channel_symmetric_int8():
    linear = nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight[3] = 0  # a row of zeros: scale 0 here, torch's eps there; both store zeros
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                        quant_min=-127, quant_max=127)
    observer(linear.weight.detach())
    scale, zero_point = observer.calculate_qparams()
    expected = torch.quantize_per_channel(linear.weight.detach(), scale, zero_point, 0, torch.qint8).int_repr()
    quantized = Int8Linear.quantize(linear)
    assert torch.equal(quantized.weight, expected)
    rows = torch.arange(40) != 3
    assert torch.equal(quantized.scale[rows], scale[rows].float()) and quantized.scale[3] == 0
    assert torch.equal(quantized.bias, linear.bias.detach())


def test_load_quantizes_every_dense_linear_and_stays_close(demo_dir):
    reference = load(demo_dir, dtype="float32").model
    model = load(demo_dir, dtype="float32", int8=True).model
    linears = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    assert {name for name, kind in linears.items() if kind is nn.Linear} == {
        name for name in linears if name.endswith("kv_b_proj")}  # MLA reads it as a matrix: kept
    assert "lm_head" in linears and linears["lm_head"] is Int8Linear
    ids = torch.randint(0, model.args.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        p, q = (torch.log_softmax(m(ids).float(), -1) for m in (reference, model))
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < 1e-3, kl


def test_k2_check_compares_the_int8_kernel_with_the_exact_path(demo_dir):
    result = run_k2_here("check", str(demo_dir), "--int8", "--threads", "1", "--prompts", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["compared"] and report["ok"] and report["kernel_modules_on_cpu"] > 0


def test_int8_elsewhere_than_the_cpu_is_refused(demo_dir, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    assert_one_line_error(run_k2_here("generate", str(demo_dir), "--int8", "--plan", str(plan), "-n", "2"),
                          "--int8 is for the CPU kernels")
