"""The BPO policy update: log-probs of a rollout batch and clipped-surrogate optimizer steps over it.

The whole loss -- packed forward to final hidden states, then the fused lm_head + BPO loss -- runs in
the ``forward`` of :class:`BPOObjective`, so FSDP2 / ZeRO-3 gather ``lm_head.weight`` inside it (as
:class:`r4b.train.objective.PackedSFTObjective` does for SFT).

Exact aggregation. A mini-batch's loss is ``fused_linear_bpo_loss`` over all its responses at once
(verl's ``loss_agg_mode``). It is computed as a sum over micro-batches (and ranks) of each micro-batch's
own loss times a weight: ``token-mean`` weights by loss tokens (``T_micro / T_mini``), the three
``seq-mean-*`` modes by responses (``S_micro / S_mini``; a response never spans micro-batches, and
``seq-mean-token-sum-norm`` uses one ``norm_len`` for the whole batch). Engines average gradients over
ranks, so each rank scales by ``world_size`` on top. Ranks make the same number of forward/backward
calls: a rank with fewer micro-batches runs zero-weight ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from r4b import packing
from r4b.config.sections import PolicyUpdate
from r4b.kernels import LOSS_AGG_MODES, LOSS_TYPES, fused_linear_bpo_loss, linear_logprobs
from r4b.models.forward import lm_head_operands, packed_final_hidden
from r4b.packed_row import PackedRow
from r4b.shared_prefix import unpack_responses
from r4b.train.accumulate import MicroStep, accumulate_gradients, rank_micro_steps

from .batch import Chunk, RolloutBatch, build_micro_batch, chunk_tokens, plan_chunks
from .rollout_correction import CORRECTIONS, LEVELS, rollout_correction_weights

__all__ = ["BPOObjective", "UpdateConfig", "compute_logprobs", "policy_update"]


@dataclass
class UpdateConfig(PolicyUpdate):
    """How one BPO policy update runs (verl's names where there is one): the fields of a run's ``policy`` section
    (:class:`r4b.config.sections.PolicyUpdate`, documented there; here ``clip_eps_high`` defaults to 0.2, no
    clip-higher) and two the run takes from elsewhere."""

    temperature: float = 1.0  # log-probs at the rollout temperature
    norm_len: int | None = None  # seq-mean-token-sum-norm; None = the batch's padded width (response_ids.shape[1])

    @classmethod
    def from_policy(cls, policy: PolicyUpdate, **extra: Any) -> UpdateConfig:
        """The update a run's ``policy`` section describes, plus ``temperature`` / ``norm_len`` from ``extra``."""
        return cls(**{f.name: getattr(policy, f.name) for f in fields(PolicyUpdate)}, **extra)

    @property
    def aggregation(self) -> str:
        """The loss aggregation: ``loss_agg_mode``, or where None the loss type's own."""
        return LOSS_TYPES[self.loss_type][1] if self.loss_agg_mode is None else self.loss_agg_mode

    def loss_options(self) -> dict[str, Any]:
        """``fused_linear_bpo_loss``'s keyword arguments for this update (all but the per-token tensors)."""
        return {
            "clip_eps_low": self.clip_eps_low,
            "clip_eps_high": self.clip_eps_high,
            "beta": self.beta,
            "temperature": self.temperature,
            "loss_type": self.loss_type,
            "loss_agg_mode": self.aggregation,
            "importance_level": self.importance_level,
            "entropy_coeff": self.entropy_coeff,
            "delta": self.delta,
            "kl_estimator": self.kl_estimator,
            "sapo_temperatures": (self.sapo_temperature_pos, self.sapo_temperature_neg),
            "vespo_gamma": (self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg),
        }

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {tuple(LOSS_TYPES)}")
        if self.aggregation not in LOSS_AGG_MODES:
            raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; expected one of {LOSS_AGG_MODES}")
        if self.importance_level == "sequence" and LOSS_TYPES[self.loss_type][0] != "clip":
            raise ValueError(f"policy.importance_level=sequence does not apply to policy.loss_type={self.loss_type}")
        if self.loss_type == "vespo" and self.rollout_correction != "none" and self.rollout_correction_level != "token":
            # VESPO multiplies the token weights into its response's weight: a per-response weight would count once
            # per token
            raise ValueError("policy.loss_type=vespo takes policy.rollout_correction_level=token")
        if self.ppo_epochs < 1 or self.mini_batches < 1 or self.max_tokens < 1:
            raise ValueError("ppo_epochs, mini_batches and max_tokens must be positive")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.delta is not None and self.delta <= 1.0 + self.clip_eps_high:
            raise ValueError(f"delta={self.delta} must be above 1 + clip_eps_high = {1.0 + self.clip_eps_high}")
        if self.rollout_correction not in CORRECTIONS or self.rollout_correction_level not in LEVELS:
            raise ValueError(
                f"rollout_correction must be one of {CORRECTIONS} and rollout_correction_level one of {LEVELS}"
            )


class BPOObjective(nn.Module):
    """``forward(**micro-batch)``: ``(loss, metrics)`` of the fused BPO loss, or with ``logprobs_only=True``
    the per-token ``(logprobs[N], entropy[N] | None)`` of the targets (no loss; run it under ``no_grad``).
    Any model family of :func:`r4b.models.forward.packed_final_hidden`: R-4B (1-D ``position_ids``,
    ``image_sizes``) or Qwen2.5-VL / Qwen3-VL (``[3, N]`` mRoPE ``position_ids``, ``image_grid_thw``)."""

    def __init__(self, model: nn.Module, *, vision_every_step: bool = False) -> None:
        super().__init__()
        self.model = model
        # with several ranks, a micro-batch without images still runs the vision tower (see packed_final_hidden)
        self.vision_every_step = vision_every_step

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        targets: Tensor,
        *,
        loss_mask: Tensor | None = None,
        advantages: Tensor | None = None,
        seq_ids: Tensor | None = None,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        is_weights: Tensor | None = None,
        segment_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_sizes: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        cu_seqlens_host: tuple[int, ...] | None = None,
        temperature: float = 1.0,
        logprobs_only: bool = False,
        with_entropy: bool = False,
        **loss_options: Any,
    ) -> tuple[Tensor, Any]:
        """``loss_options``: ``fused_linear_bpo_loss``'s (:meth:`UpdateConfig.loss_options`, ``norm_len``)."""
        hidden = packed_final_hidden(
            self.model,
            input_ids=input_ids,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            image_grid_thw=image_grid_thw,
            segment_ids=segment_ids,
            vision_every_step=self.vision_every_step,
            cu_seqlens_host=cu_seqlens_host,
        )
        hidden, weight = lm_head_operands(self.model, hidden)
        mask = targets >= 0 if loss_mask is None else loss_mask
        if logprobs_only:
            safe = targets.masked_fill(~mask, 0)
            return linear_logprobs(hidden, weight, safe, temperature=temperature, with_entropy=with_entropy)
        if advantages is None or seq_ids is None:
            raise ValueError("the BPO loss needs advantages and seq_ids (or pass logprobs_only=True)")
        return fused_linear_bpo_loss(
            hidden, weight, targets, advantages, seq_ids=seq_ids, loss_mask=mask, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, is_weights=is_weights, temperature=temperature, **loss_options,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# where to run


def _callable_objective(target: Any) -> tuple[nn.Module, torch.device, torch.dtype]:
    """(what to call, input device, pixel dtype) for an Engine, a (wrapped) BPOObjective or a bare model."""
    if hasattr(target, "unwrapped_module") and hasattr(target, "backward"):  # an r4b Engine
        module, device = target.module, target.device
        inner = target.unwrapped_module
    else:
        module = target
        inner = getattr(target, "module", target)  # DeepSpeed wraps the objective as .module
        if not isinstance(module, BPOObjective) and not isinstance(inner, BPOObjective):
            module = inner = BPOObjective(target)
        device = None
    param = next((p for p in inner.parameters() if p.is_floating_point()), None)
    if param is None:
        raise ValueError("the model has no floating-point parameters")
    return module, device if device is not None else param.device, param.dtype


# ---------------------------------------------------------------------------------------------------
# log-probs


def compute_logprobs(
    objective_or_model: Any,
    batch: RolloutBatch,
    *,
    max_tokens: int,
    shared_prefix: bool = True,
    temperature: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """Per-token log-probs ``[R, Lmax]`` (fp32, 0 past each length) of the batch's responses; forward only.

    ``objective_or_model``: an r4b Engine (its ``module`` is called, so sharded engines gather their
    parameters), a :class:`BPOObjective` (possibly wrapped), or a bare model (e.g. the frozen reference).
    Micro-batches come from :func:`r4b.packing.plan_micro_batches` over chunks, so an entry and all its
    responses share one micro-batch; an entry over ``max_tokens`` is split into runs of responses, each
    repeating the prompt. The result is on the device of ``batch.response_ids``.

    With ``world_size > 1`` each rank computes its balanced share (all ranks make the same number of
    forward calls) and the shares are summed with ``all_reduce`` when a process group is initialized;
    without one, a rank returns its share only (zeros elsewhere).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    module, device, dtype = _callable_objective(objective_or_model)
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float32, device=device)
    plan = plan_ranks(
        batch, range(batch.num_responses), max_tokens=max_tokens, shared=shared_prefix, world_size=world_size
    )
    with torch.no_grad():
        for chunks, padding in rank_micro_steps(plan, rank, lambda: _padding_chunks(plan, batch, shared_prefix)):
            micro = build_micro_batch(batch, chunks, shared=shared_prefix, device=device, pixel_dtype=dtype)
            logp, _ = module(**_model_inputs(micro), temperature=temperature, logprobs_only=True)
            if not padding:
                values = unpack_responses(micro, logp.float())
                out[torch.tensor(micro.responses, device=device), : values.shape[1]] = values
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(out)
    return out.to(batch.response_ids.device)


def _model_inputs(micro: PackedRow) -> dict[str, Any]:
    """The log-prob pass's keyword arguments: the row's inputs but the loss's (``loss_mask`` stays: the mask)."""
    loss_only = ("advantages", "seq_ids", "old_logprobs", "ref_logprobs", "is_weights")
    return {k: v for k, v in micro.inputs().items() if k not in loss_only}


# ---------------------------------------------------------------------------------------------------
# the update


def split_mini_batches(batch: RolloutBatch, mini_batches: int) -> list[list[int]]:
    """Response indices of each mini-batch: the prompts in order, cut into ``mini_batches`` near-equal runs
    (both modes of a prompt stay together)."""
    prompts = list(dict.fromkeys(batch.entry_prompts))
    if mini_batches > len(prompts):
        raise ValueError(f"mini_batches={mini_batches} is more than the batch's {len(prompts)} prompts")
    bounds = [round(k * len(prompts) / mini_batches) for k in range(mini_batches + 1)]
    of_prompt = {p: k for k in range(mini_batches) for p in prompts[bounds[k] : bounds[k + 1]]}
    entry_mini = [of_prompt[p] for p in batch.entry_prompts]
    out: list[list[int]] = [[] for _ in range(mini_batches)]
    for i, e in enumerate(batch.groups.tolist()):
        out[entry_mini[e]].append(i)
    return out


def plan_ranks(
    batch: RolloutBatch, responses: Sequence[int], *, max_tokens: int, shared: bool, world_size: int
) -> list[list[list[Chunk]]]:
    """Micro-batches (lists of chunks) of each rank for one mini-batch: :func:`r4b.packing.plan_ranks` over the
    chunks' packed tokens."""
    chunks = plan_chunks(batch, responses, max_tokens, shared=shared)
    costs = [chunk_tokens(batch, c.entry, c.responses, shared=shared) for c in chunks]
    plans = packing.plan_ranks(costs, world_size, max_tokens)
    return [[[chunks[i] for i in sorted(micro)] for micro in rank] for rank in plans]  # chunks in batch order


def policy_update(
    engine: Any,
    batch: RolloutBatch,
    config: UpdateConfig,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """``ppo_epochs x mini_batches`` optimizer steps of the BPO loss on ``batch`` (identical on every rank).

    ``engine``: an r4b Engine wrapping a :class:`BPOObjective` (``engine.backward`` per micro-batch,
    ``engine.step`` per mini-batch). ``old_logprobs`` / ``ref_logprobs``: ``[R, Lmax]`` of the rollout and
    reference policies. Without ``old_logprobs`` a single step is on-policy (ratio 1); with several steps
    the old log-probs are first computed with the current weights (what verl does). With
    ``config.rollout_correction`` the batch's ``rollout_logprobs`` and those old log-probs (computed for it even for
    one step) give the importance weights of :mod:`r4b.rl.rollout_correction`. Each rank takes its
    balanced share of every mini-batch. Returns metrics: ``loss`` (mean over steps of each mini-batch's
    loss), ``clip_frac`` / ``kl`` / ``entropy`` (token means over all updates), ``grad_norm`` (mean over
    steps; ``grad_norms`` each), ``tokens`` (response tokens), ``tokens_<mode>``, ``packed_tokens`` (per
    epoch, all ranks), ``steps`` and ``micro_batches`` (this rank's forward/backward calls), and with a rollout
    correction ``is_weight_mean``, ``is_weight_max`` and ``is_capped``.
    """
    if config.beta != 0.0 and ref_logprobs is None:
        raise ValueError("UpdateConfig.beta != 0 needs ref_logprobs (the reference policy's log-probs)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != batch.response_ids.shape:
            raise ValueError(f"{name} must have the shape of response_ids {tuple(batch.response_ids.shape)}")
    steps = config.ppo_epochs * config.mini_batches
    shared = config.shared_prefix
    correcting = config.rollout_correction != "none"
    if correcting and batch.rollout_logprobs is None:
        raise ValueError("policy.rollout_correction needs the rollout engine's log-probs; the rollouts carry none")
    old = old_logprobs
    if old is None and (steps > 1 or correcting):
        old = compute_logprobs(
            engine, batch, max_tokens=config.max_tokens, shared_prefix=shared, temperature=config.temperature,
            rank=rank, world_size=world_size,
        )  # fmt: skip
    if steps > 1:
        old_logprobs = old  # one on-policy step keeps ratio 1 with logp's own gradient
    is_weights, correction = None, {}
    if correcting:
        is_weights, correction = rollout_correction_weights(
            old, batch.rollout_logprobs.to(old.device), batch.response_lengths, correction=config.rollout_correction,
            level=config.rollout_correction_level, cap=config.rollout_correction_cap,
        )  # fmt: skip
    _, device, dtype = _callable_objective(engine)
    norm_len = config.norm_len if config.norm_len is not None else batch.response_ids.shape[1]
    loss_kwargs = {**config.loss_options(), "norm_len": norm_len}
    token_mean = config.aggregation == "token-mean"
    lengths = batch.response_lengths.tolist()
    minis = split_mini_batches(batch, config.mini_batches)
    plans = [plan_ranks(batch, m, max_tokens=config.max_tokens, shared=shared, world_size=world_size) for m in minis]

    # sums: per-step weighted losses, then token-weighted clip_frac / kl / entropy and their token count
    # on the engine's device (NCCL reduces device tensors only), accumulated there without a host sync
    sums = torch.zeros(steps + 4, dtype=torch.float64, device=device)
    grad_norms, calls = [], 0
    for epoch in range(config.ppo_epochs):
        for k, (mini, plan) in enumerate(zip(minis, plans, strict=True)):
            step = epoch * config.mini_batches + k
            mini_tokens = sum(lengths[i] for i in mini)
            denominator = mini_tokens if token_mean else len(mini)

            def micro_steps(plan=plan, denominator=denominator) -> Iterator[MicroStep[tuple[float, int]]]:
                padding_chunks = lambda: _padding_chunks(plan, batch, shared)
                for chunks, padding in rank_micro_steps(plan, rank, padding_chunks):
                    micro = build_micro_batch(
                        batch, chunks, shared=shared, device=device, pixel_dtype=dtype,
                        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, is_weights=is_weights,
                    )  # fmt: skip
                    share = 0.0 if padding else (micro.loss_tokens if token_mean else micro.num_responses) / denominator
                    yield MicroStep({**micro.inputs(), **loss_kwargs}, share * world_size, padding,
                                    (share, micro.loss_tokens))  # fmt: skip

            def record(micro: MicroStep[tuple[float, int]], output: Any, step: int = step) -> None:
                (loss, metrics), (share, loss_tokens) = output, micro.info
                sums[step] += share * loss.detach().double()
                for j, name in enumerate(("clip_frac", "kl", "entropy")):
                    sums[steps + j] += metrics[name].detach().double() * loss_tokens
                sums[steps + 3] += loss_tokens

            calls += accumulate_gradients(engine, micro_steps(), record)
            grad_norms.append(float(engine.step()))
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    sums = sums.cpu()
    tokens = max(float(sums[steps + 3]), 1.0)
    out: dict[str, Any] = {
        "loss": float(sums[:steps].mean()),
        "clip_frac": float(sums[steps]) / tokens,
        "kl": float(sums[steps + 1]) / tokens,
        "entropy": float(sums[steps + 2]) / tokens,
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "grad_norms": grad_norms,
        "steps": steps,
        "micro_batches": calls,
        "responses": batch.num_responses,
        "tokens": sum(lengths),
        "packed_tokens": sum(
            chunk_tokens(batch, c.entry, c.responses, shared=shared) for p in plans for r in p for m in r for c in m
        ),
        **correction,
    }
    for mode in dict.fromkeys(batch.modes):
        out[f"tokens_{mode}"] = sum(n for n, m in zip(lengths, batch.modes, strict=True) if m == mode)
    if not all(math.isfinite(v) for v in (out["loss"], out["grad_norm"])):
        out["nonfinite"] = True
    return out


def _padding_chunks(plan: list[list[list[Chunk]]], batch: RolloutBatch, shared: bool) -> list[Chunk]:
    """The forward a rank without work makes to keep collectives paired: the shortest (prompt, first response) of
    the plan's chunks (the first among equals), the same whichever rank pads. Images or not, the vision tower
    runs (:class:`BPOObjective` with ``vision_every_step``), so the choice changes no collective."""
    firsts = [Chunk(c.entry, c.responses[:1]) for rank in plan for micro in rank for c in micro]
    return [min(firsts, key=lambda c: chunk_tokens(batch, c.entry, c.responses, shared=shared))]
