"""Packed variable-length attention with shared prompts and bidirectional blocks.

FlashAttention-2 style: online softmax over key tiles in the forward, a
recomputing backward split into a dK/dV kernel (one program per key tile and
kv head, looping over the query heads of its GQA group: no atomics) and a dQ
kernel. No [L, L] matrix exists anywhere. The head dim is computed in two
power-of-two column chunks (:func:`head_chunks`: 72 and 80 as 64 + 16, 96 as
64 + 32), not padded to the next power of two.

The mask, per packed document (``cu_seqlens``): query i sees key j iff

    (j <= i and (seg[j] == 0 or seg[j] == seg[i])) or (bidir[i] == bidir[j] != 0)

with ``causal=False`` meaning every pair of the document. A response
(segment k) thus sees the shared prompt (segment 0) and itself, never a
sibling. Tiles whose mask is empty are skipped after a look at the tile's
segment and bidir ids only, so a prompt with 2g responses costs about what
its tokens cost, not 2g copies.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._backend import autotune_configs, interpreting, use_triton
from .attention_tiles import (
    LOG2E,
    dkdv_step,
    doc_tile,
    dq_step,
    fwd_finish,
    fwd_step,
    id_pointers,
    kernel_flags,
    load_head,
    query_side,
    row_deltas,
    store_head,
    visible_mask,
    worth_computing,
    zeros_head,
)
from .reference import varlen_attention_reference


def _configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    configs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    ]
    return autotune_configs(configs, pinned=2)  # R4B_AUTOTUNE=0: the smallest K/V tiles


def _bwd_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    configs = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    ]
    return autotune_configs(configs, pinned=1)  # R4B_AUTOTUNE=0: the smallest Q/dO tiles


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "CAUSAL", "HAS_SEG", "HAS_BIDIR"])
@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, seg_ptr, bidir_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    n_total, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BIDIR: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    doc = tl.program_id(0)
    pid_m = tl.program_id(1)
    head = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    start, seqlen, offs_m, m_ok, rows = doc_tile(cu_ptr, doc, m0, BLOCK_M)
    if m0 >= seqlen:
        return
    kv_head = head // GROUP
    q0, q1 = load_head(q_ptr, rows, m_ok, head, stride_qn, stride_qh, HEAD_DIM, D0, D1, ALIGN, True)
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0, acc1 = zeros_head(BLOCK_M, D0, D1)
    hi = seqlen
    if CAUSAL and not HAS_BIDIR:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        visible = visible_mask(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
        if worth_computing(visible, HAS_SEG or HAS_BIDIR):  # empty tiles: no K/V loads, no dots
            acc0, acc1, m_i, l_i = fwd_step(
                acc0, acc1, m_i, l_i, q0, q1, offs_n, visible, start, seqlen, kv_head, k_ptr, v_ptr,
                stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
                True, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    fwd_finish(o_ptr, lse_ptr, rows, m_ok, offs_m, start, head, stride_on, stride_oh, n_total, acc0, acc1, m_i, l_i,
                HEAD_DIM, D0, D1, ALIGN)  # fmt: skip


@triton.autotune(configs=_bwd_configs(), key=["HEAD_DIM", "CAUSAL", "HAS_SEG", "HAS_BIDIR"])
@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr, seg_ptr, bidir_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh, n_total, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BIDIR: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    doc = tl.program_id(0)
    pid_n = tl.program_id(1)
    kv_head = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    start, seqlen, offs_n, n_ok, cols = doc_tile(cu_ptr, doc, n0, BLOCK_N)
    if n0 >= seqlen:
        return
    k0, k1 = load_head(k_ptr, cols, n_ok, kv_head, stride_kn, stride_kh, HEAD_DIM, D0, D1, ALIGN, True)
    v0, v1 = load_head(v_ptr, cols, n_ok, kv_head, stride_vn, stride_vh, HEAD_DIM, D0, D1, ALIGN, True)
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    dk0, dk1 = zeros_head(BLOCK_N, D0, D1)
    dv0, dv1 = zeros_head(BLOCK_N, D0, D1)
    lo = 0
    if CAUSAL and not HAS_BIDIR:
        lo = (n0 // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for m0 in range(lo, seqlen, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            visible = visible_mask(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
            if worth_computing(visible, HAS_SEG or HAS_BIDIR):
                dk0, dk1, dv0, dv1 = dkdv_step(
                    dk0, dk1, dv0, dv1, k0, k1, v0, v1, offs_m, visible, start, seqlen, head, q_ptr, do_ptr,
                    lse_ptr, delta_ptr, stride_qn, stride_qh, stride_don, stride_doh, n_total, qk_scale,
                    True, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE, BLOCK_M, BLOCK_N,
                )  # fmt: skip
    store_head(
        dk_ptr, cols, n_ok, kv_head, stride_dkn, stride_dkh, dk0 * sm_scale, dk1 * sm_scale, HEAD_DIM, D0, D1, ALIGN
    )
    store_head(dv_ptr, cols, n_ok, kv_head, stride_dvn, stride_dvh, dv0, dv1, HEAD_DIM, D0, D1, ALIGN)


@triton.autotune(configs=_bwd_configs(), key=["HEAD_DIM", "CAUSAL", "HAS_SEG", "HAS_BIDIR"])
@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, seg_ptr, bidir_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dqn, stride_dqh, n_total, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BIDIR: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    doc = tl.program_id(0)
    pid_m = tl.program_id(1)
    head = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    start, seqlen, offs_m, m_ok, rows = doc_tile(cu_ptr, doc, m0, BLOCK_M)
    if m0 >= seqlen:
        return
    kv_head = head // GROUP
    q0, q1, do0, do1, lse, delta = query_side(
        q_ptr, do_ptr, lse_ptr, delta_ptr, rows, m_ok, offs_m, start, head, stride_qn, stride_qh,
        stride_don, stride_doh, n_total, True, HEAD_DIM, D0, D1, ALIGN,
    )  # fmt: skip
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    dq0, dq1 = zeros_head(BLOCK_M, D0, D1)
    hi = seqlen
    if CAUSAL and not HAS_BIDIR:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        visible = visible_mask(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
        if worth_computing(visible, HAS_SEG or HAS_BIDIR):
            dq0, dq1 = dq_step(
                dq0, dq1, q0, q1, do0, do1, lse, delta, offs_n, visible, start, seqlen, kv_head, k_ptr, v_ptr,
                stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
                True, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    store_head(
        dq_ptr, rows, m_ok, head, stride_dqn, stride_dqh, dq0 * sm_scale, dq1 * sm_scale, HEAD_DIM, D0, D1, ALIGN
    )


# The Triton path as torch.library custom ops with fake implementations: torch.compile traces a model calling
# varlen_attention as an opaque op (no graph break, no Triton launch in the graph). Absent id tensors are None.


@torch.library.custom_op("r4b::varlen_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    segment_ids: torch.Tensor | None,
    bidir_ids: torch.Tensor | None,
    max_seqlen: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [N, Hq, D], lse [Hq, N] fp32)."""
    n_total, n_heads, _ = q.shape
    flags = kernel_flags(q, causal, segment_ids, bidir_ids, k, v)
    seg, bidir = id_pointers(cu_seqlens, segment_ids, bidir_ids)
    out = torch.empty_like(q)
    lse = torch.empty((n_heads, n_total), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (cu_seqlens.numel() - 1, triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_heads)

    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, seg, bidir,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        n_total, softmax_scale * LOG2E,
        GROUP=n_heads // k.shape[1], **flags,
    )  # fmt: skip
    return out, lse


