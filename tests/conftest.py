"""On a CPU, run every Triton kernel in Triton's interpreter; on a GPU, compile each kernel with one config.

This must happen before r4b.kernels is imported: Triton picks the
interpreter when a kernel is decorated. It is forced, not defaulted: with it
off, CPU tensors would take the torch reference and the kernel tests would
compare the reference with itself.

``R4B_AUTOTUNE=0`` (a default: set ``R4B_AUTOTUNE=1`` to test every config) gives each ``@triton.autotune``
of r4b.kernels one config, read when r4b.kernels is imported: compiled on a GPU, the tests then compile each
kernel once per specialization instead of compiling and benchmarking every config for every new key (minutes).
The shapes stay ragged for any config; the interpreter has one config anyway.
"""

import os

import pytest
import torch

os.environ.setdefault("R4B_AUTOTUNE", "0")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def torch_reference_kernels(monkeypatch):
    """For the trainer's tests (``pytestmark = pytest.mark.usefixtures("torch_reference_kernels")``): CPU tensors
    take the torch references, the fast CPU path; the kernels are checked against them in their own tests."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# Shared fixtures: what several test areas build the same way.


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped tiny tokenizer (R-4B's specials and chat template); read-only in every test."""
    from r4b.models.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_r4b():
    """The embedded tiny R-4B, seed 0, fresh per test module."""
    from r4b.models.tiny import build_tiny_r4b

    return build_tiny_r4b(seed=0)
