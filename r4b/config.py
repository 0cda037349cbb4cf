"""Run configs: nested dataclasses filled from a YAML file and ``key=value`` overrides.

Every stage (``r4b sft``, ``r4b bpo``, ``r4b eval``) describes its run as a dataclass tree. A YAML
file sets any subset of its fields; ``section.field=value`` overrides (values parsed as YAML) come
last. Unknown keys and wrongly typed values are errors naming the file and the dotted key, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from r4b.errors import InputError

T = TypeVar("T")


class ConfigError(InputError):
    """A config file or override that does not fit the run's config dataclass."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """``cls`` filled from the YAML file at ``path`` (optional), then from ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
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


# Range and enum checks by dotted key, for whichever stage config has the key: a bad value is an error naming the
# key before anything loads (never a traceback or a silently odd run).
POSITIVE = (
    "train.global_batch_samples",
    "train.epochs",
    "train.max_steps",
    "train.schedule_steps",
    "train.steps",
    "train.prompts_per_step",
    "data.max_tokens",
    "rollout.group_size",
    "rollout.max_new_tokens",
    "rollout.prompts_per_call",
    "rollout.batch_size",
    "policy.ppo_epochs",
    "policy.mini_batches",
    "policy.max_tokens",
    "engine.timeout_minutes",
)
NON_NEGATIVE = (
    "optim.lr_llm",
    "optim.lr_vision",
    "optim.lr_projector",
    "optim.weight_decay",
    "optim.eps",
    "optim.warmup_ratio",
    "optim.min_lr_ratio",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.attention_cost_weight",
    "engine.grad_clip",
    "rollout.temperature",
    "rollout.top_k",
    "policy.beta",
)
AT_MOST_ONE = ("optim.warmup_ratio", "optim.min_lr_ratio", "rollout.top_p")
CHOICES = {
    "data.on_error": ("raise", "skip"),
    "engine.kind": ("single", "fsdp2", "deepspeed"),
    "engine.mixed_precision": ("no", "bf16"),
    "rollout.strategy": ("bpo", "grpo"),
    "rollout.engine": ("hf", "vllm"),
    "advantages.grouping": ("joint", "per_mode"),
}


def check_values(config: Any, source: str = "<config>") -> None:
    """Raise a :class:`ConfigError` naming the key for a value out of its range or not one of its choices."""
    flat = _flatten(config_to_dict(config)) if dataclasses.is_dataclass(config) else {}
    for key, value in flat.items():
        if value is None or isinstance(value, bool):
            continue
        what = None
        if key in CHOICES and value not in CHOICES[key]:
            what = f"expected one of {', '.join(map(repr, CHOICES[key]))}"
        elif key in POSITIVE and isinstance(value, int | float) and value <= 0:
            what = "must be positive"
        elif key in NON_NEGATIVE and isinstance(value, int | float) and value < 0:
            what = "must not be negative"
        elif key in AT_MOST_ONE and isinstance(value, int | float) and not 0 <= value <= 1:
            what = "must be between 0 and 1"
        if what:
            name = "--max-steps" if key == "train.max_steps" else key
            raise ConfigError(f"{source}: {name} = {value!r}: {what}")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and not prefix.count("."):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
    hints = typing.get_type_hints(cls)
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
    if hint is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    if hint is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    if typing.get_origin(hint) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} = {value!r}, expected one of {', '.join(map(repr, args))}")
        return value
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {key} = {value!r} is not a {getattr(hint, '__name__', hint)}")
