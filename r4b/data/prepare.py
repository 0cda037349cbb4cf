"""``r4b data prepare``: validate, tokenize and index data once, in parallel, into a memory-mapped dataset.

A prepared DIR holds::

    r4b_prepared.json    the manifest: format version, the shards in order, sample count, the fingerprints of the
                         tokenizer and image processor it was made with, mask_empty_think, the source files
    data/shard-NNNNN.arrow   the encoded samples, Apache Arrow IPC stream files (Hugging Face ``datasets``' own
                         cache format: ``datasets.Dataset.from_file(path)`` memory-maps one); columns input_ids,
                         labels (int32 lists, labels unshifted with -100), images (absolute paths,
                         or relative to the DIR for images stored in it: the DIR can be moved),
                         image_token_counts, mode, source (``file:line``, ``file.parquet:ROW``)
    images/XX/<sha256>.<format>   the images that Parquet / datasets inputs held as bytes, once each
    lengths.npy          int32 [samples]: tokens per sample (the planner's index, read with np.load(mmap_mode="r"))
    loss_tokens.npy      int32 [samples]: labelled tokens after the next-token shift
    data_report.json     what was loaded and skipped (by reason, with file:line examples), as r4b sft writes it

The manifest is written last and lists every other file with its size and sha256 (``files``): a DIR without it
is incomplete, and a run refuses one whose index or report no longer matches it
(:func:`r4b.data.prepared.open_prepared`).

The inputs are JSONL, LLaVA / ShareGPT ``.json`` (:mod:`r4b.data.llava`), Parquet files and ``datasets``
directories (:mod:`r4b.data.tables`). The work is cut into shards of ``shard_lines`` input lines or rows (Parquet:
at row-group boundaries), independent of the worker count, and shards are written and numbered in input order, so
the DIR's content is the same whatever ``workers`` is (images stored from bytes are content-addressed). Reading,
validation and encoding are r4b.data's own (:func:`~r4b.data.schema.parse_sample`,
:func:`~r4b.data.encode.encode_samples`): a prepared DIR holds exactly the samples ``SFTDataset.from_files`` keeps
from the same JSONL, in the same order (over-long samples are left to training: the budget is a training setting).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r4b.data.encode import IGNORE_INDEX, encode_samples
from r4b.data.errors import DataError
from r4b.data.json_lines import decode_line, load_json
from r4b.data.llava import from_llava
from r4b.data.report import DataReport
from r4b.data.schema import parse_sample
from r4b.data.tables import TABLE_KINDS, TableInput, input_kind, table_record
from r4b.errors import InputError
from r4b.file_hash import file_sha256

__all__ = [
    "FORMAT",
    "MANIFEST",
    "is_prepared",
    "load_data_tools",
    "prepare",
    "processor_fingerprint",
    "tokenizer_fingerprint",
]

FORMAT = "r4b-prepared/1"
MANIFEST = "r4b_prepared.json"
SHARD_LINES = 4096


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=_plain).encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return f"<{type(value).__name__}>"  # never an address: the hash must not change between processes


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: the vocabulary / merges / normalizer (the fast tokenizer's JSON, else
    the vocabulary), the added tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    core = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    added = sorted((str(token), int(index)) for token, index in tokenizer.get_added_vocab().items())
    return _sha256({"core": core, "added": added, "chat_template": getattr(tokenizer, "chat_template", None)})


def processor_fingerprint(processor: Any) -> str:
    """sha256 of the image processor's class and configuration (the transformers processor's ``to_dict`` and the
    r4b wrapper's plain attributes: tile / patch sizes, pinpoints, token placeholder)."""
    if processor is None:
        return _sha256(None)
    own = {k: v for k, v in vars(processor).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
    pil = getattr(processor, "_pil", None)
    config = getattr(processor, "config", None)
    return _sha256(
        {
            "class": type(processor).__qualname__,
            "own": own,
            "image_token": getattr(processor, "image_token", None),
            "pil": pil.to_dict() if hasattr(pil, "to_dict") else None,
            "vision_config": config.vision_config.to_dict() if hasattr(config, "vision_config") else None,
        }
    )


def load_data_tools(model_path: str | None, tokenizer_path: str | None) -> tuple[Any, Any]:
    """The tokenizer and image processor ``r4b sft`` uses with ``model.path`` / ``model.tokenizer``, without weights
    (the embedded tiny model's when ``model_path`` is None)."""
    from r4b.models.loading import _tokenizer, load_tokenizer_and_processor

    if model_path is None:
        from r4b.models.image_processing import RImageProcessor
        from r4b.models.tiny import tiny_r4b_config

        tokenizer = _tokenizer(None, tokenizer_path)
        return tokenizer, RImageProcessor.from_config(tiny_r4b_config(tokenizer))
    return load_tokenizer_and_processor(model_path, tokenizer_path)


@dataclass(frozen=True)
class _Shard:
    index: int
    path: str
    offset: int  # byte offset of the shard's first line (a table's: its 0-based first row)
    first_line: int  # its 1-based line (record, row) number
    lines: int
    kind: str = "jsonl"  # r4b.data.tables.input_kind


def _plan_shards(paths: Sequence[str], shard_lines: int) -> list[_Shard]:
    shards: list[_Shard] = []
    for path in paths:
        kind = input_kind(path)
        if kind in TABLE_KINDS:  # Parquet / datasets: shards of rows (the open tables are inherited by workers)
            table = _STATE.setdefault("tables", {})[path] = TableInput(path, kind)
            for start, count in table.ranges(shard_lines):
                shards.append(_Shard(len(shards), str(path), start, start + 1, count, kind))
            continue
        if kind == "llava":  # LLaVA / ShareGPT: one list of records, shards of records (inherited by workers)
            records = _load_llava(path)
            _STATE.setdefault("llava", {})[path] = records
            for start in range(0, len(records), shard_lines):
                count = min(shard_lines, len(records) - start)
                shards.append(_Shard(len(shards), str(path), start, start + 1, count, kind))
            continue
        offset, line, start, start_line = 0, 0, 0, 1
        with open(path, "rb") as handle:
            for raw in handle:
                line += 1
                offset += len(raw)
                if line - start_line + 1 == shard_lines:
                    shards.append(_Shard(len(shards), str(path), start, start_line, shard_lines))
                    start, start_line = offset, line + 1
        if line >= start_line:
            shards.append(_Shard(len(shards), str(path), start, start_line, line - start_line + 1))
    return shards


# Set in the parent before the workers fork (and in-process for one worker): what every shard needs.
_STATE: dict[str, Any] = {}


def _load_llava(path: str) -> list[Any]:
    try:
        records = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        detail = f"not a JSON file of LLaVA records: {error}"
        raise DataError(path, detail, reason="malformed_json", kind="file") from None
    if not isinstance(records, list):
        raise DataError(path, "a LLaVA / ShareGPT .json file holds a list of records", reason="bad_type", kind="file")
    return records


def _records(shard: _Shard) -> Iterator[tuple[str, Callable[[], Any]]]:
    """``(location, record)`` of each record of the shard, in order; calling ``record`` gives the r4b record or
    raises its :class:`DataError` (blank JSONL lines are not records)."""
    path = Path(shard.path)
    numbers = range(shard.first_line, shard.first_line + shard.lines)
    if shard.kind in TABLE_KINDS:
        rows = _STATE["tables"][shard.path].rows(shard.offset, shard.lines)
        for number, row in zip(numbers, rows, strict=True):
            where = f"{path}:{number}"
            yield where, lambda row=row, where=where: table_record(row, where, _STATE["images"])
    elif shard.kind == "llava":
        records = _STATE["llava"][shard.path]
        for number in numbers:
            where = f"{path}:{number}"
            yield where, lambda record=records[number - 1], where=where: from_llava(record, where)
    else:
        with path.open("rb") as handle:
            handle.seek(shard.offset)
            for number in numbers:
                raw = handle.readline()
                if raw.strip():
                    where = f"{path}:{number}"
                    yield where, lambda raw=raw, where=where: load_json(decode_line(raw, where), where)


def _read_shard(shard: _Shard, on_error: str, report: DataReport) -> list[Any]:
    """The shard's samples, validated by r4b.data.schema; bad records raise or are counted in ``report``."""
    root = Path(_STATE["image_root"]) if _STATE.get("image_root") else Path(shard.path).parent
    samples = []
    for where, record in _records(shard):
        try:
            samples.append(parse_sample(record(), where=where, root=root))
        except DataError as error:
            if on_error == "raise":
                raise
            report.skip(error)
    return samples


def _features():
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "images": List(Value("string")),
            "image_token_counts": List(Value("int32")),
            "mode": Value("string"),
            "source": Value("string"),
        }
    )


