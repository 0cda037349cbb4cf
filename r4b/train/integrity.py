"""Directories that are either complete and verifiable or absent: checkpoints and exports.

A directory is written into a staging sibling, gets ``checksums.json`` (each file's size and SHA-256) written
last, and is renamed into place (:func:`publish`): a directory with a manifest is complete, and its files can be
checked against it (:func:`verify_dir`). Verification reads every size first (a truncated file is found without
hashing anything), then hashes every file.

Cost. SHA-256 runs at about 1.6 GB/s on one core, so hashing is bound by reading the files. Under
torch.distributed every rank hashes its share of the files (spread by size), so the 50 GB checkpoint of a 4B model on
8 ranks costs each rank about 6 GB: a few seconds when saving (the files were just written and are still in the page
cache), and at resume one read of the checkpoint from disk, spread over the ranks. Exports are hashed by rank 0 alone
(8 GB for a 4B model in bf16: about 5 s), and verified again by ``r4b eval``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from r4b.errors import InputError
from r4b.file_hash import file_sha256

MANIFEST = "checksums.json"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL = 16 << 20  # free bytes under which a failed write is taken for a full disk (writes fill, then fail)
_VERIFIED: dict[tuple, str | None] = {}  # manifest identity -> verdict, so that a second look costs nothing

T = TypeVar("T")


# -- writing ----------------------------------------------------------------------------------------------------


def checksum_files(root: Path, names: Iterable[str] | None = None, *, distributed: bool = False) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of ``names`` under ``root`` (None: every file but the manifest).
    ``distributed``: every rank hashes its share and all ranks get the whole (a collective)."""
    root = Path(root)
    names = sorted(_files(root) if names is None else names)
    mine = _share(root, names) if distributed else names
    entries = {name: {"size": (root / name).stat().st_size, "sha256": file_sha256(root / name)} for name in mine}
    if distributed:
        for part in all_gather(entries):
            entries.update(part)
    return entries


