"""The one exception type of r4b.data: a bad input, located by file, line and field."""

from __future__ import annotations

from r4b.errors import InputError


class DataError(InputError):
    """A problem with one input record, e.g. ``data/train.jsonl:17: field 'mode': unknown mode 'think' (...)``.

    Attributes:
        where: ``"file:line"`` of the record (for a TSV, the line its row starts on).
        field: the field or column at fault (``"messages[2].content"``, ``"image"``), or None for the whole record.
        reason: a short key for :class:`~r4b.data.report.DataReport` counts (``"missing_image"``, ``"overlong"``).
        detail: the message without the location.
    """

    def __init__(self, where: str, detail: str, *, reason: str, field: str | None = None, kind: str = "field") -> None:
        self.where, self.detail, self.reason, self.field = where, detail, reason, field
        self.kind = kind
        location = f"{where}: {kind} '{field}'" if field is not None else where
        super().__init__(f"{location}: {detail}")

    def __reduce__(self):  # picklable across worker processes despite the keyword-only arguments
        return _rebuild, (self.where, self.detail, self.reason, self.field, self.kind)


def _rebuild(where: str, detail: str, reason: str, field: str | None, kind: str) -> DataError:
    return DataError(where, detail, reason=reason, field=field, kind=kind)
