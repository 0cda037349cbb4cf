"""The input errors of ``r4b eval``: a bad data file, model or option, said with its location."""

from __future__ import annotations

from r4b.errors import InputError

__all__ = ["EvalError"]


class EvalError(InputError):
    """Bad evaluation input that is not a data record (those raise :class:`r4b.data.DataError`): a missing
    or empty data file, a model directory that does not load, an unknown mode, clashing model names."""
