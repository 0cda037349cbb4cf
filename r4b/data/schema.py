"""The JSONL training format: one sample per line, validated strictly, every problem located by file:line:field.

A line is a JSON object::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
                  {"role": "assistant", "content": "<think>\\n5 + 7 = 12.\\n</think>\\n\\n12"}],
     "images": ["imgs/0001.png"], "mode": "thinking", "answer": "12"}

- ``messages``: non-empty; ``role`` is ``system``, ``user`` or ``assistant``; ``content`` a string or a
  non-empty list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts. An image is a
  ``{"type": "image"}`` part or a literal ``<image>`` in text. Assistant turns hold text only; when a
  sample has assistant turns, it ends with one (a trailing prompt would carry no loss). A sample without
  assistant turns is a prompt (for RL or evaluation).
- ``images``: optional (default none); paths relative to the JSONL file's directory, one per placeholder,
  in order; each must exist.
- ``mode``: ``thinking`` or ``non_thinking``.
- ``answer``: optional reference answer (a string) for RL rewards and evaluation.
- ``meta``: optional free-form object (provenance), carried along untouched.

Any other top-level field is an error, unless the reader is asked to ``keep_unknown`` (then such fields land,
unchecked, in :attr:`Sample.extra`: e.g. ``r4b curate`` carries a question's own fields into its output).

Assistant content is either in R-4B's format already (thinking ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``,
non-thinking ``<think>\\n\\n</think>\\n\\n{answer}``), which must agree with ``mode``, or, for a non-thinking
sample only, a plain answer that is wrapped with :func:`~r4b.format.format_response`. A thinking
sample without a non-empty think block is an error. After reading, every assistant content is the formatted
string.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from r4b.data.errors import DataError
from r4b.data.json_lines import decode_line, load_json
from r4b.data.prompt_tables import PromptKeys, prompt_rows
from r4b.data.report import DataReport
from r4b.data.tables import input_kind
from r4b.format import THINK_CLOSE, THINK_OPEN, format_response, parse_response
from r4b.models.tokenizer import IMAGE_TOKEN

__all__ = ["SAMPLE_MODES", "Sample", "check_prompt", "parse_sample", "read_jsonl", "read_prompts"]

SAMPLE_MODES = ("thinking", "non_thinking")
ROLES = ("system", "user", "assistant")
REQUIRED_FIELDS = ("messages",)
OPTIONAL_FIELDS = ("mode", "images", "answer", "meta")  # mode: required with an assistant turn
# Structural tokens of the template: text containing them would forge turn boundaries.
RESERVED_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@dataclass
class Sample:
    """One validated training or prompt sample.

    Attributes:
        messages: the conversation; assistant contents are R-4B-formatted strings.
        images: absolute-or-as-given paths, resolved against the JSONL file's directory, in placeholder order.
        mode: ``"thinking"`` or ``"non_thinking"``; None for a prompt (no assistant turn).
        answer: the reference answer, if any.
        source: ``"file:line"`` where the sample came from.
        meta: the optional free-form ``meta`` object.
        extra: unknown top-level fields, kept only when read with ``keep_unknown=True`` (else refused).
    """

    messages: list[dict[str, Any]]
    images: list[Path]
    mode: Literal["thinking", "non_thinking"] | None
    answer: str | None = None
    source: str = "<memory>"
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_response(self) -> bool:
        return any(message["role"] == "assistant" for message in self.messages)


def read_jsonl(
    path: str | Path, *, on_error: Literal["raise", "skip"] = "raise", keep_unknown: bool = False
) -> tuple[list[Sample], DataReport]:
    """Read and validate a JSONL file of samples.

    Args:
        path: the file; image paths in it are relative to its directory.
        on_error: ``"raise"`` the first :class:`DataError`, or ``"skip"`` bad lines, counting each in the
            report by reason (with the first few ``file:line`` messages). Blank lines are not samples.
        keep_unknown: keep unknown top-level fields in :attr:`Sample.extra` instead of refusing them.

    Returns:
        The samples in file order and a :class:`DataReport`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    samples: list[Sample] = []
    report = DataReport()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = load_json(decode_line(raw, where), where)
                samples.append(parse_sample(record, where=where, root=path.parent, keep_unknown=keep_unknown))
            except DataError as error:
                if on_error == "raise":
                    raise
                report.skip(error)
    report.loaded = len(samples)
    return samples, report


def check_prompt(sample: Sample, what: str = "a prompt") -> None:
    """A prompt for RL or evaluation: no assistant turn (the model writes the answer) and a reference answer.
    ``what`` names it in the error (e.g. "an evaluation prompt")."""
    if sample.has_response:
        roles = [message["role"] for message in sample.messages]
        raise DataError(
            sample.source,
            f"{what} must not hold an assistant turn (the model writes the answers)",
            field=f"messages[{roles.index('assistant')}]",
            reason="bad_role",
        )
    if sample.answer is None or not sample.answer.strip():
        raise DataError(sample.source, "missing reference answer", field="answer", reason="missing_field")


