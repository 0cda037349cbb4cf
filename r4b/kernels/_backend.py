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


def autotuning() -> bool:
    """False under ``R4B_AUTOTUNE=0``: every ``@triton.autotune`` of r4b.kernels then holds one config, so a
    kernel compiles once per specialization and is never benchmarked (what the GPU test run sets, in
    tests/conftest.py). Read when r4b.kernels is imported."""
    return os.environ.get("R4B_AUTOTUNE", "1") != "0"


def autotune_configs(configs: list, pinned: int) -> list:
    """``configs``, or only ``configs[pinned]`` under ``R4B_AUTOTUNE=0``. ``pinned`` names the config with the
    smallest shared-memory footprint: a lone config is never benchmarked, so Triton cannot drop it when it
    does not fit (fp32, head_dim 128); any config runs the same code paths on ragged shapes."""
    return list(configs) if autotuning() else [configs[pinned]]
