"""The documents of one packed row, on the device and on the host: what every attention call of a forward shares.

``cu_seqlens`` lives on the device (the kernels read it); its values are needed on the host too (the launch grid,
the checks, the FlexAttention block mask and the tile schedule). A :class:`PackedLayout` carries both, so that
no layer reads ``cu_seqlens`` back from the device (a host sync per layer): the values come from where the row
was built (:class:`r4b.packed_row.PackedRow` holds them), or from one read when the layout is made. The
layout also holds what is built from it once per packed batch (:meth:`PackedLayout.memo`: a block mask, a tile
schedule), which every layer of the forward and the backward then share.

A plain class on purpose, neither a dataclass nor a container: engines that walk a forward's arguments (FSDP2's
input casts, pytree flattening, gradient checkpointing) pass it through as one opaque object, so every layer
receives this very layout and its memo.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

__all__ = ["PackedLayout"]


class PackedLayout:
    """One packed row's documents: ``cu_seqlens`` (int32 [docs+1] on the device) and ``host`` (the same values as
    Python ints), with the row's ``segment_ids`` / ``bidir_ids`` (flat int32 [N], or None) when its mask has them.

    ``host=None`` reads ``cu_seqlens`` to the host (one device sync); pass it where it is known."""

    __slots__ = ("_built", "_lengths", "bidir_ids", "cu_seqlens", "host", "segment_ids")

    def __init__(
        self,
        cu_seqlens: torch.Tensor,
        host: Sequence[int] | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        bidir_ids: torch.Tensor | None = None,
    ) -> None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
            raise ValueError(
                f"cu_seqlens must be a 1-D int32 tensor [num_docs + 1] starting at 0, got {cu_seqlens.dtype} "
                f"{tuple(cu_seqlens.shape)}"
            )
        values = tuple(int(x) for x in (cu_seqlens.tolist() if host is None else host))
        if len(values) != cu_seqlens.numel() or values[0] != 0:
            raise ValueError(f"cu_seqlens' host values {list(values)} must start at 0, one per boundary of cu_seqlens")
        self.cu_seqlens = cu_seqlens
        self.host = values
        self.segment_ids = segment_ids
        self.bidir_ids = bidir_ids
        self._lengths = [b - a for a, b in itertools.pairwise(values)]
        self._built: dict[Hashable, Any] = {}

    @classmethod
    def rows(cls, batch: int, seq_len: int, device: torch.device | str) -> PackedLayout:
        """``batch`` unpacked rows of ``seq_len`` tokens each, one document per row (no device read)."""
        host = [row * seq_len for row in range(batch + 1)]
        return cls(torch.tensor(host, dtype=torch.int32, device=device), host)

    @property
    def total(self) -> int:
        """Packed tokens N (``cu_seqlens[-1]``)."""
        return self.host[-1]

    @property
    def num_docs(self) -> int:
        return len(self._lengths)

    @property
    def max_seqlen(self) -> int:
        """The longest document's length."""
        return max(self._lengths)

    @property
    def shortest(self) -> int:
        """The shortest document's length."""
        return min(self._lengths)

    @property
    def lengths(self) -> list[int]:
        """Each document's length, on the host."""
        return list(self._lengths)

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for this layout, the stored result after: what every layer
        of a forward (and its backward) shares, such as a block mask or a tile schedule."""
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def __repr__(self) -> str:
        ids = [name for name in ("segment_ids", "bidir_ids") if getattr(self, name) is not None]
        extra = f", with {' and '.join(ids)}" if ids else ""
        return f"PackedLayout({self.num_docs} documents, {self.total} tokens, longest {self.max_seqlen}{extra})"
