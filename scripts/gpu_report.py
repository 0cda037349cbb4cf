"""The bookkeeping of scripts/gpu_checks.sh (standard library only, so it runs before r4b is installed).

python scripts/gpu_report.py check-wheels DIR PINS    # exit 3 with one line unless DIR holds exactly the pinned wheels
python scripts/gpu_report.py record JSONL NAME STATUS RC SECONDS LIMIT OUTPUT_FILE   # one step's JSON line
python scripts/gpu_report.py run DIR                  # one line of JSON: what a training run's metrics say
python scripts/gpu_report.py table JSONL [ROWS...]    # the steps as a table, and the benchmark rows measured
"""

from __future__ import annotations

import hashlib
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


def _canonical(name: str) -> str:
    """A distribution name as wheel files and pins both normalise it (PEP 503, underscores)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_problems(directory: Path, pins: Path) -> list[str]:
    """What keeps DIR from being the pinned set: a pin without its wheel, a wheel nobody pinned (two versions of a
    package stop the install), a wheel whose bytes differ from SHA256SUMS (cut off while carried)."""
    wanted = {}
    for line in pins.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            wanted[(_canonical(name), version)] = line.strip()
    found = {}
    for wheel in sorted(directory.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        found[(_canonical(name), version)] = wheel
    problems = [f"missing {pin}" for key, pin in wanted.items() if key not in found]
    problems += [f"not pinned: {wheel.name}" for key, wheel in found.items() if key not in wanted]
    sums = directory / "SHA256SUMS"
    if not sums.exists():
        return [*problems, "no SHA256SUMS"]
    for line in sums.read_text().splitlines():
        digest, _, filename = line.partition("  ")
        path = directory / filename
        if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"damaged: {filename}")
    return problems


def check_wheels(directory: str, pins: str) -> int:
    problems = wheel_problems(Path(directory), Path(pins))
    if problems:
        print(f"gpu_checks: {directory} is not the pinned set of {pins} ({'; '.join(problems)}): run "
              "bash scripts/gpu_wheels.sh where there is network and carry .whl", file=sys.stderr)  # fmt: skip
        return 3
    return 0


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
    out["checkpoint_gib"] = sum(f.stat().st_size for f in run_dir.glob("checkpoint-*/**/*") if f.is_file()) / 2**30
    print(json.dumps(out, default=str))


def table(jsonl: str, *rows_files: str) -> None:
    """The steps, then per suite how many benchmark rows reached the rows JSONL (and how many are errors or
    outside their tolerance)."""
    entries = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    print(f"{'step':<18} {'status':<10} {'rc':>4} {'s':>5} {'limit':>5}  summary")
    for e in entries:
        if "step" not in e:
            continue
        head = f"{e['step']:<18} {e['status']:<10} {e['rc']:>4} {e['seconds']:>5} {e['limit_s']:>5}"
        print(f"{head}  {e['summary'][:150]}")
    for rows_file in rows_files:
        counts: dict[str, list[int]] = {}
        for line in Path(rows_file).read_text().splitlines():
            row = json.loads(line)
            count = counts.setdefault(row["suite"], [0, 0, 0])
            count[0] += 1
            count[1] += "error" in row
            count[2] += row.get("within_tolerance") is False
        for suite, (total, errors, outside) in counts.items():
            print(f"rows {suite}: {total} measured, {errors} errors, {outside} outside tolerance ({rows_file})")


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "check-wheels":
        return check_wheels(*args)
    {"record": record, "run": run, "table": table}[command](*args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
