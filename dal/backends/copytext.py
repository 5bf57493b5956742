"""PostgreSQL's COPY text format, built from validated values (no driver import).

A bulk load spends most of its client CPU encoding values. Built column by
column with C-level ``map`` calls, the text form of the common types (int,
Decimal, bool, str, NULL) costs far less than asyncpg's per-value binary
encoders, and the server parses it as fast. Other types get no text form
(:func:`text_forms` returns ``None``) and go as binary records.
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
# The Python types whose text is exactly what PostgreSQL's input function of a
# column validated for them parses back to the same value (int: integer and
# numeric columns; Decimal: numeric; bool: boolean).
_TEXT_FORMS: dict[type, Callable[[Any], str]] = {int: int.__repr__, Decimal: Decimal.__str__, bool: _BOOL_TEXT.__getitem__}

Form = Callable[[Any], str] | None
"""How one column's values become text (``None``: they are text already)."""


def text_forms(columns: Sequence[Sequence[Any]], kinds_of: Sequence[set[type]] | None = None) -> list[Form] | None:
    """How to render each column (all its values) as COPY text, or ``None`` when
    one cannot be: a type without an exact text form here, two types in one
    column, or a string UTF-8 cannot encode (a lone surrogate; binary encoding
    reports it). ``kinds_of``: each column's set of value types, when known."""
    forms: list[Form] = []
    for i, values in enumerate(columns):
        kinds = set(map(type, values)) if kinds_of is None else set(kinds_of[i])
        nulls = type(None) in kinds
        kinds.discard(type(None))
        if len(kinds) > 1:
            return None
        kind = kinds.pop() if kinds else str
        form: Form
        if kind is str:
            joined = "".join([v for v in values if v is not None] if nulls else values)
            if not joined.isascii():
                try:
                    joined.encode()
                except UnicodeEncodeError:
                    return None
            if "\\" in joined or "\n" in joined or "\r" in joined or "\t" in joined:
                form = operator.methodcaller("translate", _TEXT_ESCAPES)
            else:
                form = None
        else:
            form = _TEXT_FORMS.get(kind)
            if form is None:
                return None
        if nulls:
            form = _or_null(form)
        forms.append(form)
    return forms


def _or_null(form: Form) -> Callable[[Any], str]:
    if form is None:
        return lambda v: _NULL if v is None else v
    inner = form
    return lambda v: _NULL if v is None else inner(v)


def text_lines(columns: Sequence[Sequence[Any]], forms: Sequence[Form]) -> list[str]:
    """Rows, given column by column, as lines of COPY's text format (without the newline)."""
    return join_lines(text_columns(columns, forms))


def text_columns(columns: Sequence[Sequence[Any]], forms: Sequence[Form]) -> list[Sequence[str]]:
    """Each column's values as COPY text."""
    return [values if form is None else list(map(form, values)) for values, form in zip(columns, forms, strict=True)]


def join_lines(texts: Sequence[Sequence[str]]) -> list[str]:
    """Columns of :func:`text_columns` as lines (without the newline)."""
    return list(map("\t".join, zip(*texts)))  # noqa: B905 - columns of one length


def text_payload(lines: Sequence[str]) -> memoryview:
    """Lines of :func:`text_lines` as COPY data.

    A memoryview: asyncpg's ``copy_to_table`` would take ``bytes`` for a file path.
    """
    return memoryview(("\n".join(lines) + "\n").encode())
