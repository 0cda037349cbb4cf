"""scripts/gpu_checks.sh on a CPU: its order, the wheel check that stops a run in its first second, and a run cut
off mid-stage that keeps the benchmark rows measured so far (each suite's JSON too)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_checks.sh"
REPORT = ROOT / "scripts" / "gpu_report.py"
PINS = ROOT / "scripts" / "gpu_wheels.txt"


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("R4B_GPU_")}
    return env | {"OUT": str(tmp_path / "out"), "R4B_GPU_WORK": str(tmp_path / "work"), "PY": sys.executable, **extra}


def _steps(plan: str) -> list[str]:
    return [line.split()[0] for line in plan.splitlines()[1:] if not line.startswith("--")]


@pytest.mark.subprocess
def test_plan_orders_the_steps_by_value(tmp_path):
    """The new benchmark rows right after the install, alone; then the tests of the new kernels, the older ones, the
    gpu-marked tests and the training runs together; then the vLLM checks alone; sft_step and bpo_step last. Nothing
    runs."""
    out = subprocess.run(["bash", SCRIPT, "plan"], env=_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    steps = _steps(out.stdout)
    assert steps == [
        "install", "import-cuda-alone", "import-native", "fused_loss-new", "attention-new", "kernel-tests-new",
        "kernel-tests", "gpu-marked", "prep", "sft", "sft-result", "bpo", "bpo-result", "vllm-tests", "vllm-bench",
        "sft_step", "bpo_step",
    ]  # fmt: skip
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if not line.startswith("--")}
    assert "--impls r4b-cublas r4b-cublas-fast r4b" in lines["fused_loss-new"]
    assert "--impls r4b-schedule r4b-kernel torch-fa2 flex r4b" in lines["attention-new"]
    assert "torch.distributed.run" not in out.stdout and "torchrun" not in out.stdout  # no rendezvous
    for name in ("kernel-tests-new", "kernel-tests", "gpu-marked"):
        assert " -v " in lines[name] and "--timeout=60" in lines[name], name
    assert "-- in parallel: kernel_tests_new kernel_tests gpu_marked train" in out.stdout
    assert not (tmp_path / "out").exists()


def _fake_wheels(directory: Path) -> None:
    """One stand-in wheel per pin, named as pip names them, and their SHA256SUMS."""
    directory.mkdir()
    for line in PINS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            (directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(line.encode())
    sums = [f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}" for w in sorted(directory.glob("*.whl"))]
    (directory / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def _check_wheels(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, REPORT, "check-wheels", directory, PINS], capture_output=True, text=True)


@pytest.mark.subprocess
def test_check_wheels_wants_exactly_the_pinned_set(tmp_path):
    wheels = tmp_path / "whl"
    _fake_wheels(wheels)
    assert _check_wheels(wheels).returncode == 0
    liger = next(wheels.glob("liger_kernel-*.whl"))
    liger.write_bytes(b"cut off while carried")
    (wheels / "trl-0.1.0-py3-none-any.whl").write_bytes(b"an older version left behind")
    next(wheels.glob("dill-*.whl")).unlink()
    out = _check_wheels(wheels)
    assert out.returncode == 3 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"damaged: {liger.name}" in out.stderr and "not pinned: trl-0.1.0" in out.stderr
    assert "missing dill==" in out.stderr and "scripts/gpu_wheels.sh" in out.stderr


def test_every_carried_wheel_is_pinned():
    pins = [line for line in PINS.read_text().splitlines() if line and not line.startswith("#")]
    assert pins and all(line.count("==") == 1 and line.split("==")[1] for line in pins)
    wheels_script = (ROOT / "scripts" / "gpu_wheels.sh").read_text()
    assert "rm -rf .whl" in wheels_script and "SHA256SUMS" in wheels_script


@pytest.mark.subprocess
def test_a_missing_wheel_stops_the_run_in_its_first_second(tmp_path):
    (tmp_path / "whl").mkdir()
    env = _env(tmp_path, R4B_GPU_WHEELS=str(tmp_path / "whl"))
    t0 = time.monotonic()
    out = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stdout + out.stderr
    assert time.monotonic() - t0 < 5  # a second on the GPU machine; this CPU is shared
    assert len(out.stderr.strip().splitlines()) == 1 and "missing liger-kernel==0.8.5" in out.stderr
    assert out.stdout == "" and not (tmp_path / "out").exists()  # nothing else ran


def _wait_for_rows(out_dir: Path, proc: subprocess.Popen, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        rows = [json.loads(line) for f in out_dir.glob("rows-*.jsonl") for line in f.read_text().splitlines()]
        if rows:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"no benchmark row within {timeout} s (script rc {proc.poll()})")


@pytest.mark.subprocess
def test_a_run_cut_off_mid_stage_keeps_the_rows_measured(tmp_path):
    """The dry run's first benchmark stage (smoke sizes, Triton's interpreter), SIGTERM to the script once a row is
    in $OUT: the running suite ends through its finally-blocks (this script -> timeout -> the suite), its JSON holds
    the rows so far marked interrupted, every row measured is in the rows JSONL with what ran, the rest is skipped."""
    env = _env(tmp_path, R4B_GPU_DRY="1", R4B_GPU_SKIP_INSTALL="1")
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(["bash", SCRIPT, "bench-new"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        _wait_for_rows(out_dir, proc, timeout=75)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, stdout

    log = (out_dir / "gpu_checks.log").read_text()
    assert log.index("=== import-native") < log.index("=== fused_loss-new") < log.index("=== attention-new: skipped")
    entries = [json.loads(line) for line in (out_dir / "gpu_checks.jsonl").read_text().splitlines()]
    steps = {e["step"]: e for e in entries if "step" in e}
    assert steps["fused_loss-new"]["status"] == "terminated" and steps["attention-new"]["status"] == "skipped"

    (rows_file,) = out_dir.glob("rows-*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert rows and {r["suite"] for r in rows} == {"fused_loss"}
    assert rows[0]["impl"] == "r4b-cublas"  # the new rows first
    for row in rows:
        assert {"device", "versions", "method", "accumulation", "ms", "within_tolerance"} <= row.keys(), row
        assert {"torch", "triton", "r4b", "liger-kernel"} <= row["versions"].keys()
    started = log.split("=== fused_loss-new (limit ")[1].split(", from ")[1].split(")")[0]
    first_row_after = dt.datetime.fromisoformat(rows[0]["measured_at"]) - dt.datetime.fromisoformat(started)
    assert first_row_after.total_seconds() < 60  # within the first minute of the benchmark stage

    (suite_json,) = out_dir.glob("fused_loss-*.json")
    record = json.loads(suite_json.read_text())
    assert record["status"] == "interrupted: SIGTERM"
    assert [(r["impl"], r["mode"], r["N"]) for r in record["rows"]] == [(r["impl"], r["mode"], r["N"]) for r in rows]
    assert "rows fused_loss: " in stdout and "terminated" in stdout
