"""docs/config.md, generated from the config dataclasses: ``python -m r4b.config.docs > docs/config.md``.

Every key of every stage config (:data:`r4b.config.sections.STAGES`) with its type, the stage's default, its choices
or range, whether a resume may change it, and its docstring. ``tests/train/test_config.py`` regenerates the page
and fails when the file differs.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Literal

from r4b.config.fields import ConfigField, config_fields
from r4b.config.sections import STAGES

COMMAND = "python -m r4b.config.docs > docs/config.md"

INTRO = f"""\
# Configuration reference

<!-- Generated from r4b/config/sections.py by `{COMMAND}`: edit the dataclasses, not this page
(tests/train/test_config.py fails when it is stale). -->

`r4b sft` and `r4b bpo` take `--config FILE [--output-dir DIR] [--max-steps N] [key=value ...]`: a YAML file that
sets any subset of the keys below, section by section, then dotted overrides whose values are read as YAML
(`optim.lr_llm=1e-5`, `data.train=[a.jsonl,b.jsonl]`, `model.path=null`). `--output-dir` sets `output_dir` and
`--max-steps` sets `train.max_steps`. Everything is checked before a model loads, and each error names the file and
the key: an unknown key, a value of the wrong type, a value that is not one of the key's choices, a number out of
its range. `configs/demo/` holds commented examples; [usage.md](usage.md) describes what the stages do with them.

Every key lives in one place, a dataclass field in `r4b/config/sections.py` with its type (`Literal` choices), its
default, its range and its docstring; this page is generated from them. `r4b eval` and `r4b curate` take command
line flags instead (`--help`; [usage.md](usage.md#evaluation-r4b-eval)).

**Resume.** A resumed run compares its config with the checkpoint's and stops, naming every changed key, unless the
key is marked *resume may change* below (where it writes, how often it saves and logs, where it stops, which
kernels compute the same math) or `train.allow_config_change` lists the key or its section.

## Environment variables

| variable | effect |
|---|---|
{{variables}}"""

VARIABLES = {
    "R4B_ATTENTION_BACKEND": (
        "`auto`, `r4b`, `flex`, `fa2` or `r4b-schedule`: the packed attention's kernel. When set (not empty) it "
        "overrides `model.attention_backend`; the key applies where it is unset; with neither, `auto`. In Python, a "
        "`with r4b.models.attention_backends.use_attention_backend(name):` around the run takes precedence over "
        "both."
    ),
    "R4B_FUSED_LOSS_METHOD": (
        "`recompute`, `cublas` or `cublas-fast`: the fused lm_head losses' method. When set it overrides "
        "`model.fused_loss_method`; the key applies where it is unset (the kernels' process default); "
        "with neither, `recompute`. A `method=` passed to a kernel in Python takes precedence over both."
    ),
    "R4B_AUTOTUNE": (
        "`0` pins each Triton autotune to one config, so each kernel compiles once ([kernels.md](kernels.md))."
    ),
    "R4B_DEBUG": "`1` prints a user error's traceback instead of one line.",
}


def render() -> str:
    """The whole of docs/config.md."""
    parts = [INTRO.replace("{variables}", "".join(f"| `{name}` | {text} |\n" for name, text in VARIABLES.items()))]
    for command, cls in STAGES.items():
        specs = list(config_fields(cls))
        parts.append(f"\n## `r4b {command}` ({cls.__name__}, {len(specs)} keys)\n\n{_doc(cls)}\n")
        defaults = cls()
        for section, members in _sections(specs):
            if section:
                owner = _section_class(cls, section)
                parts.append(f"\n### `{section}`\n\n{_doc(owner)}\n")
            parts.append("\n| key | type | default | values | description |\n|---|---|---|---|---|\n")
            for spec in members:
                parts.append(_row(spec, _value(defaults, spec.key)))
    keys = {spec.key for cls in STAGES.values() for spec in config_fields(cls)}
    parts.append(f"\n{len(keys)} distinct keys in all.\n")
    return "".join(parts)


def _sections(specs: list[ConfigField]) -> list[tuple[str, list[ConfigField]]]:
    """The top-level keys first (section ""), then each section in declaration order."""
    out: dict[str, list[ConfigField]] = {}
    for spec in specs:
        out.setdefault(spec.key.rpartition(".")[0], []).append(spec)
    return list(out.items())


def _section_class(cls: type, section: str) -> type:
    hints = typing.get_type_hints(cls)
    for part in section.split("."):
        cls = hints[part]
        hints = typing.get_type_hints(cls)
    return cls


def _doc(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split()).replace("``", "`")


def _value(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _row(spec: ConfigField, default: Any) -> str:
    values = ", ".join(f"`{_yaml(c)}`" for c in spec.choices) if spec.choices else ""
    per_value = [r.text for r in spec.ranges if not r.of_list][-1:]  # the narrowest last: "0 to 1" says ">= 0" too
    ranges = [r.text for r in spec.ranges if r.of_list] + per_value
    if ranges:
        values = "; ".join(filter(None, [values, ", ".join(ranges)]))
    doc = spec.doc + (" *Resume may change.*" if spec.resume_may_change else "")
    cells = [f"`{spec.key}`", _type(spec.hint), f"`{_yaml(default)}`", values, doc]
    return "| " + " | ".join(_cell(c) for c in cells) + " |\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def _type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "choice"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def _yaml(value: Any) -> str:
    """A value as it would be written in a config file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        return _yaml(dataclasses.asdict(value))
    return repr(value) if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
