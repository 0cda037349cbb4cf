"""BPO advantages: joint-group GRPO normalisation (verl's unbiased std + eps), per-mode ablation, Dr. GRPO."""

from __future__ import annotations

import math

import pytest
import torch

from r4b.rl import compute_advantages

EPS = 1e-6
S2 = math.sqrt(2.0) / 2.0  # (1 - 0.5) / std([1, 0]) with the unbiased std sqrt(0.5)


def test_joint_matches_hand_computed_numbers():
    # Row 0: thinking [1, 0], non-thinking [1, 1]. mean 0.75; deviations [.25, -.75, .25, .25];
    # unbiased variance (3 * .0625 + .5625) / 3 = .25, std .5 -> [.5, -1.5, .5, .5] (over std + eps).
    # Row 1: [0, 0 | 1, 0]: mean .25, std .5 -> [-.5, -.5, 1.5, -.5].
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    expected = torch.tensor([[0.25, -0.75, 0.25, 0.25], [-0.25, -0.25, 0.75, -0.25]]) / (0.5 + EPS)
    out = compute_advantages(rewards)
    assert out.dtype == torch.float32 and out.shape == rewards.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(out, compute_advantages(rewards, "joint", num_thinking=1))  # joint ignores g


def test_per_mode_normalises_each_half():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    # thinking [1, 0] -> [+s, -s] with s = .5 / (sqrt(.5) + eps); non-thinking [1, 1] -> 0; row 1 the mirror image
    s = 0.5 / (math.sqrt(0.5) + EPS)
    expected = torch.tensor([[s, -s, 0.0, 0.0], [0.0, 0.0, s, -s]])
    torch.testing.assert_close(compute_advantages(rewards, "per_mode"), expected, rtol=0, atol=1e-7)


def test_dr_grpo_only_centres():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.2, 0.8, 0.5, 0.5]])
    expected = torch.tensor([[0.25, -0.75, 0.25, 0.25], [-0.3, 0.3, 0.0, 0.0]])
    torch.testing.assert_close(compute_advantages(rewards, scale_by_std=False), expected, rtol=0, atol=1e-7)
    per_mode = compute_advantages(rewards, "per_mode", scale_by_std=False)
    torch.testing.assert_close(
        per_mode, torch.tensor([[0.5, -0.5, 0.0, 0.0], [-0.3, 0.3, 0.0, 0.0]]), atol=1e-7, rtol=0
    )


def test_g_equals_one_and_equal_rewards():
    # G = 2 (g = 1): joint is a group of two; per_mode has groups of one -> 0 (no baseline; verl would give the reward)
    pair = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    torch.testing.assert_close(compute_advantages(pair), torch.tensor([[S2, -S2], [0.0, 0.0]]), atol=1e-5, rtol=0)
    assert torch.equal(compute_advantages(pair, "per_mode"), torch.zeros(2, 2))
    # all-equal groups give exactly 0, never NaN
    same = torch.full((3, 8), 0.7)
    for mode in ("joint", "per_mode"):
        for scale in (True, False):
            assert torch.equal(compute_advantages(same, mode, scale_by_std=scale), torch.zeros(3, 8))


def test_uneven_split_and_bad_input():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]])  # g = 2 thinking of G = 5 (default G // 2)
    out = compute_advantages(rewards, "per_mode")
    torch.testing.assert_close(out[0, :2], torch.tensor([S2, -S2]), atol=1e-5, rtol=0)
    s3 = (1 - 2 / 3) / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(out[0, 2:], torch.tensor([-2 * s3, s3, s3]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_prompts, G"):
        compute_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="unknown advantage mode"):
        compute_advantages(torch.ones(2, 4), "mixed")
    with pytest.raises(ValueError, match="num_thinking"):
        compute_advantages(torch.ones(2, 4), "per_mode", num_thinking=5)
