"""bench/bpo_step.py --smoke runs on a CPU and writes its JSON (shared vs unshared, r4b vs TRL, in the same run)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FULL = "full-step (tiny model)"


@pytest.mark.subprocess
def test_bpo_step_benchmark_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(ROOT / "bench" / "bpo_step.py"), "--smoke", "--out", str(tmp_path)]
    subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=120, capture_output=True)
    (path,) = tmp_path.glob("bpo_step-*.json")
    record = json.loads(path.read_text())
    assert record["suite"] == "bpo_step"
    assert {"device", "torch", "triton", "date", "command", "rows", "ratios", "environment", "config"} <= set(record)
    assert {"trl", "trl_ratios"} <= set(record)
    rows = {(r["impl"], r["mode"]): r for r in record["rows"]}
    has_trl = importlib.util.find_spec("trl") is not None  # the subprocess runs this same interpreter
    expected = {(i, m) for i in ("r4b-shared", "unshared") for m in ("update", "logprobs", FULL)}
    expected |= {("r4b-shared-grpo", FULL)} | ({("trl-grpo", FULL)} if has_trl else set())
    assert set(rows) == expected
    for row in rows.values():
        assert "error" not in row, row
        assert row["ms"] > 0 and row["responses"] == 8 and row["packed_tokens"] > 0
    for impl, mode in expected:  # a whole step: rollout, reward, log-probs, update
        if mode == FULL:
            full = rows[impl, mode]
            assert {"rollout_ms", "reward_ms", "logprobs_ms", "update_ms"} <= set(full) and full["rollout_ms"] > 0
            assert full["rollouts"] == ("grpo: 4 auto" if "grpo" in impl else "bpo: 2 thinking + 2 non-thinking")
    assert rows["unshared", "update"]["packed_tokens"] > rows["r4b-shared", "update"]["packed_tokens"]
    (update,) = [r for r in record["ratios"] if r["mode"] == "update"]
    assert update["vs"] == "unshared" and update["shared_speedup"] > 0 and update["packed_token_ratio"] > 1
    assert {r["vs"] for r in record["ratios"]} == {"unshared"}

    if not has_trl:  # recorded as skipped, no crash
        assert record["trl"]["version"] is None and record["trl"]["skipped"]
        assert record["trl_ratios"] == []
        return
    import trl

    assert record["trl"]["version"] == trl.__version__ == rows["trl-grpo", FULL]["trl_version"]
    assert record["environment"]["packages"]["trl"] == trl.__version__
    settings = record["trl"]
    assert settings["num_generations"] == 4 and settings["per_device_train_batch_size"] == 8
    assert settings["beta"] == 0 and settings["num_iterations"] == 1 and settings["max_completion_length"] == 8
    # TRL pads every row with the longest prompt; r4b packs each prompt once with its responses
    assert rows["trl-grpo", FULL]["packed_tokens"] > rows["r4b-shared-grpo", FULL]["packed_tokens"]
    vs_trl = {r["r4b"]: r for r in record["trl_ratios"]}
    assert set(vs_trl) == {"r4b-shared", "r4b-shared-grpo"}
    for ratio in vs_trl.values():
        assert ratio["vs"] == "trl-grpo" and ratio["speedup"] > 0 and ratio["rollout_speedup"] > 0
        assert ratio["update_speedup"] > 0 and ratio["token_ratio"] > 0
