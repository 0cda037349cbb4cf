"""The tile schedule of packed varlen attention: which key tiles each query tile must visit, full or partial.

Tiles are per document, as in ``varlen_attention``'s kernels: query tile t covers rows
``[q_start[t], q_start[t] + block_m)`` of document ``q_doc[t]`` (document-local offsets), key tile u covers
``[k_start[u], k_start[u] + block_n)`` of ``k_doc[u]``; a document's last tile is cut by its end. The
schedule lists, for each query tile, exactly the key tiles of its document holding at least one visible
(query, key) pair of the mask contract (``varlen_attention.attention_mask_reference``), each marked
full when all ``block_m x block_n`` pairs are inside the document and visible (no mask arithmetic needed)
and partial otherwise; the transposed lists (query tiles per key tile) serve the dK/dV pass.

Built with torch operations on the tensors' device: the only host values are the packed length (from the
row's :class:`~r4b.kernels.packed_layout.PackedLayout`) and the sizes of the lists. Candidate tile pairs
come from per-tile summaries (causal bound; segment and bidir id ranges), a superset of the non-empty
pairs; each candidate is then checked pair by pair, in chunks. :func:`schedule_for` keeps the schedule on
the layout, so that every layer of a forward (and its backward) shares one build.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._backend import interpreting
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
    zeros_head,
)
from .packed_layout import PackedLayout
from .varlen_attention import check_attention_inputs

BUILDS = {"count": 0}  # schedule builds so far (the tests count them)
_CHUNK_ELEMENTS = 1 << 24  # pairs checked per chunk of candidate tiles


@dataclasses.dataclass
class TileSchedule:
    """CSR lists of the tiles to visit (all int32 / bool tensors on the device of ``cu_seqlens``)."""

    block_m: int
    block_n: int
    q_doc: torch.Tensor  # [Tq] document of each query tile
    q_start: torch.Tensor  # [Tq] its first row, document-local
    k_doc: torch.Tensor  # [Tk]
    k_start: torch.Tensor  # [Tk]
    kv_offsets: torch.Tensor  # [Tq + 1]: query tile t visits kv_tiles[kv_offsets[t]:kv_offsets[t + 1]]
    kv_tiles: torch.Tensor  # [nnz] key tile indices, increasing within a query tile
    kv_full: torch.Tensor  # [nnz] bool: every pair of the tile visible
    q_offsets: torch.Tensor  # [Tk + 1]: key tile u is visited by q_tiles[q_offsets[u]:q_offsets[u + 1]]
    q_tiles: torch.Tensor  # [nnz] query tile indices, increasing within a key tile
    q_full: torch.Tensor  # [nnz]
    visible_pairs: torch.Tensor  # scalar int64: visible pairs of the whole mask

    def stats(self) -> dict:
        """Host counts: query / key tiles, listed (non-empty) tiles, full and partial ones, visible pairs."""
        listed = int(self.kv_tiles.numel())
        full = int(self.kv_full.sum())
        return {
            "q_tiles": int(self.q_doc.numel()),
            "k_tiles": int(self.k_doc.numel()),
            "nonempty_tiles": listed,
            "full_tiles": full,
            "partial_tiles": listed - full,
            "visible_pairs": int(self.visible_pairs),
        }


def _tiles(lengths: torch.Tensor, block: int):
    """Per document tile counts, and each tile's document and local start."""
    counts = (lengths + block - 1) // block
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(doc.numel(), device=lengths.device) - first[doc]) * block
    return counts, doc, start


def _tile_range(values: torch.Tensor, tile_of_token: torch.Tensor, n_tiles: int, nonzero_only: bool):
    """Per tile min and max of ``values`` (over its nonzero values with ``nonzero_only``); empty: (max, min)."""
    big = torch.iinfo(torch.int64).max
    keep = values != 0 if nonzero_only else torch.ones_like(values, dtype=torch.bool)
    lo = torch.full((n_tiles,), big, dtype=torch.int64, device=values.device)
    hi = torch.full((n_tiles,), -big, dtype=torch.int64, device=values.device)
    lo.scatter_reduce_(0, tile_of_token, torch.where(keep, values, big), "amin")
    hi.scatter_reduce_(0, tile_of_token, torch.where(keep, values, -big), "amax")
    return lo, hi


