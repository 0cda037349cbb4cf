"""``FusedLinearGRPOLoss``: liger-kernel's ``LigerFusedLinearGRPOLoss`` on r4b's fused BPO/GRPO loss.

Code written against liger-kernel switches by its import alone::

    # from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from r4b.kernels import FusedLinearGRPOLoss as LigerFusedLinearGRPOLoss

Same constructor, same call, same return: ``(loss, metrics)`` with ``metrics`` liger's tuple, ``(kl, clip_ratio)``
where ``beta != 0``, else ``(clip_ratio,)``. Every loss type (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``,
``sapo``, ``luspo``, ``vespo``), ``importance_sampling_level="sequence"`` (GSPO), ``delta``,
``use_bias_correction_kl``, ``vllm_is_ratio`` ([B, T] or [B, 1]) and the reference inputs run on
``fused_linear_bpo_loss``, with liger's normalizers where r4b's exact aggregation differs: ``grpo``, ``sapo``,
``dr_grpo`` and ``luspo`` divide by every row of the batch (fully masked rows too), ``dapo``, ``cispo`` and ``vespo``
by ``num_items_in_batch`` or the mask's token count summed over the process group, per process.

Two places follow TRL 1.16 where liger 0.8.5 departs from it: ``luspo`` sums each completion's tokens (liger, when
its per-token loss is not one value per sequence, i.e. token-level ratios, ``beta != 0`` or a [B, T]
``vllm_is_ratio``, sums every position of the padded [B, T], padding included, and divides by T too; the two agree
in the sequence-level setting TRL requires of ``luspo``); ``vespo`` sums the logs of a [B, T] ``vllm_is_ratio`` over
the completion's tokens (liger over every position: the same where the padding's ratios are 1, as TRL's are).
No ``[tokens, vocab]`` tensor is made (on CPU tensors without ``TRITON_INTERPRET`` the torch reference runs, as
everywhere in r4b.kernels). An argument liger adds later is a one-line ``TypeError`` naming it.
"""

from __future__ import annotations

import torch

from .linear_logprobs import linear_logprobs
from .losses import PolicyTerms, fused_linear_bpo_loss

# liger's loss types whose normalizer is the batch's row count (fully masked rows included) rather than r4b's count of
# sequences with a token, and those with the DAPO normalizer (num_items_in_batch or the process group's tokens)
PER_ROW_TYPES = ("grpo", "sapo", "dr_grpo", "luspo")
DAPO_NORMALIZED_TYPES = ("dapo", "cispo", "vespo")


