"""One run per output directory: an advisory lock held for the run's life.

Rank 0 holds ``fcntl.flock`` on ``<output_dir>/run.lock``, which names its host, process and start time; the other
ranks (on its host or others) take no lock of their own and learn rank 0's outcome, so a run is refused or admitted
as a whole. A second run into the directory is refused with one line naming the holder. The kernel drops a flock
when its process dies, however it dies, so a lock file left by a killed run (its process gone) is free and the next
run takes it over, saying so. A clean end removes the file.

The lock is taken by :func:`r4b.train.runtime.start_run` before anything is written into the directory, and released
when the stage function (``train_sft``, ``train_bpo``: :func:`releases_run_locks`) returns or raises, or at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from r4b.errors import InputError, output_dir

LOCK_FILE = "run.lock"
_HELD: dict[str, tuple[int, Path, int]] = {}  # resolved run directory -> (descriptor, lock file, holder's pid)

F = TypeVar("F", bound=Callable[..., Any])


def lock_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and lock it for this run on rank 0; every rank raises the same one-line
    :class:`InputError` when another live run holds it (a collective under torch.distributed)."""
    refusal = None
    if _rank() == 0:
        try:
            acquire(run_dir)
        except InputError as error:
            refusal = str(error)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise InputError(refusal)


def unlock_run_dir(run_dir: Path, *, remove_if_empty: bool = False) -> None:
    """Release this process's lock of ``run_dir`` (a no-op where it holds none); ``remove_if_empty``: also remove
    the directory when nothing else is in it (a run refused at start leaves nothing behind)."""
    release(run_dir)
    if remove_if_empty and _rank() == 0:
        with contextlib.suppress(OSError):  # not empty: another file was there
            Path(run_dir).rmdir()


def acquire(run_dir: Path) -> None:
    """Lock ``run_dir`` (created when missing) for this process; idempotent within it."""
    run_dir = output_dir(run_dir, "output_dir")
    key = str(run_dir.resolve())
    if key in _HELD:
        return
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise InputError(
                f"output_dir {run_dir} is in use by another run ({_describe(holder)}, lock {path}): wait for it to "
                "end, stop it, or use another --output-dir"
            ) from None
        except OSError as error:  # a filesystem without locks (some network mounts): run unlocked, say so
            os.close(fd)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: cannot lock {path} ({error.strerror}): a second run is not stopped", file=sys.stderr)
            return
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed the file between our open and lock: lock the new one
    previous = _read(fd)
    if previous:
        print(f"taking over {path} from a run that is gone ({_describe(previous)})", file=sys.stderr)
    _write(fd, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")})
    _HELD[key] = (fd, path, os.getpid())


def release(run_dir: Path) -> None:
    """Remove the lock file and drop the lock, when this process holds it."""
    held = _HELD.pop(str(Path(run_dir).resolve()), None)
    if held is None:
        return
    fd, path, pid = held
    try:
        if pid == os.getpid():  # never from a forked child (a DataLoader worker): the lock is its parent's
            path.unlink(missing_ok=True)  # while still locked: a run that opened the old file retries on a new one
    finally:
        os.close(fd)


def releases_run_locks(function: F) -> F:
    """Release the run locks taken during ``function`` when it returns or raises (the stage functions)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = set(_HELD)
        try:
            return function(*args, **kwargs)
        finally:
            for key in set(_HELD) - before:
                release(Path(key))

    return wrapper  # type: ignore[return-value]


def _release_all() -> None:
    for key in list(_HELD):
        release(Path(key))


atexit.register(_release_all)


def _rank() -> int:
    import torch.distributed as dist  # here: the module itself needs only the standard library

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 1 << 16, 0).decode()
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write(fd: int, holder: dict[str, Any]) -> None:
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "its details not written yet"
    return f"host {holder.get('host', '?')}, process {holder.get('pid', '?')}, started {holder.get('started', '?')}"
