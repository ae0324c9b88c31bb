"""Device names, as a user's --device or a plan gives them, checked once against what this torch and this machine
have: one line saying which, never a CUDA error from deep inside a load."""
import torch

from runtime.errors import K2Error


def check_device(name: str, source: str = "--device", hint: str = "") -> torch.device:
    """`name` (from `source`: a flag, or the plan that names it) as torch names it; `hint` ends every error."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise K2Error(f"{source}: no such device {name!r} (cpu, cuda, cuda:1, mps, ...){hint}") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise K2Error(f"{source} {name}: CUDA was asked for, but this torch is a CPU build; install a CUDA build "
                          f"of torch (https://pytorch.org/get-started/locally/){hint}")
        if not torch.cuda.is_available():
            raise K2Error(f"{source} {name}: this torch supports CUDA but sees no CUDA device (driver or "
                          f"CUDA_VISIBLE_DEVICES?){hint}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise K2Error(f"{source} {name}: this machine has {torch.cuda.device_count()} CUDA device(s){hint}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise K2Error(f"{source} {name}: MPS (Apple-silicon GPU) is not available in this torch on this "
                          f"machine{hint}")
    elif device.type != "cpu":
        raise K2Error(f"{source} {name}: k2 runs on cpu, cuda or mps{hint}")
    return device
