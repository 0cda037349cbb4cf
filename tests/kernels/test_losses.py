"""fused_linear_bpo_loss and fused_linear_cross_entropy against the float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, GRAD_RTOL, leaf, max_abs, random_problem, rel_err
from kernel_cases import bpo_batch, policy_logprobs, rollout_weights

from r4b.kernels import LOSS_AGG_MODES, bpo_loss_from_logprobs, fused_linear_bpo_loss, fused_linear_cross_entropy
from r4b.kernels.reference import LOSS_TYPES, bpo_loss_reference, cross_entropy_reference


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("on_policy", [True, False], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_bpo_matches_reference(loss_agg_mode, on_policy, beta):
    temperature = 0.8
    hidden64, weight64, targets, b = bpo_batch(seed=1)
    policy = policy_logprobs(hidden64, weight64, targets, temperature)
    old = None if on_policy else policy + b["old_delta"]
    ref = policy + b["ref_delta"] if beta else None
    kwargs = dict(
        seq_ids=b["seq_ids"],
        loss_mask=b["loss_mask"],
        old_logprobs=old,
        ref_logprobs=ref,
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        beta=beta,
        temperature=temperature,
        loss_agg_mode=loss_agg_mode,
        norm_len=64,
    )
    hidden, weight = leaf(hidden64, torch.float32), leaf(weight64, torch.float32)
    hidden_ref, weight_ref = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    loss, metrics = fused_linear_bpo_loss(hidden, weight, targets, b["advantages"].float(), **kwargs)
    loss_ref, metrics_ref = bpo_loss_reference(hidden_ref, weight_ref, targets, b["advantages"], **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * max(1.0, abs(loss_ref.item()))
    for name in ("clip_frac", "kl", "entropy"):
        assert not metrics[name].requires_grad
        assert abs(metrics[name].item() - metrics_ref[name].item()) < 1e-5, name
    if not on_policy:
        assert metrics["clip_frac"].item() > 0  # the test exercises the clipped branch
    loss.backward()
    loss_ref.backward()
    assert rel_err(hidden.grad, hidden_ref.grad) < GRAD_RTOL[torch.float32]
    assert rel_err(weight.grad, weight_ref.grad) < GRAD_RTOL[torch.float32]


def assert_fp32_matches_reference(hidden64, weight64, targets, advantages, kwargs) -> torch.Tensor:
    """The fused loss in fp32 (the Triton kernels) against the float64 oracle: loss, metrics and both gradients.
    Returns the oracle's loss."""
    hidden, weight = leaf(hidden64, torch.float32), leaf(weight64, torch.float32)
    hidden_ref, weight_ref = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    loss, metrics = fused_linear_bpo_loss(hidden, weight, targets, advantages.float(), **kwargs)
    loss_ref, metrics_ref = bpo_loss_reference(hidden_ref, weight_ref, targets, advantages, **kwargs)
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * max(1.0, abs(loss_ref.item()))
    for name in ("clip_frac", "kl", "entropy"):
        assert abs(metrics[name].item() - metrics_ref[name].item()) < 1e-5, name
    loss.backward()
    loss_ref.backward()
    assert rel_err(hidden.grad, hidden_ref.grad) < GRAD_RTOL[torch.float32]
    assert rel_err(weight.grad, weight_ref.grad) < GRAD_RTOL[torch.float32]
    return loss_ref.detach()


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("entropy_coeff", [0.0, 0.05], ids=["no-bonus", "entropy-bonus"])
def test_bpo_with_importance_weights_matches_reference(loss_agg_mode, entropy_coeff):
    """is_weights scale each token's surrogate, not its KL; clip_frac counts the unweighted clipped branch. The
    entropy bonus's gradient goes through the kernel's entropy."""
    hidden64, weight64, targets, b = bpo_batch(seed=3)
    policy = policy_logprobs(hidden64, weight64, targets, 1.0)
    kwargs = dict(seq_ids=b["seq_ids"], loss_mask=b["loss_mask"], old_logprobs=policy + b["old_delta"],
                  ref_logprobs=policy + b["ref_delta"], beta=0.05, loss_agg_mode=loss_agg_mode, norm_len=64,
                  is_weights=rollout_weights(targets.numel(), seed=3), entropy_coeff=entropy_coeff)  # fmt: skip
    loss_ref = assert_fp32_matches_reference(hidden64, weight64, targets, b["advantages"], kwargs)
    plain, _ = bpo_loss_reference(hidden64, weight64, targets, b["advantages"], **{**kwargs, "is_weights": None})
    assert abs(loss_ref.item() - plain.item()) > 1e-3  # the weights change the loss


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("options", [{}, {"delta": 1.15, "bias_correction_kl": True}], ids=["plain", "delta+corrected"])
def test_bpo_kl_estimators_and_liger_options_match_reference(kl_estimator, options):
    hidden64, weight64, targets, b = bpo_batch(seed=7)
    policy = policy_logprobs(hidden64, weight64, targets, 1.0)
    ref = policy + b["ref_delta"] * (40.0 if kl_estimator == "low_var_kl" else 1.0)  # far enough to reach the clamp
    kwargs = dict(seq_ids=b["seq_ids"], loss_mask=b["loss_mask"], old_logprobs=policy + b["old_delta"],
                  ref_logprobs=ref, beta=0.1, kl_estimator=kl_estimator, **options)  # fmt: skip
    hidden, weight = leaf(hidden64, torch.float32), leaf(weight64, torch.float32)
    hidden_ref, weight_ref = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    loss, metrics = fused_linear_bpo_loss(hidden, weight, targets, b["advantages"].float(), **kwargs)
    loss_ref, metrics_ref = bpo_loss_reference(hidden_ref, weight_ref, targets, b["advantages"], **kwargs)
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * max(1.0, abs(loss_ref.item()))
    assert abs(metrics["kl"].item() - metrics_ref["kl"].item()) < 1e-5 * max(1.0, abs(metrics_ref["kl"].item()))
    loss.backward()
    loss_ref.backward()
    assert rel_err(hidden.grad, hidden_ref.grad) < GRAD_RTOL[torch.float32]
    assert rel_err(weight.grad, weight_ref.grad) < GRAD_RTOL[torch.float32]


