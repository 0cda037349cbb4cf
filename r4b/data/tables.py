"""Parquet files and Hugging Face ``datasets`` directories as r4b sample records (read by ``r4b data prepare``).

An input path is, by its form (:func:`input_kind`): a ``.parquet`` file; a directory written by
``datasets.Dataset.save_to_disk`` (it holds ``state.json`` and ``dataset_info.json``; a ``DatasetDict``'s directory
is refused with the names of its splits: give one split's subdirectory); a LLaVA / ShareGPT ``.json`` list; else JSONL.

A row is an r4b record (columns ``messages``, ``mode``, ``images``, ``answer``, ``meta``) or a LLaVA / ShareGPT
record (``conversations`` of ``from`` / ``value``, ``image``: :func:`~r4b.data.llava.from_llava`), and then goes
through :func:`~r4b.data.schema.parse_sample` like a JSONL line, so it meets the same validation, errors and report;
its location is ``file.parquet:ROW`` or ``DIR:ROW`` (ROW 1-based). A null is an absent field (Arrow structs carry
every field of their type: an image part ``{"type": "image", "text": null}`` is ``{"type": "image"}``).

An image is a path string (relative to ``--image-root``, else to the directory holding the file or the datasets
directory, as for JSONL), raw bytes, or ``{"bytes": ..., "path": ...}`` as the ``datasets.Image`` feature stores it
(the bytes when present, else the path). Bytes are decoded once (undecodable bytes are a ``bad_image`` error of the
row) and written to ``images/<2 hex>/<sha256>.<format>`` in the prepared DIR: content-addressed, so an image used by
many rows is stored once and the DIR's content does not depend on the worker count.

Rows are read by ranges (:class:`TableInput`): a Parquet shard reads only the row groups it overlaps (shards are cut
at row-group boundaries), a datasets directory is memory-mapped Arrow; neither decodes the image columns.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from r4b.data.errors import DataError
from r4b.data.llava import from_llava

__all__ = ["TABLE_KINDS", "TableInput", "input_kind", "store_image", "table_record"]

TABLE_KINDS = ("parquet", "datasets")
ROWS_PER_BATCH = 64  # rows turned into Python objects at a time (image bytes: bounded memory per worker)
EXTENSIONS = {"JPEG": "jpg", "TIFF": "tif"}  # else the PIL format, lower case


def input_kind(path: str | Path) -> str:
    """``"parquet"``, ``"datasets"``, ``"llava"`` or ``"jsonl"``; a one-line :class:`DataError` for a path that is
    none of these (missing, a DatasetDict, another directory)."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits") or []
            example = path / (splits[0] if splits else "train")
            raise DataError(
                str(path),
                f"a datasets DatasetDict (splits: {', '.join(splits)}); give one split's directory, e.g. {example}",
                reason="bad_input",
                kind="file",
            )
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return "datasets"
        raise DataError(
            str(path),
            "a directory that is not a datasets save_to_disk directory (no state.json and dataset_info.json)",
            reason="bad_input",
            kind="file",
        )
    if not path.is_file():
        raise DataError(str(path), "no such file", reason="missing_file", kind="file")
    return {".parquet": "parquet", ".json": "llava"}.get(path.suffix.lower(), "jsonl")


