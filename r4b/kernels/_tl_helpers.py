"""Triton device functions shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    UPCAST: the CPU interpreter's bf16 dot is wrong, so bf16 operands are
    widened there (bf16 -> fp32 is exact). IEEE: true fp32 products for fp32
    operands instead of TF32, exactness first.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:  # noqa: SIM108 (a constexpr branch, resolved at compile time)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc
