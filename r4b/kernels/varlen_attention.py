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

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from ._backend import autotune_configs, interpreting, use_triton

_LOG2E = 1.4426950408889634


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


def head_chunks(head_dim: int) -> tuple[int, int]:
    """The head dim as two power-of-two column chunks (``tl.arange`` and ``tl.dot`` need powers of two, the
    dot at least 16): D0 = the largest power of two <= head_dim (at least 16), D1 = the rest rounded up to a
    power of two (at least 16; 0: no rest). 72 and 80 -> 64 + 16, 96 -> 64 + 32, 128 -> 128 + 0: 80, 80 and 96
    columns of matrix work where padding to the next power of two would do 128."""
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


# --- tile code shared by these kernels and attention_schedule's (the head dim in two chunks, x0 and x1) ---


@triton.jit
def _load_head(ptr, rows, row_ok, head, stride_n, stride_h, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
               D1: tl.constexpr, ALIGN: tl.constexpr, ROW_MASK: tl.constexpr):  # fmt: skip
    """A [rows, head_dim] tile of one head of an [N, heads, head_dim] tensor as its two column chunks (x0, x1):
    zeros past HEAD_DIM and, with ROW_MASK, in the rows not ``row_ok`` (an unmasked load where neither applies).
    Without a second chunk (D1 == 0) x1 is x0, unused. ALIGN (elements) divides both strides: the hint that
    lets the compiler vectorize and pipeline the loads when stride_h is not a multiple of 16 (head dim 72).
    Written out, not a per-chunk helper: the interpreter pays for every nested call."""
    base = ptr + tl.multiple_of(rows * stride_n + head * stride_h, ALIGN)[:, None]
    offs0 = tl.arange(0, D0)
    if D0 > HEAD_DIM:  # head dims below 16
        if ROW_MASK:
            x0 = tl.load(base + offs0[None, :], mask=row_ok[:, None] & (offs0 < HEAD_DIM)[None, :], other=0.0)
        else:
            x0 = tl.load(base + offs0[None, :], mask=(offs0 < HEAD_DIM)[None, :], other=0.0)
    elif ROW_MASK:
        x0 = tl.load(base + offs0[None, :], mask=row_ok[:, None], other=0.0)
    else:
        x0 = tl.load(base + offs0[None, :])
    x1 = x0
    if D1 > 0:
        offs1 = D0 + tl.arange(0, D1)
        if D0 + D1 > HEAD_DIM:
            if ROW_MASK:
                x1 = tl.load(base + offs1[None, :], mask=row_ok[:, None] & (offs1 < HEAD_DIM)[None, :], other=0.0)
            else:
                x1 = tl.load(base + offs1[None, :], mask=(offs1 < HEAD_DIM)[None, :], other=0.0)
        elif ROW_MASK:
            x1 = tl.load(base + offs1[None, :], mask=row_ok[:, None], other=0.0)
        else:
            x1 = tl.load(base + offs1[None, :])
    return x0, x1


