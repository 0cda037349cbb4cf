"""Rollout/training mismatch correction (``policy.rollout_correction``): importance weights that bring rollouts
sampled by the rollout engine (vLLM's kernels, another dtype, a stale copy) back to the trainer's policy.

Per response token, ``w = pi_old / pi_rollout = exp(old_logprob - rollout_logprob)``, where ``old`` is the
trainer's log-prob under the weights that generated the step (computed before the update) and ``rollout`` the
engine's own, returned with the rollout at the same temperature. ``policy.rollout_correction_level: sequence``
uses one weight per response, ``exp(sum_t (old_t - rollout_t))``, on each of its tokens. Then, with the cap C
(``policy.rollout_correction_cap``):

- ``tis``: truncated importance sampling, ``min(w, C)`` (verl's ``rollout_is``, TRL's ``*_truncate``);
- ``mis``: masked importance sampling, ``w`` where ``w <= C`` and 0 above (TRL's ``*_mask``): a token (or
  response) the trainer finds far likelier than the engine did leaves the loss, its denominator unchanged.

The weights multiply each token's clipped surrogate inside the fused loss (``is_weights`` of
:func:`r4b.kernels.fused_linear_bpo_loss`), not its KL term, and carry no gradient. Log ratios are clamped to
[-20, 20] first, as verl does, so ``exp`` never overflows. Tokens without a rollout log-prob (NaN: the mode
decision tokens that mode-decision credit moves into the response were forced, not sampled) get weight 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CORRECTIONS", "LEVELS", "rollout_correction_weights"]

CORRECTIONS = ("none", "tis", "mis")
LEVELS = ("token", "sequence")
LOG_RATIO_BOUND = 20.0


def rollout_correction_weights(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    lengths: Tensor,
    *,
    correction: str,
    level: str = "token",
    cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """The ``[R, Lmax]`` importance weights (0 past each response's length) of ``correction`` at ``level`` with
    ``cap`` (see the module docstring), and their metrics over the response tokens: ``is_weight_mean`` and
    ``is_weight_max`` (before the cap) and ``is_capped`` (the share of tokens, or responses at sequence level,
    over it)."""
    if correction not in CORRECTIONS[1:]:
        raise ValueError(f"unknown rollout correction {correction!r}; expected one of {CORRECTIONS[1:]}")
    if level not in LEVELS:
        raise ValueError(f"unknown rollout correction level {level!r}; expected one of {LEVELS}")
    if old_logprobs.shape != rollout_logprobs.shape or old_logprobs.shape[0] != lengths.numel():
        raise ValueError(
            f"old_logprobs {tuple(old_logprobs.shape)}, rollout_logprobs {tuple(rollout_logprobs.shape)} and "
            f"lengths ({lengths.numel()},) disagree"
        )
    rollout = rollout_logprobs.to(old_logprobs)
    tokens = torch.arange(old_logprobs.shape[1], device=old_logprobs.device) < lengths.to(old_logprobs.device)[:, None]
    log_ratio = torch.where(tokens & ~rollout.isnan(), old_logprobs.double() - rollout.double(), 0.0)
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
    raw = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
    over = raw > cap
    weights = raw.clamp(max=cap) if correction == "tis" else torch.where(over, 0.0, raw)
    counted = tokens if level == "token" else tokens[:, :1]  # one weight per response
    metrics = {
        "is_weight_mean": float(raw[tokens].mean()) if tokens.any() else 1.0,
        "is_weight_max": float(raw[tokens].max()) if tokens.any() else 1.0,
        "is_capped": float(over[:, : counted.shape[1]][counted].float().mean()) if counted.any() else 0.0,
    }
    return torch.where(tokens, weights, 0.0).float(), metrics