def write_manifest(root: Path, entries: dict[str, dict]) -> None:
    """Write ``root/checksums.json``: the last file of a complete directory."""
    text = json.dumps({"algorithm": "sha256", "files": dict(sorted(entries.items()))}, indent=1)
    with open(Path(root) / MANIFEST, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def publish(staging: Path, final: Path) -> None:
    """Move the complete ``staging`` directory to ``final``, replacing an older one (its files flushed to disk
    first). A crash in between leaves the old directory or none, never a half-written one."""
    for path in sorted(Path(staging).rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


# -- checking ---------------------------------------------------------------------------------------------------


def has_manifest(root: Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def verify_dir(root: Path, *, distributed: bool = False) -> str | None:
    """What is wrong with ``root`` against its manifest, naming the file (None: intact). Sizes first, then hashes;
    ``distributed``: every rank hashes its share (a collective; every rank gets the same verdict)."""
    root = Path(root)
    manifest = root / MANIFEST
    try:
        stat = manifest.stat()
    except OSError:
        return f"{manifest}: missing (the directory is incomplete)"
    key = (str(root.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    if key not in _VERIFIED:
        _VERIFIED[key] = _verify(root, manifest, distributed)
    return _VERIFIED[key]


def _verify(root: Path, manifest: Path, distributed: bool) -> str | None:
    try:
        files = json.loads(manifest.read_text())["files"]
        sizes = {str(name): int(entry["size"]) for name, entry in files.items()}
        digests = {str(name): str(entry["sha256"]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{manifest}: unreadable ({error})"
    for name in sorted(sizes):
        path = root / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != sizes[name]:
            return f"{path}: {path.stat().st_size} bytes where {sizes[name]} were written (truncated or overwritten)"
    names = sorted(sizes)
    mine = _share(root, names) if distributed else names
    found = next((name for name in mine if file_sha256(root / name) != digests[name]), None)
    if distributed:
        found = min((name for name in all_gather(found) if name is not None), default=None)
    return None if found is None else f"{root / found}: its contents differ from its checksum (damaged)"


def check_export(path: Path) -> None:
    """Refuse a model directory that is an unfinished or damaged r4b export, naming the file (what ``r4b eval``
    loads). A directory without checksums (another tool's, or an older r4b's) is taken as it is."""
    path = Path(path)
    if path.name.startswith(".") and path.name.endswith(".partial"):
        raise InputError(f"model {path}: an unfinished export (its writing was interrupted); export it again")
    if has_manifest(path):
        damage = verify_dir(path)
        if damage is not None:
            raise InputError(f"model {path}: damaged export: {damage}; export it again")


# -- ranks and out-of-space errors ------------------------------------------------------------------------------


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (``[value]`` outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def together(action: Callable[[], T]) -> T:
    """Run ``action`` on this rank, then let every rank know whether it failed anywhere: a failure raises on every
    rank (on the others as :class:`RankFailed`), so no rank is left waiting for one that gave up."""
    error: BaseException | None = None
    result: Any = None
    try:
        result = action()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as caught:  # (torch.distributed.checkpoint's CheckpointException is a BaseException)
        error = caught  # re-raised below, once the other ranks heard of it
    failures = all_gather(None if error is None else describe_failure(error))
    if error is not None:
        raise error
    for index, failure in enumerate(failures):
        if failure is not None:
            raise RankFailed(index, *failure)
    return result


class RankFailed(RuntimeError):
    """Another rank failed in a step every rank takes part in."""

    def __init__(self, rank: int, message: str, no_space: bool) -> None:
        super().__init__(f"rank {rank}: {message}")
        self.no_space = no_space


def describe_failure(error: BaseException) -> tuple[str, bool]:
    """(a one-line description, whether it is a full disk)."""
    if isinstance(error, RankFailed):
        return str(error), error.no_space
    full = out_of_space(error)
    if full is not None:
        return f"no space left on device{f' writing {full.filename}' if full.filename else ''}", True
    return f"{type(error).__name__}: {error}", False


def out_of_space(error: BaseException) -> OSError | None:
    """The full-disk (or over-quota) OSError behind ``error``: itself, its causes, or a torch.distributed.checkpoint
    ``CheckpointException``'s failures per rank; None when the disk is not the reason."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return current
        todo += [current.__cause__, current.__context__]
        for failure in (getattr(current, "failures", None) or {}).values():  # DCP: {rank: (exception, traceback)}
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


@contextlib.contextmanager
def disk_full_is_said(where: Path) -> Iterator[None]:
    """Writing under ``where``: an error that comes while its filesystem is (nearly) full becomes the OSError
    (ENOSPC, naming ``where``) it is. torch.save reports a full disk as a bare RuntimeError ("unexpected pos")."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as error:
        if out_of_space(error) is None and _free_bytes(Path(where)) < _NEARLY_FULL:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where)) from error
        raise


def no_space_error(error: BaseException, what: str, advice: str) -> InputError | None:
    """The one-line error of ``what`` failing on a full disk (None when that is not why): where it was writing,
    "no space left on device", and ``advice``."""
    if isinstance(error, RankFailed):
        return InputError(f"{what} not written: {error}; {advice}") if error.no_space else None
    full = out_of_space(error)
    if full is None:
        return None
    where = f" writing {full.filename}" if full.filename else ""
    return InputError(f"{what} not written: no space left on device{where}; {advice}")


# -- helpers ----------------------------------------------------------------------------------------------------


def _files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST]


def _share(root: Path, names: list[str]) -> list[str]:
    """This rank's files: largest first, each to the least-loaded rank (the same split on every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return names
    world, me = dist.get_world_size(), dist.get_rank()
    loads = [0] * world
    mine = []
    for size, name in sorted((-(root / n).stat().st_size, n) for n in names):
        owner = min(range(world), key=lambda r: (loads[r], r))
        loads[owner] -= size
        if owner == me:
            mine.append(name)
    return mine


def _free_bytes(path: Path) -> int:
    """Free space for this user on the filesystem holding ``path`` (its nearest existing parent)."""
    for parent in [path, *path.parents]:
        try:
            stat = os.statvfs(parent)
        except OSError:
            continue
        return stat.f_bavail * stat.f_frsize
    return 1 << 62
