"""Losses on top of the fused log-prob kernel: BPO/GRPO (RL) and cross-entropy (SFT).

The [N, V] work (logits, softmax, their gradients) happens in
``linear_logprobs``; what is left here is O(N) per-token arithmetic in torch,
whose gradient reaches the kernel as one scalar per token.
"""

from __future__ import annotations

import math

import torch

from . import fused_grad
from ._backend import use_triton
from .linear_logprobs import check_logprob_inputs, linear_logprobs
from .reference import LOSS_AGG_MODES


def _check_bpo_inputs(
    targets: torch.Tensor,
    per_token: dict[str, torch.Tensor | None],
    *,
    beta: float,
    loss_agg_mode: str,
    norm_len: int | None,
    clip_eps_low: float,
    clip_eps_high: float,
) -> None:
    """Fail before any kernel runs, naming the argument."""
    for name, tensor in per_token.items():
        if tensor is not None and tensor.shape != targets.shape:
            raise ValueError(f"{name} must have the shape of targets {tuple(targets.shape)}, got {tuple(tensor.shape)}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; expected one of {LOSS_AGG_MODES}")
    if beta != 0.0 and per_token.get("ref_logprobs") is None:
        raise ValueError("beta != 0 needs ref_logprobs (the reference policy's log-probs)")
    if loss_agg_mode == "seq-mean-token-sum-norm" and (norm_len is None or norm_len <= 0):
        raise ValueError(
            "loss_agg_mode='seq-mean-token-sum-norm' needs a positive norm_len (Dr. GRPO: max response length)"
        )
    if not (0.0 <= clip_eps_low < 1.0 and clip_eps_high >= 0.0):
        raise ValueError(f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {clip_eps_low}, {clip_eps_high}")


def _aggregation_weights(
    seq_ids: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str, norm_len: int | None
) -> torch.Tensor:
    """Per-token weights w such that loss = sum(w * token_loss) for verl's loss_agg_modes.

    Sequences are the distinct values of ``seq_ids``; only those with at least
    one token in ``mask`` count in means over sequences.
    """
    maskf = mask.to(torch.float32)
    if loss_agg_mode == "token-mean":
        return maskf / maskf.sum().clamp(min=1.0)
    # leading dimensions ([B, T] tokens) flattened: the sequence sums scatter over one axis
    _, seq_index = torch.unique(seq_ids.reshape(-1), return_inverse=True)
    seq_index = seq_index.view(maskf.shape)
    tokens_per_seq = torch.zeros(int(seq_index.max()) + 1 if seq_index.numel() else 0, device=mask.device)
    tokens_per_seq.scatter_add_(0, seq_index.reshape(-1), maskf.reshape(-1))
    num_seqs = (tokens_per_seq > 0).sum().clamp(min=1).to(torch.float32)
    if loss_agg_mode == "seq-mean-token-mean":
        return maskf / (tokens_per_seq[seq_index].clamp(min=1.0) * num_seqs)
    if loss_agg_mode == "seq-mean-token-sum":
        return maskf / num_seqs
    return maskf / (norm_len * num_seqs)


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


def _bpo_token_terms(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    clip_eps_low: float,
    clip_eps_high: float,
    beta: float,
    is_weights: torch.Tensor | None = None,
    delta: float | None = None,
    bias_correction_kl: bool = False,
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_loss, clipped, unclipped, kl) per token; differentiable in ``logp``. ``is_weights`` scale the
    surrogate, not the KL (verl's and TRL's rollout correction); clipped / unclipped stay unweighted (clip_frac).
    ``delta``: the unclipped ratio capped at delta (INTELLECT-2's two-sided clipping); ``bias_correction_kl``: the
    KL times the ratio (DeepSeek-V3.2's importance-corrected KL); ``kl_estimator``: :func:`kl_term`'s."""
    # Masked tokens get neutral inputs so that garbage there (inf, NaN) cannot
    # leak NaN into the gradient through a 0 * inf.
    detached = logp.detach()
    old = detached if old_logprobs is None else torch.where(mask, old_logprobs.to(logp.dtype), detached)
    adv = torch.where(mask, advantages.to(logp.dtype), 0.0)
    ratio = torch.exp(logp - old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    surrogate = unclipped if delta is None else -adv * ratio.clamp(max=delta)
    token_loss = torch.maximum(surrogate, clipped)
    if is_weights is not None:
        token_loss = token_loss * torch.where(mask, is_weights.to(logp.dtype), 0.0)
    if ref_logprobs is not None:
        kl = kl_term(torch.where(mask, ref_logprobs.to(logp.dtype), detached) - logp, kl_estimator)
        if bias_correction_kl:
            kl = kl * ratio
        token_loss = token_loss + beta * kl
    else:
        kl = torch.zeros_like(logp)
    return token_loss, clipped, unclipped, kl


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
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
    entropy_coeff: float = 0.0,
    delta: float | None = None,
    bias_correction_kl: bool = False,
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The BPO/GRPO loss of ``fused_linear_bpo_loss`` from per-token log-probs you already have.

    ``entropy`` (per token, optional) feeds the ``entropy`` metric and, with ``entropy_coeff``, the entropy bonus
    ``- entropy_coeff * entropy`` per token (differentiable where ``entropy`` is).
    """
    if entropy_coeff and entropy is None:
        raise ValueError("entropy_coeff != 0 needs the per-token entropy")
    _check_bpo_inputs(
        logprobs,
        dict(advantages=advantages, seq_ids=seq_ids, loss_mask=loss_mask, old_logprobs=old_logprobs,
             ref_logprobs=ref_logprobs, is_weights=is_weights, entropy=entropy),
        beta=beta, loss_agg_mode=loss_agg_mode, norm_len=norm_len, clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
    )  # fmt: skip

    logp = logprobs
    mask = torch.ones_like(logp, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    token_loss, clipped, unclipped, kl = _bpo_token_terms(
        logp, advantages, mask, old_logprobs, ref_logprobs, clip_eps_low, clip_eps_high, beta, is_weights,
        delta=delta, bias_correction_kl=bias_correction_kl, kl_estimator=kl_estimator,
    )  # fmt: skip

    if entropy_coeff:
        token_loss = token_loss - entropy_coeff * torch.where(mask, entropy, 0.0)
    weights = _aggregation_weights(seq_ids, mask, loss_agg_mode, norm_len)
    loss = (token_loss * weights).sum()

    n_tokens = mask.sum().clamp(min=1).to(logp.dtype)
    with torch.no_grad():
        metrics = {
            "clip_frac": ((clipped > unclipped) & mask).sum() / n_tokens,
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
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
    entropy_coeff: float = 0.0,
    delta: float | None = None,
    bias_correction_kl: bool = False,
    kl_estimator: str = "k3",
    chunk_elements: int | None = None,
    method: str | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BPO/GRPO policy loss from final hidden states, never building [N, V] logits.

    Per token: ``max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high)) + beta * k3``
    with ``r = exp(logp - old_logprobs)`` (``old_logprobs=None``: on-policy,
    the ratio is 1 with logp's gradient) and ``k3 = exp(ref - logp) - (ref - logp) - 1``.
    ``is_weights`` (per token, non-negative, no gradient) multiply the surrogate term, not the KL: the
    rollout/training mismatch correction's importance weights (``r4b.rl.rollout_correction``; liger's and
    TRL's ``vllm_is_ratio``). ``entropy_coeff`` adds verl's entropy bonus, ``- entropy_coeff * entropy`` per token
    before the aggregation, its gradient through the fused kernel's entropy (the ``"recompute"`` method: the cuBLAS
    methods make only the log-prob gradient in the forward). ``delta`` caps the unclipped ratio (INTELLECT-2's
    two-sided clipping) and ``bias_correction_kl`` multiplies the KL by the ratio (DeepSeek-V3.2), as liger's
    options of those names. ``kl_estimator``: ``k1``, ``k2``, ``k3`` (the default) or ``low_var_kl``
    (:func:`kl_term`).
    Tokens outside ``loss_mask`` contribute nothing, whatever their targets,
    advantages or old/ref log-probs hold (a padding target of -100 is fine).
    ``loss_agg_mode`` follows verl; ``seq-mean-token-sum-norm`` (Dr. GRPO)
    divides each sequence's sum by ``norm_len``, which it requires.

    ``method`` (default: ``$R4B_FUSED_LOSS_METHOD``, else ``"recompute"``): ``"recompute"``, the Triton
    forward and a backward that recomputes the logits (``linear_logprobs``; ``chunk_elements``);
    ``"cublas"`` / ``"cublas-fast"``, cuBLAS logits per token chunk of at most ``chunk_bytes`` with the
    gradients made in the forward and kept until backward (``r4b.kernels.fused_grad``).

    Returns the scalar loss (fp32) and detached token-mean metrics
    ``clip_frac``, ``kl`` and ``entropy``.
    """
    _check_bpo_inputs(
        targets,
        dict(advantages=advantages, seq_ids=seq_ids, loss_mask=loss_mask, old_logprobs=old_logprobs,
             ref_logprobs=ref_logprobs, is_weights=is_weights),
        beta=beta, loss_agg_mode=loss_agg_mode, norm_len=norm_len, clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
    )  # fmt: skip
    method = "recompute" if entropy_coeff else fused_grad.resolve_method(method)  # see the docstring
    mask = torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    safe_targets = targets.masked_fill(~mask, 0)
    aggregation = dict(clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, beta=beta, delta=delta,
                       bias_correction_kl=bias_correction_kl, kl_estimator=kl_estimator)  # fmt: skip
    if method != "recompute" and _cublas_applies(hidden, weight, safe_targets, temperature, chunk_bytes):
        flat_mask = mask.reshape(-1)
        weights = _aggregation_weights(seq_ids.reshape(-1), flat_mask, loss_agg_mode, norm_len)
        adv = advantages.reshape(-1)
        old = None if old_logprobs is None else old_logprobs.reshape(-1)
        ref = None if ref_logprobs is None else ref_logprobs.reshape(-1)
        isw = None if is_weights is None else is_weights.reshape(-1)

        def token_grad(logp_chunk: torch.Tensor, rows: slice) -> torch.Tensor:
            """d loss / d logp of the chunk's tokens: autograd through the same O(C) token terms."""
            with torch.enable_grad():
                lp = logp_chunk.detach().requires_grad_()
                token_loss = _bpo_token_terms(
                    lp, adv[rows], flat_mask[rows], None if old is None else old[rows],
                    None if ref is None else ref[rows], clip_eps_low, clip_eps_high, beta,
                    None if isw is None else isw[rows], delta=delta, bias_correction_kl=bias_correction_kl,
                    kl_estimator=kl_estimator,
                )[0]  # fmt: skip
                (grad,) = torch.autograd.grad((token_loss * weights[rows]).sum(), lp)
            return grad

        logprobs, entropy, carrier = _cublas_forward(
            hidden, weight, safe_targets, token_grad, temperature, True, method, chunk_bytes
        )
        loss, metrics = bpo_loss_from_logprobs(
            logprobs, advantages, seq_ids=seq_ids, loss_mask=mask, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, is_weights=is_weights, entropy=entropy, loss_agg_mode=loss_agg_mode,
            norm_len=norm_len,
            **aggregation,
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
        loss_agg_mode=loss_agg_mode,
        norm_len=norm_len,
        entropy_coeff=entropy_coeff,
        **aggregation,
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
