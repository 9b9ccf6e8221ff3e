"""Where the Triton kernels can run, and small helpers shared by them.

Compiled Triton needs a CUDA (or ROCm) device. With ``TRITON_INTERPRET=1`` (set before
triton is imported) the same kernels run on CPU tensors in Triton's interpreter: far too
slow to train with, exactly right for testing them against their PyTorch references.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run(device: torch.device | str) -> tuple[bool, str]:
    """(True, "") when the kernels can run on ``device``; else (False, why)."""
    device = torch.device(device)
    if not triton_available():
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, ""
    if interpreting():
        return True, ""
    return False, f"Triton kernels need a CUDA device (got {device.type}; TRITON_INTERPRET=1 runs them on CPU for tests)"


def next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()
