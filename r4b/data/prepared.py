"""Reading a prepared DIR (:mod:`r4b.data.prepare`): the lengths index in memory, samples memory-mapped on demand.

:class:`PreparedSamples` is a read-only sequence of :class:`~r4b.data.encode.EncodedSample`: ``lengths`` and
``loss_tokens`` come from the .npy index (what the batch planner needs), and ``samples[i]`` reads sample i's row
from the memory-mapped Arrow shards, so a rank touches only the samples of its own micro-batches and its RAM does
not grow with the dataset beyond the index.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from r4b.data.encode import EncodedSample
from r4b.data.prepare import FORMAT, MANIFEST, processor_fingerprint, tokenizer_fingerprint
from r4b.data.report import DataReport
from r4b.errors import InputError

__all__ = ["OPEN_SHARDS", "PreparedSamples", "open_prepared"]

OPEN_SHARDS = 64  # shards a rank keeps open (memory-mapped) at once


class PreparedSamples(Sequence):
    """Samples ``keep`` (indices into the DIRs' concatenated rows) of one or more prepared DIRs."""

    def __init__(self, dirs: Sequence[Path], manifests: Sequence[dict[str, Any]], keep: np.ndarray | None = None):
        self.dirs, self.manifests = list(dirs), list(manifests)
        self._all_lengths = np.concatenate([np.load(d / "lengths.npy", mmap_mode="r") for d in self.dirs])
        self._all_loss = np.concatenate([np.load(d / "loss_tokens.npy", mmap_mode="r") for d in self.dirs])
        self.keep = np.arange(len(self._all_lengths), dtype=np.int64) if keep is None else keep
        # every shard of every DIR, in row order: (its DIR, its file); _shard_starts[k] is shard k's first row
        self._shards = [(d, d / name) for d, m in zip(self.dirs, self.manifests, strict=True) for name in m["shards"]]
        self._shard_starts = np.cumsum([0] + [n for m in self.manifests for n in m["shard_samples"]])
        self._open: OrderedDict[int, Any] = OrderedDict()

    def _shard(self, k: int):
        """Shard ``k`` memory-mapped, opened on first use and kept among the last OPEN_SHARDS used: opening costs
        resident memory (about a sixth of a shard's size), so a rank holds the shards its micro-batches touch
        lately, not the dataset's."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        from datasets import Dataset

        shard = self._open[k] = Dataset.from_file(str(self._shards[k][1]))
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return shard

    def __len__(self) -> int:
        return len(self.keep)

    def row(self, raw: int) -> EncodedSample:
        """Row ``raw`` of the concatenated DIRs (before any filtering)."""
        k = int(np.searchsorted(self._shard_starts, raw, side="right")) - 1
        data = self._shard(k)[int(raw - self._shard_starts[k])]
        home = self._shards[k][0]  # images stored in the DIR are named relative to it
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
    def lengths(self) -> np.ndarray:
        """int32 [samples] (an array, not a list: 4 bytes a sample where a Python int costs 36)."""
        return self._all_lengths[self.keep]

    @cached_property
    def loss_tokens(self) -> np.ndarray:
        return self._all_loss[self.keep]

    def filtered(self, keep: np.ndarray) -> PreparedSamples:
        out = copy.copy(self)  # the index, shard table and open shards are shared; only ``keep`` changes
        out.keep = self.keep[keep]
        out.__dict__.pop("lengths", None)
        out.__dict__.pop("loss_tokens", None)
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
