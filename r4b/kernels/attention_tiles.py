"""Tile code shared by the packed varlen attention kernels (``varlen_attention``) and the schedule-walking ones
(``attention_schedule``): loads and stores of a head in two power-of-two column chunks (x0 and x1), the
online-softmax step, the dK/dV and dQ steps, the query-side loads, the row-wise delta of the backward, and the
constexprs every launch passes (:func:`kernel_flags`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreting

LOG2E = 1.4426950408889634


def head_chunks(head_dim: int) -> tuple[int, int]:
    """The head dim as two power-of-two column chunks (``tl.arange`` and ``tl.dot`` need powers of two, the
    dot at least 16): D0 = the largest power of two <= head_dim (at least 16), D1 = the rest rounded up to a
    power of two (at least 16; 0: no rest). 72 and 80 -> 64 + 16, 96 -> 64 + 32, 128 -> 128 + 0: 80, 80 and 96
    columns of matrix work where padding to the next power of two would do 128."""
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


@triton.jit
def load_head(ptr, rows, row_ok, head, stride_n, stride_h, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
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
def store_head(ptr, rows, row_ok, head, stride_n, stride_h, x0, x1, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """Store the chunks (x0, x1) of a [rows, head_dim] tile (rows ``row_ok`` only): :func:`load_head`'s inverse."""
    base = ptr + tl.multiple_of(rows * stride_n + head * stride_h, ALIGN)[:, None]
    offs0 = tl.arange(0, D0)
    tl.store(base + offs0[None, :], x0.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (offs0 < HEAD_DIM)[None, :])
    if D1 > 0:
        offs1 = D0 + tl.arange(0, D1)
        tl.store(base + offs1[None, :], x1.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (offs1 < HEAD_DIM)[None, :])


