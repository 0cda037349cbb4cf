"""TRL's fused LM head, ``trl.trainer.utils.add_fused_lm_head``, on r4b's kernels.

TRL 1.16's trainers (``GRPOTrainer``, ``RLOOTrainer``, ``DPOTrainer``, ``KTOTrainer``, ``SFTTrainer``, the async GRPO)
patch their model with ``add_fused_lm_head``: called with ``fused_lm_head=True``, the forward runs the backbone, picks
the positions whose shifted label is not -100 and hands their hidden states and ``lm_head.weight`` to TRL's chunked
autograd function, which TRL's wrapper looks up in ``trl.trainer.utils`` on every call. ``use_r4b_fused_lm_head()``
puts :func:`r4b.kernels.linear_logprobs` in that one place::

    from r4b.kernels import use_r4b_fused_lm_head
    use_r4b_fused_lm_head()  # then build and train TRL's GRPOTrainer as usual

Every model patched by ``add_fused_lm_head``, before or after the call, then takes its per-token log-probs and
entropy (values and gradients) from r4b. Everything around them stays TRL's own code: the label shift and the
position selection (so the outputs keep TRL's shapes), ``cast_lm_head_to_fp32``, the loss, the MoE auxiliary loss,
FSDP2's gather of the head. The compute dtype is TRL's (autocast's dtype, else the hidden states'); r4b keeps the
logits in fp32 where TRL rounds each logit tile to that dtype first, and float64 models get float64 log-probs.

Supported: ``temperature``; ``logit_scale`` (and TRL's aliases: ``output_multiplier``, ``lm_head_multiplier``,
``logits_scaling``) when positive, folded exactly into the temperature as ``temperature / logit_scale``; an
``lm_head`` bias (an extra input column of ones, exact, at the cost of one copy of the weight per call). The outputs
``log_sum_sq_probs``, ``mean_logits`` and ``is_top1`` (DPO's and SFT's metrics, never differentiated) are TRL's own:
when asked for, TRL's kernel runs once more without gradients to make them. Refused with a one-line
``NotImplementedError`` at the first fused forward: ``final_logit_softcapping`` (Gemma 2/3), a non-positive
``logit_scale``, an output name TRL 1.16 does not have, and an ``lm_head`` partitioned by DeepSpeed ZeRO-3 (r4b's
backward recomputes from the saved weight, which ZeRO-3 has released by then). TRL's vocabulary chunk size is not
used: r4b sizes its own chunks (``DEFAULT_CHUNK_ELEMENTS``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from .linear_logprobs import linear_logprobs

__all__ = ["FusedLMHeadPatch", "use_r4b_fused_lm_head"]

# TRL 1.16's per-token outputs, in the order its function returns them after the log-probs
EXTRA_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")
OUTPUTS = ("log_probs", "entropy", *EXTRA_OUTPUTS)
# The positional arguments TRL's wrapper passes (trl.kernels.chunked_logprob.ChunkedLogProbFunction.forward)
TRL_ARGUMENTS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                 "logit_scale", "outputs")  # fmt: skip


class _R4BLogProbFunction:
    """Stands where TRL's wrapper calls ``_ChunkedLogProbFunction.apply`` with TRL's arguments and returns its
    5-tuple; keeps TRL's function for the outputs r4b does not compute."""

    def __init__(self, trl_function: Any) -> None:
        self.trl_function = trl_function

    def apply(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = OUTPUTS,
    ) -> tuple[torch.Tensor | None, ...]:
        unknown = [name for name in outputs if name not in OUTPUTS]
        if unknown:
            raise NotImplementedError(f"r4b's fused LM head for TRL: unknown outputs {unknown}; it knows {OUTPUTS}")
        if final_logit_softcapping is not None:
            raise NotImplementedError(
                "r4b's fused LM head for TRL does not support final_logit_softcapping (Gemma 2/3): use TRL's own head"
            )
        if not (math.isfinite(logit_scale) and logit_scale > 0):
            raise NotImplementedError(f"r4b's fused LM head for TRL needs a positive logit_scale, got {logit_scale}")
        if getattr(weight, "ds_id", None) is not None:
            raise NotImplementedError("r4b's fused LM head for TRL does not support a DeepSpeed ZeRO-3 lm_head")
        device = hidden.device.type
        # TRL's compute dtype: autocast's, else the hidden states'; autocast is then off so nothing casts again
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            if bias is not None:  # logits + bias as one more input column: h·w + 1·bias
                h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
                w = torch.cat([w, bias.to(dtype)[:, None]], dim=1)
            log_probs, entropy = linear_logprobs(
                h, w, targets, temperature=temperature / logit_scale, with_entropy="entropy" in outputs
            )
        extras: dict[str, torch.Tensor | None] = dict.fromkeys(EXTRA_OUTPUTS)
        wanted = tuple(name for name in EXTRA_OUTPUTS if name in outputs)
        if wanted:  # metrics only (TRL marks them non-differentiable): TRL's kernel, once more, without gradients
            with torch.no_grad():
                trl_out = self.trl_function.apply(
                    hidden.detach(), weight.detach(), None if bias is None else bias.detach(), targets,
                    temperature, chunk_size, None, logit_scale, wanted,
                )  # fmt: skip
            extras.update((name, value) for name, value in zip(OUTPUTS, trl_out, strict=True) if name in wanted)
        return log_probs, entropy, *(extras[name] for name in EXTRA_OUTPUTS)


class FusedLMHeadPatch:
    """What :func:`use_r4b_fused_lm_head` installed: ``restore()`` (or leaving its ``with`` block) puts back the
    function that was there before, TRL's own unless calls were nested."""

    def __init__(self, module: ModuleType, previous: Any) -> None:
        self._module, self._previous = module, previous

    def restore(self) -> None:
        self._module._ChunkedLogProbFunction = self._previous

    def __enter__(self) -> FusedLMHeadPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def _trl_utils() -> ModuleType:
    try:
        import trl
        from trl.trainer import utils as trl_utils
    except ImportError as err:
        raise ImportError("use_r4b_fused_lm_head needs TRL >= 1.16 (pip install 'trl>=1.16')") from err
    function = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    forward: Callable | None = getattr(function, "forward", None)
    if isinstance(function, _R4BLogProbFunction):
        forward = function.trl_function.forward
    names = tuple(inspect.signature(forward).parameters)[1:] if forward is not None else ()
    if names != TRL_ARGUMENTS:  # another TRL calls its head otherwise: refuse rather than misread its arguments
        raise ImportError(
            f"use_r4b_fused_lm_head matches TRL 1.16's fused LM head; TRL {trl.__version__}'s takes {names or 'none'}"
        )
    return trl_utils


def use_r4b_fused_lm_head() -> FusedLMHeadPatch:
    """Make TRL's ``add_fused_lm_head`` (so TRL 1.16's ``GRPOTrainer`` and every trainer or model using it) compute
    per-token log-probs and entropy with :func:`r4b.kernels.linear_logprobs` (module docstring: what is supported).

    Takes effect at once, for models patched before or after the call, and process-wide; returns a handle whose
    ``restore()`` undoes it, also usable as ``with use_r4b_fused_lm_head(): ...``. Raises ImportError when TRL is
    missing or calls its head with other arguments than TRL 1.16."""
    trl_utils = _trl_utils()
    previous = trl_utils._ChunkedLogProbFunction
    trl_function = previous.trl_function if isinstance(previous, _R4BLogProbFunction) else previous
    trl_utils._ChunkedLogProbFunction = _R4BLogProbFunction(trl_function)
    return FusedLMHeadPatch(trl_utils, previous)