def _prepare_shard(shard: _Shard) -> tuple[int, dict[str, Any], np.ndarray, np.ndarray, set[str]]:
    from datasets.arrow_writer import ArrowWriter

    tokenizer, processor = _STATE["tokenizer"], _STATE["processor"]
    on_error, out = _STATE["on_error"], _STATE["out"]
    report = DataReport()
    samples = _read_shard(shard, on_error, report)
    report.loaded = len(samples)
    encoded, encode_report = encode_samples(
        samples, tokenizer, processor, mask_empty_think=_STATE["mask_empty_think"], on_error=on_error
    )
    report = report.merge(encode_report)
    report.loaded = len(encoded)
    lengths = np.array([s.length for s in encoded], dtype=np.int32)
    loss = np.array([sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in encoded], dtype=np.int32)
    with ArrowWriter(features=_features(), path=str(out / "data" / f"shard-{shard.index:05d}.arrow")) as writer:
        writer.write_batch(
            {
                "input_ids": [s.input_ids for s in encoded],
                "labels": [s.labels for s in encoded],
                "images": [[_stored_path(p) for p in s.images] for s in encoded],
                "image_token_counts": [s.image_token_counts for s in encoded],
                "mode": [s.mode for s in encoded],
                "source": [s.source for s in encoded],
            }
        )
        writer.finalize()
    stored = {str(path) for s in encoded for path in s.images if Path(path).is_relative_to(_STATE["images"])}
    return shard.index, report.to_dict(), lengths, loss, stored


