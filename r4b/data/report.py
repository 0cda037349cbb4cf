"""DataReport: what was loaded and what was skipped, by reason, with the first few examples of each."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from r4b.data.errors import DataError


@dataclass
class DataReport:
    """Counts of loaded and skipped records; nothing is ever dropped without being counted here.

    ``to_dict()`` gives ``{"loaded": 120, "skipped": {"overlong": 2, "missing_image": 1}, "examples": {...}}``
    where ``examples[reason]`` holds the first ``max_examples`` messages (each starting with ``file:line``).
    """

    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, error: DataError) -> None:
        """Count one skipped record under ``error.reason`` and keep its message if among the first few."""
        self.add(error.reason, str(error))

    def add(self, reason: str, message: str, count: int = 1) -> None:
        """Count ``count`` skipped records under ``reason``; ``message`` is kept as an example."""
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.max_examples:
            kept.append(message)

    def merge(self, other: DataReport) -> DataReport:
        """A new report with both reports' counts added (examples: the first few of both, in order)."""
        out = DataReport(self.loaded + other.loaded, dict(self.skipped), {}, self.max_examples)
        for reason, kept in self.examples.items():
            out.examples[reason] = list(kept[: self.max_examples])
        for reason, count in other.skipped.items():
            out.skipped[reason] = out.skipped.get(reason, 0) + count
        for reason, kept in other.examples.items():
            mine = out.examples.setdefault(reason, [])
            mine.extend(kept[: max(0, self.max_examples - len(mine))])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "skipped": dict(self.skipped),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        return cls(
            int(data["loaded"]),
            dict(data.get("skipped", {})),
            {k: list(v) for k, v in data.get("examples", {}).items()},
        )

    def __str__(self) -> str:
        if not self.skipped:
            return f"loaded {self.loaded}, skipped 0"
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items()))
        lines = [f"loaded {self.loaded}, skipped {self.num_skipped} ({reasons})"]
        for reason in sorted(self.examples):
            lines.extend(f"  {reason}: {message}" for message in self.examples[reason])
        return "\n".join(lines)
