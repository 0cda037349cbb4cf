"""bench/bpo_step.py --smoke runs on a CPU and writes its JSON (shared vs unshared in the same run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bpo_step_benchmark_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(ROOT / "bench" / "bpo_step.py"), "--smoke", "--out", str(tmp_path)]
    subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=120, capture_output=True)
    (path,) = tmp_path.glob("bpo_step-*.json")
    record = json.loads(path.read_text())
    assert record["suite"] == "bpo_step"
    assert {"device", "torch", "triton", "date", "command", "rows", "ratios", "environment", "config"} <= set(record)
    rows = {(r["impl"], r["mode"]): r for r in record["rows"]}
    modes = ("update", "logprobs", "full-step (tiny model)")
    assert set(rows) == {(i, m) for i in ("r4b-shared", "unshared") for m in modes}
    for row in rows.values():
        assert row["ms"] > 0 and row["responses"] == 8 and row["packed_tokens"] > 0
    for impl in ("r4b-shared", "unshared"):  # a whole step: rollout, reward, log-probs, update
        full = rows[impl, "full-step (tiny model)"]
        assert {"rollout_ms", "reward_ms", "logprobs_ms", "update_ms"} <= set(full) and full["rollout_ms"] > 0
    assert rows["unshared", "update"]["packed_tokens"] > rows["r4b-shared", "update"]["packed_tokens"]
    (update,) = [r for r in record["ratios"] if r["mode"] == "update"]
    assert update["vs"] == "unshared" and update["shared_speedup"] > 0 and update["packed_token_ratio"] > 1
