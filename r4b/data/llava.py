"""LLaVA / ShareGPT-style records (``conversations`` of ``from`` / ``value``, ``image``) as r4b sample records.

A ``.json`` file holding a list of such records (LLaVA's instruction-tuning files) is read by ``r4b data prepare``;
each record becomes the r4b record below and then goes through :func:`~r4b.data.schema.parse_sample`, so it meets
the same validation, errors and report as a JSONL line (its location is ``file.json:N``, N the 1-based record
number)::

    {"id": "x", "image": "coco/1.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                                         {"from": "gpt", "value": "A cat."}]}
    -> {"messages": [{"role": "user", "content": "<image>\\nWhat is it?"}, {"role": "assistant", "content": "A cat."}],
        "images": ["coco/1.jpg"], "mode": "non_thinking", "meta": {"id": "x"}}

``from``: ``human`` / ``user`` -> user, ``gpt`` / ``assistant`` -> assistant, ``system`` -> system. ``image``: one image
or a list (paths relative to the JSON file's directory; in a Parquet / datasets row also bytes,
:mod:`r4b.data.tables`). ``mode``: the record's own when it has one, else ``thinking`` when
an answer opens a non-empty ``<think>`` block, else ``non_thinking`` (plain answers are wrapped in R-4B's empty think
block by the schema).
"""

from __future__ import annotations

from typing import Any

from r4b.data.errors import DataError
from r4b.format import EMPTY_THINK, THINK_OPEN

__all__ = ["ROLES", "from_llava"]

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def from_llava(record: Any, where: str) -> dict[str, Any]:
    """The r4b record of one LLaVA / ShareGPT record (validated further by ``parse_sample``)."""
    if not isinstance(record, dict):
        raise DataError(where, f"a LLaVA record must be an object, got {type(record).__name__}", reason="bad_type")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(where, "must be a non-empty list of turns", field="conversations", reason="bad_type")
    messages = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise DataError(
                where,
                f"a turn is {{'from': one of {sorted(ROLES)}, 'value': a string}}",
                field=f"conversations[{k}]",
                reason="bad_type",
            )
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    image = record.get("image", record.get("images"))
    images = [] if image is None else image if isinstance(image, list) else [image]  # a path, bytes or a dict
    mode = record.get("mode")
    if mode is None:
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        thinking = any(a.startswith(THINK_OPEN) and not a.startswith(EMPTY_THINK) for a in answers)
        mode = "thinking" if thinking else "non_thinking"
    out: dict[str, Any] = {"messages": messages, "mode": mode}
    if images:
        out["images"] = images
    if "id" in record:
        out["meta"] = {"id": record["id"]}
    return out
