"""r4b's varlen attention as a transformers attention implementation.

After :func:`register_varlen_attention`, any model loaded with
``attn_implementation="r4b_varlen"`` runs packed batches (one row of N tokens)
through ``r4b.kernels.varlen_attention``. The packing travels as keyword
arguments of the model's forward, which transformers hands to every attention
call. r4b's own forwards pass ``r4b_layout``, the row's
:class:`~r4b.kernels.packed_layout.PackedLayout` (``cu_seqlens`` with its host
values, r4b's ``segment_ids`` for shared-prefix responses and ``bidir_ids`` for
bidirectional image blocks): no layer reads the device, and the block mask or
tile schedule is built once per forward. Other callers may pass the names
flash-attn's path uses, ``cu_seq_lens_q`` / ``max_length_q`` (a vision tower
does), with ``segment_ids`` / ``bidir_ids``: each call then reads
``cu_seq_lens_q`` to the host. Without either each row is one document. A
padding mask is refused: pack instead of padding.

The kernel that runs it is chosen per call by :mod:`r4b.models.attention_backends` (``R4B_ATTENTION_BACKEND``:
``auto``, ``r4b``, ``flex`` or ``fa2``); FlexAttention's block mask is built once per packed batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from r4b.kernels.packed_layout import PackedLayout

from .attention_backends import attention_backend, flex_rows_attention, packed_attention, resolve_backend

ATTENTION_NAME = "r4b_varlen"


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """One dtype for q, k and v. Under autocast, its dtype (what flash-attn's path in transformers does too:
    Qwen3's q/k RMSNorm and RoPE return fp32 q and k beside a bf16 v). Otherwise the lowest precision among
    them: v's projection sets the compute dtype, a norm or RoPE in fp32 only widens q and k."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return dtypes.pop()
    return min(dtypes, key=lambda d: torch.finfo(d).bits)


@functools.lru_cache(maxsize=16)
def _rows_layout(batch: int, seq_len: int, device: torch.device) -> PackedLayout:
    """``batch`` unpacked rows of ``seq_len`` tokens: one layout per shape, so every layer shares what is built
    from it (Flex's block mask, the tile schedule: one build per shape, not per layer)."""
    return PackedLayout.rows(batch, seq_len, device)


def _layout_of(cu_seqlens: torch.Tensor, segment_ids, bidir_ids) -> PackedLayout:
    """A layout for a caller that passed ``cu_seq_lens_q`` itself (one host read). Without id tensors (a vision
    tower's windows: several layers, a few distinct layouts) the layout is shared by content, so the layers of
    one forward share its builds; with them it serves this call only."""
    cu_seqlens = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    if segment_ids is not None or bidir_ids is not None:
        return PackedLayout(cu_seqlens, segment_ids=segment_ids, bidir_ids=bidir_ids)
    return _layout_by_content(tuple(cu_seqlens.tolist()), cu_seqlens.device)


@functools.lru_cache(maxsize=16)
def _layout_by_content(host: tuple[int, ...], device: torch.device) -> PackedLayout:
    """One layout per packing (its host values) and device, for the calls that pass equal ``cu_seq_lens_q``."""
    return PackedLayout(torch.tensor(host, dtype=torch.int32, device=device), host)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
    r4b_layout: PackedLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' calling convention: query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None).

    ``max_length_q`` is not read: the longest document comes from the layout's host values."""
    if attention_mask is not None:
        raise ValueError(
            f"{ATTENTION_NAME} takes packed batches, not padding masks: pass one row of packed tokens with "
            "cu_seq_lens_q / max_length_q instead of attention_mask"
        )
    if dropout:
        raise ValueError(f"{ATTENTION_NAME} has no attention dropout (got {dropout})")
    if r4b_layout is not None and (segment_ids is not None or bidir_ids is not None):
        raise ValueError("r4b_layout carries the row's segment_ids and bidir_ids: do not pass them beside it")
    batch, _, seq_len, _ = query.shape
    dtype = _compute_dtype(query, key, value)
    causal = getattr(module, "is_causal", True)
    backend = attention_backend()
    unpacked = r4b_layout is None and cu_seq_lens_q is None
    if unpacked and segment_ids is None and bidir_ids is None:
        kind = resolve_backend(backend, query, causal=causal, segment_ids=None, bidir_ids=None)
        if kind == "flex":  # each row one document: no packing, no block mask (a causal one cached per length)
            q, k, v = (t.to(dtype) for t in (query, key, value))
            return flex_rows_attention(q, k, v, causal=causal, softmax_scale=scaling).transpose(1, 2), None
    q, k, v = (
        t.to(dtype).transpose(1, 2).reshape(batch * seq_len, t.shape[1], t.shape[3]) for t in (query, key, value)
    )
    if not unpacked and batch != 1:
        raise ValueError(f"a packed layout describes one packed row; got a batch of {batch} rows")
    flat = lambda ids: None if ids is None else ids.reshape(-1).to(torch.int32)
    layout = r4b_layout
    if layout is None and cu_seq_lens_q is not None:
        layout = _layout_of(cu_seq_lens_q, flat(segment_ids), flat(bidir_ids))
    elif layout is None:
        layout = _rows_layout(batch, seq_len, q.device)
        if segment_ids is not None or bidir_ids is not None:
            layout = PackedLayout(
                layout.cu_seqlens, layout.host, segment_ids=flat(segment_ids), bidir_ids=flat(bidir_ids)
            )
    out = packed_attention(q, k, v, layout, causal=causal, softmax_scale=scaling, backend=backend)
    return out.view(batch, seq_len, *out.shape[1:]), None


def packed_layout(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    cu_seqlens_host: Sequence[int] | None = None,
    **ids: torch.Tensor | None,
) -> PackedLayout:
    """The checked :class:`PackedLayout` of one packed row [N] (``ids``: its ``segment_ids`` / ``bidir_ids``, each
    [N] or None), which every attention layer of the forward receives. ``cu_seqlens_host``: ``cu_seqlens``' values
    where the caller has them (a :class:`~r4b.packed_row.PackedRow` does); else one read from the device."""
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be one packed row [N], got shape {tuple(input_ids.shape)}")
    n = input_ids.shape[0]
    if position_ids.shape[-1] != n:
        raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not end in N={n}")
    layout = PackedLayout(cu_seqlens, cu_seqlens_host, **{k: _flat_ids(k, v, n) for k, v in ids.items()})
    if layout.total != n:
        raise ValueError(f"cu_seqlens must run from 0 to N={n}, got {list(layout.host)}")
    if layout.shortest <= 0 or layout.max_seqlen > max_seqlen:
        raise ValueError(f"cu_seqlens lengths {layout.lengths} must be positive and <= max_seqlen={max_seqlen}")
    return layout


def _flat_ids(name: str, ids: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if ids is not None and ids.shape != (n,):
        raise ValueError(f"{name} shape {tuple(ids.shape)} != input_ids shape {(n,)}")
    return None if ids is None else ids.to(torch.int32)


def register_varlen_attention() -> str:
    """Register ``r4b_varlen`` with transformers (idempotent); returns the name to pass as attn_implementation."""
    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    # Like flash-attn: no [T, T] mask is ever built for this implementation.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, flash_attention_mask)
    return ATTENTION_NAME
