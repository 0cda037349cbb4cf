"""The end-to-end demo on the embedded tiny model (``r4b demo``, behind ``make demo``).

Synthetic data -> bi-mode annealing -> BPO and, on the same budget, plain GRPO -> the auto-thinking
evaluation of the three models in all three modes, into one ``report.json``. Then it prints how the
run compares with the paper's signature (checks below); it does not fail when they are not met -
at toy scale they are a target, and the numbers are what they are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs" / "demo"  # shipped in the wheel too


def paper_signature(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The demo's targets (docs/demo.md) evaluated on a report: name -> {value, target, met}."""
    models = report["models"]
    bpo, annealed = models["bpo"], models["annealed"]
    by = bpo["auto"].get("by_difficulty", {})
    gap = by.get("hard", {}).get("trigger_rate", 0.0) - by.get("easy", {}).get("trigger_rate", 0.0)
    best_forced = max(bpo["thinking"]["accuracy"], bpo["non_thinking"]["accuracy"])
    checks = {
        "bpo trigger rate hard - easy": (gap, ">= 0.3", gap >= 0.3),
        "bpo auto accuracy - best forced": (
            bpo["auto"]["accuracy"] - best_forced,
            ">= -0.05",
            bpo["auto"]["accuracy"] >= best_forced - 0.05,
        ),
        "bpo auto tokens / thinking tokens": (
            bpo["auto"]["mean_tokens"] / max(1e-9, bpo["thinking"]["mean_tokens"]),
            "< 1",
            bpo["auto"]["mean_tokens"] < bpo["thinking"]["mean_tokens"],
        ),
        "bpo auto accuracy - annealed auto accuracy": (
            bpo["auto"]["accuracy"] - annealed["auto"]["accuracy"],
            "> 0",
            bpo["auto"]["accuracy"] > annealed["auto"]["accuracy"],
        ),
    }
    return {name: {"value": value, "target": target, "met": met} for name, (value, target, met) in checks.items()}


def run_demo(out: Path, *, quick: bool = False, seed: int = 0, bpo: list[str] | None = None) -> dict[str, Any]:
    """Run every stage under ``out``; returns the report (with ``paper_signature`` and the run's wall time,
    ``seconds``). ``bpo``: overrides of the demo's BPO config (``key=value``), for the BPO and GRPO runs alike."""
    started = time.perf_counter()
    from r4b.config import load_config
    from r4b.eval import evaluate
    from r4b.synth import write_synthetic
    from r4b.train.bpo import BPOConfig, train_bpo
    from r4b.train.sft import SFTConfig, train_sft

    data = out / "data"
    sizes = {"n_sft": 128, "n_rl": 64, "n_eval": 32} if quick else {"n_sft": 1024}
    write_synthetic(data, seed=seed, **sizes)
    short = ["train.epochs=1"] if quick else []
    sft = train_sft(
        load_config(
            SFTConfig, CONFIGS / "sft.yaml", [f"output_dir={out / 'sft'}", f"data.train=[{data / 'sft.jsonl'}]", *short]
        )
    )
    rl = [f"model.path={sft / 'model'}", f"data.prompts=[{data / 'rl.jsonl'}]", f"data.eval={data / 'eval.jsonl'}"]
    rl += ["train.steps=2", "train.prompts_per_step=4", "rollout.max_new_tokens=24"] if quick else []
    runs = {}
    for name, strategy in (("bpo", "bpo"), ("grpo", "grpo")):
        config = load_config(
            BPOConfig,
            CONFIGS / "bpo.yaml",
            [f"output_dir={out / name}", f"rollout.strategy={strategy}", *rl, *(bpo or [])],
        )
        runs[name] = train_bpo(config)
    models = {"annealed": sft / "model", "bpo": runs["bpo"] / "model", "grpo": runs["grpo"] / "model"}
    report = evaluate(models, data / "eval.jsonl", out / "eval", max_new_tokens=24 if quick else 96, batch_size=64)
    from r4b.models.model_card import update_model_card

    for name, path in models.items():  # each export's card gets its per-mode table
        update_model_card(path, report, name)
    report["paper_signature"] = paper_signature(report)
    report["seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="the end-to-end demo on the embedded tiny model (CPU)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bpo", action="append", default=[], metavar="KEY=VALUE",
        help="an override of the demo's BPO config for BPO and GRPO (repeatable): rollout.filter_groups=true",
    )  # fmt: skip
    parser.set_defaults(run=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    report = run_demo(args.out, quick=args.quick, seed=args.seed, bpo=args.bpo)
    print(f"\nreport: {args.out / 'report.json'} (and {args.out / 'eval' / 'report.md'})")
    for name, check in report["paper_signature"].items():
        status = "met" if check["met"] else "not met"
        print(f"  {name:<45} {check['value']:+.3f}  target {check['target']:<9} {status}")
    for flag in report.get("forced_mode_flags", []):
        print(f"  warning: {flag['message']}")
    return 0


SWEEP_COLUMNS = (
    ("trigger hard - easy", "bpo trigger rate hard - easy", "{:+.3f}"),
    ("auto acc - best forced", "bpo auto accuracy - best forced", "{:+.3f}"),
    ("auto / thinking tokens", "bpo auto tokens / thinking tokens", "{:.3f}"),
    ("BPO - annealed auto acc", "bpo auto accuracy - annealed auto accuracy", "{:+.3f}"),
)


def sweep_table(out: str | Path, seeds: list[int]) -> str:
    """A markdown table of ``scripts/demo_sweep.sh``'s runs ``out/seed-S``: per seed the four targets (a value
    not met is in bold), the forced-mode trigger rates after BPO (thinking should be 1, non-thinking 0), whether all
    four are met and the wall time; seeds without a report are listed as not finished."""
    head = [name for name, _, _ in SWEEP_COLUMNS]
    head += ["BPO forced thinking / non-thinking trigger", "targets met", "minutes"]
    lines = ["| seed | " + " | ".join(head) + " |", "|---:|" + "---:|" * len(head)]
    met_seeds = []
    for seed in seeds:
        run = Path(out) / f"seed-{seed}"
        seconds = (run / "seconds").read_text().strip() if (run / "seconds").exists() else None
        minutes = f"{int(seconds) / 60:.1f}" if seconds else "-"
        if not (run / "report.json").exists():
            lines.append(f"| {seed} | " + " | ".join(["-"] * (len(head) - 1)) + f" | {minutes} |")
            continue
        report = json.loads((run / "report.json").read_text())
        signature = paper_signature(report)
        cells = []
        for _, key, fmt in SWEEP_COLUMNS:
            text = fmt.format(signature[key]["value"])
            cells.append(text if signature[key]["met"] else f"**{text}**")
        bpo = report["models"]["bpo"]
        cells.append(f"{bpo['thinking']['trigger_rate']:.3f} / {bpo['non_thinking']['trigger_rate']:.3f}")
        met = sum(check["met"] for check in signature.values())
        met_seeds += [seed] if met == len(signature) else []
        cells += [f"{met}/{len(signature)}", minutes]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    targets = (
        "trigger hard - easy >= 0.3, auto acc - best forced >= -0.05, auto / thinking tokens < 1, BPO - annealed > 0"
    )
    lines += ["", f"Targets: {targets}. All four met on seeds {met_seeds} of {seeds}."]
    return "\n".join(lines)
