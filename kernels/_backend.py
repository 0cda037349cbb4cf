"""Where a kernel call runs: Triton (GPU, or the CPU interpreter) or the torch reference."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton for CUDA tensors, and for CPU tensors only under the interpreter.

    float64 always takes the reference: it is the oracle's precision, and the
    GPU kernels are tuned for 16/32-bit inputs.
    """
    if any(t.dtype == torch.float64 for t in tensors):
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)
