"""The GPUs ``r4b plan --gpu`` knows: vendor figures (dense peak rates, memory, bandwidth), not measurements."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # what the device reports as total
    bf16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # plain fp32 (torch's default matmul precision on the fp32 path: no TF32)
    bandwidth_tbs: float  # HBM, TB/s


GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("NVIDIA H100 80GB SXM", 81559 * (1 << 20), 989.0, 67.0, 3.35),
    "h200": GPU("NVIDIA H200 141GB", 143771 * (1 << 20), 989.0, 67.0, 4.8),
    "a100-80gb": GPU("NVIDIA A100 80GB SXM", 81920 * (1 << 20), 312.0, 19.5, 2.04),
}

RESERVED_BYTES = 3 * GIB
"""Kept out of the budget: the CUDA context, NCCL's buffers and the caching allocator's fragmentation."""
