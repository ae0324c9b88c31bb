"""Architectures by `model_type`, with the aliases that share one implementation (Kimi K2 is DeepSeek-V3)."""
from runtime.errors import K2Error

ARCHITECTURES = {"deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3"}


def build(config: dict):
    """(model class, args) for a config.json dict; the model itself is built by the caller, on the device it wants."""
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
