"""r4b.kernels.linear_cross_entropy against the float64 reference of verl's documented contract (the
``run_torch_entropy`` of verl's own kernel tests: ``-cross_entropy(logits / temperature)`` and the entropy). verl
itself does not install on a CPU machine, so this is the contract, not verl's function. float32 inputs take the
Triton kernels in the interpreter (conftest sets TRITON_INTERPRET=1 on a CPU)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, GRAD_RTOL, AllocationTracker, leaf, rel_err

from r4b.kernels import linear_cross_entropy


def verl_reference(hidden, weight, labels, temperature, reduction):
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()) / temperature
    log_probs = -F.cross_entropy(logits, labels.reshape(-1), reduction=reduction)
    entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
    if reduction == "none":
        log_probs = log_probs.view(labels.shape)
    return log_probs, entropy.view(labels.shape)


def problem(shape, hidden_size, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 0.3
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels.view(-1)[::4] = -100  # unlabelled tokens: 0 and out of the mean, their entropy still counted
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(("shape", "hidden_size", "vocab"), [((37,), 24, 70), ((3, 11), 40, 133)])
def test_matches_the_reference_in_values_and_gradients(reduction, shape, hidden_size, vocab):
    hidden64, weight64, labels = problem(shape, hidden_size, vocab, seed=len(shape) + vocab)
    hidden, weight = leaf(hidden64, torch.float32).to(DEVICE), leaf(weight64, torch.float32).to(DEVICE)
    hidden.retain_grad()
    weight.retain_grad()
    hidden_ref, weight_ref = leaf(hidden64, torch.float64), leaf(weight64, torch.float64)
    log_probs, entropy = linear_cross_entropy(hidden, weight, labels.to(DEVICE), 0.8, reduction)
    log_probs_ref, entropy_ref = verl_reference(hidden_ref, weight_ref, labels, 0.8, reduction)
    assert log_probs.shape == log_probs_ref.shape and entropy.shape == labels.shape
    assert rel_err(log_probs.cpu(), log_probs_ref) < 1e-5 and rel_err(entropy.cpu(), entropy_ref) < 1e-5
    # a loss reading both outputs, as verl's actor does with an entropy coefficient
    scale = torch.linspace(-1, 1, labels.numel(), dtype=torch.float64).view(labels.shape)
    lp_term = lambda lp: (lp * scale.to(lp)).sum() if reduction == "none" else lp
    (lp_term(log_probs) - 0.3 * (entropy * scale.to(entropy)).sum()).backward()
    (lp_term(log_probs_ref) - 0.3 * (entropy_ref * scale).sum()).backward()
    assert rel_err(hidden.grad.cpu(), hidden_ref.grad) < GRAD_RTOL[torch.float32]
    assert rel_err(weight.grad.cpu(), weight_ref.grad) < GRAD_RTOL[torch.float32]


def test_no_tokens_by_vocab_tensor():
    hidden, weight, labels = problem((64,), 16, 96, seed=3)
    hidden, weight = leaf(hidden, torch.float32), leaf(weight, torch.float32)
    with AllocationTracker() as tracker:
        log_probs, entropy = linear_cross_entropy(hidden, weight, labels)
        (log_probs.sum() + entropy.sum()).backward()
    assert 64 * 96 not in {size for size, _ in tracker.sizes}


def test_bad_arguments_are_one_line():
    hidden, weight, labels = problem((5,), 8, 10, seed=0)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="max")
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(NotImplementedError, match="dist_process_group"):
        linear_cross_entropy(hidden, weight, labels, dist_process_group=object())
