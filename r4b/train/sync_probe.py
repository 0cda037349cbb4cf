"""Checks that a weight sync took effect: the rollout engine's log-probs of a probe against the trainer's.

A rollout engine that kept its old weights (a reload into a tensor the kernels no longer read, a stream cut
short) would go on sampling from a stale policy with no error anywhere. :func:`sync_and_verify` is the trainer's
sync: after syncing an engine that asks for it (``verify_sync``: vLLM), :func:`check_rollout_sync` samples one
short response to a probe prompt (an image and a question, so the vision tower is checked too) with the engine's
log-probs, recomputes them with the trainer (:func:`r4b.rl.compute_logprobs`, the policy update's own code) and
raises when they differ by more than the precisions allow. Each rank checks its own engine; every rank calls it
(the trainer's forward is a collective under sharded engines, one micro-batch per rank).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from r4b.rl.batch import RolloutBatch
from r4b.rl.update import compute_logprobs
from r4b.rollout.base import Prompt, SamplingParams
from r4b.train.weight_sync import sync_rollout_weights

__all__ = ["PROBE", "check_rollout_sync", "sync_and_verify", "sync_tolerance"]

PROBE = Prompt(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is drawn here?"}]}],
    [Image.new("RGB", (56, 56), (200, 40, 40))],
)
PROBE_TOKENS = 8
PROBE_SEED = 20_260_101


def sync_and_verify(engine: Any, rollout_engine: Any) -> None:
    """:func:`~r4b.train.weight_sync.sync_rollout_weights`, then :func:`check_rollout_sync` where the rollout engine
    asks for it (``verify_sync``: vLLM); a collective, as the sync is."""
    sync_rollout_weights(engine, rollout_engine)
    if getattr(rollout_engine, "verify_sync", False):
        check_rollout_sync(engine, rollout_engine)


def sync_tolerance(rollout_dtype: torch.dtype | None, trainer: Any) -> float:
    """The largest mean per-token log-prob difference accepted between the rollout engine (weights in
    ``rollout_dtype``) and ``trainer``: fp32 on both sides agree to about 1e-5 on average; half precision on either
    side (the engine's weights, the trainer's ``mixed_precision: bf16``) moves log-probs by a few hundredths on
    average (single tokens by more, hence the mean), so there a sync is caught once the policy has moved further."""
    trainer_fp32 = getattr(getattr(trainer, "config", None), "mixed_precision", "no") == "no"
    return 1e-3 if rollout_dtype in (None, torch.float32) and trainer_fp32 else 0.1


def check_rollout_sync(trainer: Any, rollout_engine: Any, *, tolerance: float | None = None) -> float:
    """The mean per-token difference between ``rollout_engine``'s and ``trainer``'s log-probs of a sampled probe
    response (``trainer``: an r4b Engine, a BPOObjective or a bare model); a RuntimeError when it exceeds
    ``tolerance`` (default: :func:`sync_tolerance`)."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=PROBE_TOKENS, seed=PROBE_SEED, logprobs=True)
    rows = rollout_engine.generate([PROBE], n=1, mode="non_thinking", sampling=sampling)
    batch = RolloutBatch.from_rollouts(
        rows, [[0.0]], images=[PROBE.images], processor=rollout_engine.processor, pad_id=0
    )
    expected = compute_logprobs(trainer, batch, max_tokens=1 << 20, temperature=1.0)
    got = torch.tensor(rows[0][0].logprobs, dtype=torch.float32)
    length = len(rows[0][0].response_ids)
    diff = (expected[0, :length].cpu() - got).abs().mean().item()
    limit = (
        tolerance if tolerance is not None else sync_tolerance(getattr(rollout_engine, "weights_dtype", None), trainer)
    )
    if not diff <= limit:  # NaN fails too
        raise RuntimeError(
            f"the rollout engine's weights do not match the trainer's after a weight sync: a probe's log-probs "
            f"differ by {diff:.3g} per token on average (> {limit:g}); the sync did not take effect"
        )
    return diff
