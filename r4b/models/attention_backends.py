"""Which kernel runs the packed attention of ``r4b_varlen``: r4b's Triton kernel, FlexAttention or torch's FA2 varlen.

The setting, first match wins: :func:`use_attention_backend` (a context manager) or
:func:`set_attention_backend`, then the environment variable ``R4B_ATTENTION_BACKEND``, then ``auto``. A run's
``model.attention_backend`` key is applied with :func:`set_attention_backend` where the variable is unset
(:func:`r4b.train.runtime.apply_kernel_choices`: the variable overrides the key).

- ``r4b``: :func:`r4b.kernels.varlen_attention` (its own dispatch: flash-attn for plain masks where installed).
- ``flex``: ``torch.nn.attention.flex_attention`` with a block mask built from the same ``cu_seqlens`` /
  ``segment_ids`` / ``bidir_ids``, compiled on CUDA (eager elsewhere: forward only on the CPU).
- ``fa2``: torch's FlashAttention-2 varlen kernel (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.11,
  CUDA, fp16/bf16) for masks without segment or bidir ids, grouped-query attention without K / V copies; every
  other call runs r4b's kernel.
- ``auto`` (the default) follows the latest H100 figures (bench/RESULTS.md): on CUDA, FA2
  varlen for plain causal documents in fp16/bf16 (when torch has it), FlexAttention for shared-prefix,
  bidir and full (vision) masks, r4b's kernel for the rest; on the CPU, r4b's kernel (the Triton interpreter
  or the torch reference), as before.

Every call takes the packed row's :class:`~r4b.kernels.packed_layout.PackedLayout` (``cu_seqlens`` with its host
values and the row's segment / bidir ids). The block mask is built once per packed micro-batch, not per layer: it
is kept on the layout, which every layer of a forward receives. ``BUILDS`` counts the builds (the tests read it).

``r4b-schedule`` (never chosen by ``auto``: not yet measured on a GPU) runs r4b's kernels that walk the exact
tile schedule (:mod:`r4b.kernels.attention_schedule`), built on the device once per packed batch (kept on the
layout like the block mask) and shared by every layer, forward and backward; float64 and CPU tensors outside the
Triton interpreter take r4b's path (the reference).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import os
import typing
from collections.abc import Iterator

import torch

from r4b.config.sections import AttentionBackend
from r4b.kernels import varlen_attention
from r4b.kernels._backend import use_triton
from r4b.kernels.attention_schedule import scheduled_varlen_attention
from r4b.kernels.packed_layout import PackedLayout

BACKENDS = typing.get_args(AttentionBackend)  # ("auto", "r4b", "flex", "fa2", "r4b-schedule"): model.attention_backend
ENV_VAR = "R4B_ATTENTION_BACKEND"
BUILDS: collections.Counter = collections.Counter()  # "flex-block-mask", "tile-schedule": builds so far

_override: list[str] = []  # use_attention_backend, innermost last
_setting: list[str] = []  # set_attention_backend


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r} (setting or ${ENV_VAR})")
    return name


def attention_backend() -> str:
    """The backend setting now: the innermost :func:`use_attention_backend`, else :func:`set_attention_backend`'s,
    else ``$R4B_ATTENTION_BACKEND``, else ``auto``."""
    if _override:
        return _override[-1]
    if _setting:
        return _setting[0]
    return _check(os.environ.get(ENV_VAR, "auto").strip() or "auto")


def set_attention_backend(name: str | None) -> None:
    """Set the process-wide backend (``None``: back to ``$R4B_ATTENTION_BACKEND`` / ``auto``)."""
    _setting.clear()
    if name is not None:
        _setting.append(_check(name))


@contextlib.contextmanager
def use_attention_backend(name: str) -> Iterator[str]:
    """Run the enclosed forwards (and their backwards, which reuse what the forward chose) on ``name``."""
    _override.append(_check(name))
    try:
        yield name
    finally:
        _override.pop()


@functools.cache
def fa2_varlen():
    """torch's FA2 varlen function (torch >= 2.11), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _flex():
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError:
        return None
    return module


@functools.cache
def _compiled_flex():
    return torch.compile(_flex().flex_attention)


# CPU tensors run FlexAttention eagerly unless this is set (tests: compiled FlexAttention keeps one graph across
# micro-batches whose packing changes, checked on the CPU)
FLEX_COMPILE_ON_CPU = False