def read_prompts(
    path: str | Path,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    what: str = "a prompt",
    keep_unknown: bool = False,
    keys: PromptKeys | None = None,
    images_dir: Path | None = None,
) -> tuple[list[Sample], DataReport]:
    """Read prompts (see :func:`check_prompt`; images must be readable): every problem raises or, with ``"skip"``,
    is counted. r4b's JSONL as it is (``keep_unknown`` as in :func:`read_jsonl`); Parquet, ``datasets``
    directories, JSON lists, and JSONL under other column names through ``keys``
    (:mod:`r4b.data.prompt_tables`; image bytes stored in ``images_dir``, default a shared temporary directory)."""
    from r4b.data.image import check_images

    keys = keys or PromptKeys()
    if keys.default and input_kind(path) == "jsonl":
        samples, report = read_jsonl(path, on_error=on_error, keep_unknown=keep_unknown)
    else:
        samples, report = _read_mapped(Path(path), keys, images_dir, on_error)
    prompts = []
    for sample in samples:
        try:
            check_prompt(sample, what)
            check_images(sample.images, where=sample.source)  # a corrupt image fails (or is skipped) here, by line
        except DataError as error:
            if on_error == "raise":
                raise
            report.skip(error)
            continue
        prompts.append(sample)
    report.loaded = len(prompts)
    return prompts, report


def _read_mapped(
    path: Path, keys: PromptKeys, images_dir: Path | None, on_error: str
) -> tuple[list[Sample], DataReport]:
    """The samples of a prompt file read through ``keys`` (:func:`r4b.data.prompt_tables.prompt_rows`)."""
    images_dir = images_dir or Path(tempfile.gettempdir()) / "r4b-prompt-images"  # content-addressed: shareable
    root = path if path.is_dir() else path.parent  # relative image paths: as for JSONL
    samples, report = [], DataReport()
    for where, record in prompt_rows(path, keys, images_dir):
        try:
            if isinstance(record, DataError):
                raise record
            samples.append(parse_sample(record, where=where, root=root))
        except DataError as error:
            if on_error == "raise":
                raise
            report.skip(error)
    return samples, report


def parse_sample(record: Any, *, where: str = "<memory>", root: str | Path = ".", keep_unknown: bool = False) -> Sample:
    """Validate one decoded JSON record and return the :class:`Sample` (image paths resolved against ``root``).
    Unknown top-level fields are refused, or with ``keep_unknown`` returned unchecked in :attr:`Sample.extra`."""
    if not isinstance(record, dict):
        raise DataError(where, f"a sample must be a JSON object, got {_kind(record)}", reason="malformed_json")
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise DataError(where, "missing required field", field=name, reason="missing_field")
    known = REQUIRED_FIELDS + OPTIONAL_FIELDS
    extra = {name: value for name, value in record.items() if name not in known}
    if extra and not keep_unknown:
        allowed = ", ".join(known)
        name = next(iter(extra))
        raise DataError(where, f"unknown field (expected one of {allowed})", field=name, reason="unknown_field")

    mode = record.get("mode")
    has_assistant = isinstance(record["messages"], list) and any(
        isinstance(m, dict) and m.get("role") == "assistant" for m in record["messages"]
    )
    if mode is None and has_assistant:
        raise DataError(
            where, "missing required field (the sample has an assistant turn)", field="mode", reason="missing_field"
        )
    if mode is not None and mode not in SAMPLE_MODES:
        raise DataError(
            where, f"unknown mode {mode!r} (expected thinking or non_thinking)", field="mode", reason="unknown_mode"
        )
    messages = _parse_messages(record["messages"], mode, where)
    images = _parse_images(record.get("images", []), Path(root), where)
    placeholders = sum(_count_images(message) for message in messages)
    if placeholders != len(images):
        raise DataError(
            where,
            f"{len(images)} image path(s) for {placeholders} image placeholder(s) in messages",
            field="images",
            reason="image_count_mismatch",
        )
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise DataError(where, f"must be a string, got {_kind(answer)}", field="answer", reason="bad_type")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(where, f"must be an object, got {_kind(meta)}", field="meta", reason="bad_type")
    return Sample(messages, images, mode, answer, where, meta, extra)  # extra is empty unless keep_unknown


