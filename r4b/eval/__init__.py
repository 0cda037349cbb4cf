"""r4b.eval: auto-thinking evaluation (accuracy, thinking trigger rate, output tokens per mode).

:func:`evaluate` runs one or several models over a benchmark (JSONL prompts or a VLMEvalKit TSV) in the
auto, thinking and non-thinking modes and writes ``predictions.jsonl``, ``report.json``, ``report.md`` and
plots; :func:`rescore` recomputes a report from ``predictions.jsonl``; :func:`merge_reports` joins runs.
The metric definitions are in :mod:`r4b.eval.metrics` (the think states in :mod:`r4b.format`, answer scoring in
:mod:`r4b.answers`). Names are imported on first use, so that
``from r4b.eval.cli import add_parser`` (the CLI) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_parser": "cli",
    "EvalItem": "data",
    "load_items": "data",
    "mcq_prompt": "data",
    "EvalError": "errors",
    "choice_letter": "r4b.answers",
    "compute_metrics": "metrics",
    "is_thinking": "r4b.format",
    "score_response": "metrics",
    "summarize": "metrics",
    "think_state": "r4b.format",
    "build_report": "report",
    "plot_report": "report",
    "to_markdown": "report",
    "write_report": "report",
    "evaluate": "runner",
    "load_predictions": "runner",
    "merge_reports": "runner",
    "rescore": "runner",
    "score_record": "runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'r4b.eval' has no attribute {name!r}")
    module = _EXPORTS[name]  # a submodule of r4b.eval, or a module's full name
    return getattr(importlib.import_module(module if "." in module else f"r4b.eval.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
