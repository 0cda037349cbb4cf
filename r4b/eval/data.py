"""Benchmark questions for ``r4b eval``: JSONL prompts with answers, or VLMEvalKit TSVs.

- JSONL (any suffix but ``.tsv``): records of :func:`r4b.data.read_jsonl` without an assistant turn and with
  an ``answer``; ``meta.id`` names the item (else its ``file:line``); scalar ``meta`` fields named in
  ``group_by`` (``difficulty``, ``category``) become its groups; ``meta.options`` (``{"A": text, ...}``), when
  present, makes it multiple choice.
- TSV (``.tsv``): :func:`r4b.data.read_vlmeval_tsv`; the prompt is VLMEvalKit's multiple-choice prompt
  (:func:`mcq_prompt`: the images, then ``Hint:``, ``Question:``, ``Options:`` and the instruction to pick
  one); the answer is the letter; the ``category`` column (and any other column named in ``group_by``) gives
  the groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r4b.eval.errors import EvalError

if TYPE_CHECKING:
    from r4b.rollout.base import Prompt

__all__ = ["DEFAULT_GROUP_BY", "EvalItem", "load_items", "mcq_prompt"]

DEFAULT_GROUP_BY = ("difficulty", "category")
# Text that would forge a turn boundary or an image placeholder in the chat template (R-4B's or Qwen-VL's).
_FORBIDDEN = ("<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|image_pad|>",
              "<|vision_end|>", "<|video_pad|>")  # fmt: skip


@dataclass
class EvalItem:
    """One question: its prompt (messages and images), the reference answer and where it came from."""

    id: str
    prompt: Prompt
    question: str
    answer: str
    options: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"


def mcq_prompt(question: str, options: Mapping[str, str], hint: str | None = None) -> str:
    """VLMEvalKit's ``ImageMCQDataset.build_prompt`` text (the images go before it)."""
    text = f"Hint: {hint}\n" if hint else ""
    text += f"Question: {question}\n"
    if options:
        text += "Options:\n" + "".join(f"{letter}. {option}\n" for letter, option in options.items())
        text += "Please select the correct answer from the options above. \n"
    return text


def _question_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last user message (parts joined), for the predictions file."""
    for message in reversed(messages):
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return ""


def _read_jsonl(path: Path, group_by: Sequence[str]) -> list[EvalItem]:
    from r4b.data.errors import DataError
    from r4b.data.schema import read_prompts
    from r4b.rollout.base import Prompt

    samples, _ = read_prompts(path, what="an evaluation prompt")
    items = []
    for sample in samples:
        options = sample.meta.get("options", {})
        if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
            raise DataError(
                sample.source, "must be an object of option letter -> text", field="meta.options", reason="bad_type"
            )
        groups = {
            key: str(sample.meta[key]) for key in group_by if isinstance(sample.meta.get(key), (str, int, float, bool))
        }
        items.append(
            EvalItem(
                id=str(sample.meta.get("id", sample.source)),
                prompt=Prompt(sample.messages, list(sample.images)),
                question=_question_text(sample.messages),
                answer=sample.answer,
                options=dict(options),
                groups=groups,
                source=sample.source,
            )
        )
    return items


def _read_tsv(path: Path, group_by: Sequence[str]) -> list[EvalItem]:
    from r4b.data.errors import DataError
    from r4b.data.tsv import read_vlmeval_tsv
    from r4b.rollout.base import Prompt

    items = []
    for sample in read_vlmeval_tsv(path):
        text = mcq_prompt(sample.question, sample.options, sample.hint)
        for token in _FORBIDDEN:
            if token in text:
                raise DataError(
                    sample.source,
                    f"contains the reserved text {token!r}",
                    field="question" if token in sample.question else "hint/options",
                    kind="column",
                    reason="reserved_token",
                )
        content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": text}]
        columns = {"category": sample.category, **sample.extra}
        groups = {key: str(columns[key]) for key in group_by if columns.get(key)}
        items.append(
            EvalItem(
                id=str(sample.index),
                prompt=Prompt([{"role": "user", "content": content}], list(sample.images)),
                question=text,
                answer=str(sample.answer),
                options=dict(sample.options),
                groups=groups,
                source=sample.source,
            )
        )
    return items


def load_items(
    path: str | Path, *, limit: int | None = None, group_by: Sequence[str] = DEFAULT_GROUP_BY
) -> list[EvalItem]:
    """The questions of a benchmark file (see the module docstring), the first ``limit`` when given.

    Raises:
        r4b.data.DataError: a bad record, located by ``file:line`` and field.
        EvalError: no such file, or no questions in it.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such data file")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    items = _read_tsv(path, group_by) if path.suffix.lower() == ".tsv" else _read_jsonl(path, group_by)
    if not items:
        raise EvalError(f"{path}: no questions in the file")
    return items[:limit] if limit is not None else items
