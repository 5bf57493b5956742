"""Conditions for ``find()`` and ``count()``.

``where`` maps declared column names to a plain value (equality; ``None`` means
``IS NULL``) or to one of these::

    await users.find(where={"status": "active", "age": gt(30), "id": in_([1, 2, 3])})

Values are always bound parameters; column names must be declared columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dal.sql import Filter

__all__ = ["Filter", "eq", "ge", "gt", "in_", "is_null", "le", "like", "lt", "ne", "not_null"]


def eq(value: Any) -> Filter:
    return Filter("eq", value)


def ne(value: Any) -> Filter:
    return Filter("ne", value)


def lt(value: Any) -> Filter:
    return Filter("lt", value)


def le(value: Any) -> Filter:
    return Filter("le", value)


def gt(value: Any) -> Filter:
    return Filter("gt", value)


def ge(value: Any) -> Filter:
    return Filter("ge", value)


def like(pattern: str) -> Filter:
    """SQL LIKE with ``%`` and ``_`` wildcards (case sensitivity follows the column's collation)."""
    return Filter("like", pattern)


def in_(values: Iterable[Any]) -> Filter:
    # Filter rejects a str/bytes or a non-collection with ValidationError.
    return Filter("in", list(values) if isinstance(values, Iterable) and not isinstance(values, str | bytes) else values)


def is_null() -> Filter:
    return Filter("is_null")


def not_null() -> Filter:
    return Filter("not_null")
