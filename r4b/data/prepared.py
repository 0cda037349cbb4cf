"""Reading a prepared DIR (:mod:`r4b.data.prepare`): the lengths index in memory, samples memory-mapped on demand.

:class:`PreparedSamples` is a read-only sequence of :class:`~r4b.data.encode.EncodedSample`: ``lengths`` and
``loss_tokens`` come from the .npy index (what the batch planner needs), and ``samples[i]`` reads sample i's row
from the memory-mapped Arrow shards, so a rank touches only the samples of its own micro-batches and its RAM does
not grow with the dataset beyond the index.

Nothing in a DIR is trusted blindly: :func:`open_prepared` checks the index and the report against the manifest's
sizes and sha256 (they are small) and the shards' sizes (hashing them would read the whole dataset on every
start), and :meth:`PreparedSamples.row` checks each row it reads against the index, so an edited, truncated or
damaged DIR is one line naming the file, never a wrong packing or a traceback.
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
from r4b.data.prepare import FORMAT, INDEX_FILES, MANIFEST, file_digest, processor_fingerprint, tokenizer_fingerprint
from r4b.data.report import DataReport
from r4b.errors import InputError

__all__ = ["OPEN_SHARDS", "PreparedSamples", "open_prepared"]

OPEN_SHARDS = 64  # shards a rank keeps open (memory-mapped) at once


class PreparedSamples(Sequence):
    """Samples ``keep`` (indices into the DIRs' concatenated rows) of one or more prepared DIRs."""

    def __init__(self, dirs: Sequence[Path], manifests: Sequence[dict[str, Any]], keep: np.ndarray | None = None):
        self.dirs, self.manifests = list(dirs), list(manifests)
        index = lambda name: np.concatenate([_index(d, name, m) for d, m in zip(dirs, manifests, strict=True)])
        self._all_lengths, self._all_loss = index("lengths.npy"), index("loss_tokens.npy")
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

        try:
            shard = Dataset.from_file(str(self._shards[k][1]))
        except Exception as error:  # pyarrow raises its own types for a truncated or damaged file
            raise _damaged(self._shards[k][1], f"cannot read it ({_first_line(error)})") from None
        self._open[k] = shard
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return shard

    def __len__(self) -> int:
        return len(self.keep)

    def row(self, raw: int) -> EncodedSample:
        """Row ``raw`` of the concatenated DIRs (before any filtering)."""
        k = int(np.searchsorted(self._shard_starts, raw, side="right")) - 1
        local = int(raw - self._shard_starts[k])
        shard = self._shard(k)
        try:
            data = shard[local]
        except Exception as error:
            raise _damaged(self._shards[k][1], f"cannot read row {local} ({_first_line(error)})") from None
        if len(data["input_ids"]) != self._all_lengths[raw]:
            raise _damaged(
                self._shards[k][1],
                f"row {local} holds {len(data['input_ids'])} tokens, lengths.npy says {self._all_lengths[raw]}",
            )
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
        manifest = _read_json(path / MANIFEST)
        if not isinstance(manifest, dict):
            raise _damaged(path / MANIFEST, "not a JSON object")
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
        _check_files(path, manifest)
        dirs.append(path)
        manifests.append(manifest)
        report = report.merge(DataReport.from_dict(_read_json(path / "data_report.json")))
    return PreparedSamples(dirs, manifests), report


def _damaged(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}: the prepared DIR was edited or damaged; run `r4b data prepare` again")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _damaged(path, f"not valid JSON ({_first_line(error)})") from None


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest's files as it lists them: the index and the report by size and sha256, the shards by size (DIRs
    prepared before the manifest listed its files are checked row by row only)."""
    for name, want in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise _damaged(file, "missing")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise _damaged(file, f"{size} bytes, the manifest says {want['bytes']}")
        if name in INDEX_FILES and file_digest(file)["sha256"] != want["sha256"]:
            raise _damaged(file, "its sha256 differs from the manifest's")


def _index(path: Path, name: str, manifest: dict[str, Any]) -> np.ndarray:
    """One of the DIR's .npy index arrays, one int per sample as the manifest counts them."""
    try:
        values = np.load(path / name, mmap_mode="r")
    except ValueError as error:  # a truncated or rewritten .npy header
        raise _damaged(path / name, f"not a readable .npy array ({_first_line(error)})") from None
    if values.ndim != 1 or len(values) != manifest.get("samples") or values.dtype.kind not in "iu":
        raise _damaged(path / name, f"{values.dtype} {values.shape}, the manifest counts {manifest.get('samples')}")
    if name == "lengths.npy" and int(values.sum()) != manifest.get("tokens"):
        raise _damaged(path / name, f"{int(values.sum())} tokens in all, the manifest says {manifest.get('tokens')}")
    return values
