import pytest

from runtime.demo import write_demo


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo checkpoint (BF16, three shards), written once per test session."""
    return write_demo(tmp_path_factory.mktemp("demo") / "k2-demo")


@pytest.fixture(scope="session")
def demo_fp8_dir(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("demo") / "k2-demo-fp8", fp8=True)
