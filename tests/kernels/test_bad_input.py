"""Bad input gets a clear error naming the argument, or a documented behaviour: never silent garbage."""

import pytest
import torch
from helpers import DEVICE, random_problem

from r4b.kernels import fused_linear_bpo_loss, fused_linear_cross_entropy, linear_logprobs


@pytest.fixture
def problem():
    hidden, weight, targets = random_problem(12, 32, 40, seed=0)
    return hidden.float(), weight.float(), targets


def test_mismatched_shapes(problem):
    hidden, weight, targets = problem
    with pytest.raises(ValueError, match=r"weight must be \[V, H=32\]"):
        linear_logprobs(hidden, weight[:, :31], targets)
    with pytest.raises(ValueError, match=r"targets must have shape \(12,\)"):
        linear_logprobs(hidden, weight, targets[:11])
    with pytest.raises(ValueError, match="hidden must be"):
        linear_logprobs(hidden[0], weight, targets[0])
    with pytest.raises(ValueError, match="advantages must have the shape of targets"):
        fused_linear_bpo_loss(hidden, weight, targets, torch.zeros(11, device=DEVICE), seq_ids=targets)
    with pytest.raises(ValueError, match="seq_ids must have the shape"):
        fused_linear_bpo_loss(hidden, weight, targets, torch.zeros(12, device=DEVICE), seq_ids=targets[:3])


def test_bad_dtypes(problem):
    hidden, weight, targets = problem
    with pytest.raises(ValueError, match="targets must be int32 or int64"):
        linear_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="floating point"):
        linear_logprobs(hidden.long(), weight, targets)


@pytest.mark.parametrize("bad", [-1, 40, 10_000])
def test_out_of_range_target_names_its_index(problem, bad):
    hidden, weight, targets = problem
    targets = targets.clone()
    targets[5] = bad
    with pytest.raises(ValueError, match=rf"targets\[5\] = {bad} is outside the vocabulary \[0, 40\)"):
        linear_logprobs(hidden, weight, targets)
    # Cross-entropy accepts only ignore_index as an out-of-vocabulary target.
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_linear_cross_entropy(hidden, weight, targets)


def test_nan_hidden_poisons_only_its_row(problem):
    """Documented: a NaN/inf row gives NaN for that token only; the other rows are exact."""
    hidden, weight, targets = problem
    clean, _ = linear_logprobs(hidden, weight, targets, with_entropy=True)
    hidden = hidden.clone()
    hidden[3, 7] = float("nan")
    hidden[8, 0] = float("inf")
    logp, ent = linear_logprobs(hidden, weight, targets, with_entropy=True)
    assert torch.isnan(logp[3]) and torch.isnan(ent[3]) and torch.isnan(logp[8])
    keep = torch.ones(12, dtype=torch.bool, device=DEVICE)
    keep[[3, 8]] = False
    assert torch.equal(logp[keep], clean[keep])


def test_bad_loss_options(problem):
    hidden, weight, targets = problem
    adv, ids = torch.zeros(12, device=DEVICE), torch.zeros(12, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="beta != 0 needs ref_logprobs"):
        fused_linear_bpo_loss(hidden, weight, targets, adv, seq_ids=ids, beta=0.1)
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'seq-mean'"):
        fused_linear_bpo_loss(hidden, weight, targets, adv, seq_ids=ids, loss_agg_mode="seq-mean")
    with pytest.raises(ValueError, match="needs a positive norm_len"):
        fused_linear_bpo_loss(hidden, weight, targets, adv, seq_ids=ids, loss_agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="clip_eps_low"):
        fused_linear_bpo_loss(hidden, weight, targets, adv, seq_ids=ids, clip_eps_low=1.5)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        linear_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_elements must be positive"):
        linear_logprobs(hidden, weight, targets, chunk_elements=0)
    with pytest.raises(ValueError, match="reduction must be"):
        fused_linear_cross_entropy(hidden, weight, targets, reduction="batchmean")
