"""`r4b bpo` with its length controls on the embedded tiny model (CPU): reward.overlong=mask drops cut rollouts
from the update, reward.thought_budget's penalty shows in the metrics, and the defaults leave the step as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import DEMO_BPO, ROOT, run_two_ranks, synthetic_data, tiny_bpo

from r4b.config import load_config
from r4b.config.loading import ConfigError
from r4b.models.tokenizer import load_tokenizer
from r4b.rollout import Rollout, RolloutEngine
from r4b.rollout.prompts import encode_for_generation, stop_token_ids
from r4b.train.bpo import BPOConfig, BPOTrainer, train_bpo

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=2, n_rl=12, n_eval=4)


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_bpo(data, out, *extra)


class CuttingEngine(RolloutEngine):
    """Per prompt: a thought closed and answered wrong, and one cut at the token limit; two direct answers, wrong.
    The thought is longer than the demo's reward.min_thought_chars, so neither thinking rollout is off-mode."""

    THOUGHT = "I count the shapes one by one then add"

    def __init__(self, trainer: BPOTrainer) -> None:
        self.tokenizer, self.processor = trainer.tokenizer, trainer.processor
        self.stop = stop_token_ids(self.tokenizer)[0]

    def texts(self, mode: str) -> list[tuple[str, bool]]:
        if mode == "thinking":
            return [(f"{self.THOUGHT}\n</think>\n\n\\boxed{{x}}", True), (self.THOUGHT, False)]
        return [("\n\n\\boxed{x}", True)]

    def generate(self, prompts, *, n, mode, sampling):
        encoded = encode_for_generation(self.tokenizer, self.processor, prompts, n=n, mode=mode, suffix=None)
        rows = []
        for enc in encoded:
            texts = self.texts(mode)
            row = []
            for k in range(n):
                text, finished = texts[k % len(texts)]
                ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.stop] * finished
                row.append(Rollout(list(enc.ids), ids, text, finished, mode))
            rows.append(row)
        return rows

    def load_weights(self, weights) -> None:  # the scripted texts do not depend on the weights
        pass


def scripted_step(data: Path, out: Path, *extra: str) -> dict:
    trainer = BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, out, "rollout.max_new_tokens=40", *extra)))
    trainer.rollout_engine = CuttingEngine(trainer)
    return trainer.step(0)


def test_mask_drops_cut_rollouts_from_the_update(data, tmp_path):
    plain = scripted_step(data, tmp_path / "none")
    masked = scripted_step(data, tmp_path / "mask", "reward.overlong=mask")
    assert plain["responses"] == 16 and masked["responses"] == 12  # 4 prompts x 2g, less one cut thought each
    thought = len(load_tokenizer().encode(CuttingEngine.THOUGHT, add_special_tokens=False))
    assert plain["tokens"] - masked["tokens"] == 4 * thought  # token-mean's denominator lost every cut token
    assert plain["thinking"]["truncated"] == masked["thinking"]["truncated"] == 0.5
    assert masked["thinking"]["masked"] == 0.5 and masked["non_thinking"]["masked"] == 0.0
    assert "masked" not in plain["thinking"]  # the defaults act on nothing


def test_thought_budget_penalty_shows_in_the_metrics(data, tmp_path):
    plain = scripted_step(data, tmp_path / "none")
    budget = scripted_step(data, tmp_path / "budget", "reward.thought_budget=4", "reward.thought_budget_penalty=0.5")
    assert budget["thinking"]["thought_tokens"] == 10.5  # 11 before </think> (the "\n" too); 10 in the cut one
    assert budget["thinking"]["thought_penalty"] == 0.5  # 10 tokens: over twice the budget, the whole penalty
    assert budget["thinking"]["reward"] == pytest.approx(plain["thinking"]["reward"] - 0.5)
    assert budget["non_thinking"]["reward"] == plain["non_thinking"]["reward"]  # thinking mode only


def test_r4b_bpo_with_both_controls_on_the_tiny_model(data, tmp_path):
    """The untrained tiny model rarely stops within 6 tokens: most rollouts are cut and masked, and a step whose
    every rollout was cut makes no update."""
    run = tmp_path / "run"
    extra = ("train.steps=2", "reward.overlong=mask", "reward.thought_budget=2")
    train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, run, *extra)))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        cut = sum(row[mode]["truncated"] * 8 for mode in ("thinking", "non_thinking"))
        for mode in ("thinking", "non_thinking"):
            assert row[mode]["masked"] == row[mode]["truncated"]
        assert row["thinking"]["thought_penalty"] > 0 and row["non_thinking"]["thought_penalty"] == 0
        if row.get("all_masked"):
            assert cut == 16 and "loss" not in row
        else:
            assert row["responses"] == 16 - round(cut)


def test_overlong_buffer_over_max_new_tokens_is_a_config_error(data, tmp_path):
    extra = ("reward.overlong=soft", "reward.overlong_buffer=7")
    with pytest.raises(ConfigError, match=r"reward\.overlong_buffer=7 is over rollout\.max_new_tokens=6"):
        BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "bad", *extra)))


def test_resume_gives_the_uninterrupted_run_with_both_controls(data, tmp_path):
    """The controls keep no state across steps: a run stopped after step 1 and resumed equals the straight run."""
    extra = ("reward.overlong=soft", "reward.overlong_buffer=3", "reward.thought_budget=2", "train.steps=2",
             "train.save_every=1", "train.stop_after_flat_steps=0")  # fmt: skip
    straight = train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "a", *extra)))
    train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "b", *extra, "train.max_steps=1")))
    resumed = train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "b", *extra)))
    keys = ("step", "reward", "loss", "grad_norm", "thinking", "non_thinking")
    rows = lambda run: [{k: json.loads(line)[k] for k in keys} for line in (run / "metrics.jsonl").open()]
    assert rows(resumed) == rows(straight) and len(rows(straight)) == 2


@pytest.mark.multiprocess
def test_two_ranks_give_the_one_rank_run_with_both_controls(data, tmp_path):
    """The overlong penalty and the thought budget shape the same rewards on every rank and the updates agree:
    2 processes = 1, step for step (soft, not mask: the untrained tiny model's rollouts are nearly all cut, and
    masking them all would leave nothing to update)."""
    extra = ("reward.overlong=soft", "reward.overlong_buffer=3", "reward.thought_budget=2", "train.steps=2",
             "train.stop_after_flat_steps=0")  # fmt: skip
    one = train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "one", *extra)))
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    two = overrides(data, tmp_path / "two", *extra, "engine.kind=fsdp2")
    run_two_ranks(["-m", "r4b", "bpo", "--config", str(DEMO_BPO), *two], env=env, cwd=ROOT, timeout=300,
                  fresh=tmp_path / "two")  # fmt: skip
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows(one), rows(tmp_path / "two"), strict=True):
        assert (a["reward"], a.get("responses"), a["thinking"], a["non_thinking"]) == (
            b["reward"], b.get("responses"), b["thinking"], b["non_thinking"])  # fmt: skip
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
