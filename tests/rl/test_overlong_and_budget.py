"""BPO's length controls on hand-made rollouts: reward.overlong (mask / soft) and reward.thought_budget, their
arithmetic, the batch and advantages under mask, their per-mode metrics, and the eval's thought-length
percentiles."""

from __future__ import annotations

import json

import pytest
import torch

from r4b.config.sections import RewardSection
from r4b.eval.metrics import compute_metrics, thought_percentiles
from r4b.rl import RolloutBatch, compute_advantages, rollout_metrics
from r4b.rl.shaping import kept_rollouts, shape_rewards, think_close_token, thought_tokens
from r4b.rollout import Rollout

CLOSE, STOP, WORD = 99, 98, 5  # </think>, the stop token, any other token


def thinking(thought: int, *, closed: bool = True, answer: str = "3", finished: bool = True) -> Rollout:
    """A forced thought of ``thought`` tokens (0: an empty, off-mode one), closed and answered or not."""
    ids = [WORD] * thought + ([CLOSE, WORD] if closed else []) + [STOP] * finished
    text = ("I count them" if thought else "") + (f"\n</think>\n\n\\boxed{{{answer}}}" if closed else "")
    return Rollout([1, 2], ids, text, finished, "thinking")


def direct(length: int, *, answer: str = "3", finished: bool = True) -> Rollout:
    ids = [WORD] * (length - finished) + [STOP] * finished
    return Rollout([1, 3], ids, f"\n\n\\boxed{{{answer}}}" if finished else "\n\nthe", finished, "non_thinking")


def test_defaults_change_nothing():
    rows = [[thinking(3), thinking(40, closed=False, finished=False), direct(4), direct(10, finished=False)]]
    shaped = shape_rewards(rows, ["3"], RewardSection())
    assert shaped.rewards.tolist() == [[1.0, 0.0, 1.0, 0.0]]  # cut rollouts have no answer: 0, as today
    assert shaped.keep is None and shaped.penalties == {} and kept_rollouts(rows, RewardSection()) is None
    assert shaped.truncated.tolist() == [[False, True, False, True]]  # logged, not acted on


def test_soft_overlong_is_dapos_linear_penalty_before_the_off_mode_override():
    """max_new_tokens 10, buffer 4: no penalty up to 6 tokens, then 1/4 per token, 1 at 10."""
    reward = RewardSection(overlong="soft", overlong_buffer=4)
    rows = [[direct(6), direct(8), direct(10, finished=False), direct(10, answer="7")]]
    shaped = shape_rewards(rows, ["3"], reward, max_new_tokens=10)
    assert shaped.penalties["overlong_penalty"].tolist() == [[0.0, 0.5, 1.0, 1.0]]
    assert shaped.rewards.tolist() == [[1.0, 0.5, -1.0, -1.0]]  # 1 - 0.5; 0 - 1; a wrong answer 0 - 1
    off = [[thinking(0, closed=True), direct(10)]]  # an empty thought: off-mode keeps exactly reward.off_mode
    assert shape_rewards(off, ["3"], reward, max_new_tokens=10).rewards.tolist() == [[-1.0, 0.0]]
    with pytest.raises(ValueError, match="max_new_tokens"):
        shape_rewards(rows, ["3"], reward)


def test_thought_budget_penalises_long_thoughts_linearly_in_thinking_mode_only():
    """Budget 4, penalty 0.5: a thought of 6 tokens loses 0.5 * 2/4, one of 8 or more the whole 0.5."""
    reward = RewardSection(thought_budget=4, thought_budget_penalty=0.5)
    rows = [[thinking(4), thinking(6), thinking(12), direct(30)]]
    shaped = shape_rewards(rows, ["3"], reward, think_close_id=CLOSE)
    assert shaped.penalties["thought_tokens"].tolist() == [[4.0, 6.0, 12.0, 0.0]]
    assert shaped.penalties["thought_penalty"].tolist() == [[0.0, 0.25, 0.5, 0.0]]
    assert shaped.rewards.tolist() == [[1.0, 0.75, 0.5, 1.0]]  # the long direct answer is never penalised
    # an unclosed thought counts every token but the stop token; a cut one every token
    assert thought_tokens(thinking(7, closed=False), CLOSE) == 7
    assert thought_tokens(thinking(7, closed=False, finished=False), CLOSE) == 7
    with pytest.raises(ValueError, match="think_close_id"):
        shape_rewards(rows, ["3"], reward)


def test_think_close_token_is_one_token_of_the_tiny_tokenizer(tokenizer):
    close = think_close_token(tokenizer)
    assert tokenizer.convert_ids_to_tokens(close) == "</think>"
    ids = tokenizer.encode("a b\n</think>\n\nc", add_special_tokens=False)
    assert thought_tokens(Rollout([1], ids, "", True, "thinking"), close) == ids.index(close)


