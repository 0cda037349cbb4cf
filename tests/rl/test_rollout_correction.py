"""policy.rollout_correction's weights (r4b.rl.rollout_correction) on hand-made log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from r4b.rl.rollout_correction import rollout_correction_weights

# two responses of 3 and 2 tokens (the second padded), log ratios old - rollout: ln 3, 0, ln 0.5 | ln 1.5, ln 1.9
ROLLOUT = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
OLD = ROLLOUT + torch.tensor([[math.log(3.0), 0.0, math.log(0.5)], [math.log(1.5), math.log(1.9), 7.0]])
LENGTHS = torch.tensor([3, 2])


def close(actual: torch.Tensor, expected: list) -> bool:
    return torch.allclose(actual, torch.tensor(expected), rtol=1e-6, atol=0)


def weights(correction: str, level: str, cap: float = 2.0, rollout=ROLLOUT):
    return rollout_correction_weights(OLD, rollout, LENGTHS, correction=correction, level=level, cap=cap)


def test_token_level_truncates_or_masks_above_the_cap():
    tis, metrics = weights("tis", "token")
    assert close(tis, [[2.0, 1.0, 0.5], [1.5, 1.9, 0.0]])  # min(w, 2); 0 past the length
    mis, _ = weights("mis", "token")
    assert close(mis, [[0.0, 1.0, 0.5], [1.5, 1.9, 0.0]])  # 3 > 2 leaves the loss
    assert metrics["is_weight_mean"] == pytest.approx((3 + 1 + 0.5 + 1.5 + 1.9) / 5)
    assert metrics["is_weight_max"] == pytest.approx(3.0)
    assert metrics["is_capped"] == pytest.approx(1 / 5)


def test_sequence_level_weighs_a_response_by_the_product_of_its_ratios():
    tis, metrics = weights("tis", "sequence", cap=2.5)
    assert close(tis, [[1.5, 1.5, 1.5], [2.5, 2.5, 0.0]])  # 3 x 1 x 0.5; 1.5 x 1.9 = 2.85 -> 2.5
    mis, _ = weights("mis", "sequence", cap=2.5)
    assert close(mis, [[1.5, 1.5, 1.5], [0.0, 0.0, 0.0]])
    assert metrics["is_capped"] == pytest.approx(1 / 2)  # one response of two
    assert metrics["is_weight_max"] == pytest.approx(2.85)


def test_tokens_without_a_rollout_log_prob_weigh_one_and_ratios_cannot_overflow():
    forced = ROLLOUT.clone()
    forced[0, 0] = math.nan  # a decision token mode-decision credit moved into the response
    tis, _ = weights("tis", "token", rollout=forced)
    assert tis[0].tolist() == pytest.approx([1.0, 1.0, 0.5])
    huge = torch.full_like(ROLLOUT, -1e4)
    tis, metrics = weights("tis", "sequence", cap=1e12, rollout=huge)
    assert torch.isfinite(tis).all() and metrics["is_weight_max"] == pytest.approx(math.exp(20.0))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown rollout correction 'none'"):
        weights("none", "token")
    with pytest.raises(ValueError, match="level 'word'"):
        weights("tis", "word")
    with pytest.raises(ValueError, match="disagree"):
        rollout_correction_weights(OLD, ROLLOUT[:1], LENGTHS, correction="tis")
