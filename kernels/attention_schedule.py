"""The tile schedule of packed varlen attention: which key tiles each query tile must visit, full or partial.

Tiles are per document, as in ``varlen_attention``'s kernels: query tile t covers rows
``[q_start[t], q_start[t] + block_m)`` of document ``q_doc[t]`` (document-local offsets), key tile u covers
``[k_start[u], k_start[u] + block_n)`` of ``k_doc[u]``; a document's last tile is cut by its end. The
schedule lists, for each query tile, exactly the key tiles of its document holding at least one visible
(query, key) pair of the mask contract (``varlen_attention.attention_mask_reference``), each marked
full when all ``block_m x block_n`` pairs are inside the document and visible (no mask arithmetic needed)
and partial otherwise; the transposed lists (query tiles per key tile) serve the dK/dV pass.

Built with torch operations on the tensors' device: the only host values are the document lengths (the
cached host copy of ``cu_seqlens``, read once per tensor) and the sizes of the lists. Candidate tile pairs
come from per-tile summaries (causal bound; segment and bidir id ranges), a superset of the non-empty
pairs; each candidate is then checked pair by pair, in chunks. :func:`schedule_for` caches the schedule on
the ``cu_seqlens`` tensor, so that every layer of a forward (and its backward) shares one build.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .varlen_attention import cu_seqlens_host_values

BUILDS = {"count": 0}  # schedule builds so far (the tests count them)
_CHUNK_ELEMENTS = 1 << 24  # pairs checked per chunk of candidate tiles
_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


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
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
    block_m: int = 128,
    block_n: int = 64,
) -> TileSchedule:
    """The exact tile schedule of one packed row (see the module docstring). Not cached: :func:`schedule_for`."""
    if not causal and (segment_ids is not None or bidir_ids is not None):
        raise ValueError("causal=False attends all pairs of a document: segment_ids and bidir_ids must be None")
    BUILDS["count"] += 1
    device = cu_seqlens.device
    values = cu_seqlens_host_values(cu_seqlens)
    n = values[-1]
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


def schedule_for(
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
    block_m: int = 128,
    block_n: int = 64,
    cache_ids: tuple = (),
) -> TileSchedule:
    """:func:`build_tile_schedule`, built once per ``cu_seqlens`` tensor object (and id tensors, mask kind and
    tile sizes) while none of them changes in place: every layer of a forward shares one build.
    ``cache_ids``: the id tensors as every layer receives them (default: ``segment_ids``, ``bidir_ids``)."""
    ids = tuple(cache_ids) or (segment_ids, bidir_ids)
    key = (causal, block_m, block_n, segment_ids is None, bidir_ids is None, *(id(t) for t in ids))
    version = (cu_seqlens._version, *(None if t is None else t._version for t in ids))
    entries = _CACHE.get(cu_seqlens)
    if entries is None:
        entries = _CACHE[cu_seqlens] = {}
    hit = entries.get(key)
    if hit is not None and hit[0] == version:
        return hit[2]
    schedule = build_tile_schedule(
        cu_seqlens, causal=causal, segment_ids=segment_ids, bidir_ids=bidir_ids, block_m=block_m, block_n=block_n
    )
    if len(entries) >= 8:
        entries.pop(next(iter(entries)))
    entries[key] = (version, ids, schedule)
    return schedule


def current_kernel_stats(
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
    block_m: int = 128,
    block_n: int = 64,
) -> dict:
    """Tile efficiency of ``varlen_attention``'s forward kernel on this layout, against the exact schedule.

    The kernel launches documents x cdiv(longest, block_m) programs per head; each active one loops over the
    key tiles below its causal bound (all of the document with bidir ids or ``causal=False``) and computes
    every tile it loops over, except that with segment or bidir ids it skips the empty ones (after loading
    their ids). ``visited`` = tiles computed (matmuls), ``iterated`` = loop steps."""
    schedule = build_tile_schedule(
        cu_seqlens, causal=causal, segment_ids=segment_ids, bidir_ids=bidir_ids, block_m=block_m, block_n=block_n
    )
    stats = schedule.stats()
    lengths = cu_seqlens.diff().long()
    length = lengths[schedule.q_doc.long()]
    hi = length
    if causal and bidir_ids is None:
        hi = torch.minimum(length, schedule.q_start.long() + block_m)
    iterated = int(((hi + block_n - 1) // block_n).sum())
    visited = stats["nonempty_tiles"] if (segment_ids is not None or bidir_ids is not None) else iterated
    programs = (lengths.numel()) * int((int(lengths.max()) + block_m - 1) // block_m)
    pairs_per_tile = block_m * block_n
    return {
        **stats,
        "block_m": block_m,
        "block_n": block_n,
        "programs": programs,
        "idle_programs": programs - stats["q_tiles"],
        "iterated_tiles": iterated,
        "visited_tiles": visited,
        "visited_per_nonempty": visited / max(1, stats["nonempty_tiles"]),
        "visible_per_visited_pairs": stats["visible_pairs"] / max(1, visited * pairs_per_tile),
        "visible_per_nonempty_pairs": stats["visible_pairs"] / max(1, stats["nonempty_tiles"] * pairs_per_tile),
        "full_share": stats["full_tiles"] / max(1, stats["nonempty_tiles"]),
    }
