"""`k2 check` on an INT4 demo: the kernel this machine selects passes; a kernel made wrong on purpose fails with a
one-line verdict; a model without INT4 weights has nothing to compare. The comparison's numbers against torch's KL."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from runtime.check import DECODE_STEPS, compare_logits
from runtime.convert.quantize import QuantizeConfig, quantize_checkpoint
from runtime.int4 import Int4Experts
from runtime.kernels import cpu
from tests.helpers import assert_one_line_error, run_k2_here, stored_tensors

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ("--threads", "1")
HEAD_SCALE = 5


@pytest.fixture(scope="module")
def int4_dir(demo_dir, tmp_path_factory):
    """The demo with its routed experts in INT4, as K2-Thinking stores them, and its head made to read the token
    embedding back (times HEAD_SCALE). A random model's next-token distributions are flat (top probability ~1e-3),
    so any rounding difference (even fp32 summation order) may flip a near-tie; this one's are peaked as a trained
    model's, so its top token flips only under a real error."""
    out = tmp_path_factory.mktemp("check") / "int4"
    quantize_checkpoint(demo_dir, out, QuantizeConfig(), progress=False)
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    tensors = load_file(shard)
    tensors["lm_head.weight"] = HEAD_SCALE * stored_tensors(out)["model.embed_tokens.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    return out


def check_json(*args) -> tuple[int, dict, str]:
    result = run_k2_here("check", *args, *SMALL, "--json")
    return result.returncode, json.loads(result.stdout), result.stderr


def test_comparison_numbers_equal_torch_kl_div():
    generator = torch.Generator().manual_seed(0)
    exact = [torch.randn(5, 40, generator=generator), torch.randn(3, 40, generator=generator)]
    fast = [e + 0.3 * torch.randn(e.shape, generator=generator) for e in exact]
    got = compare_logits(exact, fast)
    e, f = torch.cat(exact), torch.cat(fast)
    kl = F.kl_div(F.log_softmax(f, -1), F.log_softmax(e, -1), log_target=True, reduction="batchmean")
    assert got["kl_mean"] == pytest.approx(kl.item(), rel=1e-5)
    assert got["top1_agreement"] == (e.argmax(-1) == f.argmax(-1)).float().mean().item()
    assert got["max_logit_diff"] == (e - f).abs().max().item() and got["positions"] == 8
    f[2, 7] = float("nan")
    broken = compare_logits([e], [f])
    assert broken["non_finite_positions"] == 1 and broken["kl_mean"] is None


def test_selected_kernel_passes(int4_dir):
    before = cpu.mode()
    code, result, stderr = check_json(int4_dir)
    assert code == 0, stderr
    assert result["compared"] and result["ok"] and result["kernel_modules_on_cpu"] > 0
    assert cpu.mode() == before  # the check leaves the selection as it found it
    assert result["kernel"] == cpu.select("auto")  # what the kernels' own dispatch picks here
    cpu.select(before)
    assert result["positions"] == 4 * (32 + DECODE_STEPS) and result["threads"] == 1
    assert result["kl_mean"] <= 1e-3 and result["top1_agreement"] >= 0.99


def test_table_ends_with_ok_verdict(int4_dir):
    result = run_k2_here("check", int4_dir, *SMALL)
    assert result.returncode == 0, result.stderr
    assert "mean KL(exact || fast)" in result.stdout and "top-1 agreement" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("ok: the ")


@pytest.fixture
def broken_kernel(monkeypatch):
    """A kernel mode named "broken" that auto selects: the real exact path underneath, the routed experts' output
    negated, as a kernel that reads the levels with the wrong sign would give."""
    real_select, forward = cpu.select, Int4Experts.forward
    broken = {"on": False}

    def select(mode):
        broken["on"] = mode in ("auto", "broken")
        return "broken" if broken["on"] else real_select(mode)

    def broken_forward(self, x, weights, ids):
        out = forward(self, x, weights, ids)
        return -out if broken["on"] else out

    before = cpu.mode()
    real_select("exact")
    monkeypatch.setattr(cpu, "select", select)
    monkeypatch.setattr(cpu, "active", lambda: "broken" if broken["on"] else "exact")
    monkeypatch.setattr(Int4Experts, "forward", broken_forward)
    yield
    real_select(before)


def test_wrong_kernel_fails_with_one_line_verdict(int4_dir, broken_kernel):
    code, result, stderr = check_json(int4_dir)
    assert code == 1 and not result["ok"] and result["kernel"] == "broken", stderr
    assert result["kl_mean"] > 1e-3 and result["top1_agreement"] < 0.99
    assert_one_line_error(run_k2_here("check", int4_dir, *SMALL),
                          "the broken CPU kernel disagrees with the exact path", "mean KL", "top-1 agreement")


def test_model_without_int4_weights_has_nothing_to_compare(demo_dir):
    code, result, stderr = check_json(demo_dir)
    assert code == 0, stderr
    assert (result["compared"], result["ok"], result["kernel_modules_on_cpu"]) == (False, True, 0)
    assert "nothing to compare" in result["verdict"]


def test_prompt_longer_than_the_context(int4_dir):
    result = run_k2_here("check", int4_dir, "--tokens", "1000000", "--threads", "1")
    assert_one_line_error(result, "--tokens 1000000", "context")
