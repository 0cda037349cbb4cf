"""Ctrl-C and SIGTERM during training: stop after the current step with a checkpoint, or at once when asked again.

Under torchrun a Ctrl-C in the terminal reaches every process of the foreground group: each worker gets SIGINT
from the terminal, and torchrun, which gets it too, forwards another to each worker a moment later. That copy is
not a second Ctrl-C. Under a launcher, a signal within :data:`LAUNCHER_COPY_S` seconds of the first is taken as
the launcher's copy and ignored; a later one stops at once. Without a launcher every second signal stops at once.
torchrun kills its workers ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (30 by default) after forwarding a signal: where
a step and a checkpoint take longer, raise it, or the run stops without the step's checkpoint (the previous one is
intact). torchrun itself then ends with its own SignalException traceback and status 1, whatever its workers did.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from r4b.errors import RunInterrupted

__all__ = ["LAUNCHER_COPY_S", "StopSignal", "under_a_launcher"]

# torchrun forwards a signal within milliseconds (tens on a loaded machine); a person presses Ctrl-C again later
LAUNCHER_COPY_S = 2.0


def under_a_launcher() -> bool:
    """Whether a launcher that forwards signals to its workers started this process (torchrun, DeepSpeed's,
    accelerate's: they set ``LOCAL_RANK``; torchrun also ``TORCHELASTIC_RUN_ID``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


class StopSignal:
    """SIGINT / SIGTERM during training: the first asks the loop to stop after the current step (it writes a
    checkpoint and raises :class:`RunInterrupted`), a second stops at once (KeyboardInterrupt), except a launcher's
    copy of the first (see the module's docstring). Installed on construction (main thread only), the old handlers
    back with :meth:`restore`.

    ``copy_window_s``: how long after the first signal another is the launcher's copy (None: :data:`LAUNCHER_COPY_S`
    under a launcher, else 0); ``clock``: the time source (tests)."""

    def __init__(self, copy_window_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}
        if copy_window_s is None:
            copy_window_s = LAUNCHER_COPY_S if under_a_launcher() else 0.0
        self.copy_window_s = copy_window_s
        self._clock = clock
        self._requested_at = 0.0
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            if self._clock() - self._requested_at < self.copy_window_s:
                return  # the launcher's copy of the signal this process already got
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self._requested_at = self._clock()
        print(f"\n{self.requested}: stopping after this step with a checkpoint (again: at once)", file=sys.stderr)

    def should_stop(self, device: Any = None) -> bool:
        """Whether any rank was asked to stop (a collective under torch.distributed: all ranks call it per step)."""
        flag = self.requested is not None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor([float(flag)], device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag

    def interrupted(self, run_dir: Path, step: int) -> RunInterrupted:
        why = self.requested or "a signal on another rank"
        return RunInterrupted(
            f"stopped by {why} after step {step}; {Path(run_dir) / f'checkpoint-{step}'} written: "
            "rerun the same command to resume"
        )

    def restore(self) -> None:
        """Put the old handlers back; after a stop under a launcher, not before its copy can have come (the old
        handler would turn it into a KeyboardInterrupt while the run reports its stop)."""
        if self.requested is not None and self.previous:
            time.sleep(max(0.0, self._requested_at + self.copy_window_s - self._clock()))
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
