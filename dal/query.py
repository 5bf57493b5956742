"""Queries over a logical table's physical tables: what a caller's ``find``/``count``
arguments mean, how rows from several physical tables merge, and how fan-out
jobs run.

- :func:`build_query` validates ``where``, ``order_by``, ``limit``, ``offset`` and a
  keyset cursor against the declared table (before any I/O) into a
  :class:`~dal.sql.Query`; the order always ends with the primary key, so pages
  are deterministic.
- :func:`sort_key` orders rows as the SQL does (NULLs first ascending, last
  descending), for the k-way merge of a fan-out.
- :func:`gather_bounded` runs a fan-out's jobs within the layer's bound and
  leaves nothing running when it raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from dal.errors import ValidationError
from dal.schema import LogicalTable
from dal.sql import Filter, Query

T = TypeVar("T")


async def gather_bounded(
    jobs: Sequence[Callable[[], Awaitable[T]]], limit: asyncio.Semaphore
) -> list[T]:
    """Run ``jobs`` concurrently under ``limit``; the first failure is raised as is.

    After a failure, the jobs not started yet are dropped and the running ones
    are waited for (their results discarded), so nothing of the call is left
    running once it raises. Running jobs are not cancelled: a statement
    cancelled in flight costs its connection, which is then discarded while its
    server session (asyncpg's cancel request) or worker thread (aiosqlite) is
    still busy with it, and may outlive the layer's ``aclose()``. When the
    caller itself is cancelled, every job is cancelled.
    """
    if len(jobs) <= 1:
        if not jobs:
            return []
        async with limit:
            return [await jobs[0]()]

    started: set[int] = set()

    async def run(i: int, job: Callable[[], Awaitable[T]]) -> T:
        async with limit:
            started.add(i)
            return await job()

    tasks = [asyncio.ensure_future(run(i, j)) for i, j in enumerate(jobs)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if not failed:
            return [t.result() for t in tasks]
        for i, t in enumerate(tasks):
            if i not in started:
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    error = failed[0].exception()
    assert error is not None
    raise error


def build_query(
    t: LogicalTable,
    where: Mapping[str, Any] | None,
    order_by: str | Sequence[str],
    limit: int | None,
    offset: int,
    after: Mapping[str, Any] | None,
) -> Query:
    """The query a caller's ``find``/``count`` arguments describe on table ``t``, every name
    and value checked against its declaration (:class:`~dal.errors.ValidationError`,
    :class:`~dal.errors.UnknownColumnError`); the order ends with the primary key."""
    if where is not None and not isinstance(where, Mapping):
        raise ValidationError(f"where must be a mapping of column names to values, got {type(where).__name__}")
    conditions: list[tuple[str, Filter]] = []
    for name, cond in (where or {}).items():
        col = t.column(name)
        f = cond if isinstance(cond, Filter) else (Filter("is_null") if cond is None else Filter("eq", cond))
        if f.op == "in":
            for v in f.value:
                t.check_value(col, v)
        elif f.op == "like":
            if not isinstance(f.value, str):
                raise ValidationError(f"{t.name}.{col}: like() takes a str pattern")
        elif f.op not in ("is_null", "not_null"):
            if f.value is None:
                raise ValidationError(f"{t.name}.{col}: compare with None using is_null()/not_null()")
            t.check_value(col, f.value)
        conditions.append((col, f))
    if isinstance(order_by, str):
        order_by = [order_by]
    elif not isinstance(order_by, Sequence):
        raise ValidationError(f"order_by takes a column name or a list of them, got {type(order_by).__name__}")
    order: list[tuple[str, bool]] = []
    for item in order_by:
        if type(item) is not str:
            raise ValidationError(f"order_by takes column names, got {type(item).__name__}")
        desc = item.startswith("-")
        col = t.column(item[1:] if desc else item)
        if all(col != o for o, _ in order):
            order.append((col, desc))
    for col in t.primary_key:  # a total order: deterministic pages and keyset cursors
        if all(col != o for o, _ in order):
            order.append((col, False))
    if limit is not None and (type(limit) is not int or limit < 0):
        raise ValidationError(f"limit must be an int >= 0, got {limit!r}")
    if type(offset) is not int or offset < 0:
        raise ValidationError(f"offset must be an int >= 0, got {offset!r}")
    cursor: tuple[Any, ...] | None = None
    if after is not None:
        if not isinstance(after, Mapping):
            raise ValidationError("after must be a mapping (e.g. the last row of the previous page)")
        values = []
        for col, _ in order:
            if col not in after or after[col] is None:
                raise ValidationError(
                    f"after needs a non-NULL value for every order column {[c for c, _ in order]}; missing {col!r}"
                )
            t.check_value(col, after[col])
            values.append(after[col])
        cursor = tuple(values)
    return Query(tuple(conditions), tuple(order), limit, offset, cursor)


class _Desc:
    """Inverts comparisons for a descending key; NULLs (None) go last."""

    __slots__ = ("v",)

    def __init__(self, v: Any) -> None:
        self.v = v

    def __lt__(self, other: _Desc) -> bool:
        return bool(self.v > other.v)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and bool(self.v == other.v)

    __hash__ = None  # type: ignore[assignment]


def sort_key(order: Sequence[tuple[str, bool]]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """Sort key matching the SQL order: NULLs first ascending, last descending."""

    def key(row: Mapping[str, Any]) -> tuple[Any, ...]:
        parts: list[Any] = []
        for col, desc in order:
            v = row[col]
            if desc:
                parts.append((v is None, _Desc(v) if v is not None else 0))
            else:
                parts.append((v is not None, v if v is not None else 0))
        return tuple(parts)

    return key
