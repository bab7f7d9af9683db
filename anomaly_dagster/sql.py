"""SQL identifier and literal safety: configuration never becomes SQL text unchecked."""

from __future__ import annotations

import re
from datetime import date, datetime, time

IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def validate_identifier(name: str, what: str = "identifier") -> str:
    """Return ``name`` if it is a plain identifier (letters, digits, underscore), else raise ValueError."""
    if not isinstance(name, str) or not IDENTIFIER_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits and underscores, starting with a letter or underscore"
        )
    return name


def quote_identifier(name: str, what: str = "identifier") -> str:
    """Validate then double-quote an identifier for DuckDB."""
    return '"' + validate_identifier(name, what) + '"'


def quote_literal(value: str) -> str:
    """Single-quote a string literal (paths, formats) with embedded quotes doubled."""
    if "\x00" in value:
        raise ValueError("string literal contains a NUL byte")
    return "'" + value.replace("'", "''") + "'"


def parse_day(value: str | date) -> date:
    """A partition key (``YYYY-MM-DD``) as a date, rejecting anything else (e.g. path traversal).

    A datetime (or pandas Timestamp) is accepted only at midnight, and becomes its date.
    """
    if isinstance(value, datetime):
        if value.time() != time(0) or value.tzinfo is not None:
            raise ValueError(f"invalid partition key {value!r}: expected a day, got a time of day")
        return value.date()
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError(f"invalid partition key {value!r}: expected YYYY-MM-DD")
    return date.fromisoformat(value)
