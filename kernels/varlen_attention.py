"""Packed variable-length attention with shared prompts and bidirectional blocks.

FlashAttention-2 style: online softmax over key tiles in the forward, a
recomputing backward split into a dK/dV kernel (one program per key tile and
kv head, looping over the query heads of its GQA group: no atomics) and a dQ
kernel. No [L, L] matrix exists anywhere.

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
from ._tl_helpers import dot

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
def _load_rows(ptr, rows, head, stride_n, stride_h, offs_d, mask):
    """A [rows, head_dim] tile of one head of an [N, heads, head_dim] tensor."""
    return tl.load(ptr + rows[:, None] * stride_n + head * stride_h + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, rows, head, stride_n, stride_h, offs_d, mask, value):
    tl.store(
        ptr + rows[:, None] * stride_n + head * stride_h + offs_d[None, :], value.to(ptr.dtype.element_ty), mask=mask
    )


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "CAUSAL", "HAS_SEG", "HAS_BIDIR"])
@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    cu_ptr,
    seg_ptr,
    bidir_ptr,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    n_total,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_BIDIR: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    doc = tl.program_id(0)
    pid_m = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + doc)
    seqlen = tl.load(cu_ptr + doc + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    kv_head = head // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen
    rows = (start + offs_m).to(tl.int64)
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = _load_rows(q_ptr, rows, head, stride_qn, stride_qh, offs_d, q_mask)
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    hi = seqlen
    if CAUSAL and not HAS_BIDIR:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        visible = _visible(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
        if _worth_computing(visible, HAS_SEG or HAS_BIDIR):  # empty tiles: no K/V loads, no dots
            cols = (start + offs_n).to(tl.int64)
            n_ok = offs_n < seqlen
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = _load_rows(k_ptr, cols, kv_head, stride_kn, stride_kh, offs_d, kv_mask)
            s = dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST, IEEE) * qk_scale
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_rows(v_ptr, cols, kv_head, stride_vn, stride_vh, offs_d, kv_mask)
            acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, IEEE)
            m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    _store_rows(o_ptr, rows, head, stride_on, stride_oh, offs_d, q_mask, out)
    # base-2 log-sum-exp of the scaled scores, for the backward
    tl.store(lse_ptr + head * n_total + start + offs_m, m_i + tl.math.log2(l_safe), mask=m_ok)


@triton.autotune(configs=_bwd_configs(), key=["HEAD_DIM", "CAUSAL", "HAS_SEG", "HAS_BIDIR"])
@triton.jit
def _bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    cu_ptr,
    seg_ptr,
    bidir_ptr,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_don,
    stride_doh,
    stride_dkn,
    stride_dkh,
    stride_dvn,
    stride_dvh,
    n_total,
    qk_scale,
    sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_BIDIR: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    doc = tl.program_id(0)
    pid_n = tl.program_id(1)
    kv_head = tl.program_id(2)
    start = tl.load(cu_ptr + doc)
    seqlen = tl.load(cu_ptr + doc + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < seqlen
    cols = (start + offs_n).to(tl.int64)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = _load_rows(k_ptr, cols, kv_head, stride_kn, stride_kh, offs_d, kv_mask)
    v = _load_rows(v_ptr, cols, kv_head, stride_vn, stride_vh, offs_d, kv_mask)
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    lo = 0
    if CAUSAL and not HAS_BIDIR:
        lo = (n0 // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for m0 in range(lo, seqlen, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            visible = _visible(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
            if _worth_computing(visible, HAS_SEG or HAS_BIDIR):
                m_ok = offs_m < seqlen
                rows = (start + offs_m).to(tl.int64)
                q_mask = m_ok[:, None] & d_ok[None, :]
                q = _load_rows(q_ptr, rows, head, stride_qn, stride_qh, offs_d, q_mask)
                do = _load_rows(do_ptr, rows, head, stride_don, stride_doh, offs_d, q_mask)
                lse = tl.load(lse_ptr + head * n_total + start + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(delta_ptr + head * n_total + start + offs_m, mask=m_ok, other=0.0)
                s = dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST, IEEE) * qk_scale
                p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
                dv = dot(tl.trans(p.to(do.dtype)), do, dv, UPCAST, IEEE)
                dp = dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST, IEEE)
                ds = p * (dp - delta[:, None])
                dk = dot(tl.trans(ds.to(q.dtype)), q, dk, UPCAST, IEEE)
    _store_rows(dk_ptr, cols, kv_head, stride_dkn, stride_dkh, offs_d, kv_mask, dk * sm_scale)
    _store_rows(dv_ptr, cols, kv_head, stride_dvn, stride_dvh, offs_d, kv_mask, dv)


@triton.autotune(configs=_bwd_configs(), key=["HEAD_DIM", "CAUSAL", "HAS_SEG", "HAS_BIDIR"])
@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    cu_ptr,
    seg_ptr,
    bidir_ptr,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_don,
    stride_doh,
    stride_dqn,
    stride_dqh,
    n_total,
    qk_scale,
    sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_BIDIR: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    doc = tl.program_id(0)
    pid_m = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + doc)
    seqlen = tl.load(cu_ptr + doc + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    kv_head = head // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen
    rows = (start + offs_m).to(tl.int64)
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = _load_rows(q_ptr, rows, head, stride_qn, stride_qh, offs_d, q_mask)
    do = _load_rows(do_ptr, rows, head, stride_don, stride_doh, offs_d, q_mask)
    lse = tl.load(lse_ptr + head * n_total + start + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + head * n_total + start + offs_m, mask=m_ok, other=0.0)
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    hi = seqlen
    if CAUSAL and not HAS_BIDIR:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        visible = _visible(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
        if _worth_computing(visible, HAS_SEG or HAS_BIDIR):
            n_ok = offs_n < seqlen
            cols = (start + offs_n).to(tl.int64)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = _load_rows(k_ptr, cols, kv_head, stride_kn, stride_kh, offs_d, kv_mask)
            v = _load_rows(v_ptr, cols, kv_head, stride_vn, stride_vh, offs_d, kv_mask)
            s = dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST, IEEE) * qk_scale
            p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST, IEEE)
            ds = p * (dp - delta[:, None])
            dq = dot(ds.to(k.dtype), k, dq, UPCAST, IEEE)
    _store_rows(dq_ptr, rows, head, stride_dqn, stride_dqh, offs_d, q_mask, dq * sm_scale)


_DELTA_ROWS = 16 if interpreting() else 64


@triton.jit
def _delta_kernel(
    o_ptr, do_ptr, delta_ptr, stride_on, stride_oh, stride_don, stride_doh, n_total,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """delta[head, i] = sum_d dO[i, head, d] * O[i, head, d] in fp32, without fp32 copies of O and dO."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    offs_d = tl.arange(0, D_PAD)
    row_ok = rows < n_total
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = _load_rows(o_ptr, rows.to(tl.int64), head, stride_on, stride_oh, offs_d, mask).to(tl.float32)
    do = _load_rows(do_ptr, rows.to(tl.int64), head, stride_don, stride_doh, offs_d, mask).to(tl.float32)
    tl.store(delta_ptr + head * n_total + rows, tl.sum(o * do, 1), mask=row_ok)


# cu_seqlens tensor -> (its version, (first, total, longest, shortest), its values): see remember_cu_seqlens
_HOST_INFO: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _flags(q: torch.Tensor, causal: bool, segment_ids, bidir_ids) -> dict:
    head_dim = q.shape[-1]
    return {
        "HEAD_DIM": head_dim,
        "D_PAD": max(16, triton.next_power_of_2(head_dim)),
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
        flags = _flags(q, causal, segment_ids, bidir_ids)
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
            HEAD_DIM=flags["HEAD_DIM"], D_PAD=flags["D_PAD"], BLOCK=_DELTA_ROWS,
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