def _stored_path(path: str | Path) -> str:
    """How a shard names an image: relative to the DIR for the images stored in it (the DIR can be moved or copied
    to a node's local disk), else absolute."""
    path = Path(path).resolve()
    images = _STATE["images"]
    return str(path.relative_to(images.parent)) if path.is_relative_to(images) else str(path)


def prepare(
    paths: Sequence[str | Path],
    out: str | Path,
    tokenizer: Any,
    processor: Any,
    *,
    workers: int = 1,
    on_error: str = "skip",
    mask_empty_think: bool = True,
    shard_lines: int = SHARD_LINES,
    overwrite: bool = False,
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """Prepare ``paths`` into the DIR ``out``; returns the manifest.

    ``on_error="skip"`` counts bad records in data_report.json (training then applies its own ``data.on_error``
    to that report); ``"raise"`` stops at the first bad record in input order, whatever ``workers`` is.
    ``paths`` ending in ``.json`` are LLaVA / ShareGPT lists of records (:mod:`r4b.data.llava`), ``.parquet``
    files and ``datasets.Dataset.save_to_disk`` directories are tables of r4b or LLaVA rows whose images may be
    bytes (:mod:`r4b.data.tables`), other files JSONL. Image paths are relative to ``image_root`` when given, else
    to each file's (or datasets directory's) parent directory.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not paths:
        raise ValueError("no data: give one or more JSONL, .json, .parquet files or datasets directories")
    if workers < 1:
        raise InputError(f"--workers {workers}: must be at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (overwrite and is_prepared(out)):
            raise InputError(f"{out}: exists and is not empty (--overwrite replaces a prepared DIR)")
        shutil.rmtree(out)
    started = time.perf_counter()
    _STATE.update(tokenizer=tokenizer, processor=processor, on_error=on_error, out=out, image_root=image_root)
    _STATE.update(mask_empty_think=mask_empty_think, images=(out / "images").resolve())
    # the parallelism is the workers' (one core each): the tokenizer's own threads would make 1 worker use many
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        shards = _plan_shards([str(p) for p in paths], shard_lines)
        (out / "data").mkdir(parents=True, exist_ok=True)
        if workers == 1 or len(shards) <= 1:
            results = [_prepare_shard(shard) for shard in shards]
        else:
            import multiprocessing

            context = multiprocessing.get_context("fork")  # the workers inherit the tokenizer and processor
            with context.Pool(min(workers, len(shards))) as pool:
                results = list(pool.imap(_prepare_shard, shards, chunksize=1))  # input order
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        _STATE.clear()
    _remove_unused_images(out / "images", set().union(*(r[4] for r in results)))
    report = DataReport()
    for shard_report in (r[1] for r in results):
        report = report.merge(DataReport.from_dict(shard_report))
    lengths = np.concatenate([r[2] for r in results]) if results else np.zeros(0, np.int32)
    loss = np.concatenate([r[3] for r in results]) if results else np.zeros(0, np.int32)
    np.save(out / "lengths.npy", lengths.astype(np.int32))
    np.save(out / "loss_tokens.npy", loss.astype(np.int32))
    (out / "data_report.json").write_text(report.to_json())
    shard_names = [f"data/shard-{shard.index:05d}.arrow" for shard in shards]
    manifest = {
        "format": FORMAT,
        "samples": len(lengths),
        "tokens": int(lengths.sum()),
        "shards": shard_names,
        "shard_samples": [len(r[2]) for r in results],
        "sources": [str(p) for p in paths],
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "processor_sha256": processor_fingerprint(processor),
        "processor_class": type(processor).__qualname__,
        "mask_empty_think": mask_empty_think,
        "on_error": on_error,
        "workers": workers,
        "seconds": round(time.perf_counter() - started, 3),
        "files": {name: file_digest(out / name) for name in [*INDEX_FILES, *shard_names]},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: its presence means complete
    return manifest


INDEX_FILES = ("lengths.npy", "loss_tokens.npy", "data_report.json")


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _remove_unused_images(images: Path, used: set[str]) -> None:
    """Stored images no kept sample refers to (their row was refused after its images were stored) are removed,
    so the DIR holds the same files whatever the worker count."""
    if not images.is_dir():
        return
    for path in sorted(images.rglob("*"), reverse=True):  # files before their (then maybe empty) directories
        if path.is_file() and str(path.resolve()) not in used:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if not any(images.iterdir()):
        images.rmdir()
