"""r4b's varlen attention as a transformers attention implementation.

After :func:`register_varlen_attention`, any model loaded with
``attn_implementation="r4b_varlen"`` runs packed batches (one row of N tokens)
through ``r4b.kernels.varlen_attention``. The packing travels as keyword
arguments of the model's forward, which transformers hands to every attention
call: ``cu_seq_lens_q`` / ``max_length_q`` (the names flash-attn's path uses),
plus r4b's ``segment_ids`` (shared-prefix responses) and ``bidir_ids``
(bidirectional image blocks). Without ``cu_seq_lens_q`` each row is one
document. A padding mask is refused: pack instead of padding.

The kernel that runs it is chosen per call by :mod:`r4b.models.attention_backends` (``R4B_ATTENTION_BACKEND``:
``auto``, ``r4b``, ``flex`` or ``fa2``); FlexAttention's block mask is built once per packed batch.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from r4b.kernels.varlen_attention import remember_cu_seqlens

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
def _rows_cu_seqlens(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` of ``batch`` unpacked rows of ``seq_len`` tokens: one tensor per shape (never written), so that
    every layer hands the same object to the caches keyed on it (the host copy, the r4b-schedule tile schedule and
    Flex's block mask: one build per shape, not per layer)."""
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * seq_len
    # its host values are known: never read back from the device (a sync per layer, per vision window)
    remember_cu_seqlens(cu, values=[row * seq_len for row in range(batch + 1)])
    return cu


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
    max_length_q: int | None = None,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' calling convention: query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None)."""
    if attention_mask is not None:
        raise ValueError(
            f"{ATTENTION_NAME} takes packed batches, not padding masks: pass one row of packed tokens with "
            "cu_seq_lens_q / max_length_q instead of attention_mask"
        )
    if dropout:
        raise ValueError(f"{ATTENTION_NAME} has no attention dropout (got {dropout})")
    batch, _, seq_len, _ = query.shape
    dtype = _compute_dtype(query, key, value)
    causal = getattr(module, "is_causal", True)
    backend = attention_backend()
    if cu_seq_lens_q is None and segment_ids is None and bidir_ids is None:
        kind = resolve_backend(backend, query, causal=causal, segment_ids=None, bidir_ids=None)
        if kind == "flex":  # each row one document: no packing, no block mask (a causal one cached per length)
            q, k, v = (t.to(dtype) for t in (query, key, value))
            return flex_rows_attention(q, k, v, causal=causal, softmax_scale=scaling).transpose(1, 2), None
    q, k, v = (
        t.to(dtype).transpose(1, 2).reshape(batch * seq_len, t.shape[1], t.shape[3]) for t in (query, key, value)
    )
    if cu_seq_lens_q is None:
        cu_seq_lens_q = _rows_cu_seqlens(batch, seq_len, q.device)
        max_length_q = seq_len
    elif batch != 1:
        raise ValueError(f"cu_seq_lens_q describes one packed row; got a batch of {batch} rows")
    cu_seqlens = cu_seq_lens_q if cu_seq_lens_q.dtype == torch.int32 else cu_seq_lens_q.to(torch.int32)
    if max_length_q is None or isinstance(max_length_q, torch.Tensor):
        # e.g. a vision tower's per-layer (cu_seqlens.diff().max()): the host value comes from the cu_seqlens
        # read that varlen_attention caches per tensor, not from a device sync in every layer
        max_length_q = remember_cu_seqlens(cu_seqlens)[2]
    flat = lambda ids: None if ids is None else ids.reshape(-1).to(torch.int32)
    out = packed_attention(
        q,
        k,
        v,
        cu_seqlens,
        int(max_length_q),
        causal=causal,
        segment_ids=flat(segment_ids),
        bidir_ids=flat(bidir_ids),
        softmax_scale=scaling,
        backend=backend,
        cache_ids=(segment_ids, bidir_ids),  # the objects every layer receives: the block mask's cache key
    )
    return out.view(batch, seq_len, *out.shape[1:]), None


def register_varlen_attention() -> str:
    """Register ``r4b_varlen`` with transformers (idempotent); returns the name to pass as attn_implementation."""
    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    # Like flash-attn: no [T, T] mask is ever built for this implementation.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, flash_attention_mask)
    return ATTENTION_NAME
