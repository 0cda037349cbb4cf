"""One packed row: N tokens of concatenated documents as every objective takes them, and what they need on the host.

SFT (:func:`r4b.data.pack.collate_packed`, then :meth:`r4b.train.sft_data.SFTDataset.host_batch` adds the images
and mRoPE positions), the BPO update and the log-prob passes (:func:`r4b.shared_prefix.pack_shared_prefix` /
``pack_unshared``, then :func:`r4b.rl.batch.build_micro_batch`) all build a :class:`PackedRow`;
:meth:`PackedRow.inputs` is the objective's keyword arguments and :meth:`PackedRow.to` the one place a row moves to
a device.

Host lengths travel with the row. ``cu_seqlens_host`` holds ``cu_seqlens``' values as Python ints, known where the
row is built; it is one of :meth:`PackedRow.inputs`, from which the forward makes the row's
:class:`~r4b.kernels.packed_layout.PackedLayout`, so no layer of the language model reads ``cu_seqlens`` back from
the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["PackedRow"]

# The objective's keyword arguments: the model's inputs, then the BPO loss's (None for SFT)
MODEL_INPUTS = ("input_ids", "position_ids", "cu_seqlens", "cu_seqlens_host", "max_seqlen", "targets", "segment_ids",
                "pixel_values", "image_sizes", "image_grid_thw")  # fmt: skip
LOSS_INPUTS = ("loss_mask", "advantages", "seq_ids", "old_logprobs", "ref_logprobs", "is_weights")


@dataclass(eq=False)
class PackedRow:
    """One row of N packed tokens (no padding): documents back to back, delimited by ``cu_seqlens``.

    Model inputs:
        input_ids: [N] int64.
        position_ids: [N] int64 (restarting in each document), or ``[3, N]`` mRoPE positions (Qwen-VL).
        cu_seqlens: [docs+1] int32 document boundaries (0, l0, l0+l1, ...).
        max_seqlen: the longest document's length.
        targets: [N] int64, already shifted (position t holds the label of token t+1); -100 off the loss.
        segment_ids: [N] int32 (shared-prefix BPO rows: 0 the prompt body, k response k), None for plain causal
            documents (SFT, the unshared BPO layout).
        pixel_values, image_sizes (R-4B) / image_grid_thw (Qwen-VL): the row's images, None without.

    Loss inputs (BPO; None for SFT): ``loss_mask`` [N] bool (targets != -100), ``advantages`` [N] float32 (the
    response's on loss tokens, else 0), ``seq_ids`` [N] int64 (the response's index on loss tokens, else -1),
    ``old_logprobs`` / ``ref_logprobs`` [N] float32 or None, ``is_weights`` [N] float32 or None (the rollout
    correction's importance weights).

    Host facts: ``cu_seqlens_host`` (``cu_seqlens`` as Python ints) and ``loss_tokens`` (positions on the loss).

    BPO bookkeeping, to map per-token values back (:func:`r4b.shared_prefix.unpack_responses`):
    ``response_starts`` [R] int64 (the packed index of the position predicting response i's first token),
    ``response_lengths`` [R] int64, ``max_response_len`` (the padded width unpacking restores) and ``responses``
    (the batch indices of the packed responses, in packing order, when built from a
    :class:`~r4b.rl.batch.RolloutBatch`).

    SFT bookkeeping: ``sample_indices`` (each sample's index in what was packed), ``images`` (the samples' image
    paths, in row order) and ``sources`` (``file:line`` of each sample).
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    targets: Tensor
    cu_seqlens_host: tuple[int, ...]
    loss_tokens: int
    segment_ids: Tensor | None = None
    pixel_values: Tensor | None = None
    image_sizes: Tensor | None = None
    image_grid_thw: Tensor | None = None
    loss_mask: Tensor | None = None
    advantages: Tensor | None = None
    seq_ids: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    is_weights: Tensor | None = None
    response_starts: Tensor | None = None
    response_lengths: Tensor | None = None
    max_response_len: int = 0
    responses: tuple[int, ...] | None = None
    sample_indices: list[int] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_responses(self) -> int:
        """Packed responses (BPO rows; 0 for SFT)."""
        return 0 if self.response_lengths is None else self.response_lengths.numel()

    def inputs(self) -> dict[str, Any]:
        """The objective's keyword arguments: every model and loss input that is not None (``max_seqlen`` too)."""
        names = (*MODEL_INPUTS, *LOSS_INPUTS)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to(
        self, device: torch.device | str, *, pixel_dtype: torch.dtype | None = None, non_blocking: bool = True
    ) -> PackedRow:
        """This row on ``device`` (``pixel_values`` also cast to ``pixel_dtype`` when given; tensors already there
        are not copied): the one place a row moves to a device."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                dtype = pixel_dtype if f.name == "pixel_values" else None
                moved[f.name] = value.to(device, dtype=dtype, non_blocking=non_blocking)
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> PackedRow:
        """This row with every tensor in page-locked memory (the DataLoader calls it with ``pin_memory=True``), so
        :meth:`to` copies asynchronously."""
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v.pin_memory() for k, v in tensors.items() if isinstance(v, Tensor)})
