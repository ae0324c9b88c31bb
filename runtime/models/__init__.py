"""Architecture families by `model_type`: each family module declares a `FAMILY` (runtime/models/family.py).

A new family is one module listed in FAMILY_MODULES; nothing else in the toolkit needs to know it. A family that
lives elsewhere (the tests' scripted model, tests/scripted_model.py) is added for one process by `register_family`.
"""
import importlib
from contextlib import contextmanager

from runtime import config_schema
from runtime.errors import K2Error
from runtime.models.family import Family

FAMILY_MODULES = ["runtime.models.deepseek_v3", "runtime.models.llama", "runtime.models.qwen3",
                  "runtime.models.qwen3_moe"]
DEMO_MODULE = "runtime.models.deepseek_v3_demo"  # the built-in demo: a tiny Kimi K2


def families() -> list[Family]:
    return [importlib.import_module(name).FAMILY for name in FAMILY_MODULES]


def register_family(module_name: str):
    """Add the family module `module_name` (one that declares a `FAMILY`) for the rest of this process; registering
    one again changes nothing."""
    if module_name in FAMILY_MODULES:
        return
    if not isinstance(getattr(importlib.import_module(module_name), "FAMILY", None), Family):
        raise K2Error(f"{module_name} declares no FAMILY (runtime/models/family.py)")
    FAMILY_MODULES.append(module_name)


def family_of(config: dict) -> Family:
    model_type = config.get("model_type")
    for family in families():
        if model_type in family.model_types:
            return family
    supported = sorted(t for family in families() for t in family.model_types)
    raise K2Error(f"unsupported model_type {model_type!r} (supported: {', '.join(supported)})")


def write_demo(folder, fp8: bool = False, random: bool = False):
    """Write the built-in demo checkpoint to `folder`: the trained one, or with `random` the random-weight one of the
    same architecture (with `fp8`, its linear weights as FP8 blocks)."""
    module = importlib.import_module(DEMO_MODULE)
    return (module.write_demo if random else module.write_trained_demo)(folder, fp8=fp8)


def read_args(config: dict, source="config.json"):
    """The family's args of a config.json dict read from `source`, after checking every key the toolkit reads
    against its schema (runtime/config_schema.py): a bad value is K2Error `source: field: ...`."""
    config_schema.validate(config_schema.ConfigKeys, config, source)
    return config_schema.read_args(family_of(config).args_class, config, source)


def build(config: dict):
    """(model class, args) for a config.json dict."""
    args = read_args(config)
    return family_of(config).model_class, args


@contextmanager
def _no_random_init():
    # Weights always come from a checkpoint; random init on the meta device costs seconds (torch imports its
    # compiler stack to run nn.init on meta tensors), so the layers' reset_parameters are skipped while building.
    from torch import nn

    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def build_on_meta(config: dict):
    """The model for `config` with every weight on the meta device: shapes and names, no memory."""
    import torch

    model_cls, args = build(config)
    with torch.device("meta"), _no_random_init():
        return model_cls(args)
