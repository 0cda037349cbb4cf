"""BPO that cannot learn says so: a step whose advantages are all 0 (every group's rewards equal) is flagged in the
metrics and the progress line, and ``train.stop_after_flat_steps`` such steps in a row stop the run with one line
and a checkpoint. The fault: a reward that is constant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import DEMO_BPO, synthetic_data, tiny_bpo

from r4b.cli import main
from r4b.rl import compute_advantages
from r4b.rl.metrics import rollout_metrics
from r4b.rl.reward import REWARDS
from r4b.rollout import Rollout
from r4b.train.logging import _status

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


def _rollouts(prompts: int, g: int) -> list[list[Rollout]]:
    modes = ["thinking"] * g + ["non_thinking"] * g
    row = [Rollout(prompt_ids=[0], response_ids=[1, 2], text="x", finished=True, mode=m) for m in modes]
    return [list(row) for _ in range(prompts)]


@pytest.mark.parametrize(("grouping", "flat"), [("joint", False), ("per_mode", True)])
def test_flat_is_read_from_the_advantages(grouping, flat):
    # each mode's rewards equal, the modes' differ: no signal under per_mode grouping only
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    advantages = compute_advantages(rewards, grouping, num_thinking=2)
    out = rollout_metrics(_rollouts(2, 2), rewards, rewards, None, advantages=advantages)
    assert out["flat"] is flat and out["zero_adv_groups"] == (1.0 if flat else 0.5)


def test_the_progress_line_warns_on_a_flat_step():
    row = {"loss": 0.0, "lr": 1e-3, "tokens_per_s": 10.0, "reward": 0.0, "flat": True, "flat_steps": 3}
    assert "no signal: each group's rewards equal (3 step(s) in a row)" in _status(row)
    assert "no signal" not in _status(row | {"flat": False, "flat_steps": 0})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=2, n_rl=8, n_eval=2)


def _bpo(data: Path, out: Path, *extra: str) -> list[str]:
    args = tiny_bpo(data, out, "rollout.max_new_tokens=4", "train.prompts_per_step=2", "policy.beta=0",
                    "reward.name=constant", "reward.off_mode=null", *extra)  # fmt: skip
    return ["bpo", "--config", str(DEMO_BPO), *args]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_constant_reward_stops_bpo_with_one_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(REWARDS, "constant", lambda response, answer, **_: 1.0)
    run = tmp_path / "stop"
    assert main(_bpo(data, run, "train.steps=3", "train.stop_after_flat_steps=2")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(err)
    assert "step 1: every group's rewards were equal: all advantages 0, nothing to learn" in err
    assert err[-1].startswith("r4b bpo: error: steps 1-2: every group's rewards were equal, so every advantage was 0")
    assert f"({run / 'checkpoint-2'} written)" in err[-1] and (run / "checkpoint-2").is_dir()
    rows = _rows(run)
    assert [(r["flat"], r["flat_steps"], r["zero_adv_groups"]) for r in rows] == [(True, 1, 1.0), (True, 2, 1.0)]
    assert all(r["loss"] == 0.0 for r in rows)

    run = tmp_path / "never"  # 0: flagged, never stopped
    assert main(_bpo(data, run, "train.steps=2", "train.stop_after_flat_steps=0")) == 0
    assert [r["flat_steps"] for r in _rows(run)] == [1, 2]