LOSS_TYPE_CASES = [(t, "token") for t in LOSS_TYPES] + [(t, "sequence") for t in ("grpo", "dapo", "luspo", "dr_grpo")]


@pytest.mark.parametrize(("loss_type", "level"), LOSS_TYPE_CASES)
def test_bpo_loss_types_match_reference(loss_type, level):
    """liger's and TRL's loss types (each with its own aggregation) and GSPO's sequence-level ratio, with the
    rollout correction's weights and the KL, through the Triton kernels."""
    hidden64, weight64, targets, b = bpo_batch(seed=8)
    policy = policy_logprobs(hidden64, weight64, targets, 0.9)
    kwargs = dict(seq_ids=b["seq_ids"], loss_mask=b["loss_mask"], old_logprobs=policy + b["old_delta"],
                  ref_logprobs=policy + b["ref_delta"], beta=0.05, temperature=0.9, loss_type=loss_type,
                  importance_level=level, norm_len=64, is_weights=rollout_weights(targets.numel(), seed=8),
                  clip_eps_high=1.2 if loss_type == "cispo" else 0.28, sapo_temperatures=(0.8, 1.3),
                  vespo_gamma=(1.5, 2.5, 2.0, 1.5))  # fmt: skip
    assert_fp32_matches_reference(hidden64, weight64, targets, b["advantages"], kwargs)


