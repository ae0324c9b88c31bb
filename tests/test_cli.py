"""The commands as a user runs them: default MODEL is the demo, created on first use in the user's cache."""
import json

import torch

from runtime.loading import load_model
from tests.helpers import assert_one_line_error, generate, run_k2, run_k2_here


def test_generate_on_default_demo_matches_library(tmp_path):
    home = tmp_path / "home"
    result = run_k2("generate", "--ids", "5,6,7,8", "-n", "12", "--json", "--dtype", "float32", home=home)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    demo = next(home.glob("demo-v*"))
    expected = generate(load_model(demo, dtype=torch.float32), [[5, 6, 7, 8]], 12)[0]
    assert out["new_ids"][: len(expected)] == expected


def test_generate_text_prompt(tmp_path):
    result = run_k2_here("generate", "--prompt", "Hello there", "-n", "4", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello there")


def test_bad_inputs(tmp_path):
    assert run_k2_here("info", home=tmp_path).returncode == 0  # writes the demo, so later errors are the only output
    assert_one_line_error(run_k2_here("generate", "--ids", "1,x", home=tmp_path), "--ids")
    assert_one_line_error(run_k2_here("generate", "--ids", "99999999", home=tmp_path), "prompt ids")
    assert_one_line_error(run_k2_here("generate", "--dtype", "int3", home=tmp_path), "--dtype")
    assert_one_line_error(run_k2_here("info", "someone/not-downloaded", home=tmp_path), "not in the Hugging Face cache")
    assert_one_line_error(run_k2_here("generate", "--device", "cdua", home=tmp_path), "no such device 'cdua'")
    if not torch.cuda.is_available():
        assert_one_line_error(run_k2_here("generate", "--device", "cuda", home=tmp_path), "--device cuda: ")
    if not torch.backends.mps.is_available():
        assert_one_line_error(run_k2_here("chat", "-p", "hi", "--device", "mps", home=tmp_path), "--device mps: ")


def test_help_is_fast_and_lists_commands():
    result = run_k2("--help")
    assert result.returncode == 0
    for command in ("info", "init-demo", "generate"):
        assert command in result.stdout


def test_installed_console_script_prints_one_line_errors(tmp_path):
    """The `k2` script pip installs (not only `python -m k2cli`) goes through the error handler."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("k2")
    if not script.exists():
        import pytest

        pytest.skip("k2 is not installed next to this interpreter")
    result = subprocess.run([script, "info", tmp_path / "nope"], capture_output=True, text=True)
    assert_one_line_error(result, "no such folder")
