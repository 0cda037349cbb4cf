"""Lines of JSON as r4b reads them: UTF-8 decoding and JSON parsing with located, spelled-out errors."""

from __future__ import annotations

import json
from typing import Any

from r4b.data.errors import DataError

__all__ = ["decode_line", "json_error_text", "load_json"]


def decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(where, f"not UTF-8 (byte {error.start})", reason="malformed_json") from None


def load_json(line: str, where: str) -> Any:
    try:
        return json.loads(line.rstrip("\r\n"))  # the line's end is no part of its JSON (an open string is unclosed)
    except json.JSONDecodeError as error:
        raise DataError(where, json_error_text(error), reason="malformed_json") from None


# json's terse messages, said in full ("Expecting value" at column 1 means no JSON value starts there)
_JSON_MESSAGES = {
    "Expecting value": "expected a JSON value (an object, string, number, ...)",
    "Extra data": "extra text after the JSON value (one sample per line)",
    "Unterminated string starting at": "a string that starts here is never closed",
    "Expecting property name enclosed in double quotes": "expected a field name in double quotes",
    "Expecting ',' delimiter": "expected ',' between items",
    "Expecting ':' delimiter": "expected ':' after a field name",
    "Invalid control character at": "a raw control character (a tab or newline) inside a string",
    "Invalid \\escape": "an invalid backslash escape",
}


def json_error_text(error: json.JSONDecodeError) -> str:
    """``malformed JSON at column N: <what json expected there>`` for a :class:`json.JSONDecodeError`."""
    text = _JSON_MESSAGES.get(error.msg) or error.msg.removesuffix(" at").lower()
    return f"malformed JSON at column {error.colno}: {text}"
