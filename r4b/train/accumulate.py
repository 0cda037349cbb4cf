"""The seam every optimizer step goes through, SFT and BPO alike: each rank's micro-batches, padded to the busiest
rank's count, run forward (and backward, scaled by their share of the step's loss) on the engine's objective.

Two rules live here and nowhere else. Every rank makes the same number of forward and backward calls, padding
with zero-weight passes, because sharded engines (FSDP2, ZeRO-3) run collectives inside them that must pair up
across ranks. And a padding pass leaves no trace in what is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def rank_micro_steps(plans: Sequence[Sequence[T]], rank: int, padding: Callable[[], T]) -> Iterator[tuple[T, bool]]:
    """Rank ``rank``'s micro-batches of one step (``plans``: every rank's, in order) as ``(item, False)``, then
    ``(padding(), True)`` up to the busiest rank's count."""
    mine = plans[rank]
    for index in range(max(len(plan) for plan in plans)):
        yield (mine[index], False) if index < len(mine) else (padding(), True)


@dataclass
class MicroStep(Generic[T]):
    """One forward / backward: the objective's keyword arguments (on its device), the factor its loss is scaled by
    before backward (its share of the step's loss times the world size, as engines average gradients over ranks),
    whether it is a padding pass, and what the caller needs to record its output."""

    inputs: dict[str, Any]
    grad_scale: float
    padding: bool = False
    info: T | None = None


def accumulate_gradients(
    engine: Any, micro_steps: Iterable[MicroStep[T]], record: Callable[[MicroStep[T], Any], None] | None = None
) -> int:
    """Forward and backward of each micro-step on ``engine.module``: backward of the loss (the objective's output,
    or its first element) times ``grad_scale``, 0 for a padding pass; ``record(step, output)`` for each other
    one. The optimizer step is the caller's. Returns the number of forward / backward calls."""
    calls = 0
    for step in micro_steps:
        output = engine.module(**step.inputs)
        loss = output[0] if isinstance(output, tuple) else output
        engine.backward(loss * (0.0 if step.padding else step.grad_scale))
        calls += 1
        if not step.padding and record is not None:
            record(step, output)
    return calls
