"""VLMEvalKit's TSV benchmark files: one question per row, images inline as base64.

Columns: ``index``, ``image`` (base64; a Python-literal list of base64 strings for several images; or, in a
cell of at most 64 characters, the ``index`` of another row whose image it shares, as VLMEvalKit does),
``question``, ``answer``, and optionally single-letter option columns ``A``, ``B``, ... (empty cells mean no
such option), ``category``, ``hint``. Instead of ``image``, a file may have ``image_path`` (paths relative to
the TSV's directory). Other columns are kept in ``EvalSample.extra``. Quoting follows pandas' ``to_csv``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from r4b.data.errors import DataError

__all__ = ["EvalSample", "read_vlmeval_tsv"]

REFERENCE_MAX_CHARS = 64  # VLMEvalKit: an image cell this short names another row's index


@dataclass
class EvalSample:
    """One benchmark question."""

    index: int | str
    images: list[Image.Image]
    question: str
    answer: str | None
    options: dict[str, str] = field(default_factory=dict)
    category: str | None = None
    hint: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"


def read_vlmeval_tsv(path: str | Path, *, require_answer: bool = True) -> list[EvalSample]:
    """Read a VLMEvalKit TSV; images are decoded to PIL images.

    Args:
        path: the ``.tsv`` file.
        require_answer: the ``answer`` column must exist and be non-empty (False for unlabeled test splits).

    Raises:
        DataError: located as ``file:line: column 'image': ...`` (the line a row starts on).
    """
    path = Path(path)
    _raise_field_limit()
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}:1", "empty file (no header row)", reason="missing_column")
        rows = []
        line = reader.line_num + 1
        for cells in reader:
            rows.append((line, cells))
            line = reader.line_num + 1
    image_column = "image" if "image" in header else "image_path" if "image_path" in header else None
    required = ["index", "question"] + (["answer"] if require_answer else [])
    for name in required + ([] if image_column else ["image"]):
        if name not in header:
            raise DataError(
                f"{path}:1", "missing column in the header", field=name, kind="column", reason="missing_column"
            )

    records = []
    cells_by_index: dict[str, str] = {}
    for line, cells in rows:
        where = f"{path}:{line}"
        if len(cells) != len(header):
            raise DataError(where, f"row has {len(cells)} cells, the header {len(header)}", reason="malformed_row")
        record = dict(zip(header, cells, strict=True))
        if record["index"] in cells_by_index:
            raise DataError(
                where, f"duplicate index {record['index']!r}", field="index", kind="column", reason="duplicate_index"
            )
        cells_by_index[record["index"]] = record.get(image_column or "", "")
        records.append((where, record))

    samples = []
    for where, record in records:
        if require_answer and not record["answer"]:
            raise DataError(where, "empty answer", field="answer", kind="column", reason="missing_field")
        if image_column == "image":
            images = _decode_cell(record["image"], cells_by_index, where)
        elif image_column == "image_path":
            images = _open_paths(record["image_path"], path.parent, where)
        else:
            images = []
        options = {name: record[name] for name in header if len(name) == 1 and name.isupper() and record[name]}
        known = {"index", "image", "image_path", "question", "answer", "category", "hint", *options}
        samples.append(
            EvalSample(
                index=_index_value(record["index"]),
                images=images,
                question=record["question"],
                answer=record.get("answer") or None,
                options=options,
                category=record.get("category") or None,
                hint=record.get("hint") or None,
                extra={k: v for k, v in record.items() if k not in known and not (len(k) == 1 and k.isupper())},
                source=where,
            )
        )
    return samples


def _decode_cell(cell: str, cells_by_index: dict[str, str], where: str) -> list[Image.Image]:
    if not cell:
        raise DataError(where, "empty image cell", field="image", kind="column", reason="bad_image")
    if len(cell) <= REFERENCE_MAX_CHARS:
        target = cells_by_index.get(cell)
        if target is None or len(target) <= REFERENCE_MAX_CHARS:
            raise DataError(
                where,
                f"short cell {cell!r} is not the index of a row with its own image",
                field="image",
                kind="column",
                reason="bad_reference",
            )
        cell = target
    return [_decode_base64(data, where) for data in _as_list(cell, where, "image")]


def _as_list(cell: str, where: str, column: str) -> list[str]:
    if not cell.startswith("["):
        return [cell]
    try:
        items = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        raise DataError(where, "malformed list", field=column, kind="column", reason="bad_image") from None
    if not isinstance(items, list) or not items or not all(isinstance(item, str) for item in items):
        raise DataError(where, "must be a non-empty list of strings", field=column, kind="column", reason="bad_image")
    return items


def _decode_base64(data: str, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, OSError, ValueError) as error:
        raise DataError(
            where, f"cannot decode image: {error}", field="image", kind="column", reason="bad_image"
        ) from None
    return image


def _open_paths(cell: str, root: Path, where: str) -> list[Image.Image]:
    images = []
    for name in _as_list(cell, where, "image_path"):
        try:
            with Image.open(root / name) as image:
                image.load()
                images.append(image.copy())
        except (OSError, ValueError) as error:
            raise DataError(
                where,
                f"cannot read image {root / name}: {error}",
                field="image_path",
                kind="column",
                reason="missing_image",
            ) from None
    return images


def _index_value(cell: str) -> int | str:
    try:
        return int(cell)
    except ValueError:
        return cell


def _raise_field_limit() -> None:
    # Base64 images are far over csv's default 128 KiB field limit.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10
