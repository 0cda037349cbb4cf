"""verl's fused LM head, ``verl.utils.kernel.linear_cross_entropy``, on r4b's kernels.

verl's actor calls ``log_probs, entropy = linear_cross_entropy(hidden, weight, labels, temperature, "none")``
instead of ``lm_head`` + log-softmax: a trainer written for it switches by the import. The contract (verl's own
reference in its tests): logits ``hidden @ weight.T / temperature``, ``log_probs = -cross_entropy(logits, labels,
reduction)`` (so per token with ``"none"``, their sum or mean over the labelled tokens with ``"sum"`` / ``"mean"``;
a label of -100 gives 0 and is left out of the mean) and ``entropy`` per token, both differentiable. Built on
:func:`r4b.kernels.linear_logprobs`, so no ``[tokens, vocab]`` tensor is ever made.
"""

from __future__ import annotations

import torch

from .linear_logprobs import linear_logprobs

__all__ = ["linear_cross_entropy"]

IGNORE_INDEX = -100
REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, entropy)`` of ``hidden [..., H] @ weight[V, H].T / temperature`` at ``labels [...]``, verl's
    signature and semantics (module docstring); fp32. ``log_probs`` is shaped like ``labels`` with ``"none"``, a
    scalar otherwise; ``entropy`` like ``labels``. A vocabulary split over a tensor-parallel group
    (``dist_process_group``) is not supported: one line says so."""
    if dist_process_group is not None:
        raise NotImplementedError(
            "linear_cross_entropy: dist_process_group (a tensor-parallel vocabulary) is not supported"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree: want [..., H] and [...]"
        )
    labelled = labels != IGNORE_INDEX
    log_probs, entropy = linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1).masked_fill(~labelled.reshape(-1), 0),
        temperature=temperature,
        with_entropy=True,
    )
    log_probs = torch.where(labelled.reshape(-1), log_probs, 0.0)
    if reduction == "sum":
        log_probs = log_probs.sum()
    elif reduction == "mean":  # torch's mean over the labelled tokens (0, not NaN, when there are none)
        log_probs = log_probs.sum() / labelled.sum().clamp(min=1)
    else:
        log_probs = log_probs.view(labels.shape)
    return log_probs, entropy.view(labels.shape)
