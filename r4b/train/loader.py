"""Micro-batches off the training loop's critical path (``data.workers``).

Each rank's micro-batches are known in advance: the :class:`~r4b.train.batches.GlobalBatchPlanner` plans every step
from the lengths index alone. :class:`MicroBatchLoader` builds them in that order in ``torch.utils.data.DataLoader``
worker processes: reading the samples (memory-mapped from a prepared DIR), packing, decoding and AnyRes-tiling the
images. The loop only copies the finished tensors to the device. A micro-batch is a pure function of its sample
indices and the DataLoader returns results in request order, so the batches, and with them the losses, are the
same whatever the worker count (tested). ``data_wait_s`` in metrics.jsonl is the time a step spent waiting for
them: near zero once enough workers are set.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from r4b.errors import InputError
from r4b.train.accumulate import rank_micro_steps
from r4b.train.batches import GlobalBatchPlanner

if TYPE_CHECKING:
    from r4b.packed_row import PackedRow

__all__ = ["MicroBatchKey", "MicroBatchLoader", "default_workers", "rank_micro_batches"]


@dataclass(frozen=True)
class MicroBatchKey:
    """Micro-batch ``index`` of ``step`` on one rank: its sample indices; ``padding`` marks the zero-weight pass
    of a rank with fewer micro-batches than the others."""

    step: int
    index: int
    samples: tuple[int, ...]
    padding: bool = False


def rank_micro_batches(
    planner: GlobalBatchPlanner,
    rank: int,
    start: int,
    stop: int,
    padding_sample: Callable[[Any], tuple[int, ...]],
) -> Iterator[MicroBatchKey]:
    """Every micro-batch rank ``rank`` trains on in steps ``start`` to ``stop - 1``, in training order."""
    for step in range(start, stop):
        plan = planner.plan(step)
        micro_steps = rank_micro_steps(plan.micro_batches, rank, lambda plan=plan: padding_sample(plan))
        for index, (samples, padding) in enumerate(micro_steps):
            yield MicroBatchKey(step, index, tuple(samples), padding=padding)


def default_workers(device: torch.device | str, world_size: int = 1) -> int:
    """``data.workers`` when unset: none on a CPU (the step itself uses every core), else up to 4 per rank from
    the cores this process may use."""
    if torch.device(device).type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, world_size) - 1))


class _Source(torch.utils.data.Dataset):
    """The DataLoader's view: a key in, ``(key, host row)`` out. A user's data error (a missing or undecodable
    image) travels back as the exception itself, raised by the loop as the one-line error it is: the DataLoader
    would re-raise it as a RuntimeError holding the worker's traceback."""

    def __init__(self, build: Callable[[Sequence[int]], PackedRow]):
        self.build = build

    def __getitem__(self, key: MicroBatchKey) -> tuple[MicroBatchKey, Any]:
        try:
            return key, self.build(key.samples)
        except InputError as error:
            return key, error


def _as_is(item: Any) -> Any:
    return item


def _ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C and SIGTERM reach the whole process group; the loop stops after its step (r4b.train.signals
    .StopSignal) and still needs the step's micro-batches, so the workers leave the signals to it (they stop with
    the loader, or when the loop's process is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class MicroBatchLoader:
    """Host rows (:class:`~r4b.packed_row.PackedRow`) of ``keys`` built by ``build`` (``SFTDataset.host_batch``),
    ``workers`` processes ahead of the loop, each keeping ``prefetch`` micro-batches ready; ``workers=0`` builds each
    one when the loop asks for it. With ``pin_memory`` the DataLoader pins each row (``PackedRow.pin_memory``).

    Use as a context manager (the workers stop on exit, also on Ctrl-C); :meth:`next` returns the next micro-batch's
    key (its samples, whether it is a padding pass), the micro-batch and the seconds the loop waited for it.
    """

    def __init__(
        self,
        build: Callable[[Sequence[int]], PackedRow],
        keys: Iterable[MicroBatchKey],
        *,
        workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ):
        if workers < 0:
            raise InputError(f"data.workers must be 0 or more, got {workers}")
        self.workers = workers
        source = _Source(build)
        if workers == 0:
            self._loader = None
            self._iterator = map(source.__getitem__, keys)
        else:
            self._loader = torch.utils.data.DataLoader(
                source,
                sampler=keys,  # consumed in this process, in order: the workers only build
                batch_size=None,
                collate_fn=_as_is,
                num_workers=workers,
                prefetch_factor=prefetch,
                pin_memory=pin_memory,
                worker_init_fn=_ignore_stop_signals,
                # fork: the workers inherit the dataset (a prepared DIR's memory maps, the processor) without pickling
                multiprocessing_context="fork",
            )
            self._iterator = iter(self._loader)

    def next(self, step: int, index: int) -> tuple[MicroBatchKey, PackedRow, float]:
        """Micro-batch ``index`` of ``step`` (the order is fixed: asking for another one is a bug) and the wait."""
        started = time.perf_counter()
        key, batch = next(self._iterator)
        waited = time.perf_counter() - started
        if (key.step, key.index) != (step, index):
            raise RuntimeError(f"loader out of order: step {step} micro-batch {index} asked, {key} delivered")
        if isinstance(batch, InputError):
            raise batch
        return key, batch, waited

    def close(self) -> None:
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iterator = iter(())

    def __enter__(self) -> MicroBatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
