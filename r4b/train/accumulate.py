"""The seam every optimizer step goes through, SFT and BPO alike: each rank's micro-batches, padded to the busiest
rank's count, run forward (and backward, scaled by their share of the step's loss) on the engine's objective.

Three rules live here and nowhere else. Every rank makes the same number of forward and backward calls, padding
with zero-weight passes, because sharded engines (FSDP2, ZeRO-3) run collectives inside them that must pair up
across ranks. A padding pass leaves no trace in what is recorded. And no optimizer step applies a non-finite loss
or gradient (:class:`NonFiniteGuard`, ``train.on_nonfinite``): every rank takes the same decision before the step.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

from r4b.errors import InputError
from r4b.train.engine import DeepSpeedEngine, host_norm
from r4b.train.ranks import rank

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


# --------------------------------------------------------------------------------------------------------------
# the non-finite guard: every optimizer step of every stage goes through NonFiniteGuard.step

ON_NONFINITE = ("stop", "skip")  # train.on_nonfinite


class NonFiniteStep(InputError):
    """A step's loss or gradient norm was not finite on some rank (or the weights were, before a save); the run
    stopped before applying it. An input error for the CLI: one line, usually a learning rate or the data."""


class NonFiniteGuard:
    """The engine as the loop drives it, with a check before every optimizer step: ``backward`` notes on the device
    (no host sync) whether any loss it saw was non-finite, and :meth:`step` reduces that flag over the ranks and
    takes the engine's gradient norm (already global; ``engine.step`` clips with it, not computing it again) before
    the step, so every rank takes the same decision.
    A non-finite step raises :class:`NonFiniteStep` (``policy="stop"``), or (``"skip"``) has its gradients
    dropped: the weights and AdamW's moments stay, the learning-rate schedule advances as for a taken step (a
    resumed run and the data plan stay keyed by the step), and :attr:`skipped` counts it.

    DeepSpeed keeps its gradients in ZeRO's partitions, out of reach before its step; it refuses a non-finite
    gradient norm itself (no update; the norm it returns is inf), which the guard then stops on or counts. A
    non-finite loss whose gradients are finite cannot be dropped there: under ``skip`` the run then stops after
    that step. Every other attribute is the engine's."""

    def __init__(self, engine: Any, policy: str = "stop", *, updates_per_step: int = 1) -> None:
        if policy not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, not {policy!r}")
        self.engine = engine
        self.policy = policy
        self.updates_per_step = updates_per_step
        self.step_number = 0  # the loop's step (1-based), for the messages
        self.update = 0  # optimizer updates taken or dropped in this step
        self.skipped = 0  # updates dropped in this step
        self._bad_loss: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def begin(self, step_number: int) -> None:
        """Start the loop's step ``step_number`` (1-based): the per-step counts restart."""
        self.step_number, self.update, self.skipped = step_number, 0, 0

    def backward(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        self.engine.backward(loss)

    def step(self) -> float:
        """``engine.step()`` when the loss and the gradient norm are finite on every rank; returns the gradient
        norm (nan for a dropped update)."""
        self.update += 1
        bad_loss = self._loss_was_nonfinite()
        if _is_deepspeed(self.engine):
            return self._deepspeed_step(bad_loss)
        total = self.engine.grad_norm()  # handed to the step: the engine's clip does not compute it again
        norm = host_norm(total)
        if not bad_loss and math.isfinite(norm):
            return self.engine.step(total)
        return self._refuse("loss" if bad_loss else f"gradient norm ({norm})", drop=True)

    def _deepspeed_step(self, bad_loss: bool) -> float:
        if bad_loss and self.policy == "stop":
            return self._refuse("loss", drop=False)
        norm = self.engine.step()  # DeepSpeed applies nothing when its gradient norm is not finite (inf then)
        if not math.isfinite(norm):
            return self._refuse("loss" if bad_loss else f"gradient norm ({norm})", drop=False)
        if bad_loss:
            raise NonFiniteStep(
                f"{self._where()}: non-finite loss with finite gradients, which DeepSpeed applies (it drops only "
                "non-finite gradients), so the run stops. Lower the learning rates (optim.lr_*) or check the data"
            )
        return norm

    def _refuse(self, what: str, *, drop: bool) -> float:
        """Stop on a non-finite step, or (skip) drop its gradients: ``engine.step()`` without gradients leaves the
        weights and AdamW's state as they were and advances the schedule (``drop``; DeepSpeed has dropped them)."""
        if self.policy == "stop":
            raise NonFiniteStep(
                f"{self._where()}: non-finite {what}; stopped before its optimizer step, nothing of it applied or "
                "saved. Lower the learning rates (optim.lr_*) or check the data; train.on_nonfinite=skip drops such "
                "updates instead"
            )
        if drop:
            self.engine.optimizer.zero_grad(set_to_none=True)
            self.engine.step()
        self.skipped += 1
        if rank() == 0:
            print(f"{self._where()}: non-finite {what}: update skipped (train.on_nonfinite=skip)", file=sys.stderr)
        return float("nan")

    def check_weights(self) -> None:
        """Raise :class:`NonFiniteStep` unless every trainable weight (this rank's shard, then over the ranks) is
        finite: called before a checkpoint or an export is written (collective)."""
        tensors = [_local(p).detach() for p in _optimizer_params(self.engine)]
        device = self.engine.device
        bad = torch.zeros((), dtype=torch.bool, device=device)
        for tensor in tensors:
            bad |= ~torch.isfinite(tensor).all().to(device)
        if _reduce_any(bad):
            raise NonFiniteStep(
                f"step {self.step_number}: the weights hold non-finite values after the optimizer step, so nothing "
                "was saved; lower the learning rates (optim.lr_*)"
            )

    def _where(self) -> str:
        where = f"step {self.step_number}"
        return where if self.updates_per_step == 1 else f"{where}, update {self.update} of {self.updates_per_step}"

    def _loss_was_nonfinite(self) -> bool:
        bad, self._bad_loss = self._bad_loss, None
        if bad is None:
            bad = torch.zeros((), dtype=torch.bool, device=self.engine.device)
        return _reduce_any(bad)


def _optimizer_params(engine: Any) -> list[torch.Tensor]:
    return [p for group in engine.optimizer.param_groups for p in group["params"]]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # this rank's shard of a DTensor


def _is_deepspeed(engine: Any) -> bool:
    return isinstance(engine, DeepSpeedEngine)


def _reduce_any(flag: torch.Tensor) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce under torch.distributed, on the flag's device)."""
    value = flag.to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
