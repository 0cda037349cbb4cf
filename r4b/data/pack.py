"""Packing encoded samples into token-budgeted batches of concatenated sequences (no padding, never cut)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from r4b.data.encode import IGNORE_INDEX, EncodedSample
from r4b.data.errors import DataError
from r4b.data.report import DataReport
from r4b.packed_row import PackedRow
from r4b.packing import plan_micro_batches

__all__ = ["collate_packed", "overlong_error", "pack"]


def collate_packed(samples: Sequence[EncodedSample], indices: Sequence[int]) -> PackedRow:
    """One :class:`~r4b.packed_row.PackedRow` of ``samples`` in the order given, on the host (``indices`` are
    recorded as is, in ``sample_indices``): ``targets`` already shifted (position t of a sample holds the label of
    its token t+1, the last position of each sample -100: nothing to predict across a sample boundary),
    ``position_ids`` restarting at 0 for each sample, no images loaded yet (``images`` names them)."""
    input_ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    cu_seqlens = [0]
    images: list[Path] = []
    for sample in samples:
        input_ids.extend(sample.input_ids)
        targets.extend(sample.labels[1:])
        targets.append(IGNORE_INDEX)
        positions.extend(range(sample.length))
        cu_seqlens.append(cu_seqlens[-1] + sample.length)
        images.extend(sample.images)
    return PackedRow(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        position_ids=torch.tensor(positions, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        max_seqlen=max((sample.length for sample in samples), default=0),
        targets=torch.tensor(targets, dtype=torch.int64),
        cu_seqlens_host=tuple(cu_seqlens),
        loss_tokens=sum(target != IGNORE_INDEX for target in targets),
        sample_indices=list(indices),
        images=images,
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
) -> tuple[list[PackedRow], DataReport]:
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
