"""The one engine: which decoder runs is decided from the device and the settings alone, and every command that
generates (chat, generate, bench) runs the one it decides."""
import json

import pytest

from runtime.engine import select_decoder
from tests.helpers import run_k2_here


@pytest.mark.parametrize("device, settings, expected", [
    ("cpu", {}, "eager"),
    ("cpu", {"eager": True}, "eager"),
    ("mps", {}, "eager"),
    ("cuda", {}, "cuda-graph"),
    ("cuda:1", {}, "cuda-graph"),
    ("cuda", {"eager": True}, "eager"),
    ("cuda", {"placed": True}, "eager"),
    ("cuda", {"pipeline": True}, "eager"),
])
def test_decoder_is_a_function_of_device_and_settings(device, settings, expected):
    assert select_decoder(device, **settings) == expected


@pytest.mark.parametrize("flags", [(), ("--eager",)], ids=["default", "eager"])
def test_chat_generate_and_bench_run_the_same_decoder(demo_dir, flags):
    common = (demo_dir, "--dtype", "float32", *flags)
    runs = {
        "generate": run_k2_here("generate", *common, "--ids", "5,6,7", "-n", "2", "--json"),
        "chat": run_k2_here("chat", *common, "-p", "Hi", "-n", "2", "--json"),
        "bench": run_k2_here("bench", *common, "--prompt-len", "4", "--gen", "2", "--reps", "1", "--warmup", "0",
                             "--json"),
    }
    decoders = {}
    for command, result in runs.items():
        assert result.returncode == 0, (command, result.stderr)
        decoders[command] = json.loads(result.stdout)["decoder"]
    assert decoders == dict.fromkeys(runs, select_decoder("cpu", eager=bool(flags)))
