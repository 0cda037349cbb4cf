"""Plain-PyTorch references: the tests' oracle and the fallback where Triton cannot run.

Written for obviousness, not speed: the logits are materialized and every
reduction over sequences is a Python loop. Run them in float64 to get an
oracle for the fp32/fp16/bf16 kernels.
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(hidden @ weight.T / T) gathered at targets; fp32 (fp64 for fp64 inputs)."""
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.t()).to(out_dtype) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logprobs = log_probs.gather(1, targets.long()[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return logprobs, entropy


def bpo_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    *,
    seq_ids: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    beta: float = 0.0,
    temperature: float = 1.0,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
    entropy_coeff: float = 0.0,
    delta: float | None = None,
    bias_correction_kl: bool = False,
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The BPO/GRPO token-level clipped surrogate (the unclipped ratio capped at ``delta``; times ``is_weights``,
    the rollout correction's importance weights) + beta * k3 KL (times the ratio with ``bias_correction_kl``) -
    entropy_coeff * entropy, aggregated as verl does; ``kl_estimator`` k1, k2, k3 or low_var_kl (k3 clamped to
    [-10, 10])."""
    mask = torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    logp, entropy = linear_logprobs_reference(hidden, weight, safe_targets, temperature=temperature, with_entropy=True)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
    ratio = torch.exp(logp - old)
    adv = advantages.to(logp.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)  # INTELLECT-2's two-sided clip
    token_loss = torch.maximum(-adv * capped, clipped)
    if is_weights is not None:
        token_loss = token_loss * is_weights.to(logp.dtype)
    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        log_ratio = logp - ref_logprobs.to(logp.dtype)  # log(pi / pi_ref)
        kl = {
            "k1": log_ratio,
            "k2": log_ratio**2 / 2,
            "k3": torch.exp(-log_ratio) + log_ratio - 1.0,
            "low_var_kl": (torch.exp(-log_ratio) + log_ratio - 1.0).clamp(-10.0, 10.0),
        }[kl_estimator]
        if bias_correction_kl:
            kl = kl * ratio
    token_loss = token_loss + beta * kl - entropy_coeff * entropy

    masked = [token_loss[(seq_ids == s) & mask] for s in torch.unique(seq_ids)]
    masked = [x for x in masked if x.numel() > 0]
    if loss_agg_mode == "token-mean":
        picked = token_loss[mask]
        loss = picked.sum() / max(picked.numel(), 1)
    elif loss_agg_mode == "seq-mean-token-mean":
        loss = _mean([x.mean() for x in masked], token_loss)
    elif loss_agg_mode == "seq-mean-token-sum":
        loss = _mean([x.sum() for x in masked], token_loss)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        loss = _mean([x.sum() / norm_len for x in masked], token_loss)
    else:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; expected one of {LOSS_AGG_MODES}")

    n_tokens = max(int(mask.sum()), 1)
    metrics = {
        "clip_frac": ((clipped > unclipped) & mask).sum().float() / n_tokens,
        "kl": (kl * mask).sum().detach() / n_tokens,
        "entropy": (entropy * mask).sum().detach() / n_tokens,
    }
    return loss, metrics


def _mean(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not values:
        return (like * 0).sum()
    return torch.stack(values).mean()


def cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """torch.nn.functional.cross_entropy on materialized logits (0, not NaN, when all are ignored)."""
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.t()).to(out_dtype)
    losses = torch.nn.functional.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / max(int((targets != ignore_index).sum()), 1)


def attention_mask_reference(
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The explicit [N, N] boolean mask of the contract (True = query row may see key column)."""
    n_total = int(cu_seqlens[-1])
    device = cu_seqlens.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    same_doc = doc[:, None] == doc[None, :]
    if not causal:
        return same_doc
    idx = torch.arange(n_total, device=device)
    seg = torch.zeros(n_total, dtype=torch.long, device=device) if segment_ids is None else segment_ids.long()
    see = (idx[None, :] <= idx[:, None]) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
    if bidir_ids is not None:
        bid = bidir_ids.long()
        see |= (bid[:, None] == bid[None, :]) & (bid[None, :] != 0)
    return same_doc & see


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Explicit mask + softmax over all N packed tokens (memory N^2: tests and CPU fallback only)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.to(compute) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", qf, kf) * scale
    mask = attention_mask_reference(cu_seqlens, causal=causal, segment_ids=segment_ids, bidir_ids=bidir_ids)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hnm,mhd->nhd", probs, vf).to(q.dtype)
