"""r4b.eval: auto-thinking evaluation (accuracy, thinking trigger rate, output tokens per mode).

:func:`evaluate` runs one or several models over a benchmark (JSONL prompts or a VLMEvalKit TSV) in the
auto, thinking and non-thinking modes and writes ``predictions.jsonl``, ``report.json``, ``report.md`` and
plots; :func:`rescore` recomputes a report from ``predictions.jsonl``; :func:`merge_reports` joins runs.
The metric definitions are in :mod:`r4b.eval.metrics`. Names are imported on first use, so that
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
    "choice_letter": "metrics",
    "compute_metrics": "metrics",
    "is_thinking": "metrics",
    "score_response": "metrics",
    "summarize": "metrics",
    "think_state": "metrics",
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
    return getattr(importlib.import_module(f"r4b.eval.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
