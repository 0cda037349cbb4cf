"""The evaluation report: ``report.json`` (the numbers), ``report.md`` (tables) and PNG plots.

``report.json``::

    {"benchmark": "eval", "data": "...", "modes": [...], "group_keys": ["difficulty"],
     "models": {"<name>": {"<mode>": {"n", "accuracy", "trigger_rate", "mean_tokens", "median_tokens",
                                      "unfinished_rate", "by_difficulty": {"easy": {...same keys}, ...}}}},
     "settings": {"<name>": {"model", "max_new_tokens", "temperature", ...}},
     "forced_mode_flags": [{"model", "mode", "trigger_rate", "expected", "message"}, ...],
     "definitions": {...}}

The numbers are :func:`r4b.eval.metrics.compute_metrics` over the records of ``predictions.jsonl``.
``forced_mode_flags`` (:func:`forced_mode_flags`) lists every forced mode whose trigger rate departs from its
forced value by more than :data:`FORCED_MODE_TOLERANCE` (thinking: 1, non-thinking: 0), e.g. a model that
closes its forced thought at once (BPO can teach that: docs/demo.md); ``report.md`` shows them above the tables.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from r4b.eval.metrics import compute_metrics

__all__ = [
    "DEFINITIONS",
    "FORCED_MODE_TOLERANCE",
    "build_report",
    "forced_mode_flags",
    "plot_report",
    "to_markdown",
    "write_report",
]

DEFINITIONS = {
    "accuracy": "share of responses whose final answer (after the last </think>) matches the reference",
    "trigger_rate": "share of responses with a non-empty think block (mode suffix + response starts with "
    "'<think>\\n' and holds non-whitespace text before </think> or the end); unclosed counts, malformed does not",
    "tokens": "generated tokens per response, the stop token included; max_new_tokens when cut off",
    "unfinished_rate": "share of responses cut at max_new_tokens",
}
PLOTS = ("accuracy_tokens.png", "trigger_rate.png")
# The trigger rate a forced mode should have, and how far it may depart before the report flags it.
FORCED_TRIGGER_RATE = {"thinking": 1.0, "non_thinking": 0.0}
FORCED_MODE_TOLERANCE = 0.05


def forced_mode_flags(
    models: Mapping[str, Mapping[str, Mapping[str, Any]]], tolerance: float = FORCED_MODE_TOLERANCE
) -> list[dict[str, Any]]:
    """One flag per (model, forced mode) whose trigger rate departs from the forced value by more than
    ``tolerance``: thinking forced with ``<think>\\n`` should think (1), non-thinking forced with
    ``<think>\\n\\n</think>`` should not (0). A departure means the model leaves the mode it is put in: it no
    longer follows the format its modes are defined by, and the forced modes stop measuring what they name."""
    flags = []
    for name, per_mode in models.items():
        for mode, expected in FORCED_TRIGGER_RATE.items():
            rate = per_mode.get(mode, {}).get("trigger_rate")
            if rate is None or abs(rate - expected) <= tolerance:
                continue
            what = "leaves the forced think block empty" if expected else "thinks though forced not to"
            message = (
                f"{name}: forced {mode} mode has trigger rate {rate:.3f}, expected {expected:.0f}: the model {what} "
                f"on {abs(rate - expected):.1%} of the items"
            )
            flags.append({"model": name, "mode": mode, "trigger_rate": rate, "expected": expected, "message": message})
    return flags


def build_report(
    records: Sequence[Mapping[str, Any]],
    *,
    benchmark: str,
    data: str,
    settings: Mapping[str, Mapping[str, Any]],
    group_keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The report dict of prediction records (see the module docstring)."""
    if group_keys is None:
        group_keys = list(dict.fromkeys(key for r in records for key in r.get("groups", {})))
    models = compute_metrics(records, group_keys)
    modes = list(dict.fromkeys(mode for per_mode in models.values() for mode in per_mode))
    return {
        "benchmark": benchmark,
        "data": data,
        "items": max((m["n"] for per_mode in models.values() for m in per_mode.values()), default=0),
        "modes": modes,
        "group_keys": list(group_keys),
        "models": models,
        "settings": {name: dict(settings.get(name, {})) for name in models},
        "forced_mode_flags": forced_mode_flags(models),
        "definitions": DEFINITIONS,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def to_markdown(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """``report.md``: a table per benchmark (model x mode), one per group key, the definitions and the plots."""
    bench = report["benchmark"]
    lines = [f"# r4b eval: {bench}", "", f"Data: `{report['data']}` ({report['items']} questions).", ""]
    for name, settings in report["settings"].items():
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        lines.append(f"- **{name}**: {shown}")
    flags = report.get("forced_mode_flags", forced_mode_flags(report["models"]))
    if flags:
        lines += [
            "",
            f"**Forced modes departing from their forced trigger rate** (tolerance {FORCED_MODE_TOLERANCE}):",
            "",
        ]
        lines += [f"- ⚠ {flag['message']}" for flag in flags]
    lines += ["", f"## {bench}", ""]
    lines += ["| model | mode | n | accuracy (%) | trigger rate (%) | mean tokens | median tokens | unfinished (%) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, per_mode in report["models"].items():
        for mode, m in per_mode.items():
            lines.append(
                f"| {name} | {mode} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['trigger_rate'])} | "
                f"{_num(m['mean_tokens'])} | {_num(m['median_tokens'])} | {_pct(m['unfinished_rate'])} |"
            )
    for key in report["group_keys"]:
        lines += ["", f"### {bench} by {key}", ""]
        lines += [f"| model | mode | {key} | n | accuracy (%) | trigger rate (%) | mean tokens | median tokens |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, per_mode in report["models"].items():
            for mode, m in per_mode.items():
                for value, g in m[f"by_{key}"].items():
                    lines.append(
                        f"| {name} | {mode} | {value} | {g['n']} | {_pct(g['accuracy'])} | {_pct(g['trigger_rate'])} "
                        f"| {_num(g['mean_tokens'])} | {_num(g['median_tokens'])} |"
                    )
    lines += ["", "Definitions:", ""]
    lines += [f"- {name}: {text}" for name, text in report["definitions"].items()]
    if plots:
        lines.append("")
        lines += [f"![{Path(plot).stem}]({plot})" for plot in plots]
    return "\n".join(lines) + "\n"


def _bars(ax: Any, labels: Sequence[str], series: Mapping[str, Sequence[float | None]], *, fmt: str) -> None:
    """Grouped bars: one group per label, one bar per series, value on each bar."""
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(labels))]
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=[("-" if v is None else format(v, fmt)) for v in values], fontsize=7)
    ax.set_xticks(range(len(labels)), labels)


def plot_report(report: Mapping[str, Any], out_dir: str | Path) -> list[str]:
    """Write ``accuracy_tokens.png`` (accuracy and mean tokens per mode, a bar per model) and
    ``trigger_rate.png`` (trigger rate per group of the first group key, in auto mode when evaluated, else per
    mode). Returns the file names written; none (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        print("r4b eval: matplotlib is not installed: no plots written", file=sys.stderr)
        return []
    out = Path(out_dir)
    models, modes, bench = report["models"], report["modes"], report["benchmark"]

    fig, (acc_ax, tok_ax) = plt.subplots(1, 2, figsize=(11, 4))
    acc = {name: [100 * per_mode[m]["accuracy"] if m in per_mode else None for m in modes] for name, per_mode in
           models.items()}  # fmt: skip
    tok = {name: [per_mode[m]["mean_tokens"] if m in per_mode else None for m in modes] for name, per_mode in
           models.items()}  # fmt: skip
    _bars(acc_ax, modes, acc, fmt=".1f")
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.set_ylim(0, 105)
    acc_ax.set_title(f"{bench}: accuracy per mode")
    _bars(tok_ax, modes, tok, fmt=".0f")
    tok_ax.set_ylabel("mean output tokens")
    tok_ax.set_title(f"{bench}: mean output tokens per mode")
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=120)
    plt.close(fig)

    key = report["group_keys"][0] if report["group_keys"] else None
    shown_modes = ["auto"] if "auto" in modes else list(modes)
    shown = [(name, mode) for name, per_mode in models.items() for mode in shown_modes if mode in per_mode]
    groups = list(
        dict.fromkeys(g for name, mode in shown for g in (models[name][mode].get(f"by_{key}", {}) if key else {}))
    )
    labels = [*groups, "all"]
    series = {}
    for name, mode in shown:
        m = models[name][mode]
        by = m.get(f"by_{key}", {}) if key else {}
        values = [by[g]["trigger_rate"] if g in by else None for g in groups] + [m["trigger_rate"]]
        series[name if len(shown_modes) == 1 else f"{name} ({mode})"] = values
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(labels) + 2), 4))
    _bars(ax, labels, {name: [None if v is None else 100 * v for v in vs] for name, vs in series.items()}, fmt=".0f")
    ax.set_ylabel("thinking trigger rate (%)")
    ax.set_ylim(0, 105)
    mode_text = "auto mode" if shown_modes == ["auto"] else "per mode"
    ax.set_title(f"{bench}: trigger rate by {key} ({mode_text})" if key else f"{bench}: trigger rate ({mode_text})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=120)
    plt.close(fig)
    return list(PLOTS)


def write_report(report: dict[str, Any], out_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Write ``report.json``, the plots (``report["plots"]`` lists them) and ``report.md`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot_report(report, out) if plots else []
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(to_markdown(report, report["plots"]))
    return report