@_attention_op.register_fake
def _(q, k, v, cu_seqlens, segment_ids, bidir_ids, max_seqlen, causal, softmax_scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("r4b::varlen_attention_backward", mutates_args=())
def _attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    segment_ids: torch.Tensor | None,
    bidir_ids: torch.Tensor | None,
    max_seqlen: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): the row deltas, then the dK/dV kernel (no atomics) and the dQ kernel."""
    n_total, n_heads, _ = q.shape
    num_docs = cu_seqlens.numel() - 1
    flags = kernel_flags(q, causal, segment_ids, bidir_ids, k, v)
    seg, bidir = id_pointers(cu_seqlens, segment_ids, bidir_ids)
    grad_out = grad_out.contiguous()
    delta = row_deltas(out, grad_out, flags)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(GROUP=n_heads // k.shape[1], **flags)
    scales = (n_total, softmax_scale * LOG2E, softmax_scale)

    def grid_kv(meta):
        return (num_docs, triton.cdiv(max_seqlen, meta["BLOCK_N"]), k.shape[1])

    _bwd_dkdv_kernel[grid_kv](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, seg, bidir,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        *scales, **common,
    )  # fmt: skip

    def grid_q(meta):
        return (num_docs, triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_heads)

    _bwd_dq_kernel[grid_q](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens, seg, bidir,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1),
        *scales, **common,
    )  # fmt: skip
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, grad_out, cu_seqlens, segment_ids, bidir_ids, max_seqlen, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, segment_ids, bidir_ids, max_seqlen, causal, softmax_scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, segment_ids, bidir_ids)
    ctx.meta = (max_seqlen, causal, softmax_scale)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, segment_ids, bidir_ids = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(q, k, v, out, lse, grad_out, cu_seqlens, segment_ids, bidir_ids, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def check_attention_inputs(q, k, v, cu_seqlens, cu_seqlens_host, max_seqlen, causal, segment_ids, bidir_ids) -> None:
    """The varlen attention contract's checks (shapes, dtypes, heads, ``cu_seqlens`` against N and ``max_seqlen``, the
    mask's ids), one ValueError each; the kernels that walk the tile schedule run them too."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [N, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"k and v must be [N={q.shape[0]}, Hkv, D={q.shape[2]}], got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype} (cast them to the compute dtype)"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [num_docs + 1] starting at 0")
    if not torch.compiler.is_compiling():  # eager calls only: a device read where the host values are not given
        host = cu_seqlens.tolist() if cu_seqlens_host is None else list(cu_seqlens_host)
        if len(host) != cu_seqlens.numel() or host[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0 (host values {host}, {cu_seqlens.numel()} boundaries)")
        total, longest = host[-1], max(b - a for a, b in itertools.pairwise(host))
        if total != q.shape[0]:
            raise ValueError(f"cu_seqlens[-1] = {total} must equal the packed tokens N = {q.shape[0]}")
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen = {max_seqlen} is shorter than the longest document ({longest} tokens)")
    if not causal and (segment_ids is not None or bidir_ids is not None):
        raise ValueError("causal=False attends all pairs of a document: segment_ids and bidir_ids must be None")
    for name, ids in (("segment_ids", segment_ids), ("bidir_ids", bidir_ids)):
        if ids is not None and (ids.shape != (q.shape[0],) or ids.dtype != torch.int32):
            raise ValueError(f"{name} must be int32 [N={q.shape[0]}], got {ids.dtype} {tuple(ids.shape)}")


@functools.cache
def _flash_attn_varlen():
    """flash-attn's varlen function, or None; the import is tried once per process."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    cu_seqlens_host: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention over packed documents: q [N, Hq, D], k and v [N, Hkv, D] -> [N, Hq, D].

    ``cu_seqlens`` (int32 [docs + 1]) delimits the documents; ``max_seqlen`` is
    the longest. ``segment_ids`` (int32 [N]): 0 = shared prompt, k = k-th
    response, which sees the prompt and itself only. ``bidir_ids`` (int32 [N]):
    tokens sharing a nonzero id see each other both ways (image tokens).
    ``causal=False``: every pair of a document (a vision tower's images).
    GQA when Hq is a multiple of Hkv. Differentiable in q, k and v.
    ``cu_seqlens_host``: ``cu_seqlens``' values as Python ints, where the caller
    has them (:class:`r4b.kernels.packed_layout.PackedLayout` ``.host``): the
    checks use them instead of reading ``cu_seqlens`` back (a device sync).

    Dispatch: flash-attn's varlen kernel for plain causal / full documents on a
    GPU when installed; else the Triton kernel (GPU, or CPU under
    ``TRITON_INTERPRET=1``); else the explicit-mask reference.
    """
    check_attention_inputs(q, k, v, cu_seqlens, cu_seqlens_host, max_seqlen, causal, segment_ids, bidir_ids)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    plain = segment_ids is None and bidir_ids is None
    half = q.dtype in (torch.float16, torch.bfloat16)  # q, k and v share it (checked)
    flash = _flash_attn_varlen() if q.is_cuda and plain and half else None
    if flash is not None:
        return flash(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal)
    if use_triton(q, k, v):
        # The kernels index head_dim with unit stride.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return _attention_op(q, k, v, cu_seqlens, segment_ids, bidir_ids, max_seqlen, causal, scale)[0]
    return varlen_attention_reference(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        causal=causal,
        segment_ids=segment_ids,
        bidir_ids=bidir_ids,
        softmax_scale=scale,
    )