def test_sequence_level_ratio_is_one_per_sequence():
    """GSPO: the ratio is the geometric mean of the sequence's token ratios, so doubling every token's ratio of one
    sequence moves its loss like a token-level ratio of 2 would, and masked tokens do not count in the mean."""
    logp = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    seq_ids = torch.tensor([0, 0, 0, 1, 1])
    mask = torch.tensor([True, True, False, True, True])
    old = torch.tensor([-math.log(2), 0.0, 5.0, 0.0, 0.0], dtype=torch.float64)  # seq 0: ratios 2, 1 -> sqrt(2)
    loss, _ = bpo_loss_from_logprobs(logp, torch.ones(5, dtype=torch.float64), seq_ids=seq_ids, loss_mask=mask,
                                     old_logprobs=old, importance_level="sequence", clip_eps_high=1.0,
                                     loss_agg_mode="seq-mean-token-mean")  # fmt: skip
    assert loss.item() == pytest.approx(-(math.sqrt(2) + 1.0) / 2, rel=1e-12)
    loss.backward()
    # d/dlogp_t of -A exp(mean log-ratio) / 2 sequences: seq 0's two loss tokens share sqrt(2) / 2 / 2
    assert logp.grad.tolist() == pytest.approx([-math.sqrt(2) / 4, -math.sqrt(2) / 4, 0.0, -0.25, -0.25])


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_bpo_leading_dimensions_equal_the_flat_tokens(loss_agg_mode):
    """[B, T, H] hidden states with [B, T] targets, sequence ids, mask and advantages: the loss and gradients of
    the same tokens flattened, in every aggregation mode (the sequence sums scatter over the flattened tokens)."""
    hidden64, weight64, targets, b = bpo_batch(seed=4)
    policy = policy_logprobs(hidden64, weight64, targets, 1.0)
    kwargs = dict(old_logprobs=policy + b["old_delta"], loss_agg_mode=loss_agg_mode, norm_len=16)
    flat = [leaf(hidden64, torch.float64), leaf(weight64, torch.float64)]
    shaped = [leaf(hidden64.view(6, 10, -1), torch.float64), leaf(weight64, torch.float64)]
    loss, _ = fused_linear_bpo_loss(*flat, targets, b["advantages"], seq_ids=b["seq_ids"],
                                    loss_mask=b["loss_mask"], **kwargs)  # fmt: skip
    view = {k: b[k].view(6, 10) for k in ("seq_ids", "loss_mask", "advantages")}
    kwargs["old_logprobs"] = kwargs["old_logprobs"].view(6, 10)
    loss_2d, _ = fused_linear_bpo_loss(shaped[0], shaped[1], targets.view(6, 10), view["advantages"],
                                       seq_ids=view["seq_ids"], loss_mask=view["loss_mask"], **kwargs)  # fmt: skip
    assert loss_2d.item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-12)
    loss.backward()
    loss_2d.backward()
    assert torch.allclose(shaped[0].grad.reshape(flat[0].shape), flat[0].grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(shaped[1].grad, flat[1].grad, rtol=1e-10, atol=1e-12)


def test_on_policy_gradient_is_the_policy_gradient():
    """old_logprobs=None: loss = -mean(A) and d loss = -mean(A * d logp), whatever the clip range."""
    hidden64, weight64, targets, b = bpo_batch(seed=2)
    hidden = leaf(hidden64, torch.float32)
    loss, metrics = fused_linear_bpo_loss(
        hidden, weight64.float(), targets, b["advantages"].float(), seq_ids=b["seq_ids"], clip_eps_low=0.0,
        clip_eps_high=0.0,
    )  # fmt: skip
    assert math.isclose(loss.item(), -b["advantages"].mean().item(), rel_tol=1e-5)
    assert metrics["clip_frac"].item() == 0.0
    loss.backward()
    hidden_ref = leaf(hidden64, torch.float64)
    logits = hidden_ref @ weight64.t()
    logp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    (-(b["advantages"] * logp).mean()).backward()
    assert rel_err(hidden.grad, hidden_ref.grad) < 1e-4


def test_masked_tokens_cannot_leak():
    """Garbage at masked positions (target -100, inf/NaN log-probs, NaN advantages) changes nothing."""
    hidden64, weight64, targets, b = bpo_batch(seed=3)
    policy = policy_logprobs(hidden64, weight64, targets, 1.0)
    mask = b["loss_mask"]
    clean = dict(old=policy + b["old_delta"], ref=policy + b["ref_delta"], adv=b["advantages"], tgt=targets)
    dirty = dict(
        old=torch.where(mask, clean["old"], float("inf")),
        ref=torch.where(mask, clean["ref"], float("nan")),
        adv=torch.where(mask, clean["adv"], float("nan")),
        tgt=torch.where(mask, targets, -100),
    )
    results = []
    for batch in (clean, dirty):
        hidden = leaf(hidden64, torch.float32)
        loss, _ = fused_linear_bpo_loss(
            hidden, weight64.float(), batch["tgt"], batch["adv"].float(), seq_ids=b["seq_ids"], loss_mask=mask,
            old_logprobs=batch["old"].float(), ref_logprobs=batch["ref"].float(), beta=0.1,
        )  # fmt: skip
        loss.backward()
        results.append((loss.detach(), hidden.grad))
    assert torch.isfinite(results[1][0]) and torch.isfinite(results[1][1]).all()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_all_tokens_masked_gives_zero():
    hidden64, weight64, targets, b = bpo_batch(seed=4)
    hidden = leaf(hidden64, torch.float32)
    for mode in LOSS_AGG_MODES:
        loss, metrics = fused_linear_bpo_loss(
            hidden, weight64.float(), targets, b["advantages"].float(), seq_ids=b["seq_ids"],
            loss_mask=torch.zeros_like(b["loss_mask"]), loss_agg_mode=mode, norm_len=10,
        )  # fmt: skip
        assert loss.item() == 0.0 and metrics["entropy"].item() == 0.0


def test_hand_computed_token_loss():
    """Two tokens, one sequence each, token-mean: the PPO clip worked out by hand."""
    hidden = torch.zeros(2, 16, device=DEVICE, requires_grad=True)  # zero logits: logp = -log(V)
    weight = torch.zeros(4, 16, device=DEVICE)
    targets = torch.tensor([1, 2], device=DEVICE)
    lp = -math.log(4)
    old = torch.tensor([lp - math.log(1.5), lp - math.log(0.5)], device=DEVICE)  # ratios 1.5 and 0.5
    adv = torch.tensor([2.0, -1.0], device=DEVICE)
    loss, metrics = fused_linear_bpo_loss(
        hidden, weight, targets, adv, seq_ids=torch.tensor([0, 1], device=DEVICE), old_logprobs=old,
        clip_eps_low=0.2, clip_eps_high=0.3,
    )  # fmt: skip
    # token 0: max(-2*1.5, -2*1.3) = -2.6 (clipped); token 1: max(1*0.5, 1*0.8) = 0.8 (clipped)
    assert math.isclose(loss.item(), (-2.6 + 0.8) / 2, rel_tol=1e-6)
    assert metrics["clip_frac"].item() == 1.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cross_entropy_matches_torch(reduction, dtype):
    hidden64, weight64, targets = random_problem(45, 38, 101, seed=7)
    targets[::4] = -100
    hidden, weight = leaf(hidden64, dtype), leaf(weight64, dtype)
    hidden_ref, weight_ref = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    loss = fused_linear_cross_entropy(hidden, weight, targets, reduction=reduction)
    expected = F.cross_entropy(hidden_ref @ weight_ref.t(), targets, reduction=reduction)
    assert loss.dtype == torch.float32
    assert max_abs(loss, expected) < 1e-4 * max(1.0, float(expected.detach().abs().max()))
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    (loss.double() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert rel_err(hidden.grad, hidden_ref.grad) < GRAD_RTOL[dtype]
    assert rel_err(weight.grad, weight_ref.grad) < GRAD_RTOL[dtype]


def test_cross_entropy_reference_and_all_ignored():
    hidden64, weight64, targets = random_problem(20, 32, 50, seed=8)
    targets[3] = 7
    ref = cross_entropy_reference(hidden64, weight64, targets, ignore_index=7)
    assert math.isclose(ref.item(), F.cross_entropy(hidden64 @ weight64.t(), targets, ignore_index=7).item())
    ignored = torch.full_like(targets, -100)
    assert fused_linear_cross_entropy(hidden64.float(), weight64.float(), ignored).item() == 0.0
