"""Filling a run config from a YAML file and ``key=value`` overrides, and checking its values.

A YAML file sets any subset of the stage's fields; ``section.field=value`` overrides (values parsed as YAML) come
last. Unknown keys and wrongly typed values are errors naming the file and the dotted key, so a typo never silently
falls back to a default; so are a value that is not one of a ``Literal`` field's choices and a number outside the
range declared on its field (:mod:`r4b.config.fields`), all checked here, before anything loads.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from r4b.config.fields import config_fields
from r4b.errors import InputError

T = TypeVar("T")

__all__ = ["ConfigError", "check_values", "config_to_dict", "load_config", "shipped_config"]


class ConfigError(InputError):
    """A config file or override that does not fit the run's config dataclass."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """``cls`` filled from the YAML file at ``path`` (optional), then from ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = path if Path(path).exists() else shipped_config(path) or path
        source = str(path)
        try:
            raw = yaml.load(Path(path).read_text(), Loader=_StrictLoader) or {}
        except _DuplicateKey as error:
            raise ConfigError(f"{path}:{error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        except OSError as error:
            raise ConfigError(f"--config {path}: cannot read it ({error.strerror})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key=value, e.g. optim.lr_llm=1e-5")
        _set_dotted(raw, key.strip().split("."), yaml.safe_load(value), override)
    config = _build(cls, raw, source, prefix="")
    check_values(config, source)
    return config


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # r4b/configs, in the wheel too


def shipped_config(path: str | Path) -> Path | None:
    """The config r4b ships under ``path`` (``configs/demo/sft.yaml`` or ``demo/sft.yaml``), or None: so the
    README's commands work from any directory, with r4b installed from a wheel as well as from a checkout."""
    parts = Path(path).parts
    parts = parts[1:] if parts[:1] == ("configs",) else parts
    candidate = SHIPPED_CONFIGS.joinpath(*parts) if parts else None
    return candidate if candidate is not None and candidate.is_file() else None


class _DuplicateKey(Exception):
    """A mapping that sets a key twice (``line: message``)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key set twice in one mapping: by default the second silently replaces the
    first, so a repeated ``optim:`` section would send every rate it does not repeat back to its default."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"{line}: key {key!r} is set twice in one mapping (first on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def check_values(config: Any, source: str = "<config>") -> None:
    """Raise a :class:`ConfigError` naming the key for a value that is not one of its field's choices or lies out
    of its field's range (``Annotated[int, POSITIVE]``...). Loading calls it, and so does every stage's start, for
    a config built in Python."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return
    for spec in config_fields(type(config)):
        value = config
        for part in spec.key.split("."):
            value = getattr(value, part)
        what = _problem(spec.choices, spec.ranges, value)
        if what:
            name = "--max-steps" if spec.key == "train.max_steps" else spec.key
            raise ConfigError(f"{source}: {name} = {value!r}: {what}")


def _problem(choices: tuple[Any, ...] | None, ranges: tuple[Any, ...], value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if choices is not None:
        for item in value if isinstance(value, list | tuple) else [value]:
            if item not in choices:
                return _expected(choices)
    if isinstance(value, list | tuple):
        numbers = [item for item in value if isinstance(item, int | float) and not isinstance(item, bool)]
        for bound in ranges:
            if not (bound.holds(value) if bound.of_list else all(bound.holds(item) for item in numbers)):
                return bound.message
    elif isinstance(value, int | float):
        for bound in ranges:
            if not bound.of_list and not bound.holds(value):
                return bound.message
    return None


def _expected(choices: tuple[Any, ...]) -> str:
    return f"expected one of {', '.join(map(repr, choices))}"


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for the run directory's config.yaml and checkpoints)."""
    return dataclasses.asdict(config)


def _set_dotted(tree: dict[str, Any], keys: list[str], value: Any, override: str) -> None:
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {key!r} is not a section")
        tree = node
    tree[keys[-1]] = value


def _build(cls: type[T], raw: dict[str, Any], source: str, prefix: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)  # Annotated metadata removed
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, source, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, source, f"{key}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last_error = None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as error:
                last_error = error
        raise last_error  # type: ignore[misc]
    if origin in (list, tuple):
        items = value if isinstance(value, list | tuple) else [value]
        item_hint = args[0] if args else Any
        return origin(_coerce(item_hint, item, source, key) for item in items)
    if origin is dict or hint is Any:
        return value
    if origin is typing.Literal:
        if isinstance(value, bool) or value not in args:
            raise ConfigError(f"{source}: {key} = {value!r}: {_expected(args)}")
        return value
    if hint is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and not math.isfinite(number):  # .nan, .inf, 1.0e+400: never a meant setting
            raise ConfigError(f"{source}: {key} = {value!r}: must be a finite number")
        if number is not None:
            return number
    if hint is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    kind = _KIND_NAMES.get(hint, f"a {getattr(hint, '__name__', hint)}")
    raise ConfigError(f"{source}: {key} = {value!r}: expected {kind}")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
