"""Which samples each rank trains on at each optimizer step: deterministic from (seed, step).

A global batch is ``global_batch_samples`` samples of the epoch's shuffled order (the last batch of
an epoch may be smaller). Its samples are split across data-parallel ranks with Karmarkar-Karp
balancing of tokens (plus a quadratic attention term), then each rank packs its share into
micro-batches under the token budget (best-fit decreasing). The plan depends only on the seed and
the step, so resuming needs nothing but the step number, and 1 and N processes see the same global
batches.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from r4b.errors import InputError
from r4b.packing import plan_ranks


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n`` items in ``epoch``: a permutation that depends only on (seed, epoch). SFT's
    global batches and BPO's prompts (:func:`r4b.train.bpo.prompt_indices`) both walk it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@dataclass(frozen=True)
class StepPlan:
    step: int
    epoch: int
    # rank -> micro-batches -> sample indices (into the dataset)
    micro_batches: tuple[tuple[tuple[int, ...], ...], ...]
    loss_tokens: int  # tokens with a label in the whole global batch: the loss denominator
    tokens: int  # all tokens of the global batch

    def for_rank(self, rank: int) -> tuple[tuple[int, ...], ...]:
        return self.micro_batches[rank]

    @property
    def micro_steps(self) -> int:
        """Forward/backward passes every rank makes (ranks with fewer micro-batches pad with empty ones,
        because sharded engines need the same collectives on every rank)."""
        return max(1, max(len(m) for m in self.micro_batches))


class GlobalBatchPlanner:
    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        loss_tokens: Sequence[int] | np.ndarray,
        *,
        global_batch_samples: int,
        max_tokens: int,
        world_size: int = 1,
        seed: int = 0,
        attention_weight: float = 0.0,
    ) -> None:
        if len(lengths) == 0:
            raise InputError("data.train: no training samples (data_report.json counts the skipped ones)")
        if global_batch_samples <= 0:
            raise InputError(f"train.global_batch_samples = {global_batch_samples}: must be positive")
        if global_batch_samples > len(lengths):  # legal (a step is then the whole dataset), but rarely meant
            print(
                f"warning: train.global_batch_samples = {global_batch_samples} is larger than the dataset "
                f"({len(lengths)} samples): every step trains on the whole dataset",
                file=sys.stderr,
            )
        # numpy, not lists: 8 bytes a sample where a Python int costs 36 (the index of 16M samples on every rank)
        self.lengths, self.loss_tokens = np.asarray(lengths, dtype=np.int64), np.asarray(loss_tokens, dtype=np.int64)
        index = int(self.lengths.argmax())
        if self.lengths[index] > max_tokens:
            raise ValueError(f"sample {index} has {self.lengths[index]} tokens, over the budget of {max_tokens}")
        self.global_batch_samples = global_batch_samples
        self.max_tokens, self.world_size, self.seed = max_tokens, world_size, seed
        self.attention_weight = attention_weight
        self.steps_per_epoch = -(-len(lengths) // global_batch_samples)

    @lru_cache(maxsize=2)  # noqa: B019 - one planner per run; the epoch order is reused by every step
    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.lengths), self.seed, epoch).numpy()

    def plan(self, step: int) -> StepPlan:
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch_samples
        chosen = self._order(epoch)[start : start + self.global_batch_samples]
        samples = chosen.tolist()
        plans = plan_ranks(
            self.lengths[chosen].tolist(), self.world_size, self.max_tokens, attention_weight=self.attention_weight
        )
        return StepPlan(
            step=step,
            epoch=epoch,
            micro_batches=tuple(tuple(tuple(samples[i] for i in micro) for micro in rank) for rank in plans),
            loss_tokens=int(self.loss_tokens[chosen].sum()),
            tokens=int(self.lengths[chosen].sum()),
        )
