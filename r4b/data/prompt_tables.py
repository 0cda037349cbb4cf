"""RL and evaluation prompts laid out as other trainers keep them: verl's and EasyR1's Parquet files, ``datasets``
directories, JSON lists and JSONL, read through three keys.

``PromptKeys`` names the columns (``data.prompt_key``, ``data.answer_key``, ``data.image_key``; a dotted key reads
into a struct, as verl's ``reward_model.ground_truth``). A row becomes an r4b prompt record:

- the prompt: a chat list (verl: ``[{"role": "user", "content": "<image>Find x."}]``) or one string, the user's
  turn (EasyR1's ``problem``). An ``<image>`` placeholder marks where each image goes; a prompt with images and no
  placeholder gets one per image at the start of its first user turn (EasyR1's convention);
- the answer: a string or a number (written as text); a missing or empty one is a ``missing_field`` error naming
  the key;
- the images: a list (or one) of paths, raw bytes or ``{"bytes": ..., "path": ...}`` (``datasets.Image``); bytes
  are stored once, content-addressed, in ``images_dir`` (:func:`r4b.data.tables.store_image`).

Other columns (verl's ``data_source``, ``ability``, ``extra_info``) are ignored. The record then meets the JSONL's
validation (:func:`~r4b.data.schema.parse_sample`, :func:`~r4b.data.schema.check_prompt`, readable images), with
``file:ROW`` locations (1-based) and ``data.on_error`` as for JSONL lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r4b.data.errors import DataError
from r4b.data.json_lines import decode_line, load_json
from r4b.data.tables import TableInput, _image_path, _without_nulls, input_kind
from r4b.models.tokenizer import IMAGE_TOKEN

__all__ = ["PromptKeys", "prompt_rows"]


@dataclass(frozen=True)
class PromptKeys:
    """Where a row keeps its prompt, reference answer and images (r4b's own JSONL names by default)."""

    prompt: str = "messages"
    answer: str = "answer"
    image: str = "images"

    @property
    def default(self) -> bool:
        return self == PromptKeys()


def prompt_rows(path: str | Path, keys: PromptKeys, images_dir: Path) -> Iterator[tuple[str, Any]]:
    """``(location, r4b record or DataError)`` of every row of ``path`` (Parquet, a datasets directory, a JSON list
    or JSONL), in order; a row that cannot be mapped yields its :class:`DataError` (the caller raises or counts it)."""
    kind = input_kind(path)
    for where, row in _rows(Path(path), kind):
        try:
            yield where, prompt_record(row, keys, where, images_dir)
        except DataError as error:
            yield where, error


def _rows(path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    if kind in ("parquet", "datasets"):
        table = TableInput(path, kind)
        for start, count in table.ranges(4096):
            for offset, row in enumerate(table.rows(start, count)):
                yield f"{path}:{start + offset + 1}", row
    elif kind == "llava":  # a .json file: a list of records
        records = load_json(path.read_text(encoding="utf-8"), str(path))
        if not isinstance(records, list):
            detail = "a .json prompt file must hold a list of records"
            raise DataError(str(path), detail, reason="bad_input", kind="file")
        for number, record in enumerate(records, start=1):
            yield f"{path}:{number}", record
    else:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    where = f"{path}:{number}"
                    try:
                        yield where, load_json(decode_line(raw, where), where)
                    except DataError as error:
                        yield where, error


def prompt_record(row: Any, keys: PromptKeys, where: str, images_dir: Path) -> dict[str, Any]:
    """The r4b prompt record (``messages``, ``answer``, ``images``) of one row (see the module docstring)."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(where, f"a row must be an object, got {type(row).__name__}", reason="malformed_json")
    row = _without_nulls(row)
    images = _lookup(row, keys.image, where)
    images = [] if images is None else images if isinstance(images, list) else [images]
    images = [_image_path(image, images_dir, where, f"{keys.image}[{k}]") for k, image in enumerate(images)]
    record: dict[str, Any] = {"messages": _messages(_lookup(row, keys.prompt, where), keys.prompt, where, len(images))}
    if images:
        record["images"] = images
    answer = _lookup(row, keys.answer, where)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise DataError(where, "missing reference answer", field=keys.answer, reason="missing_field")
    if not isinstance(answer, str):
        detail = f"must be a string or a number, got {type(answer).__name__}"
        raise DataError(where, detail, field=keys.answer, reason="bad_type")
    record["answer"] = answer
    return record


def _lookup(row: dict[str, Any], key: str, where: str) -> Any:
    """``row[key]``, a dotted key reading into nested objects; None where absent."""
    value: Any = row
    for part in key.split("."):
        if isinstance(value, str) and part:  # a struct stored as a JSON string (some Parquet exports do)
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return None
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _messages(prompt: Any, key: str, where: str, num_images: int) -> list[dict[str, Any]]:
    if prompt is None:
        raise DataError(where, "missing prompt", field=key, reason="missing_field")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        detail = f"must be a chat list of {{role, content}} or a string, got {type(prompt).__name__}"
        raise DataError(where, detail, field=key, reason="bad_type")
    text = [m.get("content") for m in messages if isinstance(m.get("content"), str)]
    if num_images and not any(IMAGE_TOKEN in content for content in text):
        first = next((m for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)), None)
        if first is not None:
            first["content"] = IMAGE_TOKEN * num_images + first["content"]
    return messages
