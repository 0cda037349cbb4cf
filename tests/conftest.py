"""On a CPU, run every Triton kernel in Triton's interpreter.

This must happen before r4b.kernels is imported: Triton picks the
interpreter when a kernel is decorated. It is forced, not defaulted: with it
off, CPU tensors would take the torch reference and the kernel tests would
compare the reference with itself.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