def test_mask_leaves_truncated_rollouts_out_of_the_group_and_the_batch():
    """Prompt 0: thinking [right, cut], non-thinking [wrong, right]; prompt 1: every rollout cut."""
    rows = [
        [thinking(3), thinking(9, closed=False, finished=False), direct(3, answer="7"), direct(3)],
        [thinking(9, closed=False, finished=False)] * 2 + [direct(9, finished=False)] * 2,
    ]
    reward = RewardSection(overlong="mask")
    shaped = shape_rewards(rows, ["3", "3"], reward)
    assert shaped.keep.tolist() == [[True, False, True, True], [False] * 4]
    advantages = compute_advantages(shaped.rewards, valid=shaped.keep)
    # prompt 0's group is its three finished rollouts, rewards [1, 0, 1]: mean 2/3, unbiased std 1/sqrt(3)
    expected = torch.tensor([1 / 3, 0.0, -2 / 3, 1 / 3]) * 3**0.5
    assert torch.allclose(advantages[0], expected, atol=1e-5)
    assert advantages[1].tolist() == [0.0] * 4  # a group with no finished rollout teaches nothing
    # without the mask the cut thought (0: no answer) would sit in the mean and push its siblings up
    assert compute_advantages(shaped.rewards)[0, 0] > advantages[0, 0]

    batch = RolloutBatch.from_rollouts(rows, advantages, keep=shaped.keep)
    assert batch.source == [(0, 0), (0, 2), (0, 3)] and batch.entry_prompts == [0, 0]
    assert batch.response_lengths.tolist() == [6, 3, 3]  # token-mean's denominator holds no cut token
    assert torch.allclose(batch.advantages, expected[[0, 2, 3]], atol=1e-5)
    with pytest.raises(ValueError, match="no rollouts"):
        RolloutBatch.from_rollouts(rows, advantages, keep=torch.zeros(2, 4, dtype=torch.bool))


def test_per_mode_advantages_mask_each_mode_apart():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 5.0, 1.0]])
    valid = torch.tensor([[True, True, False, True, True]])
    out = compute_advantages(rewards, "per_mode", num_thinking=3, valid=valid)
    half = 0.5 / (0.5**0.5 + 1e-6)
    assert torch.allclose(out, torch.tensor([[half, -half, 0.0, 2 / (8**0.5 + 1e-6), -2 / (8**0.5 + 1e-6)]]))
    with pytest.raises(ValueError, match="valid must have the shape"):
        compute_advantages(rewards, valid=valid[:, :2])


def test_metrics_show_truncation_masking_and_penalties_per_mode():
    rows = [[thinking(6), thinking(9, closed=False, finished=False), direct(3), direct(10, finished=False)]]
    reward = RewardSection(overlong="mask", thought_budget=4, thought_budget_penalty=0.5)
    shaped = shape_rewards(rows, ["3"], reward, think_close_id=CLOSE)
    out = rollout_metrics(rows, shaped.rewards, shaped.scores, shaped.formats, shaped.off,
                          per_mode=shaped.per_mode_metrics())  # fmt: skip
    assert out["thinking"]["truncated"] == 0.5 and out["thinking"]["masked"] == 0.5
    assert out["non_thinking"]["truncated"] == 0.5 and out["non_thinking"]["masked"] == 0.5
    assert out["thinking"]["thought_penalty"] == pytest.approx((0.25 + 0.5) / 2)  # thoughts of 6 and 9 tokens
    assert out["thinking"]["thought_tokens"] == 7.5 and out["non_thinking"]["thought_penalty"] == 0.0
    assert "truncated" not in rollout_metrics(rows, shaped.rewards, shaped.scores, None)["thinking"]


def test_eval_reports_thought_length_percentiles_per_mode():
    record = lambda mode, n, thinking=True: {"model": "m", "mode": mode, "correct": True, "thinking": thinking,
                                             "tokens": n + 3, "finished": True, "thought_tokens": n}  # fmt: skip
    records = [record("thinking", n) for n in (10, 20, 30, 40, 50)] + [record("auto", 7)]
    records += [record("auto", 99, thinking=False), {**record("non_thinking", 0, False)}]
    assert thought_percentiles(records[:5]) == {"p50": 30.0, "p90": 46.0, "p99": 49.6}  # linear interpolation
    metrics = compute_metrics(records)["m"]
    assert metrics["thinking"]["thought_tokens"]["p90"] == 46.0
    assert metrics["auto"]["thought_tokens"] == {"p50": 7.0, "p90": 7.0, "p99": 7.0}  # thinking responses only
    assert metrics["non_thinking"]["thought_tokens"] == {"p50": None, "p90": None, "p99": None}


def test_r4b_eval_counts_thoughts_of_the_tiny_model(tmp_path):
    """Every thinking prediction carries its thought's token count, and report.json its percentiles per mode."""
    from r4b.eval import evaluate
    from r4b.synth import write_synthetic

    write_synthetic(tmp_path, n_sft=1, n_rl=1, n_eval=4, seed=0)
    report = evaluate("tiny", tmp_path / "eval.jsonl", tmp_path / "out", modes=["thinking"], max_new_tokens=6,
                      batch_size=4, progress=False, plots=False)  # fmt: skip
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    thinking = [r for r in records if r["thinking"]]
    assert thinking and all(0 <= r["thought_tokens"] <= r["tokens"] for r in thinking)
    assert all("thought_tokens" not in r for r in records if not r["thinking"])
    assert report["models"]["tiny"]["thinking"]["thought_tokens"] == thought_percentiles(records)
