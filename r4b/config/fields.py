"""What a config field declares beside its type: its range, whether a resume may change it, and its docstring.

A field of a run config is written as torchtitan writes its own: the type (``Literal[...]`` for a choice), the
default, and a string literal right under it, its documentation::

    global_batch_samples: Annotated[int, POSITIVE] = 1024
    \"\"\"Samples per optimizer step (the paper: 1,024).\"\"\"

Ranges and the resume marker ride on the type as :data:`typing.Annotated` metadata, so they sit next to the field
and need no table keyed by dotted names. :func:`config_fields` walks a config tree and gives each key with all of
it; loading (:func:`r4b.config.check_values`), resume (``RESUME_MAY_CHANGE``) and the reference page
(``python -m r4b.config.docs``) all read it from there. Standard library only.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal

__all__ = [
    "BELOW_ONE",
    "FRACTION",
    "NON_EMPTY",
    "NON_NEGATIVE",
    "PAIR",
    "POSITIVE",
    "RESUME_MAY_CHANGE",
    "ConfigField",
    "Range",
    "choices_of",
    "config_fields",
    "field_docs",
    "resume_may_change_keys",
]


@dataclasses.dataclass(frozen=True)
class Range:
    """A range a number must lie in, declared on its field as ``Annotated[float, NON_NEGATIVE]``."""

    text: str  # how the reference page writes it
    message: str  # the error's ending: "{source}: {key} = {value!r}: {message}"
    holds: Callable[[Any], bool] = dataclasses.field(compare=False)
    of_list: bool = False  # holds() judges a list field as a whole (its length); else each number in it


POSITIVE = Range("> 0", "must be positive", lambda v: v > 0)
NON_NEGATIVE = Range(">= 0", "must not be negative", lambda v: v >= 0)
FRACTION = Range("0 to 1", "must be between 0 and 1", lambda v: 0 <= v <= 1)
BELOW_ONE = Range("each in [0, 1)", "each must be at least 0 and below 1", lambda v: 0 <= v < 1)
NON_EMPTY = Range("at least one", "must name at least one", lambda v: len(v) > 0, of_list=True)
PAIR = Range("two values", "must be two numbers", lambda v: len(v) == 2, of_list=True)


class _ResumeMayChange:
    """Marks a key whose change cannot alter what a resumed run computes (where it writes, how often it saves and
    logs, where it stops): a resume takes the new value without ``train.allow_config_change``."""

    def __repr__(self) -> str:
        return "RESUME_MAY_CHANGE"


RESUME_MAY_CHANGE = _ResumeMayChange()


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One key of a config tree: where it is, its type, what is declared on it and its documentation."""

    key: str  # dotted: "train.max_steps"
    name: str  # the field's own name
    owner: type  # the section dataclass that holds it
    hint: Any  # the type, Annotated metadata removed
    ranges: tuple[Range, ...]
    resume_may_change: bool
    doc: str

    @property
    def choices(self) -> tuple[Any, ...] | None:
        return choices_of(self.hint)


def config_fields(cls: type, prefix: str = "") -> Iterator[ConfigField]:
    """Every leaf key of the config dataclass ``cls`` (nested sections walked, in declaration order)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        hint, extras = _split_annotated(hints[f.name])
        if dataclasses.is_dataclass(hint):
            yield from config_fields(hint, f"{prefix}{f.name}.")
            continue
        yield ConfigField(
            key=f"{prefix}{f.name}",
            name=f.name,
            owner=cls,
            hint=hint,
            ranges=tuple(e for e in extras if isinstance(e, Range)),
            resume_may_change=any(e is RESUME_MAY_CHANGE for e in extras),
            doc=docs.get(f.name, ""),
        )


def resume_may_change_keys(*configs: type) -> frozenset[str]:
    """The dotted keys marked ``RESUME_MAY_CHANGE`` in any of ``configs``."""
    return frozenset(f.key for cls in configs for f in config_fields(cls) if f.resume_may_change)


def choices_of(hint: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal`` type, also inside ``X | None`` and ``list[X]``; None for any other type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return args
    if origin in (typing.Union, types.UnionType, list, tuple):
        for arg in args:
            found = choices_of(arg)
            if found is not None:
                return found
    return None


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}``: the string literal under each field of ``cls`` and of its dataclass bases (a
    subclass's own string wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_field_docs(klass))
    return out


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined where there is no source (an interactive session)
        return {}
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = {}
    for before, after in zip(node.body, node.body[1:], strict=False):
        if (
            isinstance(before, ast.AnnAssign)
            and isinstance(before.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            out[before.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return out


def _split_annotated(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(hint) is typing.Annotated:
        return hint.__origin__, hint.__metadata__
    return hint, ()
