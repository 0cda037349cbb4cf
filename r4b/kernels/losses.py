"""Losses on top of the fused log-prob kernel: BPO/GRPO (RL) and cross-entropy (SFT).

The [N, V] work (logits, softmax, their gradients) happens in
``linear_logprobs``; what is left here is O(N) per-token arithmetic in torch,
whose gradient reaches the kernel as one scalar per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import fused_grad
from ._backend import use_triton
from .linear_logprobs import check_logprob_inputs, linear_logprobs
from .reference import IMPORTANCE_LEVELS, LOSS_AGG_MODES, LOSS_TYPES


@dataclass(frozen=True)
class PolicyTerms:
    """The per-token policy loss's options (``fused_linear_bpo_loss``'s, documented there)."""

    loss_type: str = "dapo"
    importance_level: str = "token"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    beta: float = 0.0
    delta: float | None = None
    bias_correction_kl: bool = False
    kl_estimator: str = "k3"
    sapo_temperatures: tuple[float, float] = (1.0, 1.05)
    vespo_gamma: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {tuple(LOSS_TYPES)}")
        if self.importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"unknown importance_level {self.importance_level!r}; expected one of {IMPORTANCE_LEVELS}")
        if self.importance_level == "sequence" and self.kind != "clip":  # liger's and TRL's rule
            raise ValueError(f"importance_level='sequence' does not apply to loss_type={self.loss_type!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; expected one of {KL_ESTIMATORS}")
        if not (0.0 <= self.clip_eps_low < 1.0 and self.clip_eps_high >= 0.0):
            raise ValueError(
                f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {self.clip_eps_low}, {self.clip_eps_high}"
            )
        if min(self.sapo_temperatures) <= 0:
            raise ValueError(f"sapo_temperatures must be positive, got {self.sapo_temperatures}")

    @property
    def kind(self) -> str:
        """The per-token policy term: clip, cispo, sapo or vespo."""
        return LOSS_TYPES[self.loss_type][0]

    @property
    def couples_sequences(self) -> bool:
        """Whether a token's loss depends on other tokens' log-probs (a sequence's shared ratio or weight)."""
        return self.importance_level == "sequence" or self.kind == "vespo"


def _check_bpo_inputs(
    targets: torch.Tensor,
    per_token: dict[str, torch.Tensor | None],
    terms: PolicyTerms,
    *,
    loss_agg_mode: str,
    norm_len: int | None,
) -> None:
    """Fail before any kernel runs, naming the argument."""
    for name, tensor in per_token.items():
        if tensor is not None and tensor.shape != targets.shape:
            raise ValueError(f"{name} must have the shape of targets {tuple(targets.shape)}, got {tuple(tensor.shape)}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; expected one of {LOSS_AGG_MODES}")
    if terms.beta != 0.0 and per_token.get("ref_logprobs") is None:
        raise ValueError("beta != 0 needs ref_logprobs (the reference policy's log-probs)")
    if loss_agg_mode == "seq-mean-token-sum-norm" and (norm_len is None or norm_len <= 0):
        raise ValueError(
            "loss_agg_mode='seq-mean-token-sum-norm' needs a positive norm_len (Dr. GRPO: max response length)"
        )


def _sequence_index(seq_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(each token's sequence as 0..S-1, S): sequences are the distinct values of ``seq_ids``."""
    if not seq_ids.numel():
        return seq_ids.long(), 0
    values, index = torch.unique(seq_ids.reshape(-1), return_inverse=True)
    return index.view(seq_ids.shape), values.numel()


def _per_sequence_sum(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[S] sums of ``values`` over each sequence's tokens (differentiable in ``values``)."""
    out = values.new_zeros(num_seqs)
    return out.scatter_add(0, seq_index.reshape(-1), values.reshape(-1))


def _aggregation_weights(
    seq_index: torch.Tensor,
    num_seqs: int,
    mask: torch.Tensor,
    loss_agg_mode: str,
    norm_len: int | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights w such that loss = sum(w * token_loss) for verl's loss_agg_modes, in ``dtype`` (the
    log-probs': fp32, or fp64 for an fp64 oracle).

    Only sequences with at least one token in ``mask`` count in means over sequences.
    """
    maskf = mask.to(dtype)
    if loss_agg_mode == "token-mean":
        return maskf / maskf.sum().clamp(min=1.0)
    tokens_per_seq = _per_sequence_sum(maskf, seq_index, num_seqs)
    num_seqs_with_tokens = (tokens_per_seq > 0).sum().clamp(min=1).to(dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        return maskf / (tokens_per_seq[seq_index].clamp(min=1.0) * num_seqs_with_tokens)
    if loss_agg_mode == "seq-mean-token-sum":
        return maskf / num_seqs_with_tokens
    return maskf / (norm_len * num_seqs_with_tokens)


KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


def kl_term(log_ref_ratio: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Schulman's per-token estimators of KL(policy || reference) from ``log_ref_ratio = ref - logp``: ``k1``
    ``-x``, ``k2`` ``x^2 / 2``, ``k3`` ``e^x - x - 1`` (TRL's and liger's), ``low_var_kl`` k3 clamped to [-10, 10]
    (verl's)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    if estimator == "k1":
        return -log_ref_ratio
    if estimator == "k2":
        return 0.5 * log_ref_ratio.square()
    k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
    return k3.clamp(-10.0, 10.0) if estimator == "low_var_kl" else k3


@torch.no_grad()
def _vespo_phi(
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    is_weights: torch.Tensor | None,
    seq_index: torch.Tensor,
    num_seqs: int,
    gamma: tuple[float, float, float, float],
) -> torch.Tensor:
    """VESPO's detached gamma weight of each token's sequence, phi(w) = e^lambda w^k e^(-lambda w) (phi(1) = 1), in
    log space: w is the sequence's product of ratios (log-ratios clamped to +-20) and of its ``is_weights`` (logs
    clamped to [log 1e-8, 20]), its log clamped likewise; k and lambda by the advantage's sign (liger's, TRL's)."""
    k_pos, lambda_pos, k_neg, lambda_neg = gamma
    floor = math.log(1e-8)
    log_w = torch.where(mask, log_ratio.clamp(-20.0, 20.0), 0.0)
    if is_weights is not None:
        log_is = torch.log(torch.where(mask, is_weights.to(log_ratio.dtype), 1.0)).clamp(floor, 20.0)
        log_w = log_w + log_is
    log_w = _per_sequence_sum(log_w, seq_index, num_seqs).clamp(floor, 20.0)[seq_index]
    nonneg = adv >= 0
    k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _bpo_token_terms(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_seqs: int,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    terms: PolicyTerms,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_loss, clipped, kl) per token; differentiable in ``logp``. ``clipped`` (bool): liger's clip metric,
    the ratio past the bound its advantage's sign pushes against; ``is_weights`` scale the policy term, not the KL
    (verl's and TRL's rollout correction; VESPO folds them into its weight)."""
    # Masked tokens get neutral inputs so that garbage there (inf, NaN) cannot
    # leak NaN into the gradient through a 0 * inf.
    detached = logp.detach()
    old = detached if old_logprobs is None else torch.where(mask, old_logprobs.to(logp.dtype), detached)
    adv = torch.where(mask, advantages.to(logp.dtype), 0.0)
    log_ratio = logp - old
    if terms.importance_level == "sequence":  # GSPO: the mean log-ratio over the sequence's loss tokens
        sums = _per_sequence_sum(torch.where(mask, log_ratio, 0.0), seq_index, num_seqs)
        counts = _per_sequence_sum(mask.to(logp.dtype), seq_index, num_seqs).clamp(min=1.0)
        log_ratio = (sums / counts)[seq_index]
    ratio = torch.exp(log_ratio)
    lower = upper = torch.zeros_like(mask)
    if terms.kind == "clip":
        low, high = 1.0 - terms.clip_eps_low, 1.0 + terms.clip_eps_high
        lower, upper = ratio < low, ratio > high
        capped = ratio if terms.delta is None else ratio.clamp(max=terms.delta)  # INTELLECT-2's two-sided clipping
        token_loss = torch.maximum(-adv * capped, -adv * ratio.clamp(low, high))
    elif terms.kind == "cispo":  # the clipped ratio as a detached weight on the log-prob
        upper = ratio > terms.clip_eps_high
        token_loss = -ratio.clamp(max=terms.clip_eps_high).detach() * adv * torch.where(mask, logp, 0.0)
    elif terms.kind == "sapo":  # a sigmoid gate instead of the hard clip
        t_pos, t_neg = terms.sapo_temperatures
        t = torch.where(adv > 0, t_pos, t_neg).to(logp.dtype)
        token_loss = -adv * torch.sigmoid(t * (ratio - 1.0)) * (4.0 / t)
    else:
        phi = _vespo_phi(log_ratio, adv, mask, is_weights, seq_index, num_seqs, terms.vespo_gamma)
        token_loss = -phi * adv * torch.where(mask, logp, 0.0)
    if is_weights is not None and terms.kind != "vespo":
        token_loss = token_loss * torch.where(mask, is_weights.to(logp.dtype), 0.0)
    if ref_logprobs is not None:
        kl = kl_term(torch.where(mask, ref_logprobs.to(logp.dtype), detached) - logp, terms.kl_estimator)
        if terms.bias_correction_kl:  # DeepSeek-V3.2: the KL times the (token or sequence) ratio, before delta
            kl = kl * ratio
        token_loss = token_loss + terms.beta * kl
    else:
        kl = torch.zeros_like(logp)
    clipped = ((lower & (adv < 0)) | (upper & (adv > 0))) & mask
    return token_loss, clipped, kl


def bpo_loss_from_logprobs(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    seq_ids: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    beta: float = 0.0,
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
    """The loss of ``fused_linear_bpo_loss`` from per-token log-probs you already have.

    ``entropy`` (per token, optional) feeds the ``entropy`` metric and, with ``entropy_coeff``, the entropy bonus
    ``- entropy_coeff * entropy`` per token (differentiable where ``entropy`` is).
    """
    terms = PolicyTerms(
        loss_type, importance_level, clip_eps_low, clip_eps_high, beta, delta, bias_correction_kl, kl_estimator,
        tuple(sapo_temperatures), tuple(vespo_gamma),
    )  # fmt: skip
    loss_agg_mode = LOSS_TYPES[loss_type][1] if loss_agg_mode is None else loss_agg_mode
    if entropy_coeff and entropy is None:
        raise ValueError("entropy_coeff != 0 needs the per-token entropy")
    _check_bpo_inputs(
        logprobs,
        dict(advantages=advantages, seq_ids=seq_ids, loss_mask=loss_mask, old_logprobs=old_logprobs,
             ref_logprobs=ref_logprobs, is_weights=is_weights, entropy=entropy),
        terms, loss_agg_mode=loss_agg_mode, norm_len=norm_len,
    )  # fmt: skip
    mask = torch.ones_like(logprobs, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    seq_index, num_seqs = _sequence_index(seq_ids)
    token_loss, clipped, kl = _bpo_token_terms(
        logprobs, advantages, mask, seq_index, num_seqs, old_logprobs, ref_logprobs, is_weights, terms
    )
    if entropy_coeff:
        token_loss = token_loss - entropy_coeff * torch.where(mask, entropy, 0.0)
    weights = _aggregation_weights(seq_index, num_seqs, mask, loss_agg_mode, norm_len, logprobs.dtype)
    loss = (token_loss * weights).sum()

    n_tokens = mask.sum().clamp(min=1).to(logprobs.dtype)
    with torch.no_grad():
        metrics = {
            "clip_frac": clipped.sum() / n_tokens,
            "kl": torch.where(mask, kl, 0.0).sum() / n_tokens,
            "entropy": torch.where(mask, entropy.detach(), 0.0).sum() / n_tokens
            if entropy is not None
            else n_tokens * 0,
        }
    return loss, metrics


def fused_linear_bpo_loss(
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
    chunk_elements: int | None = None,
    method: str | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BPO/GRPO policy loss from final hidden states, never building [N, V] logits.

    Per token, with ``r = exp(logp - old_logprobs)`` (``old_logprobs=None``: on-policy, the ratio is 1 with
    logp's gradient) and ``A`` the advantage, the policy term of ``loss_type`` (liger-kernel's and TRL's names,
    ``r4b.kernels.LOSS_TYPES``): ``grpo``, ``bnpo``, ``dapo``, ``dr_grpo``, ``luspo``: PPO's clipped surrogate
    ``max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))``, the unclipped ``r`` capped at ``delta`` where given
    (INTELLECT-2's two-sided clipping); ``cispo``: ``-min(r, eps_high) * A * logp`` with the weight detached;
    ``sapo``: ``-A * sigmoid(t * (r - 1)) * 4 / t``, ``t`` the first of ``sapo_temperatures`` where A > 0, else
    the second; ``vespo``: ``-phi * A * logp`` with phi the detached gamma weight (``vespo_gamma``: k_pos, lambda_pos,
    k_neg, lambda_neg) of the sequence's summed log-ratio. ``importance_level="sequence"`` (GSPO; clip types only):
    ``r`` is ``exp`` of the mean log-ratio over the sequence's loss tokens, shared by its tokens. Then
    ``+ beta * KL``, ``kl_estimator`` ``k1``, ``k2``, ``k3`` (the default) or ``low_var_kl`` (:func:`kl_term`)
    of ``ref - logp``, times ``r`` with ``bias_correction_kl`` (DeepSeek-V3.2). ``is_weights`` (per token,
    non-negative, no gradient) multiply the policy term, not the KL: the rollout/training mismatch correction's
    importance weights (``r4b.rl.rollout_correction``; liger's and TRL's ``vllm_is_ratio``; VESPO adds their logs
    to its sequence's). ``entropy_coeff`` adds verl's entropy bonus, ``- entropy_coeff * entropy`` per token,
    its gradient through the fused kernel's entropy (the ``"recompute"`` method: the cuBLAS methods make only the
    log-prob gradient in the forward).
    Tokens outside ``loss_mask`` contribute nothing, whatever their targets,
    advantages or old/ref log-probs hold (a padding target of -100 is fine). Sequences are the distinct values of
    ``seq_ids``. ``loss_agg_mode`` follows verl (default: the loss type's, ``LOSS_TYPES``);
    ``seq-mean-token-sum-norm`` (Dr. GRPO) divides each sequence's sum by ``norm_len``, which it requires.

    ``method`` (default: ``$R4B_FUSED_LOSS_METHOD``, else ``"recompute"``): ``"recompute"``, the Triton
    forward and a backward that recomputes the logits (``linear_logprobs``; ``chunk_elements``);
    ``"cublas"`` / ``"cublas-fast"``, cuBLAS logits per token chunk of at most ``chunk_bytes`` with the
    gradients made in the forward and kept until backward (``r4b.kernels.fused_grad``); a loss whose tokens share
    a sequence's ratio or weight (GSPO, VESPO) takes one more logits pass there, for every log-prob first.

    Returns the scalar loss (fp32) and detached token-mean metrics
    ``clip_frac``, ``kl`` and ``entropy``.
    """
    terms = PolicyTerms(
        loss_type, importance_level, clip_eps_low, clip_eps_high, beta, delta, bias_correction_kl, kl_estimator,
        tuple(sapo_temperatures), tuple(vespo_gamma),
    )  # fmt: skip
    loss_agg_mode = LOSS_TYPES[loss_type][1] if loss_agg_mode is None else loss_agg_mode
    _check_bpo_inputs(
        targets,
        dict(advantages=advantages, seq_ids=seq_ids, loss_mask=loss_mask, old_logprobs=old_logprobs,
             ref_logprobs=ref_logprobs, is_weights=is_weights),
        terms, loss_agg_mode=loss_agg_mode, norm_len=norm_len,
    )  # fmt: skip
    method = "recompute" if entropy_coeff else fused_grad.resolve_method(method)  # see the docstring
    mask = torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    safe_targets = targets.masked_fill(~mask, 0)
    options = dict(
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, beta=beta, loss_type=loss_type,
        loss_agg_mode=loss_agg_mode, importance_level=importance_level, norm_len=norm_len, delta=delta,
        bias_correction_kl=bias_correction_kl, kl_estimator=kl_estimator, sapo_temperatures=sapo_temperatures,
        vespo_gamma=vespo_gamma,
    )  # fmt: skip
    if method != "recompute" and _cublas_applies(hidden, weight, safe_targets, temperature, chunk_bytes):
        flat_mask = mask.reshape(-1)
        seq_index, num_seqs = _sequence_index(seq_ids.reshape(-1))
        weights = _aggregation_weights(seq_index, num_seqs, flat_mask, loss_agg_mode, norm_len)
        flat = lambda t: None if t is None else t.reshape(-1)
        adv, old, ref, isw = flat(advantages), flat(old_logprobs), flat(ref_logprobs), flat(is_weights)
        part = lambda t, rows: None if t is None else t[rows]

        def loss_grad(logp_rows: torch.Tensor, rows: slice) -> torch.Tensor:
            """d loss / d logp of the rows' tokens: autograd through the same O(rows) token terms."""
            with torch.enable_grad():
                lp = logp_rows.detach().requires_grad_()
                token_loss = _bpo_token_terms(
                    lp, adv[rows], flat_mask[rows], seq_index[rows], num_seqs, part(old, rows), part(ref, rows),
                    part(isw, rows), terms,
                )[0]  # fmt: skip
                (grad,) = torch.autograd.grad((token_loss * weights[rows]).sum(), lp)
            return grad

        token_grad = loss_grad
        if terms.couples_sequences:  # a sequence may span token chunks: every log-prob first (one more logits pass)
            logp_all, _ = fused_grad.logprobs_forward_only(
                hidden.reshape(-1, hidden.shape[-1]), weight.to(hidden.dtype), safe_targets.reshape(-1),
                temperature=temperature, chunk_bytes=chunk_bytes,
                logits_fp32=fused_grad.method_options(method)["logits_fp32"],
            )  # fmt: skip
            grads = loss_grad(logp_all, slice(None))
            token_grad = lambda _logp_rows, rows: grads[rows]
        logprobs, entropy, carrier = _cublas_forward(
            hidden, weight, safe_targets, token_grad, temperature, True, method, chunk_bytes
        )
        loss, metrics = bpo_loss_from_logprobs(
            logprobs, advantages, seq_ids=seq_ids, loss_mask=mask, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, is_weights=is_weights, entropy=entropy, **options,
        )  # fmt: skip
        return loss + carrier, metrics
    logprobs, entropy = linear_logprobs(
        hidden,
        weight,
        safe_targets,
        temperature=temperature,
        with_entropy=True,
        chunk_elements=chunk_elements,
        method="recompute",
    )
    return bpo_loss_from_logprobs(
        logprobs,
        advantages,
        seq_ids=seq_ids,
        loss_mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        is_weights=is_weights,
        entropy=entropy if entropy_coeff else entropy.detach(),  # no entropy gradient pass unless the bonus asks
        entropy_coeff=entropy_coeff,
        **options,
    )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_elements: int | None = None,
    method: str | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, never building the logits.

    Matches ``torch.nn.functional.cross_entropy`` except that a batch whose
    targets are all ``ignore_index`` gives 0 with ``reduction="mean"`` (torch
    gives NaN): a packed micro-batch without supervised tokens must not poison
    gradient accumulation. Returns fp32. ``method`` and ``chunk_bytes`` as in ``fused_linear_bpo_loss``;
    ``reduction="none"`` always takes ``"recompute"`` (the per-token gradient is unknown in the forward).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    method = fused_grad.resolve_method(method)
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)
    if (
        method != "recompute"
        and reduction != "none"
        and _cublas_applies(hidden, weight, safe_targets, 1.0, chunk_bytes)
    ):
        count = valid.sum().clamp(min=1)
        scale = -valid.reshape(-1).to(torch.float32)
        if reduction == "mean":
            scale = scale / count

        def token_grad(logp_chunk: torch.Tensor, rows: slice) -> torch.Tensor:
            return scale[rows]

        logp, _, carrier = _cublas_forward(hidden, weight, safe_targets, token_grad, 1.0, False, method, chunk_bytes)
        losses = torch.where(valid, -logp, 0.0)
        total = losses.sum() if reduction == "sum" else losses.sum() / count
        return total + carrier
    logp, _ = linear_logprobs(hidden, weight, safe_targets, chunk_elements=chunk_elements, method="recompute")
    losses = torch.where(valid, -logp, 0.0)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum().clamp(min=1)


def _cublas_applies(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_bytes: int | None
) -> bool:
    """Validate the inputs; True where the cuBLAS methods run (where Triton would: CUDA, or the CPU interpreter)."""
    check_logprob_inputs(hidden, weight, targets)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return use_triton(hidden, weight.to(hidden.dtype))


def _cublas_forward(hidden, weight, targets, token_grad, temperature, with_entropy, method, chunk_bytes):
    """fused_grad.fused_loss_forward on flattened inputs: (logp, entropy, carrier) shaped like ``targets``."""
    shape = targets.shape
    logp, entropy, carrier = fused_grad.fused_loss_forward(
        hidden.reshape(-1, hidden.shape[-1]), weight.to(hidden.dtype), targets.reshape(-1), token_grad,
        temperature=temperature, with_entropy=with_entropy, chunk_bytes=chunk_bytes,
        **fused_grad.method_options(method),
    )  # fmt: skip
    return logp.view(shape), None if entropy is None else entropy.view(shape), carrier