@triton.jit
def zeros_head(BLOCK: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """fp32 accumulators of a [BLOCK, head_dim] tile, chunk by chunk (the second unused when D1 == 0)."""
    acc0 = tl.zeros((BLOCK, D0), tl.float32)
    acc1 = acc0
    if D1 > 0:
        acc1 = tl.zeros((BLOCK, D1), tl.float32)
    return acc0, acc1


@triton.jit
def dot_nt(a0, a1, b0, b1, D1: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ROWS: tl.constexpr,
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
def dot_acc(a, b0, b1, acc0, acc1, D1: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
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
def doc_tile(cu_ptr, doc, first, BLOCK: tl.constexpr):
    """Document ``doc``'s start and length, and its tile of BLOCK rows from ``first`` (document-local): the row
    offsets, which are inside the document, and their packed indices (int64)."""
    start = tl.load(cu_ptr + doc)
    seqlen = tl.load(cu_ptr + doc + 1) - start
    offs = first + tl.arange(0, BLOCK)
    return start, seqlen, offs, offs < seqlen, (start + offs).to(tl.int64)


@triton.jit
def visible_mask(
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
def worth_computing(visible, MAY_BE_EMPTY: tl.constexpr):
    """Whether a tile has a visible pair. Plain causal and full masks loop over non-empty tiles only,
    and a constant here keeps their loads out of an scf.if, where the pipeliner cannot reach them."""
    if MAY_BE_EMPTY:
        return tl.max(visible.to(tl.int32)) > 0
    else:
        return True


@triton.jit
def fwd_step(
    acc0, acc1, m_i, l_i, q0, q1, offs_n, visible, start, seqlen, kv_head, k_ptr, v_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key tile of the forward's online softmax. MASKED: ``visible`` masks the scores and the rows past the
    document are not loaded; else every pair of the tile is visible (no mask arithmetic, ``visible`` unused)."""
    cols = (start + offs_n).to(tl.int64)
    n_ok = offs_n < seqlen
    k0, k1 = load_head(k_ptr, cols, n_ok, kv_head, stride_kn, stride_kh, HEAD_DIM, D0, D1, ALIGN, MASKED)
    s = dot_nt(q0, q1, k0, k1, D1, UPCAST, IEEE, BLOCK_M, BLOCK_N) * qk_scale
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
    v0, v1 = load_head(v_ptr, cols, n_ok, kv_head, stride_vn, stride_vh, HEAD_DIM, D0, D1, ALIGN, MASKED)
    acc0 = acc0 * alpha[:, None]
    if D1 > 0:
        acc1 = acc1 * alpha[:, None]
    acc0, acc1 = dot_acc(p.to(v0.dtype), v0, v1, acc0, acc1, D1, UPCAST, IEEE)
    return acc0, acc1, m_new, l_i


@triton.jit
def fwd_finish(o_ptr, lse_ptr, rows, m_ok, offs_m, start, head, stride_on, stride_oh, n_total, acc0, acc1, m_i,
                l_i, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """Normalize and store a query tile's output, and its base-2 log-sum-exp of the scaled scores (the backward's)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    store_head(o_ptr, rows, m_ok, head, stride_on, stride_oh, acc0 / l_safe[:, None], acc1 / l_safe[:, None],
                HEAD_DIM, D0, D1, ALIGN)  # fmt: skip
    tl.store(lse_ptr + head * n_total + start + offs_m, m_i + tl.math.log2(l_safe), mask=m_ok)


@triton.jit
def query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, rows, m_ok, offs_m, start, head, stride_qn, stride_qh,
                stride_don, stride_doh, n_total, ROW_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """What the backward needs of a query tile: q, dO (chunked), lse and delta."""
    q0, q1 = load_head(q_ptr, rows, m_ok, head, stride_qn, stride_qh, HEAD_DIM, D0, D1, ALIGN, ROW_MASK)
    do0, do1 = load_head(do_ptr, rows, m_ok, head, stride_don, stride_doh, HEAD_DIM, D0, D1, ALIGN, ROW_MASK)
    if ROW_MASK:
        lse = tl.load(lse_ptr + head * n_total + start + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + head * n_total + start + offs_m, mask=m_ok, other=0.0)
    else:
        lse = tl.load(lse_ptr + head * n_total + start + offs_m)
        delta = tl.load(delta_ptr + head * n_total + start + offs_m)
    return q0, q1, do0, do1, lse, delta


@triton.jit
def bwd_p_ds(q0, q1, do0, do1, lse, delta, k0, k1, v0, v1, visible, qk_scale, MASKED: tl.constexpr,
              D1: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    """p and dS [BLOCK_M, BLOCK_N] of one tile (recomputed from lse; ``visible`` applied when MASKED)."""
    s = dot_nt(q0, q1, k0, k1, D1, UPCAST, IEEE, BLOCK_M, BLOCK_N) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    dp = dot_nt(do0, do1, v0, v1, D1, UPCAST, IEEE, BLOCK_M, BLOCK_N)
    return p, p * (dp - delta[:, None])


@triton.jit
def dkdv_step(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1, offs_m, visible, start, seqlen, head, q_ptr, do_ptr, lse_ptr, delta_ptr,
    stride_qn, stride_qh, stride_don, stride_doh, n_total, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One query tile (rows offs_m, one query head) into a key tile's dK and dV."""
    rows = (start + offs_m).to(tl.int64)
    m_ok = offs_m < seqlen
    q0, q1, do0, do1, lse, delta = query_side(
        q_ptr, do_ptr, lse_ptr, delta_ptr, rows, m_ok, offs_m, start, head, stride_qn, stride_qh,
        stride_don, stride_doh, n_total, MASKED, HEAD_DIM, D0, D1, ALIGN,
    )  # fmt: skip
    p, ds = bwd_p_ds(q0, q1, do0, do1, lse, delta, k0, k1, v0, v1, visible, qk_scale, MASKED, D1, UPCAST, IEEE,
                      BLOCK_M, BLOCK_N)  # fmt: skip
    dv0, dv1 = dot_acc(tl.trans(p.to(do0.dtype)), do0, do1, dv0, dv1, D1, UPCAST, IEEE)
    dk0, dk1 = dot_acc(tl.trans(ds.to(q0.dtype)), q0, q1, dk0, dk1, D1, UPCAST, IEEE)
    return dk0, dk1, dv0, dv1


@triton.jit
def dq_step(
    dq0, dq1, q0, q1, do0, do1, lse, delta, offs_n, visible, start, seqlen, kv_head, k_ptr, v_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key tile into a query tile's dQ."""
    cols = (start + offs_n).to(tl.int64)
    n_ok = offs_n < seqlen
    k0, k1 = load_head(k_ptr, cols, n_ok, kv_head, stride_kn, stride_kh, HEAD_DIM, D0, D1, ALIGN, MASKED)
    v0, v1 = load_head(v_ptr, cols, n_ok, kv_head, stride_vn, stride_vh, HEAD_DIM, D0, D1, ALIGN, MASKED)
    _, ds = bwd_p_ds(q0, q1, do0, do1, lse, delta, k0, k1, v0, v1, visible, qk_scale, MASKED, D1, UPCAST, IEEE,
                      BLOCK_M, BLOCK_N)  # fmt: skip
    return dot_acc(ds.to(k0.dtype), k0, k1, dq0, dq1, D1, UPCAST, IEEE)


# --- the kernels: one program per (document, query or key tile, head), looping over the document's tiles ---


DELTA_ROWS = 16 if interpreting() else 64


@triton.jit
def delta_kernel(
    o_ptr, do_ptr, delta_ptr, stride_on, stride_oh, stride_don, stride_doh, n_total,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """delta[head, i] = sum_d dO[i, head, d] * O[i, head, d] in fp32, without fp32 copies of O and dO."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    row_ok = rows < n_total
    rows = rows.to(tl.int64)
    o0, o1 = load_head(o_ptr, rows, row_ok, head, stride_on, stride_oh, HEAD_DIM, D0, D1, ALIGN, True)
    do0, do1 = load_head(do_ptr, rows, row_ok, head, stride_don, stride_doh, HEAD_DIM, D0, D1, ALIGN, True)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if D1 > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    tl.store(delta_ptr + head * n_total + rows, delta, mask=row_ok)


def row_deltas(out: torch.Tensor, grad_out: torch.Tensor, flags: dict) -> torch.Tensor:
    """``delta [Hq, N]`` (fp32) of the backward: per row and head, the sum over the head dim of dO * O
    (:func:`delta_kernel`; ``flags``: the launch's :func:`kernel_flags`; ``grad_out`` contiguous)."""
    n_total, n_heads, _ = out.shape
    delta = torch.empty((n_heads, n_total), dtype=torch.float32, device=out.device)
    delta_kernel[(triton.cdiv(n_total, DELTA_ROWS), n_heads)](
        out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), n_total,
        HEAD_DIM=flags["HEAD_DIM"], D0=flags["D0"], D1=flags["D1"], ALIGN=flags["ALIGN"],
        BLOCK=DELTA_ROWS,
    )  # fmt: skip
    return delta


def id_pointers(
    cu_seqlens: torch.Tensor, segment_ids: torch.Tensor | None, bidir_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The id tensors the kernels index; an absent one (its constexpr off) still needs a valid pointer."""
    return (
        segment_ids if segment_ids is not None else cu_seqlens,
        bidir_ids if bidir_ids is not None else cu_seqlens,
    )


def stride_align(head_dim: int, *tensors: torch.Tensor) -> int:
    """The largest power of two (at most 16) dividing ``head_dim`` and the row and head strides of ``tensors``: every
    tile row a kernel loads or stores then starts ALIGN elements into an aligned tensor (the outputs and
    gradients the kernels write are contiguous: their strides are multiples of ``head_dim``)."""
    align = 16
    for stride in (head_dim, *(s for t in tensors for s in t.stride()[:-1])):
        while stride % align:
            align //= 2
    return align


def kernel_flags(q: torch.Tensor, causal: bool, segment_ids, bidir_ids, *more: torch.Tensor) -> dict:
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
