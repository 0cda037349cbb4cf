"""`r4b bpo` with its length controls on the embedded tiny model (CPU): reward.overlong=mask drops cut rollouts
from the update, reward.thought_budget's penalty shows in the metrics, and the defaults leave the step as it was."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
from helpers import DEMO_BPO, ROOT, run_two_ranks, synthetic_data, tiny_bpo

from r4b.config import load_config
from r4b.config.loading import ConfigError
from r4b.models.tokenizer import load_tokenizer
from r4b.rollout import Prompt, Rollout, RolloutEngine
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


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("policy.loss_type=cispo", "policy.importance_level=sequence"), r"does not apply to policy\.loss_type=cispo"),
        (("policy.delta=1.1",), r"delta=1\.1 must be above 1 \+ clip_eps_high"),
    ],
)
def test_policy_settings_that_cannot_combine_are_config_errors(data, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "bad", *extra)))
    assert not (tmp_path / "bad").exists()  # refused before the run directory


# The controls run for real on the untrained tiny model: the length penalties with the rollout correction (its
# weights near 1: the engine is the trainer's own model), and dynamic sampling where, without the off-mode reward,
# most groups are flat (every rollout cut: the same full overlong penalty) and a few are not.
LENGTH_CONTROLS = ("reward.overlong=soft", "reward.overlong_buffer=3", "reward.thought_budget=2",
                   "policy.rollout_correction=tis")  # fmt: skip
FILTERING = ("rollout.filter_groups=true", "reward.off_mode=null", "reward.overlong=soft", "reward.overlong_buffer=3")
CONTROLS = pytest.mark.parametrize("controls", [LENGTH_CONTROLS, FILTERING], ids=["length+correction", "filter_groups"])


@CONTROLS
def test_resume_gives_the_uninterrupted_run_with_the_controls(data, tmp_path, controls):
    """The controls keep no state across steps: a run stopped after step 1 and resumed equals the straight run."""
    extra = (*controls, "train.steps=2", "train.save_every=1", "train.stop_after_flat_steps=0")
    straight = train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "a", *extra)))
    train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "b", *extra, "train.max_steps=1")))
    resumed = train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "b", *extra)))
    keys = ("step", "reward", "loss", "grad_norm", "thinking", "non_thinking", "filter", "is_weight_mean")
    rows = lambda run: [{k: json.loads(line).get(k) for k in keys} for line in (run / "metrics.jsonl").open()]
    assert rows(resumed) == rows(straight) and len(rows(straight)) == 2
    if controls is FILTERING:  # the premise: filtering acted, and some step still trained
        assert any(r["filter"]["filtered"] > 0 for r in rows(straight))
        assert any(r["loss"] is not None for r in rows(straight))


@pytest.mark.multiprocess
@CONTROLS
def test_two_ranks_give_the_one_rank_run_with_the_controls(data, tmp_path, controls):
    """The controls shape the same rewards and keep the same prompts on every rank, and the updates agree:
    2 processes = 1, step for step (soft, not mask: the untrained tiny model's rollouts are nearly all cut, and
    masking them all would leave nothing to update)."""
    extra = (*controls, "train.steps=2", "train.stop_after_flat_steps=0")
    one = train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "one", *extra)))
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    two = overrides(data, tmp_path / "two", *extra, "engine.kind=fsdp2")
    run_two_ranks(["-m", "r4b", "bpo", "--config", str(DEMO_BPO), *two], env=env, cwd=ROOT, timeout=300,
                  fresh=tmp_path / "two")  # fmt: skip
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = 0
    for a, b in zip(rows(one), rows(tmp_path / "two"), strict=True):
        keys = ("reward", "responses", "thinking", "non_thinking", "filter")
        assert [a.get(k) for k in keys] == [b.get(k) for k in keys]
        if "loss" in a:
            trained += 1
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
            if controls is LENGTH_CONTROLS:  # the correction's weights, near 1 on both
                assert b["is_weight_mean"] == pytest.approx(a["is_weight_mean"], rel=1e-5)
    assert trained > 0


# -- rollout.filter_groups (dynamic sampling) ----------------------------------------------------------------------


def key(prompt: Prompt) -> tuple:
    """What tells the synthetic set's prompts apart: text and image pixels (texts repeat; so do a few images, with
    their answers)."""
    return repr(prompt.messages), tuple(image.tobytes() for image in prompt.images)


def counting(prompt: Prompt) -> bool:
    """The synthetic set's "How many ...?" prompts (5 of the test's 12), which :class:`SignalEngine` gives a
    signal."""
    return "How many" in repr(prompt.messages)


class SignalEngine(CuttingEngine):
    """Counting prompts are answered right when thinking and wrong when not (a joint group of two rewards: a signal
    under BPO's joint grouping, none per mode); the others wrong in both modes (no signal). ``seen``: whether each
    prompt asked for had a signal, in order."""

    def __init__(self, trainer: BPOTrainer) -> None:
        super().__init__(trainer)
        self.answers = {key(Prompt.from_sample(s).decoded()): s.answer for s in trainer.prompts}
        self.seen: list[bool] = []

    def generate(self, prompts, *, n, mode, sampling):
        encoded = encode_for_generation(self.tokenizer, self.processor, prompts, n=n, mode=mode, suffix=None)
        rows = []
        for prompt, enc in zip(prompts, encoded, strict=True):
            if mode == "thinking":
                self.seen.append(counting(prompt))
                answer = self.answers[key(prompt)] if counting(prompt) else "x"
                text = f"{self.THOUGHT}\n</think>\n\n\\boxed{{{answer}}}"
            else:
                text = "\n\n\\boxed{x}"
            ids = [*self.tokenizer.encode(text, add_special_tokens=False), self.stop]
            rows.append([Rollout(list(enc.ids), ids, text, True, mode) for _ in range(n)])
        return rows


def signal_step(data: Path, out: Path, *extra: str) -> tuple[dict, list[bool]]:
    config = load_config(BPOConfig, DEMO_BPO, overrides(data, out, "rollout.max_new_tokens=40", *extra))
    trainer = BPOTrainer(config)
    trainer.rollout_engine = engine = SignalEngine(trainer)
    return trainer.step(0), engine.seen


def test_filter_groups_refills_the_step_with_prompts_that_have_a_signal(data, tmp_path):
    plain, first = signal_step(data, tmp_path / "plain")
    assert "filter" not in plain and plain["responses"] == 16  # the defaults keep every prompt
    assert plain["zero_adv_groups"] == first.count(False) / 4
    assert 0 < plain["zero_adv_groups"] < 1  # the step's own draw mixes both kinds (the test's premise)

    filtered, seen = signal_step(data, tmp_path / "filtered", "rollout.filter_groups=true")
    assert seen[:4] == first and len(seen) > 4 and sum(seen) >= 4  # refilled until four prompts had a signal
    assert filtered["filter"] == {
        "rounds": filtered["filter"]["rounds"],
        "filtered": pytest.approx(seen.count(False) / len(seen)),
        "prompts": 4,
        "full": True,
    }
    assert filtered["filter"]["rounds"] > 1 and filtered["responses"] == 16  # 4 prompts x 2g, all with a signal
    assert filtered["zero_adv_groups"] == pytest.approx(seen.count(False) / len(seen))  # metrics: all drawn

    again, seen_again = signal_step(data, tmp_path / "again", "rollout.filter_groups=true")
    assert seen_again == seen and again["filter"] == filtered["filter"] and again["loss"] == filtered["loss"]


def test_filter_groups_drops_groups_by_their_advantages_joint_not_per_mode(data, tmp_path):
    """A prompt right in one mode and wrong in the other is uniform within each mode: kept under BPO's joint
    grouping (above), empty under per_mode grouping, where the step then runs out of rounds and trains on nothing."""
    extra = ("rollout.filter_groups=true", "rollout.max_filter_rounds=2", "advantages.grouping=per_mode")
    metrics, seen = signal_step(data, tmp_path / "per-mode", *extra)
    assert metrics["filter"] == {"rounds": 2, "filtered": 1.0, "prompts": 0, "full": False}
    assert len(seen) == 8 and "loss" not in metrics and metrics["flat"]


# -- policy.rollout_correction -------------------------------------------------------------------------------------


def test_rollout_correction_acts_on_a_mismatched_engine(data, tmp_path):
    """An engine whose log-probs put every other response token 0.5 nats below the trainer's: those tokens weigh
    e^0.5 > the cap, so mis drops them from the loss (and tis would cut them to the cap); the rest weigh 1."""
    extra = (
        "policy.rollout_correction=mis",
        "policy.rollout_correction_cap=1.2",
        "advantages.mode_decision_credit=false",
    )
    trainer = BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "mis", *extra)))
    generate = trainer.rollout_engine.generate

    def mismatched(prompts, *, n, mode, sampling):
        assert sampling.logprobs  # asked for because the correction needs them
        rows = generate(prompts, n=n, mode=mode, sampling=sampling)
        shift = lambda r: [lp - 0.5 * (k % 2) for k, lp in enumerate(r.logprobs)]
        return [[dataclasses.replace(r, logprobs=shift(r)) for r in row] for row in rows]

    trainer.rollout_engine.generate = mismatched
    metrics = trainer.step(0)
    lengths = [len(r.response_ids) for row in trainer.step_rollouts[1] for r in row]
    odd = sum(n // 2 for n in lengths)
    assert metrics["is_capped"] == pytest.approx(odd / sum(lengths), rel=1e-6)
    assert metrics["is_weight_max"] == pytest.approx(math.exp(0.5), rel=1e-4)
    assert metrics["is_weight_mean"] == pytest.approx((odd * math.exp(0.5) + sum(lengths) - odd) / sum(lengths), 1e-4)