@triton.jit
def _store_head(ptr, rows, row_ok, head, stride_n, stride_h, x0, x1, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """Store the chunks (x0, x1) of a [rows, head_dim] tile (rows ``row_ok`` only): :func:`_load_head`'s inverse."""
    base = ptr + tl.multiple_of(rows * stride_n + head * stride_h, ALIGN)[:, None]
    offs0 = tl.arange(0, D0)
    tl.store(base + offs0[None, :], x0.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (offs0 < HEAD_DIM)[None, :])
    if D1 > 0:
        offs1 = D0 + tl.arange(0, D1)
        tl.store(base + offs1[None, :], x1.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (offs1 < HEAD_DIM)[None, :])


@triton.jit
def _zeros_head(BLOCK: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """fp32 accumulators of a [BLOCK, head_dim] tile, chunk by chunk (the second unused when D1 == 0)."""
    acc0 = tl.zeros((BLOCK, D0), tl.float32)
    acc1 = acc0
    if D1 > 0:
        acc1 = tl.zeros((BLOCK, D1), tl.float32)
    return acc0, acc1


@triton.jit
def _dot_nt(a0, a1, b0, b1, D1: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ROWS: tl.constexpr,
            COLS: tl.constexpr):  # fmt: skip
    """a @ b.T over the head dim, chunk by chunk: [ROWS, COLS] fp32 (scores q k^T, or dO v^T). UPCAST and IEEE
    as in ``_tl_helpers.dot`` (written out here: the interpreter pays for every nested call)."""
    if UPCAST:
        a0, b0, a1, b1 = a0.to(tl.float32), b0.to(tl.float32), a1.to(tl.float32), b1.to(tl.float32)
    s = tl.zeros((ROWS, COLS), tl.float32)
    if IEEE:
        s = tl.dot(a0, tl.trans(b0), s, input_precision="ieee")
        if D1 > 0:
            s = tl.dot(a1, tl.trans(b1), s, input_precision="ieee")
    else:
        s = tl.dot(a0, tl.trans(b0), s)
        if D1 > 0:
            s = tl.dot(a1, tl.trans(b1), s)
    return s


@triton.jit
def _dot_acc(a, b0, b1, acc0, acc1, D1: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """(acc0, acc1) + a @ (b0, b1): a product into the head dim, chunk by chunk."""
    if UPCAST:
        a, b0, b1 = a.to(tl.float32), b0.to(tl.float32), b1.to(tl.float32)
    if IEEE:
        acc0 = tl.dot(a, b0, acc0, input_precision="ieee")
        if D1 > 0:
            acc1 = tl.dot(a, b1, acc1, input_precision="ieee")
    else:
        acc0 = tl.dot(a, b0, acc0)
        if D1 > 0:
            acc1 = tl.dot(a, b1, acc1)
    return acc0, acc1


@triton.jit
def _doc_tile(cu_ptr, doc, first, BLOCK: tl.constexpr):
    """Document ``doc``'s start and length, and its tile of BLOCK rows from ``first`` (document-local): the row
    offsets, which are inside the document, and their packed indices (int64)."""
    start = tl.load(cu_ptr + doc)
    seqlen = tl.load(cu_ptr + doc + 1) - start
    offs = first + tl.arange(0, BLOCK)
    return start, seqlen, offs, offs < seqlen, (start + offs).to(tl.int64)


@triton.jit
def _visible(
    offs_m,
    offs_n,
    seqlen,
    seg_ptr,
    bidir_ptr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_BIDIR: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] mask of the pairs (query offs_m, key offs_n) of one document."""
    m_ok = offs_m < seqlen
    n_ok = offs_n < seqlen
    inside = m_ok[:, None] & n_ok[None, :]
    if not CAUSAL:
        return inside
    see = offs_n[None, :] <= offs_m[:, None]
    if HAS_SEG:
        seg_q = tl.load(seg_ptr + offs_m, mask=m_ok, other=0)
        seg_k = tl.load(seg_ptr + offs_n, mask=n_ok, other=0)
        see = see & ((seg_k[None, :] == 0) | (seg_k[None, :] == seg_q[:, None]))
    if HAS_BIDIR:
        bid_q = tl.load(bidir_ptr + offs_m, mask=m_ok, other=0)
        bid_k = tl.load(bidir_ptr + offs_n, mask=n_ok, other=0)
        see = see | ((bid_q[:, None] == bid_k[None, :]) & (bid_k[None, :] != 0))
    return inside & see


@triton.jit
def _worth_computing(visible, MAY_BE_EMPTY: tl.constexpr):
    """Whether a tile has a visible pair. Plain causal and full masks loop over non-empty tiles only,
    and a constant here keeps their loads out of an scf.if, where the pipeliner cannot reach them."""
    if MAY_BE_EMPTY:
        return tl.max(visible.to(tl.int32)) > 0
    else:
        return True


@triton.jit
def _fwd_step(
    acc0, acc1, m_i, l_i, q0, q1, offs_n, visible, start, seqlen, kv_head, k_ptr, v_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key tile of the forward's online softmax. MASKED: ``visible`` masks the scores and the rows past the
    document are not loaded; else every pair of the tile is visible (no mask arithmetic, ``visible`` unused)."""
    cols = (start + offs_n).to(tl.int64)
    n_ok = offs_n < seqlen
    k0, k1 = _load_head(k_ptr, cols, n_ok, kv_head, stride_kn, stride_kh, HEAD_DIM, D0, D1, ALIGN, MASKED)
    s = _dot_nt(q0, q1, k0, k1, D1, UPCAST, IEEE, BLOCK_M, BLOCK_N) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v0, v1 = _load_head(v_ptr, cols, n_ok, kv_head, stride_vn, stride_vh, HEAD_DIM, D0, D1, ALIGN, MASKED)
    acc0 = acc0 * alpha[:, None]
    if D1 > 0:
        acc1 = acc1 * alpha[:, None]
    acc0, acc1 = _dot_acc(p.to(v0.dtype), v0, v1, acc0, acc1, D1, UPCAST, IEEE)
    return acc0, acc1, m_new, l_i


@triton.jit
def _fwd_finish(o_ptr, lse_ptr, rows, m_ok, offs_m, start, head, stride_on, stride_oh, n_total, acc0, acc1, m_i,
                l_i, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """Normalize and store a query tile's output, and its base-2 log-sum-exp of the scaled scores (the backward's)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_head(o_ptr, rows, m_ok, head, stride_on, stride_oh, acc0 / l_safe[:, None], acc1 / l_safe[:, None],
                HEAD_DIM, D0, D1, ALIGN)  # fmt: skip
    tl.store(lse_ptr + head * n_total + start + offs_m, m_i + tl.math.log2(l_safe), mask=m_ok)


@triton.jit
def _query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, rows, m_ok, offs_m, start, head, stride_qn, stride_qh,
                stride_don, stride_doh, n_total, ROW_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """What the backward needs of a query tile: q, dO (chunked), lse and delta."""
    q0, q1 = _load_head(q_ptr, rows, m_ok, head, stride_qn, stride_qh, HEAD_DIM, D0, D1, ALIGN, ROW_MASK)
    do0, do1 = _load_head(do_ptr, rows, m_ok, head, stride_don, stride_doh, HEAD_DIM, D0, D1, ALIGN, ROW_MASK)
    if ROW_MASK:
        lse = tl.load(lse_ptr + head * n_total + start + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + head * n_total + start + offs_m, mask=m_ok, other=0.0)
    else:
        lse = tl.load(lse_ptr + head * n_total + start + offs_m)
        delta = tl.load(delta_ptr + head * n_total + start + offs_m)
    return q0, q1, do0, do1, lse, delta


@triton.jit
def _bwd_p_ds(q0, q1, do0, do1, lse, delta, k0, k1, v0, v1, visible, qk_scale, MASKED: tl.constexpr,
              D1: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    """p and dS [BLOCK_M, BLOCK_N] of one tile (recomputed from lse; ``visible`` applied when MASKED)."""
    s = _dot_nt(q0, q1, k0, k1, D1, UPCAST, IEEE, BLOCK_M, BLOCK_N) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    dp = _dot_nt(do0, do1, v0, v1, D1, UPCAST, IEEE, BLOCK_M, BLOCK_N)
    return p, p * (dp - delta[:, None])


@triton.jit
def _dkdv_step(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1, offs_m, visible, start, seqlen, head, q_ptr, do_ptr, lse_ptr, delta_ptr,
    stride_qn, stride_qh, stride_don, stride_doh, n_total, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One query tile (rows offs_m, one query head) into a key tile's dK and dV."""
    rows = (start + offs_m).to(tl.int64)
    m_ok = offs_m < seqlen
    q0, q1, do0, do1, lse, delta = _query_side(
        q_ptr, do_ptr, lse_ptr, delta_ptr, rows, m_ok, offs_m, start, head, stride_qn, stride_qh,
        stride_don, stride_doh, n_total, MASKED, HEAD_DIM, D0, D1, ALIGN,
    )  # fmt: skip
    p, ds = _bwd_p_ds(q0, q1, do0, do1, lse, delta, k0, k1, v0, v1, visible, qk_scale, MASKED, D1, UPCAST, IEEE,
                      BLOCK_M, BLOCK_N)  # fmt: skip
    dv0, dv1 = _dot_acc(tl.trans(p.to(do0.dtype)), do0, do1, dv0, dv1, D1, UPCAST, IEEE)
    dk0, dk1 = _dot_acc(tl.trans(ds.to(q0.dtype)), q0, q1, dk0, dk1, D1, UPCAST, IEEE)
    return dk0, dk1, dv0, dv1


@triton.jit
def _dq_step(
    dq0, dq1, q0, q1, do0, do1, lse, delta, offs_n, visible, start, seqlen, kv_head, k_ptr, v_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key tile into a query tile's dQ."""
    cols = (start + offs_n).to(tl.int64)
    n_ok = offs_n < seqlen
    k0, k1 = _load_head(k_ptr, cols, n_ok, kv_head, stride_kn, stride_kh, HEAD_DIM, D0, D1, ALIGN, MASKED)
    v0, v1 = _load_head(v_ptr, cols, n_ok, kv_head, stride_vn, stride_vh, HEAD_DIM, D0, D1, ALIGN, MASKED)
    _, ds = _bwd_p_ds(q0, q1, do0, do1, lse, delta, k0, k1, v0, v1, visible, qk_scale, MASKED, D1, UPCAST, IEEE,
                      BLOCK_M, BLOCK_N)  # fmt: skip
    return _dot_acc(ds.to(k0.dtype), k0, k1, dq0, dq1, D1, UPCAST, IEEE)


# --- the kernels: one program per (document, query or key tile, head), looping over the document's tiles ---


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
    start, seqlen, offs_m, m_ok, rows = _doc_tile(cu_ptr, doc, m0, BLOCK_M)
    if m0 >= seqlen:
        return
    kv_head = head // GROUP
    q0, q1 = _load_head(q_ptr, rows, m_ok, head, stride_qn, stride_qh, HEAD_DIM, D0, D1, ALIGN, True)
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0, acc1 = _zeros_head(BLOCK_M, D0, D1)
    hi = seqlen
    if CAUSAL and not HAS_BIDIR:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        visible = _visible(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
        if _worth_computing(visible, HAS_SEG or HAS_BIDIR):  # empty tiles: no K/V loads, no dots
            acc0, acc1, m_i, l_i = _fwd_step(
                acc0, acc1, m_i, l_i, q0, q1, offs_n, visible, start, seqlen, kv_head, k_ptr, v_ptr,
                stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
                True, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    _fwd_finish(o_ptr, lse_ptr, rows, m_ok, offs_m, start, head, stride_on, stride_oh, n_total, acc0, acc1, m_i, l_i,
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
    start, seqlen, offs_n, n_ok, cols = _doc_tile(cu_ptr, doc, n0, BLOCK_N)
    if n0 >= seqlen:
        return
    k0, k1 = _load_head(k_ptr, cols, n_ok, kv_head, stride_kn, stride_kh, HEAD_DIM, D0, D1, ALIGN, True)
    v0, v1 = _load_head(v_ptr, cols, n_ok, kv_head, stride_vn, stride_vh, HEAD_DIM, D0, D1, ALIGN, True)
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    dk0, dk1 = _zeros_head(BLOCK_N, D0, D1)
    dv0, dv1 = _zeros_head(BLOCK_N, D0, D1)
    lo = 0
    if CAUSAL and not HAS_BIDIR:
        lo = (n0 // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for m0 in range(lo, seqlen, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            visible = _visible(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
            if _worth_computing(visible, HAS_SEG or HAS_BIDIR):
                dk0, dk1, dv0, dv1 = _dkdv_step(
                    dk0, dk1, dv0, dv1, k0, k1, v0, v1, offs_m, visible, start, seqlen, head, q_ptr, do_ptr,
                    lse_ptr, delta_ptr, stride_qn, stride_qh, stride_don, stride_doh, n_total, qk_scale,
                    True, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE, BLOCK_M, BLOCK_N,
                )  # fmt: skip
    _store_head(
        dk_ptr, cols, n_ok, kv_head, stride_dkn, stride_dkh, dk0 * sm_scale, dk1 * sm_scale, HEAD_DIM, D0, D1, ALIGN
    )
    _store_head(dv_ptr, cols, n_ok, kv_head, stride_dvn, stride_dvh, dv0, dv1, HEAD_DIM, D0, D1, ALIGN)


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
    start, seqlen, offs_m, m_ok, rows = _doc_tile(cu_ptr, doc, m0, BLOCK_M)
    if m0 >= seqlen:
        return
    kv_head = head // GROUP
    q0, q1, do0, do1, lse, delta = _query_side(
        q_ptr, do_ptr, lse_ptr, delta_ptr, rows, m_ok, offs_m, start, head, stride_qn, stride_qh,
        stride_don, stride_doh, n_total, True, HEAD_DIM, D0, D1, ALIGN,
    )  # fmt: skip
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    dq0, dq1 = _zeros_head(BLOCK_M, D0, D1)
    hi = seqlen
    if CAUSAL and not HAS_BIDIR:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        visible = _visible(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
        if _worth_computing(visible, HAS_SEG or HAS_BIDIR):
            dq0, dq1 = _dq_step(
                dq0, dq1, q0, q1, do0, do1, lse, delta, offs_n, visible, start, seqlen, kv_head, k_ptr, v_ptr,
                stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
                True, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    _store_head(
        dq_ptr, rows, m_ok, head, stride_dqn, stride_dqh, dq0 * sm_scale, dq1 * sm_scale, HEAD_DIM, D0, D1, ALIGN
    )


_DELTA_ROWS = 16 if interpreting() else 64


@triton.jit
def _delta_kernel(
    o_ptr, do_ptr, delta_ptr, stride_on, stride_oh, stride_don, stride_doh, n_total,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """delta[head, i] = sum_d dO[i, head, d] * O[i, head, d] in fp32, without fp32 copies of O and dO."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    row_ok = rows < n_total
    rows = rows.to(tl.int64)
    o0, o1 = _load_head(o_ptr, rows, row_ok, head, stride_on, stride_oh, HEAD_DIM, D0, D1, ALIGN, True)
    do0, do1 = _load_head(do_ptr, rows, row_ok, head, stride_don, stride_doh, HEAD_DIM, D0, D1, ALIGN, True)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if D1 > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    tl.store(delta_ptr + head * n_total + rows, delta, mask=row_ok)


# cu_seqlens tensor -> (its version, (first, total, longest, shortest), its values): see remember_cu_seqlens
_HOST_INFO: WeakIdKeyDictionary = WeakIdKeyDictionary()


def stride_align(head_dim: int, *tensors: torch.Tensor) -> int:
    """The largest power of two (at most 16) dividing ``head_dim`` and the row and head strides of ``tensors``: every
    tile row a kernel loads or stores then starts ALIGN elements into an aligned tensor (the outputs and
    gradients the kernels write are contiguous: their strides are multiples of ``head_dim``)."""
    align = 16
    for stride in (head_dim, *(s for t in tensors for s in t.stride()[:-1])):
        while stride % align:
            align //= 2
    return align


def _flags(q: torch.Tensor, causal: bool, segment_ids, bidir_ids, *more: torch.Tensor) -> dict:
    """The kernels' constexprs; ``more``: the other tensors they index with their own strides (k, v)."""
    head_dim = q.shape[-1]
    d0, d1 = head_chunks(head_dim)
    return {
        "HEAD_DIM": head_dim,
        "D0": d0,
        "D1": d1,
        "ALIGN": stride_align(head_dim, q, *more),
        "CAUSAL": causal,
        "HAS_SEG": segment_ids is not None,
        "HAS_BIDIR": bidir_ids is not None,
        "UPCAST": interpreting() and q.dtype == torch.bfloat16,
        "IEEE": q.dtype == torch.float32,
    }


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, segment_ids, bidir_ids, softmax_scale):
        n_total, n_heads, _ = q.shape
        num_docs = cu_seqlens.numel() - 1
        flags = _flags(q, causal, segment_ids, bidir_ids, k, v)
        # Unused id pointers still need a valid tensor to point at.
        seg = segment_ids if segment_ids is not None else cu_seqlens
        bidir = bidir_ids if bidir_ids is not None else cu_seqlens
        out = torch.empty_like(q)
        lse = torch.empty((n_heads, n_total), dtype=torch.float32, device=q.device)
        group = n_heads // k.shape[1]

        def grid(meta):
            return (num_docs, triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_heads)

        _fwd_kernel[grid](
            q, k, v, out, lse, cu_seqlens, seg, bidir,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            n_total, softmax_scale * _LOG2E,
            GROUP=group, **flags,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seg, bidir)
        ctx.meta = (max_seqlen, softmax_scale, group, flags)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, seg, bidir = ctx.saved_tensors
        max_seqlen, softmax_scale, group, flags = ctx.meta
        n_total, n_heads, _ = q.shape
        num_docs = cu_seqlens.numel() - 1
        grad_out = grad_out.contiguous()
        delta = torch.empty((n_heads, n_total), dtype=torch.float32, device=q.device)
        _delta_kernel[(triton.cdiv(n_total, _DELTA_ROWS), n_heads)](
            out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), n_total,
            HEAD_DIM=flags["HEAD_DIM"], D0=flags["D0"], D1=flags["D1"], ALIGN=flags["ALIGN"],
            BLOCK=_DELTA_ROWS,
        )  # fmt: skip
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(GROUP=group, **flags)
        scales = (n_total, softmax_scale * _LOG2E, softmax_scale)

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
        return dq, dk, dv, None, None, None, None, None, None


def attention_mask_reference(
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The explicit [N, N] boolean mask of the contract (True = query row may see key column)."""
    n_total = int(cu_seqlens[-1])
    device = cu_seqlens.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    same_doc = doc[:, None] == doc[None, :]
    if not causal:
        return same_doc
    idx = torch.arange(n_total, device=device)
    seg = torch.zeros(n_total, dtype=torch.long, device=device) if segment_ids is None else segment_ids.long()
    see = (idx[None, :] <= idx[:, None]) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
    if bidir_ids is not None:
        bid = bidir_ids.long()
        see |= (bid[:, None] == bid[None, :]) & (bid[None, :] != 0)
    return same_doc & see


def varlen_attention_reference(
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
) -> torch.Tensor:
    """Explicit mask + softmax over all N packed tokens (memory N^2: tests and CPU fallback only)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.to(compute) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", qf, kf) * scale
    mask = attention_mask_reference(cu_seqlens, causal=causal, segment_ids=segment_ids, bidir_ids=bidir_ids)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hnm,mhd->nhd", probs, vf).to(q.dtype)


def remember_cu_seqlens(cu_seqlens: torch.Tensor, values: list[int] | None = None) -> tuple[int, int, int, int]:
    """``(first, total, longest, shortest)`` of ``cu_seqlens`` (the last two: document lengths), read to the
    host once per tensor object (and version).

    Every layer of a forward gets the same ``cu_seqlens`` tensor: the first call reads it (one host sync,
    none when ``values`` -- its host copy, which a packed batch's collate already has -- is given) and
    later calls reuse the result, so the per-layer checks and the launch grid cost no device sync.
    """
    version = cu_seqlens._version
    hit = _HOST_INFO.get(cu_seqlens)
    if hit is not None and hit[0] == version and values is None:
        return hit[1]
    values = cu_seqlens.tolist() if values is None else [int(x) for x in values]
    if len(values) < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [num_docs + 1] starting at 0")
    lengths = [b - a for a, b in itertools.pairwise(values)]
    info = (values[0], values[-1], max(lengths), min(lengths))
    _HOST_INFO[cu_seqlens] = (version, info, values)
    return info


def cu_seqlens_host_values(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens`` as a host list, from the same once-per-tensor read as :func:`remember_cu_seqlens`."""
    remember_cu_seqlens(cu_seqlens)
    return _HOST_INFO[cu_seqlens][2]


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, causal, segment_ids, bidir_ids) -> None:
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
    _, total, longest, _ = remember_cu_seqlens(cu_seqlens)  # a host read once per cu_seqlens, not per layer
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
) -> torch.Tensor:
    """Attention over packed documents: q [N, Hq, D], k and v [N, Hkv, D] -> [N, Hq, D].

    ``cu_seqlens`` (int32 [docs + 1]) delimits the documents; ``max_seqlen`` is
    the longest. ``segment_ids`` (int32 [N]): 0 = shared prompt, k = k-th
    response, which sees the prompt and itself only. ``bidir_ids`` (int32 [N]):
    tokens sharing a nonzero id see each other both ways (image tokens).
    ``causal=False``: every pair of a document (a vision tower's images).
    GQA when Hq is a multiple of Hkv. Differentiable in q, k and v.

    Dispatch: flash-attn's varlen kernel for plain causal / full documents on a
    GPU when installed; else the Triton kernel (GPU, or CPU under
    ``TRITON_INTERPRET=1``); else the explicit-mask reference.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, causal, segment_ids, bidir_ids)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    plain = segment_ids is None and bidir_ids is None
    half = q.dtype in (torch.float16, torch.bfloat16)  # q, k and v share it (checked)
    flash = _flash_attn_varlen() if q.is_cuda and plain and half else None
    if flash is not None:
        return flash(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal)
    if use_triton(q, k, v):
        # The kernels index head_dim with unit stride.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, causal, segment_ids, bidir_ids, scale)
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