def _parse_messages(messages: Any, mode: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(where, "must be a non-empty list of messages", field="messages", reason="bad_type")
    out = []
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(where, f"must be an object, got {_kind(message)}", field=name, reason="bad_type")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(where, "missing required field", field=f"{name}.{key}", reason="missing_field")
        for key in message:
            if key not in ("role", "content"):
                raise DataError(where, "unknown field", field=f"{name}.{key}", reason="unknown_field")
        role = message["role"]
        if role not in ROLES:
            raise DataError(
                where,
                f"unknown role {role!r} (expected system, user or assistant)",
                field=f"{name}.role",
                reason="bad_role",
            )
        content = _parse_content(message["content"], where, f"{name}.content")
        if role == "assistant":
            content = _format_assistant(content, mode, where, f"{name}.content")
        out.append({"role": role, "content": content})
    roles = [message["role"] for message in out]
    if "assistant" in roles and roles[-1] != "assistant":
        raise DataError(
            where,
            f"the last message is a {roles[-1]!r} turn after an assistant turn; it would carry no loss",
            field=f"messages[{len(out) - 1}].role",
            reason="bad_role",
        )
    return out


def _parse_content(content: Any, where: str, name: str) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        _check_reserved(content, where, name)
        return content
    if not isinstance(content, list) or not content:
        raise DataError(where, "must be a string or a non-empty list of parts", field=name, reason="bad_type")
    parts = []
    for j, part in enumerate(content):
        pname = f"{name}[{j}]"
        if not isinstance(part, dict) or "type" not in part:
            raise DataError(
                where, 'must be {"type": "image"} or {"type": "text", "text": ...}', field=pname, reason="bad_type"
            )
        if part["type"] == "image" and set(part) == {"type"}:
            parts.append({"type": "image"})
        elif part["type"] == "text" and set(part) == {"type", "text"} and isinstance(part["text"], str):
            _check_reserved(part["text"], where, f"{pname}.text")
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise DataError(
                where, 'must be {"type": "image"} or {"type": "text", "text": ...}', field=pname, reason="bad_type"
            )
    return parts


def _check_reserved(text: str, where: str, name: str) -> None:
    for token in RESERVED_TOKENS:
        if token in text:
            raise DataError(where, f"contains the reserved template token {token}", field=name, reason="reserved_token")


def _format_assistant(content: str | list[dict[str, str]], mode: str, where: str, name: str) -> str:
    """The assistant text in R-4B's format, checked against ``mode``."""
    if isinstance(content, list):
        if any(part["type"] != "text" for part in content):
            raise DataError(where, "assistant turns cannot hold images", field=name, reason="bad_format")
        content = "".join(part["text"] for part in content)
    if IMAGE_TOKEN in content:
        raise DataError(where, f"assistant turns cannot hold {IMAGE_TOKEN}", field=name, reason="bad_format")
    if not content.startswith(THINK_OPEN):
        if THINK_OPEN in content or THINK_CLOSE in content:
            raise DataError(where, "think tags must open the assistant turn", field=name, reason="bad_format")
        if mode == "thinking":
            raise DataError(
                where,
                "a thinking sample needs a non-empty <think>\\n...\\n</think> block",
                field=name,
                reason="bad_format",
            )
        content = format_response(content, None)
    parsed = parse_response(content)
    if parsed is None:
        raise DataError(
            where,
            "malformed think block (expected <think>\\n{reasoning}\\n</think>\\n\\n{answer} "
            "or <think>\\n\\n</think>\\n\\n{answer})",
            field=name,
            reason="bad_format",
        )
    found, _, answer = parsed
    if found != mode:
        raise DataError(where, f"a {found} response in a {mode} sample", field=name, reason="mode_mismatch")
    if THINK_OPEN in answer or THINK_CLOSE in answer:
        raise DataError(where, "think tags after the think block", field=name, reason="bad_format")
    if not answer.strip():
        raise DataError(where, "empty answer after the think block", field=name, reason="bad_format")
    return content


def _parse_images(images: Any, root: Path, where: str) -> list[Path]:
    if not isinstance(images, list):
        raise DataError(where, f"must be a list of paths, got {_kind(images)}", field="images", reason="bad_type")
    out = []
    for k, image in enumerate(images):
        if not isinstance(image, str) or not image:
            raise DataError(where, "must be a non-empty path string", field=f"images[{k}]", reason="bad_type")
        resolved = root / image
        problem = _image_path_problem(image, resolved)
        if problem:
            raise DataError(where, problem, field=f"images[{k}]", reason="missing_image")
        out.append(resolved)
    return out


def _image_path_problem(image: str, resolved: Path) -> str | None:
    """Why ``resolved`` (``image`` as the sample names it) is not an image file to read, or None."""
    if "://" in image:
        return f"image {image!r} is a URL: images are read from local files, download it first"
    try:
        if resolved.is_file():
            return None
        if resolved.is_dir():
            return f"image path {resolved} is a directory, not a file"
        if resolved.is_symlink():
            resolved.resolve(strict=True)  # raises on a loop or a dangling link
    except RuntimeError:  # Python < 3.13: a symlink loop
        return f"image path {resolved} is a symlink loop"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"image path {resolved} is a symlink loop"
        if resolved.is_symlink():
            return f"image path {resolved} is a symlink to a missing file ({os.readlink(resolved)})"
    return f"image file not found: {resolved}"


def _count_images(message: dict[str, Any]) -> int:
    content = message["content"]
    if isinstance(content, str):
        return content.count(IMAGE_TOKEN)
    return sum(1 if part["type"] == "image" else part["text"].count(IMAGE_TOKEN) for part in content)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
