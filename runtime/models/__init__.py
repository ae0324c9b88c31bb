"""Architectures by `model_type`, with the aliases that share one implementation (Kimi K2 is DeepSeek-V3)."""
from contextlib import contextmanager

from runtime.errors import K2Error

ARCHITECTURES = {"deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3"}


def build(config: dict):
    """(model class, args) for a config.json dict."""
    model_type = config.get("model_type")
    family = ARCHITECTURES.get(model_type)
    if family is None:
        raise K2Error(f"unsupported model_type {model_type!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    from runtime.models import deepseek_v3

    try:
        args = deepseek_v3.ModelArgs.from_dict(config)
    except TypeError as e:
        raise K2Error(f"config.json does not describe a {model_type} model: {e}") from None
    return deepseek_v3.DeepseekV3, args


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
