"""Packing encoded samples into token-budgeted batches of concatenated sequences (no padding, never cut)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from r4b.data.encode import IGNORE_INDEX, EncodedSample
from r4b.data.errors import DataError
from r4b.data.report import DataReport
from r4b.packing import plan_micro_batches

__all__ = ["PackedBatch", "collate_packed", "overlong_error", "pack"]


@dataclass
class PackedBatch:
    """Samples concatenated into one row of N tokens (the varlen layout).

    Attributes:
        input_ids: [N] int64.
        labels: [N] int64 targets, already shifted: position t of a sample holds the label of its token t+1,
            the last position of each sample holds -100 (nothing to predict across a sample boundary).
        position_ids: [N] int64, restarting at 0 for each sample.
        cu_seqlens: [S+1] int32 sample boundaries (0, l0, l0+l1, ...).
        max_seqlen: the longest sample's length.
        sample_indices: for each sample in the row, its index in the list that was packed.
        images: the samples' image paths, in row order.
        image_token_counts: tokens of each image in ``images``.
        sources: ``file:line`` of each sample.
        vision: ``ImageProcessor.preprocess`` output for ``images`` when the caller attached it.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    sample_indices: list[int]
    images: list[Path] = field(default_factory=list)
    image_token_counts: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    vision: dict[str, Any] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def loss_mask(self) -> torch.Tensor:
        """[N] bool: positions whose (shifted) target carries loss."""
        return self.labels != IGNORE_INDEX

    def seq_ids(self) -> torch.Tensor:
        """[N] int64: which sample (0..S-1) each token belongs to."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def collate_packed(samples: Sequence[EncodedSample], indices: Sequence[int]) -> PackedBatch:
    """One :class:`PackedBatch` of ``samples`` in the order given (``indices`` are recorded as is)."""
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    cu_seqlens = [0]
    images: list[Path] = []
    counts: list[int] = []
    for sample in samples:
        input_ids.extend(sample.input_ids)
        labels.extend(sample.labels[1:])
        labels.append(IGNORE_INDEX)
        positions.extend(range(sample.length))
        cu_seqlens.append(cu_seqlens[-1] + sample.length)
        images.extend(sample.images)
        counts.extend(sample.image_token_counts)
    return PackedBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        position_ids=torch.tensor(positions, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        max_seqlen=max((sample.length for sample in samples), default=0),
        sample_indices=list(indices),
        images=images,
        image_token_counts=counts,
        sources=[sample.source for sample in samples],
    )


def overlong_error(sample: EncodedSample, max_tokens: int) -> DataError:
    return DataError(
        sample.source,
        f"sample has {sample.length} tokens, over the packing budget of {max_tokens} (samples are never cut)",
        reason="overlong",
    )


def pack(
    encoded: Sequence[EncodedSample], max_tokens: int, *, on_overlong: Literal["raise", "skip"] = "raise"
) -> tuple[list[PackedBatch], DataReport]:
    """Pack samples into batches of at most ``max_tokens`` tokens with best-fit decreasing.

    Batches come in the order the planner opened them; within a batch, samples in the order placed
    (longest first). A sample over the budget raises :class:`DataError` (``on_overlong="raise"``) or is
    counted in the report as ``overlong`` and left out (``"skip"``); no sample is ever cut.
    """
    if on_overlong not in ("raise", "skip"):
        raise ValueError(f"on_overlong must be 'raise' or 'skip', got {on_overlong!r}")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    report = DataReport()
    kept = []
    for index, sample in enumerate(encoded):
        if sample.length > max_tokens:
            error = overlong_error(sample, max_tokens)
            if on_overlong == "raise":
                raise error
            report.skip(error)
        else:
            kept.append(index)
    bins = plan_micro_batches([encoded[i].length for i in kept], max_tokens)
    batches = [collate_packed([encoded[kept[j]] for j in b], [kept[j] for j in b]) for b in bins]
    report.loaded = len(kept)
    return batches, report
