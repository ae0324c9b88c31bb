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


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: a second intra-op thread only adds synchronization (and stalls when the machine is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
