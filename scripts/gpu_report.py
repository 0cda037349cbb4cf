"""The bookkeeping of scripts/gpu_checks.sh (standard library only, so it runs before r4b is installed).

python scripts/gpu_report.py record JSONL NAME STATUS RC SECONDS LIMIT OUTPUT_FILE   # one step's JSON line
python scripts/gpu_report.py run DIR                  # one line of JSON: what a training run's metrics say
python scripts/gpu_report.py table JSONL              # the steps as a table (the end of the device's reply)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# What a step's output says, by the first pattern that matches (searched from the end of the output).
SUMMARY_PATTERNS = [
    re.compile(r"^(=+ )?(\d+ [a-z]+|no tests ran)(, \d+ [a-z]+)* in [0-9.]+s( \(.*\))?( =+)?$"),  # pytest
    re.compile(r"^wrote .*"),
    re.compile(r"^\{.*\}$"),
]


def _summary(output: Path) -> str:
    """The line of a step's output that says most: pytest's result line, "wrote ...", or its last line."""
    try:
        lines = [line.strip() for line in output.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    for pattern in SUMMARY_PATTERNS:
        for line in reversed(lines):
            if pattern.match(line):
                return line[:1000]
    return lines[-1][-1000:] if lines else ""


def record(jsonl: str, name: str, status: str, rc: str, seconds: str, limit: str, output: str) -> None:
    entry = {"step": name, "status": status, "rc": int(rc), "seconds": int(seconds), "limit_s": int(limit)}
    entry["summary"] = _summary(Path(output))
    with open(jsonl, "a") as handle:  # one short append per step: parallel steps never interleave within a line
        handle.write(json.dumps(entry) + "\n")


def run(directory: str) -> None:
    """Steps, first and last loss, mean tokens/s (or the BPO time split), the export and the checkpoints."""
    run_dir = Path(directory)
    metrics = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "step" in m and "loss" in m]
    out: dict = {"run": str(run_dir), "steps": len(steps)}
    if steps:
        out["loss_first"], out["loss_last"] = steps[0]["loss"], steps[-1]["loss"]
        out["grad_norm_last"] = steps[-1].get("grad_norm")
        rates = [m["tokens_per_s"] for m in steps if isinstance(m.get("tokens_per_s"), (int, float))]
        out["tokens_per_s_mean"] = sum(rates) / len(rates) if rates else None
        for key in ("reward", "kl", "entropy", "time", "packed_tokens", "tokens"):
            if key in steps[-1]:
                out[f"{key}_last"] = steps[-1][key]
    evals = [m for m in metrics if "eval_auto" in m]
    if evals:
        out["eval_auto"] = evals[-1]["eval_auto"]
    out["exported"] = (run_dir / "model" / "config.json").exists()
    out["checkpoints"] = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    print(json.dumps(out, default=str))


def table(jsonl: str) -> None:
    entries = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    print(f"{'step':<16} {'status':<8} {'rc':>4} {'s':>5} {'limit':>5}  summary")
    for e in entries:
        if "step" not in e:
            continue
        head = f"{e['step']:<16} {e['status']:<8} {e['rc']:>4} {e['seconds']:>5} {e['limit_s']:>5}"
        print(f"{head}  {e['summary'][:150]}")


def main(argv: list[str]) -> int:
    command, *args = argv
    {"record": record, "run": run, "table": table}[command](*args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
