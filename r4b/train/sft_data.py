"""The annealing stage's data: JSONL files -> encoded samples -> packed micro-batches on a device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r4b.data import DataReport, EncodedSample, ImageProcessor, collate_packed, encode_samples, load_images, read_jsonl
from r4b.data.encode import IGNORE_INDEX
from r4b.data.pack import overlong_error
from r4b.data.prepare import is_prepared
from r4b.data.prepared import open_prepared
from r4b.errors import InputError
from r4b.packed_row import PackedRow


@dataclass
class SFTDataset:
    samples: Sequence[EncodedSample]  # a list, or PreparedSamples (memory-mapped) for a prepared DIR
    processor: ImageProcessor | None
    report: DataReport

    @classmethod
    def from_files(
        cls,
        paths: Sequence[str],
        tokenizer: Any,
        processor: ImageProcessor | None,
        *,
        max_tokens: int,
        on_error: str = "raise",
        mask_empty_think: bool = True,
        report_to: Path | None = None,
    ) -> SFTDataset:
        """Read, validate and encode every file; bad or over-long samples raise or are counted (``on_error``).
        With no sample left, an :class:`InputError` (after writing the report to ``report_to``, if given)."""
        if not paths:
            raise ValueError("no training data: set data.train to one or more JSONL files")
        if any(is_prepared(path) for path in paths):
            dataset = cls._from_prepared(paths, tokenizer, processor, max_tokens, on_error, mask_empty_think)
            _check_not_empty(paths, dataset.report, report_to)
            return dataset
        report = DataReport()
        encoded: list[EncodedSample] = []
        for path in paths:
            samples, read_report = read_jsonl(path, on_error=on_error)
            ready, encode_report = encode_samples(
                samples, tokenizer, processor, mask_empty_think=mask_empty_think, on_error=on_error
            )
            report = report.merge(read_report).merge(encode_report)
            encoded += ready
        kept = []
        for sample in encoded:
            if sample.length <= max_tokens:
                kept.append(sample)
                continue
            error = overlong_error(sample, max_tokens)
            if on_error == "raise":
                raise error
            report.skip(error)
        report.loaded = len(kept)
        _check_not_empty(paths, report, report_to)
        return cls(kept, processor, report)

    @classmethod
    def _from_prepared(cls, paths, tokenizer, processor, max_tokens, on_error, mask_empty_think) -> SFTDataset:
        """Prepared DIRs (``r4b data prepare``): the lengths index is read, samples stay memory-mapped; the same
        samples, order, over-long handling and report as the JSONL they were made from."""
        if not all(is_prepared(path) for path in paths):
            raise InputError(f"data.train mixes prepared DIRs and JSONL files: {', '.join(map(str, paths))}")
        samples, report = open_prepared(paths, tokenizer, processor, mask_empty_think=mask_empty_think)
        if on_error == "raise" and report.num_skipped:
            first = next(iter(report.examples.values()), ["?"])[0]
            raise InputError(
                f"{', '.join(map(str, paths))}: prepared with {report.num_skipped} skipped record(s) "
                f"(first: {first}); set data.on_error=skip to train on the rest"
            )
        lengths = np.asarray(samples.lengths)
        over = np.flatnonzero(lengths > max_tokens)
        if len(over) and on_error == "raise":
            raise overlong_error(samples[int(over[0])], max_tokens)
        for index in over[: report.max_examples]:
            report.skip(overlong_error(samples[int(index)], max_tokens))
        if len(over) > report.max_examples:
            report.add("overlong", "", len(over) - report.max_examples)  # examples already full: counted only
        samples = samples.filtered(np.flatnonzero(lengths <= max_tokens)) if len(over) else samples
        report.loaded = len(samples)
        return cls(samples, processor, report)

    @property
    def lengths(self) -> Sequence[int]:
        if hasattr(self.samples, "lengths"):  # a prepared DIR: from its index, no sample read
            return self.samples.lengths
        return [sample.length for sample in self.samples]

    @property
    def loss_tokens(self) -> Sequence[int]:
        """Labelled tokens of each sample after the next-token shift (the first token is never a target)."""
        if hasattr(self.samples, "loss_tokens"):
            return self.samples.loss_tokens
        return [sum(label != IGNORE_INDEX for label in sample.labels[1:]) for sample in self.samples]

    def collate(self, indices: Sequence[int], device: torch.device | str) -> PackedRow:
        """These samples as one packed row on ``device`` (``inputs()``: the keyword arguments of
        :class:`~r4b.train.objective.PackedSFTObjective`): :meth:`host_batch`, then ``to(device)``."""
        return self.host_batch(indices).to(device)

    def host_batch(self, indices: Sequence[int]) -> PackedRow:
        """These samples packed into one micro-batch of host tensors, images decoded and preprocessed: the work a
        DataLoader worker does (:mod:`r4b.train.loader`).

        R-4B: ``position_ids`` [N] and, with images, ``pixel_values`` / ``image_sizes``. A processor with
        ``packed_position_ids`` (Qwen2.5-VL / Qwen3-VL: :class:`~r4b.models.qwen_vl.QwenVLImageProcessor`) gives
        the ``[3, N]`` mRoPE positions of the row, each sample's own, and ``pixel_values`` / ``image_grid_thw``.
        """
        samples = [self.samples[i] for i in indices]
        row = collate_packed(samples, indices)
        vision: dict[str, torch.Tensor] = {}
        if row.images:
            vision = self.processor.preprocess(load_images(row.images, where=", ".join(row.sources)))
            for key in VISION_KEYS:
                if key in vision:
                    setattr(row, key, vision[key])
        if hasattr(self.processor, "packed_position_ids"):
            grids = vision.get("image_grid_thw")
            starts = [0]
            for sample in samples:
                starts.append(starts[-1] + len(sample.images))
            per_sample = [None if a == b else grids[a:b] for a, b in pairwise(starts)]
            ids = [row.input_ids[a:b] for a, b in pairwise(row.cu_seqlens_host)]
            row.position_ids = self.processor.packed_position_ids(ids, per_sample)
        return row


VISION_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")


def _check_not_empty(paths: Sequence[str], report: DataReport, report_to: Path | None) -> None:
    if report.loaded:
        return
    if report_to is not None:
        Path(report_to).write_text(report.to_json())
    where = " (data_report.json lists the skipped)" if report_to is not None and report.num_skipped else ""
    summary = str(report).splitlines()[0]
    raise InputError(f"data.train: no trainable samples in {', '.join(map(str, paths))}: {summary}{where}")