def resolve_backend(
    name: str, q: torch.Tensor, *, causal: bool, segment_ids: torch.Tensor | None, bidir_ids: torch.Tensor | None
) -> str:
    """The kernel that runs one call: ``r4b``, ``flex``, ``fa2`` or ``r4b-schedule``."""
    _check(name)
    if name == "r4b-schedule":
        return name
    plain = segment_ids is None and bidir_ids is None
    fa2_ok = q.is_cuda and plain and q.dtype in (torch.float16, torch.bfloat16) and fa2_varlen() is not None
    if name == "fa2":
        return "fa2" if fa2_ok else "r4b"
    if name == "flex":
        if _flex() is None:
            raise RuntimeError("attention backend 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        return "flex"
    if name == "r4b" or not q.is_cuda:
        return "r4b"
    if fa2_ok and causal:
        return "fa2"  # plain causal documents: FA2 varlen (0.99 / 4.13 ms against r4b's 1.61 / 4.40 at 16k)
    if (not plain or not causal) and _flex() is not None:
        return "flex"  # shared prefix (2.6-2.8x), vision tiles (1.3-2.0x): FlexAttention is faster today
    return "r4b"


def flex_block_mask(layout: PackedLayout, *, causal: bool = True, block_size: int = 128):
    """FlexAttention's block mask of r4b's mask contract over one packed row (built once per layout, kept on it)."""

    def build():
        BUILDS["flex-block-mask"] += 1
        flex = _flex()
        n, device = layout.total, layout.cu_seqlens.device
        lengths = layout.cu_seqlens.diff().long()
        doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=n)
        seg = layout.segment_ids.long() if layout.segment_ids is not None else None
        bid = layout.bidir_ids.long() if layout.bidir_ids is not None else None

        def mask_mod(b, h, q_idx, kv_idx):
            same = doc[q_idx] == doc[kv_idx]
            if not causal:
                return same
            see = kv_idx <= q_idx
            if seg is not None:
                see = see & ((seg[kv_idx] == 0) | (seg[kv_idx] == seg[q_idx]))
            if bid is not None:
                see = see | ((bid[q_idx] == bid[kv_idx]) & (bid[kv_idx] != 0))
            return same & see

        return flex.create_block_mask(
            mask_mod, None, None, n, n, device=device, BLOCK_SIZE=block_size, _compile=device.type == "cuda"
        )

    return layout.memo(("flex-block-mask", causal, block_size), build)


@functools.lru_cache(maxsize=16)
def _flex_rows_mask(seq_len: int, device: torch.device, block_size: int):
    """The causal block mask of rows of ``seq_len`` tokens (calls without cu_seqlens), built once per shape."""
    BUILDS["flex-block-mask"] += 1
    return _flex().create_block_mask(
        lambda b, h, q, k: k <= q, None, None, seq_len, seq_len, device=device, BLOCK_SIZE=block_size
    )


def _flex_call(q, k, v, block_mask, scale):
    """q [B, Hq, T, D], k / v [B, Hkv, T, D] -> [B, Hq, T, D]."""
    fn = _compiled_flex() if q.is_cuda or FLEX_COMPILE_ON_CPU else _flex().flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def flex_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *, causal: bool = True, softmax_scale=None
) -> torch.Tensor:
    """:func:`r4b.kernels.varlen_attention`'s contract (q [N, Hq, D], k / v [N, Hkv, D]) on FlexAttention."""
    _check_mask(layout, causal)
    out = _flex_call(
        *(t.transpose(0, 1)[None] for t in (q, k, v)), flex_block_mask(layout, causal=causal), softmax_scale
    )
    return out[0].transpose(0, 1)


def _check_mask(layout: PackedLayout, causal: bool) -> None:
    if not causal and (layout.segment_ids is not None or layout.bidir_ids is not None):
        raise ValueError("causal=False attends all pairs of a document: segment_ids and bidir_ids must be None")


@functools.cache
def _fa2_takes_enable_gqa() -> bool:
    """Whether this torch's ``varlen_attn`` has ``enable_gqa`` (added after 2.12)."""
    return "enable_gqa" in inspect.signature(fa2_varlen()).parameters


def fa2_varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, causal: bool = True, softmax_scale=None):
    """Plain documents (causal or full) on torch's FA2 varlen kernel: q [N, Hq, D], k / v [N, Hkv, D].

    Grouped-query attention runs without repeating K and V on every ``varlen_attn`` torch ships from 2.11: the
    FA2 kernel under it (``aten._flash_attention_forward`` / ``_backward``) takes fewer kv heads than query heads
    itself. Torch 2.11 and 2.12 pass them through unchecked; later releases want ``enable_gqa=True`` to allow it
    (both sources read: ``torch/nn/attention/varlen.py``)."""
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] and _fa2_takes_enable_gqa() else {}
    window = (-1, 0) if causal else (-1, -1)
    m = int(max_seqlen)
    return fa2_varlen()(q, k, v, cu_seqlens, cu_seqlens, m, m, scale=softmax_scale, window_size=window, **gqa)


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PackedLayout,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`r4b.kernels.varlen_attention` over ``layout`` (its ``cu_seqlens``, ``segment_ids`` and ``bidir_ids``)
    on the backend ``backend`` (``None``: :func:`attention_backend`). No device read: the host values are the
    layout's."""
    seg, bidir, cu_seqlens = layout.segment_ids, layout.bidir_ids, layout.cu_seqlens
    kind = resolve_backend(backend or attention_backend(), q, causal=causal, segment_ids=seg, bidir_ids=bidir)
    if kind == "fa2":
        return fa2_varlen_attention(q, k, v, cu_seqlens, layout.max_seqlen, causal=causal, softmax_scale=softmax_scale)
    if kind == "flex":
        return flex_varlen_attention(q, k, v, layout, causal=causal, softmax_scale=softmax_scale)
    if kind == "r4b-schedule" and use_triton(q, k, v):
        _check_mask(layout, causal)
        return scheduled_varlen_attention(q, k, v, layout, causal=causal, softmax_scale=softmax_scale)
    return varlen_attention(
        q, k, v, cu_seqlens, layout.max_seqlen, causal=causal, segment_ids=seg, bidir_ids=bidir,
        softmax_scale=softmax_scale, cu_seqlens_host=layout.host,
    )  # fmt: skip


def flex_rows_attention(query, key, value, *, causal: bool, softmax_scale=None) -> torch.Tensor:
    """Rows without packing (each row one document): query [B, Hq, T, D] -> [B, Hq, T, D] on FlexAttention."""
    mask = _flex_rows_mask(query.shape[2], query.device, 128) if causal else None
    return _flex_call(query, key, value, mask, softmax_scale)
