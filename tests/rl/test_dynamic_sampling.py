"""rollout.filter_groups' arithmetic (r4b.rl.dynamic_sampling) on hand-made rewards: which BPO groups are empty,
which prompts refill a step, and the draws' bookkeeping."""

from __future__ import annotations

import torch

from r4b.rl import compute_advantages
from r4b.rl.dynamic_sampling import Draw, concat_draws, empty_groups, refill_indices, refill_size, select_rows
from r4b.rl.shaping import ShapedRewards

# one prompt per row, g = 2 thinking columns then 2 non-thinking ones
REWARDS = torch.tensor(
    [
        [1.0, 1.0, 1.0, 1.0],  # all right: empty
        [0.0, 0.0, 0.0, 0.0],  # all wrong: empty
        [1.0, 1.0, 0.0, 0.0],  # thinking right, non-thinking wrong: uniform per mode, BPO's clearest signal
        [1.0, 0.0, 0.0, 0.0],  # a signal in the thinking half
        [-1.0, -1.0, -1.0, -1.0],  # every rollout off-mode: empty
    ]
)


def test_empty_groups_are_joint_groups_of_one_reward():
    joint = compute_advantages(REWARDS, "joint", num_thinking=2)
    assert empty_groups(joint).tolist() == [True, True, False, False, True]
    per_mode = compute_advantages(REWARDS, "per_mode", num_thinking=2)
    assert empty_groups(per_mode).tolist() == [True, True, True, False, True]  # row 2 teaches nothing per mode
    dr_grpo = compute_advantages(REWARDS, "joint", num_thinking=2, scale_by_std=False)
    assert empty_groups(dr_grpo).tolist() == [True, True, False, False, True]


def test_empty_groups_count_only_the_rollouts_that_train():
    """reward.overlong=mask: a group whose kept rollouts share one reward is empty, whatever the cut ones got."""
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, False, True, True], [True, True, False, False], [True, False, False, False]])
    advantages = compute_advantages(rewards, "joint", valid=valid)
    assert empty_groups(advantages).tolist() == [True, False, True]


def test_refill_indices_are_new_deterministic_and_run_out():
    drawn = {0, 3, 5}
    first = refill_indices(7, 1, 4, 12, 0, drawn)
    assert first == refill_indices(7, 1, 4, 12, 0, drawn) and len(first) == 4 and not drawn & set(first)
    assert refill_indices(7, 2, 4, 12, 0, drawn) != first  # each round its own shuffle
    assert refill_indices(8, 1, 4, 12, 0, drawn) != first  # and each step
    assert sorted(refill_indices(7, 1, 100, 12, 0, drawn)) == sorted(set(range(12)) - drawn)
    assert refill_indices(7, 1, 4, 3, 0, {0, 1, 2}) == []


def test_refill_size_scales_by_the_share_kept():
    assert refill_size(missing=2, drawn=8, kept=4, limit=8) == 4
    assert refill_size(missing=3, drawn=8, kept=0, limit=8) == 8  # nothing kept yet: a full step's worth
    assert refill_size(missing=1, drawn=8, kept=7, limit=8) == 2


def draw(rows: torch.Tensor, tag: str) -> Draw:
    shaped = ShapedRewards(rows, rows, None, rows > 0, keep=None, truncated=rows < 0, penalties={"p": rows * 2})
    n = len(rows)
    return Draw([f"{tag}{i}" for i in range(n)], [None] * n, [[None]] * n, shaped, rows.float(), failures=1)


def test_concat_and_select_keep_the_rows_together():
    both = concat_draws([draw(REWARDS[:2], "a"), draw(REWARDS[2:], "b")])
    assert both.samples == ["a0", "a1", "b0", "b1", "b2"] and both.failures == 2
    assert torch.equal(both.shaped.rewards, REWARDS) and torch.equal(both.shaped.penalties["p"], REWARDS * 2)
    picked = select_rows(both, [3, 0])
    assert picked.samples == ["b1", "a0"] and len(picked) == 2
    for field in (picked.shaped.rewards, picked.shaped.off, picked.shaped.truncated, picked.advantages):
        assert field.shape[0] == 2
    assert torch.equal(picked.shaped.penalties["p"], REWARDS[[3, 0]] * 2) and picked.shaped.formats is None
