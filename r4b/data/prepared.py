"""Reading a prepared DIR (:mod:`r4b.data.prepare`): the lengths index in memory, samples memory-mapped on demand.

:class:`PreparedSamples` is a read-only sequence of :class:`~r4b.data.encode.EncodedSample`: ``lengths`` and
``loss_tokens`` come from the .npy index (what the batch planner needs), and ``samples[i]`` reads sample i's row
from the memory-mapped Arrow shards, so a rank touches only the samples of its own micro-batches and its RAM does
not grow with the dataset beyond the index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from r4b.data.encode import EncodedSample
from r4b.data.prepare import FORMAT, MANIFEST, processor_fingerprint, tokenizer_fingerprint
from r4b.data.report import DataReport
from r4b.errors import InputError

__all__ = ["PreparedSamples", "open_prepared"]


class PreparedSamples(Sequence):
    """Samples ``keep`` (indices into the DIRs' concatenated rows) of one or more prepared DIRs."""

    def __init__(self, dirs: Sequence[Path], manifests: Sequence[dict[str, Any]], keep: np.ndarray | None = None):
        self.dirs, self.manifests = list(dirs), list(manifests)
        self._all_lengths = np.concatenate([np.load(d / "lengths.npy", mmap_mode="r") for d in self.dirs])
        self._all_loss = np.concatenate([np.load(d / "loss_tokens.npy", mmap_mode="r") for d in self.dirs])
        self.keep = np.arange(len(self._all_lengths), dtype=np.int64) if keep is None else keep
        self._table = None
        self._starts = np.cumsum([0] + [len(np.load(d / "lengths.npy", mmap_mode="r")) for d in self.dirs])

    @property
    def table(self):
        """The rows of every shard, memory-mapped (a ``datasets.Dataset``), opened on first use."""
        if self._table is None:
            from datasets import Dataset, concatenate_datasets

            files = [d / s for d, m in zip(self.dirs, self.manifests, strict=True) for s in m["shards"]]
            shards = [shard for shard in map(Dataset.from_file, map(str, files)) if len(shard)]
            self._table = concatenate_datasets(shards) if shards else None
        return self._table

    def __len__(self) -> int:
        return len(self.keep)

    def row(self, raw: int) -> EncodedSample:
        """Row ``raw`` of the concatenated DIRs (before any filtering)."""
        data = self.table[int(raw)]
        home = self.dirs[int(np.searchsorted(self._starts, raw, side="right")) - 1]  # images stored in the DIR
        return EncodedSample(
            input_ids=list(data["input_ids"]),
            labels=list(data["labels"]),
            images=[home / p for p in data["images"]],  # an absolute path stays itself
            image_token_counts=list(data["image_token_counts"]),
            mode=data["mode"],
            source=data["source"],
        )

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.row(int(self.keep[index]))

    @cached_property
    def lengths(self) -> list[int]:
        return self._all_lengths[self.keep].tolist()

    @cached_property
    def loss_tokens(self) -> list[int]:
        return self._all_loss[self.keep].tolist()

    def filtered(self, keep: np.ndarray) -> PreparedSamples:
        out = PreparedSamples.__new__(PreparedSamples)
        out.dirs, out.manifests = self.dirs, self.manifests
        out._all_lengths, out._all_loss, out._table = self._all_lengths, self._all_loss, self._table
        out._starts = self._starts
        out.keep = self.keep[keep]
        return out


def open_prepared(
    paths: Sequence[str | Path], tokenizer: Any, processor: Any, *, mask_empty_think: bool
) -> tuple[PreparedSamples, DataReport]:
    """The prepared DIRs' samples (in DIR order) and their merged data report; refuses a DIR made with another
    tokenizer, image processor or ``mask_empty_think`` with a one-line :class:`~r4b.errors.InputError` naming it."""
    dirs, manifests = [], []
    report = DataReport()
    want_tok, want_proc = tokenizer_fingerprint(tokenizer), processor_fingerprint(processor)
    for path in map(Path, paths):
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise InputError(f"{path}: prepared dataset format {manifest.get('format')!r}, this r4b reads {FORMAT!r}")
        checks = (("tokenizer", "tokenizer_sha256", want_tok), ("image processor", "processor_sha256", want_proc))
        for what, key, want in checks:
            if manifest.get(key) != want:
                raise InputError(
                    f"{path}: prepared with another {what} (sha256 {str(manifest.get(key))[:12]}, this run's "
                    f"{want[:12]}); run `r4b data prepare` again with this model's tokenizer and processor"
                )
        if manifest.get("mask_empty_think") != mask_empty_think:
            raise InputError(
                f"{path}: prepared with mask_empty_think={manifest.get('mask_empty_think')}, the run sets "
                f"data.mask_empty_think={mask_empty_think}; prepare it again or change the setting"
            )
        dirs.append(path)
        manifests.append(manifest)
        report = report.merge(DataReport.from_dict(json.loads((path / "data_report.json").read_text())))
    return PreparedSamples(dirs, manifests), report
