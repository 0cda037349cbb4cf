"""Plain-PyTorch references: the tests' oracle and the fallback where Triton cannot run.

Written for obviousness, not speed: the logits are materialized and every
reduction over sequences is a Python loop. Run them in float64 to get an
oracle for the fp32/fp16/bf16 kernels.
"""

from __future__ import annotations

import math

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# liger-kernel's and TRL's GRPO loss types: (the per-token policy term, the aggregation each comes with). bnpo and
# dapo differ in liger only by their normalizer across processes and accumulation steps; r4b aggregates the whole
# batch exactly, so both are its token-mean. luspo is TRL's: the sum over each sequence's tokens, averaged over
# sequences (with importance_level="sequence", as TRL requires: each token weighs its sequence's length).
LOSS_TYPES = {
    "grpo": ("clip", "seq-mean-token-mean"),
    "bnpo": ("clip", "token-mean"),
    "dapo": ("clip", "token-mean"),
    "dr_grpo": ("clip", "seq-mean-token-sum-norm"),
    "luspo": ("clip", "seq-mean-token-sum"),
    "cispo": ("cispo", "token-mean"),
    "sapo": ("sapo", "seq-mean-token-mean"),
    "vespo": ("vespo", "token-mean"),
}
IMPORTANCE_LEVELS = ("token", "sequence")


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
    loss_type: str = "dapo",
    loss_agg_mode: str | None = None,
    importance_level: str = "token",
    norm_len: int | None = None,
    entropy_coeff: float = 0.0,
    delta: float | None = None,
    bias_correction_kl: bool = False,
    kl_estimator: str = "k3",
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    vespo_gamma: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The BPO/GRPO policy loss of ``loss_type`` (+ beta x KL - entropy_coeff x entropy) per token, aggregated as
    verl does (``loss_agg_mode``, default the loss type's own, ``LOSS_TYPES``).

    Per-token policy terms with ``r`` the ratio pi / pi_old, per token or (``importance_level="sequence"``, GSPO)
    ``exp`` of the mean log-ratio over the sequence's loss tokens, and ``A`` the advantage: ``clip`` (grpo, bnpo,
    dapo, dr_grpo, luspo) ``max(-A r', -A clip(r, 1 - eps_low, 1 + eps_high))`` with ``r'`` r capped at ``delta``;
    ``cispo`` ``-min(r, eps_high) A logp`` (the weight detached); ``sapo`` ``-A sigmoid(t (r - 1)) 4 / t`` (``t``
    the positive or negative temperature by the sign of A); ``vespo`` ``-phi A logp`` with phi the detached gamma
    weight of the sequence's summed log-ratio (plus its summed log ``is_weights``). ``is_weights`` scale the other
    policy terms (not the KL); the KL is ``kl_estimator``'s of ``ref - logp``, times ``r`` with
    ``bias_correction_kl``."""
    mask = torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    kind, default_agg = LOSS_TYPES[loss_type]
    loss_agg_mode = default_agg if loss_agg_mode is None else loss_agg_mode
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    logp, entropy = linear_logprobs_reference(hidden, weight, safe_targets, temperature=temperature, with_entropy=True)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    log_ratio = logp - old
    sequences = [((seq_ids == s) & mask).nonzero().flatten() for s in torch.unique(seq_ids)]
    log_w = log_ratio.clone()
    if importance_level == "sequence":  # GSPO: every token of a sequence takes its mean log-ratio
        for idx in sequences:
            if idx.numel():
                log_w = log_w.index_put((idx,), log_ratio[idx].mean().expand(idx.numel()))
    ratio = torch.exp(log_w)
    upper = lower = torch.zeros_like(mask)
    if kind == "clip":
        lower, upper = ratio < 1.0 - clip_eps_low, ratio > 1.0 + clip_eps_high
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)  # INTELLECT-2's two-sided clip
        token_loss = torch.maximum(-adv * capped, -adv * torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
    elif kind == "cispo":
        upper = ratio > clip_eps_high
        token_loss = -torch.clamp(ratio, max=clip_eps_high).detach() * adv * logp
    elif kind == "sapo":
        t = torch.where(adv > 0, sapo_temperatures[0], sapo_temperatures[1]).to(logp.dtype)
        token_loss = -adv * torch.sigmoid(t * (ratio - 1.0)) * 4.0 / t
    else:  # vespo
        token_loss = -_vespo_phi(log_ratio.detach(), adv, is_weights, sequences, vespo_gamma) * adv * logp
    if is_weights is not None and kind != "vespo":  # VESPO folds them into phi
        token_loss = token_loss * is_weights.to(logp.dtype)
    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        log_pi_ref = logp - ref_logprobs.to(logp.dtype)  # log(pi / pi_ref)
        kl = {
            "k1": log_pi_ref,
            "k2": log_pi_ref**2 / 2,
            "k3": torch.exp(-log_pi_ref) + log_pi_ref - 1.0,
            "low_var_kl": (torch.exp(-log_pi_ref) + log_pi_ref - 1.0).clamp(-10.0, 10.0),
        }[kl_estimator]
        if bias_correction_kl:
            kl = kl * ratio
    token_loss = token_loss + beta * kl - entropy_coeff * entropy

    masked = [token_loss[idx] for idx in sequences if idx.numel() > 0]
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
    clipped = ((lower & (adv < 0)) | (upper & (adv > 0))) & mask
    metrics = {
        "clip_frac": clipped.sum().float() / n_tokens,
        "kl": (kl * mask).sum().detach() / n_tokens,
        "entropy": (entropy * mask).sum().detach() / n_tokens,
    }
    return loss, metrics


def _vespo_phi(log_ratio, adv, is_weights, sequences, gamma):
    """VESPO's gamma weight per token, that of its sequence: phi(w) = e^lambda w^k e^(-lambda w) (phi(1) = 1) with
    w the sequence's product of ratios (each log-ratio clamped to +-20; the sum with the summed log is_weights, each
    clamped to [log 1e-8, 20], clamped likewise), k and lambda by the advantage's sign."""
    k_pos, lambda_pos, k_neg, lambda_neg = gamma
    floor = math.log(1e-8)
    phi = torch.zeros_like(log_ratio)
    for idx in sequences:
        if not idx.numel():
            continue
        log_w = log_ratio[idx].clamp(-20.0, 20.0).sum()
        if is_weights is not None:
            log_w = log_w + torch.log(is_weights[idx].to(log_ratio.dtype)).clamp(floor, 20.0).sum()
        log_w = log_w.clamp(floor, 20.0)
        nonneg = bool(adv[idx[0]] >= 0)
        k, lam = (k_pos, lambda_pos) if nonneg else (k_neg, lambda_neg)
        lam = max(lam, 1e-4)
        value = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        phi[idx] = value
    return phi


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