class FusedLinearGRPOLoss(torch.nn.Module):
    """liger's GRPO loss family from ``[B, T, H]`` hidden states and the ``lm_head`` weight.

    Arguments as liger-kernel 0.8.5's ``LigerFusedLinearGRPOLoss``. ``compiled`` and ``chunk_size`` are accepted and
    unused (r4b needs no torch.compile and sizes its own token chunks). ``bias`` and ``ref_bias`` are supported by
    appending a column to the hidden states and the weight (one copy of each per call). Keyword-only extras:
    ``method`` and ``chunk_bytes`` of ``fused_linear_bpo_loss`` (default: ``$R4B_FUSED_LOSS_METHOD``).
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        method: str | None = None,
        chunk_bytes: int | None = None,
    ):
        super().__init__()
        # the options' own checks, at construction (liger's run at the first call)
        sapo_temperatures = (sapo_temperature_pos, sapo_temperature_neg)
        PolicyTerms(loss_type, importance_sampling_level, sapo_temperatures=sapo_temperatures)
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg
        self.method = method
        self.chunk_bytes = chunk_bytes

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        selected_token_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        advantages: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_per_token_logps: torch.Tensor | None = None,
        old_per_token_logps: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        vllm_is_ratio: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if _input.dim() != 3:
            raise ValueError(f"_input must be [B, T, H] hidden states, got shape {tuple(_input.shape)}")
        batch, seq_len = _input.shape[:2]
        if attention_mask.shape != (batch, seq_len):
            raise ValueError(f"attention_mask must be [B, T] = {(batch, seq_len)}, got {tuple(attention_mask.shape)}")
        if advantages.shape != (batch,):
            raise ValueError(f"advantages must be [B] = [{batch}] (one per sequence), got {tuple(advantages.shape)}")
        if vllm_is_ratio is not None and vllm_is_ratio.shape not in ((batch, seq_len), (batch, 1)):
            raise ValueError(f"vllm_is_ratio must be [B, T] or [B, 1], got {tuple(vllm_is_ratio.shape)}")
        mask = attention_mask.bool()
        ref = self._reference_logprobs(ref_per_token_logps, ref_input, ref_weight, ref_bias, selected_token_ids, mask)
        hidden, weight = _with_bias(_input, lin_weight, bias)
        # Flat [B * T] tokens: fused_linear_bpo_loss's sequence means group tokens by seq_ids (one id per row).
        flat = lambda t: None if t is None else t.reshape(batch * seq_len)
        seq_ids = torch.arange(batch, device=_input.device).repeat_interleave(seq_len)
        is_weights = None if vllm_is_ratio is None else _token_is_weights(vllm_is_ratio, mask, self.loss_type)
        loss, metrics = fused_linear_bpo_loss(
            hidden.reshape(batch * seq_len, -1), weight, flat(selected_token_ids),
            advantages.repeat_interleave(seq_len), seq_ids=seq_ids, loss_mask=flat(mask),
            old_logprobs=flat(old_per_token_logps), ref_logprobs=flat(ref), clip_eps_low=self.epsilon_low,
            is_weights=flat(is_weights), clip_eps_high=self.epsilon_high, beta=self.beta if ref is not None else 0.0,
            temperature=self.temperature, loss_type=self.loss_type, importance_level=self.importance_sampling_level,
            norm_len=self.max_completion_length, method=self.method, chunk_bytes=self.chunk_bytes,
            delta=self.delta, bias_correction_kl=self.use_bias_correction_kl,
            sapo_temperatures=(self.sapo_temperature_pos, self.sapo_temperature_neg),
            vespo_gamma=(self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg),
        )  # fmt: skip
        scale = self._liger_normalizer_scale(mask, num_items_in_batch)
        if scale is not None:
            loss = loss * scale
        clip_ratio = metrics["clip_frac"]
        return loss, ((metrics["kl"], clip_ratio) if self.beta != 0.0 else (clip_ratio,))

    def _reference_logprobs(self, ref_per_token_logps, ref_input, ref_weight, ref_bias, targets, mask):
        """Liger's rule: with ``use_ref_model`` the given log-probs, else those of ``ref_input`` (no gradient);
        without it none (its KL term is then 0 with no gradient, as liger's)."""
        if not self.use_ref_model:
            return None
        if ref_per_token_logps is not None:
            return ref_per_token_logps
        if ref_input is None or ref_weight is None:
            raise ValueError("use_ref_model=True needs ref_per_token_logps, or ref_input and ref_weight")
        hidden, weight = _with_bias(ref_input, ref_weight, ref_bias)
        with torch.no_grad():
            return linear_logprobs(
                hidden, weight, targets.masked_fill(~mask, 0), temperature=self.temperature, method=self.method,
                chunk_bytes=self.chunk_bytes,
            )[0]  # fmt: skip

    def _liger_normalizer_scale(self, mask: torch.Tensor, num_items_in_batch) -> torch.Tensor | None:
        """The factor from r4b's normalizer to liger's, or None where they agree."""
        if self.loss_type in PER_ROW_TYPES:  # r4b: sequences with a token; liger: all B rows
            return (mask.any(dim=1).sum().clamp(min=1) / mask.shape[0]).to(torch.float32)
        if self.loss_type not in DAPO_NORMALIZED_TYPES:
            return None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_items_in_batch is None and not distributed:
            return None
        local = mask.sum().to(torch.float32)
        world = torch.distributed.get_world_size() if distributed else 1
        if num_items_in_batch is not None:
            total = torch.as_tensor(num_items_in_batch, device=mask.device, dtype=torch.float32)
        else:
            total = local.clone()
            torch.distributed.all_reduce(total)
        return local.clamp(min=1) / (total / world).clamp(min=1)


def _token_is_weights(ratio: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """liger's ``vllm_is_ratio`` as per-token weights: [B, 1] scales every token, except under VESPO, which adds the
    log of one value per sequence to its weight, so that value goes on the first completion token and 1 elsewhere."""
    batch, seq_len = mask.shape
    if ratio.shape[1] == seq_len or loss_type != "vespo":
        return ratio.expand(batch, seq_len)
    first = mask & (mask.cumsum(dim=1) == 1)
    return torch.where(first, ratio, torch.ones_like(ratio))


def _with_bias(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``hidden @ weight.T + bias`` as ``[hidden, 1] @ [weight, bias].T`` (differentiable in all three)."""
    if bias is None:
        return hidden, weight
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    ones = hidden.new_ones((*hidden.shape[:-1], 1))
    return torch.cat([hidden, ones], dim=-1), torch.cat([weight, bias[:, None].to(weight.dtype)], dim=-1)