def build_tile_schedule(
    layout: PackedLayout, *, causal: bool = True, block_m: int = 128, block_n: int = 64
) -> TileSchedule:
    """The exact tile schedule of one packed row (see the module docstring). Not kept: :func:`schedule_for`."""
    cu_seqlens, segment_ids, bidir_ids = layout.cu_seqlens, layout.segment_ids, layout.bidir_ids
    if not causal and (segment_ids is not None or bidir_ids is not None):
        raise ValueError("causal=False attends all pairs of a document: segment_ids and bidir_ids must be None")
    BUILDS["count"] += 1
    device = cu_seqlens.device
    n = layout.total
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens.diff().long()
    tm, q_doc, q_start = _tiles(lengths, block_m)
    tn, k_doc, k_start = _tiles(lengths, block_n)
    n_q, n_k = q_doc.numel(), k_doc.numel()

    # candidate pairs: every (query tile, key tile) of the same document, document by document
    pairs_per_doc = tm * tn
    pair_doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), pairs_per_doc)
    local = torch.arange(pair_doc.numel(), device=device) - (torch.cumsum(pairs_per_doc, 0) - pairs_per_doc)[pair_doc]
    q_first = torch.cumsum(tm, 0) - tm
    k_first = torch.cumsum(tn, 0) - tn
    pq = q_first[pair_doc] + local // tn[pair_doc]
    pk = k_first[pair_doc] + local % tn[pair_doc]

    if causal:
        # summaries: a superset of the pairs that can hold a visible pair
        token_doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=n)
        pos = torch.arange(n, device=device) - starts[token_doc]
        q_tile_of = q_first[token_doc] + pos // block_m
        k_tile_of = k_first[token_doc] + pos // block_n
        maybe = k_start[pk] <= q_start[pq] + block_m - 1  # a causal pair exists
        if segment_ids is not None:
            seg = segment_ids.long()
            q_lo, q_hi = _tile_range(seg, q_tile_of, n_q, nonzero_only=False)
            k_lo, k_hi = _tile_range(seg, k_tile_of, n_k, nonzero_only=True)
            k_zero = torch.zeros(n_k, dtype=torch.bool, device=device).index_put_(
                (k_tile_of[seg == 0],), torch.ones((), dtype=torch.bool, device=device)
            )
            meet = (q_lo[pq] <= k_hi[pk]) & (k_lo[pk] <= q_hi[pq])
            maybe &= k_zero[pk] | meet
        if bidir_ids is not None:
            bid = bidir_ids.long()
            q_lo, q_hi = _tile_range(bid, q_tile_of, n_q, nonzero_only=True)
            k_lo, k_hi = _tile_range(bid, k_tile_of, n_k, nonzero_only=True)
            maybe |= (q_lo[pq] <= k_hi[pk]) & (k_lo[pk] <= q_hi[pq])
        keep = maybe.nonzero().squeeze(1)
        pq, pk = pq[keep], pk[keep]

    # exact check of the candidates, pair by pair
    ar_m = torch.arange(block_m, device=device)
    ar_n = torch.arange(block_n, device=device)
    nonempty, full, visible = [], [], torch.zeros((), dtype=torch.int64, device=device)
    step = max(1, _CHUNK_ELEMENTS // (block_m * block_n))
    for a in range(0, pq.numel(), step):
        cq, ck = pq[a : a + step], pk[a : a + step]
        doc = q_doc[cq]
        length = lengths[doc]
        i = q_start[cq][:, None] + ar_m  # [P, BM] document-local rows
        j = k_start[ck][:, None] + ar_n  # [P, BN]
        i_ok, j_ok = i < length[:, None], j < length[:, None]
        see = i_ok[:, :, None] & j_ok[:, None, :]
        if causal:
            gi = (starts[doc][:, None] + i).clamp(max=n - 1)
            gj = (starts[doc][:, None] + j).clamp(max=n - 1)
            rule = j[:, None, :] <= i[:, :, None]
            if segment_ids is not None:
                si, sj = seg[gi][:, :, None], seg[gj][:, None, :]
                rule = rule & ((sj == 0) | (sj == si))
            if bidir_ids is not None:
                bi, bj = bid[gi][:, :, None], bid[gj][:, None, :]
                rule = rule | ((bi == bj) & (bj != 0))
            see = see & rule
        count = see.sum((1, 2))
        visible = visible + count.sum()
        nonempty.append(count > 0)
        full.append(count == block_m * block_n)
    nonempty = torch.cat(nonempty) if nonempty else torch.zeros(0, dtype=torch.bool, device=device)
    full = torch.cat(full) if full else torch.zeros(0, dtype=torch.bool, device=device)
    listed = nonempty.nonzero().squeeze(1)
    pq, pk, full = pq[listed], pk[listed], full[listed]

    # pairs come ordered by (query tile, key tile); the transposed lists sort by (key tile, query tile)
    kv_offsets = torch.zeros(n_q + 1, dtype=torch.int64, device=device)
    kv_offsets[1:] = torch.cumsum(torch.bincount(pq, minlength=n_q), 0)
    order = torch.argsort(pk * max(n_q, 1) + pq)
    q_offsets = torch.zeros(n_k + 1, dtype=torch.int64, device=device)
    q_offsets[1:] = torch.cumsum(torch.bincount(pk, minlength=n_k), 0)
    i32 = lambda t: t.to(torch.int32)
    return TileSchedule(
        block_m=block_m, block_n=block_n, q_doc=i32(q_doc), q_start=i32(q_start), k_doc=i32(k_doc),
        k_start=i32(k_start), kv_offsets=i32(kv_offsets), kv_tiles=i32(pk), kv_full=full,
        q_offsets=i32(q_offsets), q_tiles=i32(pq[order]), q_full=full[order], visible_pairs=visible,
    )  # fmt: skip


def schedule_for(layout: PackedLayout, *, causal: bool = True, block_m: int = 128, block_n: int = 64) -> TileSchedule:
    """:func:`build_tile_schedule`, built once per layout (and mask kind and tile sizes) and kept on it: every
    layer of a forward, and the backward, share one build."""
    build = lambda: build_tile_schedule(layout, causal=causal, block_m=block_m, block_n=block_n)
    return layout.memo(("tile-schedule", causal, block_m, block_n), build)


# --- kernels walking the schedule: checked against the reference in the interpreter, not yet timed on a GPU ---
#
# One program per (query tile, head) for the forward and dQ, per (key tile, kv head) for dK/dV: no idle
# programs. Each walks its list in two branch-free loops, the partial tiles (mask arithmetic) then the full
# ones (none). Tile sizes are the schedule's (fixed, not autotuned). The tile code (loads in two head-dim chunks,
# no padding to the next power of two; the online-softmax step; the dK/dV and dQ steps) is varlen_attention's.


def kernel_lists(schedule: TileSchedule) -> dict:
    """Each list with its partial tiles first, then its full ones, and where the full ones start (cached)."""
    cached = getattr(schedule, "_kernel_lists", None)
    if cached is not None:
        return cached
    out = {}
    for name, offsets, tiles, full, n_other in (
        ("kv", schedule.kv_offsets, schedule.kv_tiles, schedule.kv_full, schedule.k_doc.numel()),
        ("q", schedule.q_offsets, schedule.q_tiles, schedule.q_full, schedule.q_doc.numel()),
    ):
        offsets = offsets.long()
        rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff())
        order = torch.argsort(rows * 2 * (n_other + 1) + full.long() * (n_other + 1) + tiles.long())
        partial = torch.zeros(offsets.numel() - 1, dtype=torch.int64, device=offsets.device)
        partial.index_add_(0, rows, (~full).long())
        out[name] = (offsets.to(torch.int32), tiles[order].contiguous(), (offsets[:-1] + partial).to(torch.int32))
    schedule._kernel_lists = out
    return out


