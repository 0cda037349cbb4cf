"""The sha256 of a file, read in 4 MiB blocks: the one file hash behind r4b's checksums (checkpoints and exports,
r4b.train.integrity; prepared data DIRs, r4b.data.prepare)."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_sha256"]

_BLOCK = 1 << 22


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