class TableInput:
    """A Parquet file or datasets directory: its row count, shard ranges and rows (as Python objects)."""

    def __init__(self, path: str | Path, kind: str):
        self.path, self.kind = str(path), kind
        if kind == "parquet":
            metadata = self._parquet().metadata
            self.group_rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            self.num_rows = sum(self.group_rows)
        else:
            from datasets import Dataset

            try:
                dataset = Dataset.load_from_disk(self.path)  # memory-mapped; inherited by forked workers
            except Exception as error:  # datasets raises many types on a damaged directory
                detail = f"cannot read the datasets directory: {error}"
                raise DataError(self.path, detail, reason="bad_input", kind="file") from None
            self.dataset = dataset.with_format("arrow")  # rows as Arrow: images stay bytes, never decoded
            self.num_rows = len(dataset)

    def _parquet(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path, memory_map=True)
        except Exception as error:  # pyarrow's ArrowInvalid / OSError on a file that is not Parquet
            raise DataError(self.path, f"not a Parquet file: {error}", reason="bad_input", kind="file") from None

    def ranges(self, shard_rows: int) -> list[tuple[int, int]]:
        """``(first row, rows)`` of each shard, in order: ``shard_rows`` rows, Parquet shards cut at row-group
        boundaries (several small groups share a shard, a group larger than a shard is cut into several)."""
        if self.kind != "parquet":
            return [(start, min(shard_rows, self.num_rows - start)) for start in range(0, self.num_rows, shard_rows)]
        out: list[tuple[int, int]] = []
        begin = end = 0
        for rows in self.group_rows:
            if end > begin and end + rows - begin > shard_rows:
                out.append((begin, end - begin))
                begin = end
            end += rows
            while end - begin > shard_rows:
                out.append((begin, shard_rows))
                begin += shard_rows
        if end > begin:
            out.append((begin, end - begin))
        return out

    def _table(self, start: int, count: int):
        if self.kind != "parquet":
            return self.dataset[start : start + count]
        groups, first, offset = [], None, 0
        for index, rows in enumerate(self.group_rows):
            if offset < start + count and offset + rows > start:
                groups.append(index)
                first = offset if first is None else first
            offset += rows
        return self._parquet().read_row_groups(groups).slice(start - (first or 0), count)

    def rows(self, start: int, count: int) -> Iterator[dict[str, Any]]:
        """Rows ``start`` .. ``start + count - 1`` (0-based) as dicts."""
        table = self._table(start, count)
        for offset in range(0, table.num_rows, ROWS_PER_BATCH):
            yield from table.slice(offset, ROWS_PER_BATCH).to_pylist()


def table_record(row: dict[str, Any], where: str, images_dir: Path) -> dict[str, Any]:
    """The r4b record of one row, its image bytes stored in ``images_dir`` (:func:`store_image`) and replaced by
    the stored file's absolute path; validated further by ``parse_sample``."""
    row = _without_nulls(row)
    record = from_llava(row, where) if "conversations" in row else row
    images = record.get("images")
    if isinstance(images, list):
        record["images"] = [_image_path(image, images_dir, where, f"images[{k}]") for k, image in enumerate(images)]
    return record


def _without_nulls(value: Any) -> Any:
    """A null is an absent field: dicts (Arrow structs and rows) lose their null entries, at any depth."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _image_path(image: Any, images_dir: Path, where: str, field: str) -> Any:
    if isinstance(image, dict) and set(image) <= {"bytes", "path"} and (image.get("bytes") or image.get("path")):
        image = image.get("bytes") or image["path"]
    if isinstance(image, (bytes, bytearray)) and image:
        return str(store_image(bytes(image), images_dir, where=where, field=field))
    if isinstance(image, str):
        return image  # a path: parse_sample resolves and checks it
    detail = "an image is a path, bytes or {'bytes': ..., 'path': ...} (datasets.Image)"
    raise DataError(where, detail, field=field, reason="bad_type")


def store_image(data: bytes, images_dir: Path, *, where: str, field: str) -> Path:
    """Decode ``data`` (a ``bad_image`` :class:`DataError` if PIL cannot) and write it, once, to
    ``images_dir/<2 hex>/<sha256>.<format>``; returns that path."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format or "bin"
            image.load()
    except Exception as error:  # PIL raises many types (SyntaxError, struct.error, DecompressionBombError)
        detail = "not an image format PIL knows" if isinstance(error, UnidentifiedImageError) else str(error)
        raise DataError(
            where, f"cannot decode the image bytes ({len(data)} bytes): {detail}", field=field, reason="bad_image"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    target = images_dir / digest[:2] / f"{digest}.{EXTENSIONS.get(image_format, image_format.lower())}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        partial.write_bytes(data)
        os.replace(partial, target)  # atomic: workers storing the same image concurrently write the same bytes
    return target