@triton.jit
def schedule_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, seg_ptr, bidir_ptr,
    q_doc_ptr, q_start_ptr, k_start_ptr, offsets_ptr, tiles_ptr, split_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    n_total, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BIDIR: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    start, seqlen, offs_m, m_ok, rows = doc_tile(cu_ptr, tl.load(q_doc_ptr + tile), tl.load(q_start_ptr + tile),
                                                  BLOCK_M)  # fmt: skip
    kv_head = head // GROUP
    q0, q1 = load_head(q_ptr, rows, m_ok, head, stride_qn, stride_qh, HEAD_DIM, D0, D1, ALIGN, True)
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0, acc1 = zeros_head(BLOCK_M, D0, D1)
    lo = tl.load(offsets_ptr + tile)
    split = tl.load(split_ptr + tile)
    hi = tl.load(offsets_ptr + tile + 1)
    for idx in range(lo, split):  # partial tiles: masked
        offs_n = tl.load(k_start_ptr + tl.load(tiles_ptr + idx)) + tl.arange(0, BLOCK_N)
        visible = visible_mask(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
        acc0, acc1, m_i, l_i = fwd_step(
            acc0, acc1, m_i, l_i, q0, q1, offs_n, visible, start, seqlen, kv_head, k_ptr, v_ptr,
            stride_kn, stride_kh, stride_vn, stride_vh, qk_scale, True, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE,
            BLOCK_M, BLOCK_N,
        )  # fmt: skip
    for idx in range(split, hi):  # full tiles: no mask arithmetic
        offs_n = tl.load(k_start_ptr + tl.load(tiles_ptr + idx)) + tl.arange(0, BLOCK_N)
        acc0, acc1, m_i, l_i = fwd_step(
            acc0, acc1, m_i, l_i, q0, q1, offs_n, 0, start, seqlen, kv_head, k_ptr, v_ptr,
            stride_kn, stride_kh, stride_vn, stride_vh, qk_scale, False, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE,
            BLOCK_M, BLOCK_N,
        )  # fmt: skip
    fwd_finish(o_ptr, lse_ptr, rows, m_ok, offs_m, start, head, stride_on, stride_oh, n_total, acc0, acc1, m_i, l_i,
                HEAD_DIM, D0, D1, ALIGN)  # fmt: skip


@triton.jit
def schedule_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr, seg_ptr, bidir_ptr,
    k_doc_ptr, k_start_ptr, q_start_ptr, offsets_ptr, tiles_ptr, split_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh, n_total, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BIDIR: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    start, seqlen, offs_n, n_ok, cols = doc_tile(cu_ptr, tl.load(k_doc_ptr + tile), tl.load(k_start_ptr + tile),
                                                  BLOCK_N)  # fmt: skip
    k0, k1 = load_head(k_ptr, cols, n_ok, kv_head, stride_kn, stride_kh, HEAD_DIM, D0, D1, ALIGN, True)
    v0, v1 = load_head(v_ptr, cols, n_ok, kv_head, stride_vn, stride_vh, HEAD_DIM, D0, D1, ALIGN, True)
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    dk0, dk1 = zeros_head(BLOCK_N, D0, D1)
    dv0, dv1 = zeros_head(BLOCK_N, D0, D1)
    lo = tl.load(offsets_ptr + tile)
    split = tl.load(split_ptr + tile)
    hi = tl.load(offsets_ptr + tile + 1)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for idx in range(lo, split):  # partial tiles: masked
            offs_m = tl.load(q_start_ptr + tl.load(tiles_ptr + idx)) + tl.arange(0, BLOCK_M)
            visible = visible_mask(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
            dk0, dk1, dv0, dv1 = dkdv_step(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, offs_m, visible, start, seqlen, head, q_ptr, do_ptr, lse_ptr,
                delta_ptr, stride_qn, stride_qh, stride_don, stride_doh, n_total, qk_scale,
                True, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE, BLOCK_M, BLOCK_N,
            )  # fmt: skip
        for idx in range(split, hi):  # full tiles: no mask arithmetic
            offs_m = tl.load(q_start_ptr + tl.load(tiles_ptr + idx)) + tl.arange(0, BLOCK_M)
            dk0, dk1, dv0, dv1 = dkdv_step(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, offs_m, 0, start, seqlen, head, q_ptr, do_ptr, lse_ptr,
                delta_ptr, stride_qn, stride_qh, stride_don, stride_doh, n_total, qk_scale,
                False, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    store_head(
        dk_ptr, cols, n_ok, kv_head, stride_dkn, stride_dkh, dk0 * sm_scale, dk1 * sm_scale, HEAD_DIM, D0, D1, ALIGN
    )
    store_head(dv_ptr, cols, n_ok, kv_head, stride_dvn, stride_dvh, dv0, dv1, HEAD_DIM, D0, D1, ALIGN)


@triton.jit
def schedule_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, seg_ptr, bidir_ptr,
    q_doc_ptr, q_start_ptr, k_start_ptr, offsets_ptr, tiles_ptr, split_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dqn, stride_dqh, n_total, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BIDIR: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    start, seqlen, offs_m, m_ok, rows = doc_tile(cu_ptr, tl.load(q_doc_ptr + tile), tl.load(q_start_ptr + tile),
                                                  BLOCK_M)  # fmt: skip
    kv_head = head // GROUP
    q0, q1, do0, do1, lse, delta = query_side(
        q_ptr, do_ptr, lse_ptr, delta_ptr, rows, m_ok, offs_m, start, head, stride_qn, stride_qh,
        stride_don, stride_doh, n_total, True, HEAD_DIM, D0, D1, ALIGN,
    )  # fmt: skip
    seg_doc = seg_ptr + start
    bidir_doc = bidir_ptr + start
    dq0, dq1 = zeros_head(BLOCK_M, D0, D1)
    lo = tl.load(offsets_ptr + tile)
    split = tl.load(split_ptr + tile)
    hi = tl.load(offsets_ptr + tile + 1)
    for idx in range(lo, split):  # partial tiles: masked
        offs_n = tl.load(k_start_ptr + tl.load(tiles_ptr + idx)) + tl.arange(0, BLOCK_N)
        visible = visible_mask(offs_m, offs_n, seqlen, seg_doc, bidir_doc, CAUSAL, HAS_SEG, HAS_BIDIR)
        dq0, dq1 = dq_step(
            dq0, dq1, q0, q1, do0, do1, lse, delta, offs_n, visible, start, seqlen, kv_head, k_ptr, v_ptr,
            stride_kn, stride_kh, stride_vn, stride_vh, qk_scale, True, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE,
            BLOCK_M, BLOCK_N,
        )  # fmt: skip
    for idx in range(split, hi):  # full tiles: no mask arithmetic
        offs_n = tl.load(k_start_ptr + tl.load(tiles_ptr + idx)) + tl.arange(0, BLOCK_N)
        dq0, dq1 = dq_step(
            dq0, dq1, q0, q1, do0, do1, lse, delta, offs_n, 0, start, seqlen, kv_head, k_ptr, v_ptr,
            stride_kn, stride_kh, stride_vn, stride_vh, qk_scale, False, HEAD_DIM, D0, D1, ALIGN, UPCAST, IEEE,
            BLOCK_M, BLOCK_N,
        )  # fmt: skip
    store_head(
        dq_ptr, rows, m_ok, head, stride_dqn, stride_dqh, dq0 * sm_scale, dq1 * sm_scale, HEAD_DIM, D0, D1, ALIGN
    )


# --- Hopper launch configs: chosen from sm_90 compiles, not yet timed on an H100 --------------------------------
#
# Tiles (the schedule's): 128 query rows x 64 keys for 16-bit inputs. The forward and dQ hold a 128-row Q tile (and
# dO) in shared memory for the whole walk and stream 64-key K/V tiles, FA2/FA3's H100 shape for head dims <= 128:
# a 128 x 64 x D wgmma per tile for 8 warps (two warpgroups of 64 rows each), P kept in registers as the A operand
# of P @ V. dK/dV holds its 64-key K/V tile and streams 128-row Q/dO tiles (same schedule, transposed lists).
# Stages: shared memory per CTA as Triton 3.9 allocates it for sm_90, bf16 (bytes; the H100 allows 232,448 =
# 227 KiB per CTA, 228 KiB per SM), from `compile_for_sm90` (tests/kernels/test_attention_schedule.py checks the pins):
#
#   head dim          64       72/80     96       128
#   fwd  (3 stages)   66,560   82,944    99,328   132,096     K+V ring 3 x 2 x 64 x D x 2 B + Q 128 x D x 2 B
#   dQ   (3 stages)   82,944   103,424   123,904  164,864     + dO, the second operand of dP = dO V^T
#   dKdV (2 stages)  100,864  121,344   141,824  182,784     Q+dO ring 2 x 2 x 128 x D x 2 B + K, V; 3 stages
#                                                             need 249,856 at D = 128: over the limit
#
# One CTA per SM at D = 128 (8 warps, 2 warpgroups): what FA2 runs on Hopper too; at D <= 96 the forward leaves
# room for a second CTA. 72 and 80 take 64 + 16 column chunks: their K/V loads need the ALIGN hint (stride 72 is
# not a multiple of 16) to become cp.async copies the pipeliner can multi-buffer; without it they were plain loads.
# fp32 inputs (tests, never training) use 64 x 64 tiles, 4 warps and 2 stages (115,456 / 147,968 / 164,864 at
# D = 128): 128 x 64 dK/dV needs 262,144 bytes in fp32 even at one stage. The same 16-bit table fits an A100
# (sm_80: 99,328 / 132,096 / 116,736 at D = 128, under its 166,912). One config per kernel and no autotuning, so
# R4B_AUTOTUNE changes nothing here: the tests run the configs the GPU runs.
# Prediction (owed: H100 figures): the forward on shared-prefix and vision masks at 1.5-2.5x today's r4b kernel
# (no empty-tile loop steps or idle programs, no mask arithmetic on full tiles, 72 at 80 columns instead of 128),
# which is about FlexAttention's time or better; causal documents within 10% of torch's FA2; the backward's dK/dV
# is the weakest kernel (one CTA per SM, 2 stages, Q and dO streamed per query head of the GQA group).
_LAUNCH_16BIT = {"fwd": (8, 3), "dq": (8, 3), "dkdv": (8, 2)}  # (num_warps, num_stages)
_LAUNCH_32BIT = {"fwd": (4, 2), "dq": (4, 2), "dkdv": (4, 2)}


def default_blocks(dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """The tiles (query rows, keys) of the schedule-walking kernels: 16 x 16 in the interpreter; on a GPU 128 x 64
    for 16-bit inputs, 64 x 64 for fp32 (see the launch configs above)."""
    if interpreting():
        return (16, 16)
    return (128, 64) if dtype.itemsize <= 2 else (64, 64)


def launch_config(kernel: str, dtype: torch.dtype, block_m: int, block_n: int) -> dict:
    """``num_warps`` / ``num_stages`` of a walking kernel (``fwd``, ``dq`` or ``dkdv``); none in the interpreter."""
    if interpreting():
        return {}
    small = dtype.itemsize <= 2 or block_m * block_n <= 64 * 64
    warps, stages = (_LAUNCH_16BIT if dtype.itemsize <= 2 else _LAUNCH_32BIT)[kernel] if small else (4, 1)
    return {"num_warps": warps, "num_stages": stages}


class _ScheduledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, causal, segment_ids, bidir_ids, scale, schedule):
        n_total, n_heads, _ = q.shape
        flags = kernel_flags(q, causal, segment_ids, bidir_ids, k, v)
        seg, bidir = id_pointers(cu_seqlens, segment_ids, bidir_ids)
        out = torch.empty_like(q)
        lse = torch.empty((n_heads, n_total), dtype=torch.float32, device=q.device)
        group = n_heads // k.shape[1]
        offsets, tiles, split = kernel_lists(schedule)["kv"]
        blocks = dict(BLOCK_M=schedule.block_m, BLOCK_N=schedule.block_n)
        launch = launch_config("fwd", q.dtype, schedule.block_m, schedule.block_n)
        schedule_fwd_kernel[(schedule.q_doc.numel(), n_heads)](
            q, k, v, out, lse, cu_seqlens, seg, bidir,
            schedule.q_doc, schedule.q_start, schedule.k_start, offsets, tiles, split,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), n_total, scale * LOG2E, GROUP=group, **flags, **blocks, **launch,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seg, bidir)
        ctx.meta = (scale, group, flags, schedule)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, seg, bidir = ctx.saved_tensors
        scale, group, flags, schedule = ctx.meta
        n_total, n_heads, _ = q.shape
        grad_out = grad_out.contiguous()
        delta = row_deltas(out, grad_out, flags)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        blocks = (schedule.block_m, schedule.block_n)
        common = dict(GROUP=group, BLOCK_M=schedule.block_m, BLOCK_N=schedule.block_n, **flags)
        lists = kernel_lists(schedule)
        schedule_dkdv_kernel[(schedule.k_doc.numel(), k.shape[1])](
            q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, seg, bidir,
            schedule.k_doc, schedule.k_start, schedule.q_start, *lists["q"],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            grad_out.stride(0), grad_out.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            n_total, scale * LOG2E, scale, **common, **launch_config("dkdv", q.dtype, *blocks),
        )  # fmt: skip
        schedule_dq_kernel[(schedule.q_doc.numel(), n_heads)](
            q, k, v, grad_out, lse, delta, dq, cu_seqlens, seg, bidir,
            schedule.q_doc, schedule.q_start, schedule.k_start, *lists["kv"],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1),
            n_total, scale * LOG2E, scale, **common, **launch_config("dq", q.dtype, *blocks),
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def scheduled_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PackedLayout,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    schedule: TileSchedule | None = None,
) -> torch.Tensor:
    """``varlen_attention``'s contract on the kernels that walk the tile schedule (the layout's, with its tile sizes
    the kernels', unless given). The mask is the layout's: its ``cu_seqlens``, ``segment_ids`` and ``bidir_ids``.
    Triton only (GPU or the interpreter)."""
    ids = (layout.segment_ids, layout.bidir_ids)
    check_attention_inputs(q, k, v, layout.cu_seqlens, layout.host, layout.max_seqlen, causal, *ids)
    if schedule is None:
        bm, bn = default_blocks(q.dtype)
        schedule = schedule_for(layout, causal=causal, block_m=bm, block_n=bn)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _ScheduledAttention.apply(q, k, v, layout.cu_seqlens, causal, *ids, scale, schedule)
