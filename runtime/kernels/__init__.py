"""Kernels for the CUDA decode fast path, each with a pure-torch path that computes the same math.

A kernel runs only where it can (Triton importable and the tensors on a CUDA device, or Triton's interpreter asked
for with TRITON_INTERPRET=1); elsewhere the torch path runs, after a one-time message that says why.
"""
import functools
import os
import sys

import torch


@functools.cache
def triton_missing_reason() -> str | None:
    """Why Triton kernels cannot run in this process, or None when they can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def triton_runs_on(device: torch.device) -> bool:
    return triton_missing_reason() is None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def say_once(message: str):
    print(f"k2: {message}", file=sys.stderr)
