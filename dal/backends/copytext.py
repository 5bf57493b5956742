"""PostgreSQL's COPY text format, built from validated values (no driver import).

A bulk load spends most of its client CPU encoding values. Built column by
column with C-level ``map`` calls, the text form of the common types (int,
Decimal, bool, str, NULL) costs far less than asyncpg's per-value binary
encoders, and the server parses it as fast. Other types return ``None`` and go
as binary records.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

# COPY's text format: these four characters are escaped, NULL is \N.
_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_BOOL_TEXT = {True: "t", False: "f"}
_NULL = "\\N"
# The Python types whose str() is exactly what PostgreSQL's input function of a
# column validated for them parses back to the same value (int: integer and
# numeric columns; Decimal: numeric; bool via _BOOL_TEXT).
_TEXT_FORMS: dict[type, Callable[[Any], str]] = {int: int.__repr__, Decimal: Decimal.__str__, bool: _BOOL_TEXT.__getitem__}


def copy_text_lines(columns: Sequence[Sequence[Any]]) -> list[str] | None:
    """Rows, given column by column, as lines of COPY's text format (without the newline).

    ``None`` when a column holds a type without an exact text form here, or a
    string UTF-8 cannot encode (a lone surrogate): the caller COPYs binary
    records instead, whose encoder reports it. Each column is converted by
    C-level ``map`` calls, so a bulk load spends far less CPU here than
    asyncpg's per-value binary encoders do.
    """
    texts: list[Sequence[str]] = []
    for values in columns:
        kinds = set(map(type, values))
        nulls = type(None) in kinds
        kinds.discard(type(None))
        if len(kinds) > 1:
            return None
        kind = kinds.pop() if kinds else str
        if kind is str:
            present = [v for v in values if v is not None] if nulls else values
            joined = "".join(present)
            if not joined.isascii():
                try:
                    joined.encode()
                except UnicodeEncodeError:
                    return None
            if "\\" in joined or "\n" in joined or "\r" in joined or "\t" in joined:
                form: Callable[[Any], str] = operator.methodcaller("translate", _TEXT_ESCAPES)
            elif not nulls:
                texts.append(values)
                continue
            else:
                form = str
        else:
            found = _TEXT_FORMS.get(kind)
            if found is None:
                return None
            form = found
        if nulls:
            texts.append([_NULL if v is None else form(v) for v in values])
        else:
            texts.append(list(map(form, values)))
    return list(map("\t".join, zip(*texts)))  # noqa: B905 - columns of one length


def copy_text_payload(lines: Sequence[str]) -> memoryview:
    """Lines of :func:`copy_text_lines` as one COPY payload.

    A memoryview: asyncpg's ``copy_to_table`` would take ``bytes`` for a file path.
    """
    return memoryview(("\n".join(lines) + "\n").encode())
