"""SQLite through aiosqlite: the embedded default, one file per shard database.

Each connection runs on its own thread (aiosqlite) in autocommit mode
(``isolation_level=None``); a transaction is ``BEGIN IMMEDIATE`` so that two
writers queue on the database lock at ``BEGIN`` instead of failing later when a
read lock cannot be upgraded. The file uses WAL, so readers never wait for the
writer and each statement sees every commit before it. sqlite3 keeps
``statement_cache_size`` prepared statements per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from dal.config import NodeSpec
from dal.errors import (
    ConnectionUnavailableError,
    DalError,
    DataError,
    DuplicateKeyError,
    ForeignKeyError,
    IntegrityError,
    NotNullError,
    QueryError,
    QueryTimeoutError,
    ReadOnlyError,
    SchemaMismatchError,
)

from .base import Row, settle, timed_out

_BUSY_SLICE = 0.02
"""Seconds SQLite itself waits for a lock before saying the database is locked."""

T = TypeVar("T")

# OverflowError: an int beyond SQLite's 64-bit INTEGER, raised by sqlite3 when binding.
# ValueError: UnicodeEncodeError of a str with a lone surrogate (sqlite3), or one of
# aiosqlite's for a connection whose worker thread has stopped (_AIOSQLITE_GONE).
_ERRORS = (sqlite3.Error, ValueError, OverflowError)
_AIOSQLITE_GONE = ("Connection closed", "no active connection")


def map_error(exc: BaseException, node: str) -> DalError:
    """The dal error for a sqlite3/aiosqlite exception raised on ``node``."""
    text = str(exc)
    low = text.lower()
    msg = f"{node}: {text}"
    if isinstance(exc, sqlite3.IntegrityError):
        if "unique constraint" in low or "primary key" in low:
            return DuplicateKeyError(msg)
        if "not null constraint" in low:
            return NotNullError(msg)
        if "foreign key constraint" in low:
            return ForeignKeyError(msg)
        return IntegrityError(msg)
    if "no such table" in low or "no such column" in low or "has no column named" in low:
        return SchemaMismatchError(msg)
    if "database is locked" in low or "database table is locked" in low or "interrupted" in low:
        return QueryTimeoutError(msg, node=node)
    if "readonly database" in low or "read-only" in low:
        return ReadOnlyError(msg)
    if isinstance(exc, UnicodeEncodeError):
        # A str with a lone surrogate (in a value or the SQL text): refused by sqlite3
        # before SQLite sees it; the connection is fine.
        return DataError(f"{node}: a str value cannot be encoded as UTF-8: {text}")
    if isinstance(exc, sqlite3.DataError | OverflowError) or "too big" in low:
        return DataError(msg)
    if (isinstance(exc, ValueError) and text in _AIOSQLITE_GONE) or "closed" in low or "unable to open" in low or "disk i/o" in low:
        return ConnectionUnavailableError(msg)
    # (another ValueError: sqlite3 refused an argument before running anything)
    return QueryError(msg)


class SQLiteConnection:
    """One aiosqlite connection (a worker thread running its statements in order).

    A statement interrupted on this side (``query_timeout``, or the caller
    cancelled) goes on in the worker thread, and would commit once it got the
    lock it waits for: before the interruption propagates, it is interrupted
    (``sqlite3_interrupt``) and waited for until the worker has finished it
    (:func:`~dal.backends.base.settle`).
    """

    __slots__ = ("_conn", "_deadline", "_node", "_spec", "broken", "created_at", "last_used", "sent", "unsettled")

    def __init__(self, conn: aiosqlite.Connection, spec: NodeSpec) -> None:
        self._conn = conn
        self._spec = spec
        self._node = spec.name
        self.unsettled: asyncio.Future[bool] | None = None
        qt = spec.pool.query_timeout
        # The lock wait's own limit (query_timeout, in _locked) first: a statement refused
        # for a lock it could not get did nothing, and the connection stays usable.
        self._deadline: float | None = None if qt is None else qt + 1.0
        self.broken = False
        self.created_at = 0.0
        self.last_used = 0.0
        self.sent = 0

    async def fetch_one(self, sql: str, params: Sequence[Any]) -> Row | None:
        try:
            async with asyncio.timeout(self._deadline):
                self.sent += 1
                rows = await self._locked(lambda: self._conn.execute_fetchall(sql, params))
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=False) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout, read=True)
            raise
        for row in rows:
            return row
        return None

    async def fetch_all(self, sql: str, params: Sequence[Any]) -> list[Row]:
        try:
            async with asyncio.timeout(self._deadline):
                self.sent += 1
                return list(await self._locked(lambda: self._conn.execute_fetchall(sql, params)))
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=False) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout, read=True)
            raise

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        try:
            async with asyncio.timeout(self._deadline):
                self.sent += 1
                cur = await self._locked(lambda: self._conn.execute(sql, params))
                count = cur.rowcount
                await cur.close()
            return max(count, 0)
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=sql == "COMMIT" or not self._conn.in_transaction) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise

    async def execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> int:
        try:
            async with asyncio.timeout(self._deadline):
                self.sent += len(params)
                cur = await self._locked(lambda: self._conn.executemany(sql, params))
                count = cur.rowcount
                await cur.close()
            return max(count, 0)
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=sql == "COMMIT" or not self._conn.in_transaction) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise

    async def begin(self) -> None:
        await self.execute("BEGIN IMMEDIATE", ())

    async def commit(self) -> None:
        await self.execute("COMMIT", ())

    async def rollback(self) -> None:
        await self.execute("ROLLBACK", ())

    def in_transaction(self) -> bool:
        return bool(self._conn.in_transaction)

    def is_closed(self) -> bool:
        return not self._conn._running  # noqa: SLF001  (aiosqlite says so only here)

    async def close(self) -> None:
        await self._conn.close()

    def terminate(self) -> None:
        # Closed by its worker thread, which runs the request even once this event
        # loop is gone (a close task might never run).
        self._conn.stop()

    async def _locked(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, again while SQLite says the database is locked, for up to
        ``query_timeout``. The lock is waited for here, in short slices (the connection's
        own busy timeout is :data:`_BUSY_SLICE`), not in SQLite's busy handler: a caller
        cancelled meanwhile stops at once, with nothing running in the worker thread
        (``sqlite3_interrupt`` does not cut a busy wait). A statement refused for a lock
        did nothing, so trying it again is safe."""
        loop = asyncio.get_running_loop()
        qt = self._spec.pool.query_timeout
        end = None if qt is None else loop.time() + qt
        delay = 0.001
        while True:
            try:
                return await call()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or (end is not None and loop.time() >= end):
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def _timed_out(self, exc: BaseException, *, write: bool) -> QueryTimeoutError:
        return await timed_out(self, self._settle, self._spec, "was interrupted", landed=write, read=not write)

    async def _settle(self) -> bool:
        """Interrupt the statement the worker runs and wait until the worker is done with it
        (its queue runs in order: a no-op queued now runs after it)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        try:
            self._conn._tx.put_nowait((done, lambda: None))  # noqa: SLF001  (aiosqlite's worker queue: no public API)
        except Exception:
            return False
        while not done.done():
            with contextlib.suppress(Exception):
                # sqlite3's own interrupt() (thread-safe), not aiosqlite's, which would queue
                # behind the statement it is meant to cut; waits on a lock are cut too.
                self._conn._connection.interrupt()  # type: ignore[union-attr]  # noqa: SLF001
            await asyncio.wait([done], timeout=0.05)
        return True

    def _lost(self, exc: BaseException) -> DalError:
        err = map_error(exc, self._node)
        if isinstance(err, ConnectionUnavailableError):
            self.broken = True
        return err


def database_path(spec: NodeSpec) -> str:
    return spec.dsn.url.database or ":memory:"


async def connect(spec: NodeSpec) -> SQLiteConnection:
    path = database_path(spec)
    timeout = _BUSY_SLICE  # (lock waits beyond it: SQLiteConnection._locked)
    try:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(
            path,
            isolation_level=None,
            timeout=timeout,
            cached_statements=spec.pool.statement_cache_size,
        )
    except (*_ERRORS, OSError) as exc:
        raise ConnectionUnavailableError(f"{spec.name}: cannot open {path}: {exc}") from exc
    try:
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA foreign_keys=ON",
            f"PRAGMA busy_timeout={int(timeout * 1000)}",
        ):
            await conn.execute(pragma)
    except BaseException as exc:
        # (cancelled too): the connection's worker thread is no daemon, and one left
        # running keeps the interpreter from exiting
        conn.stop()
        if isinstance(exc, (*_ERRORS, OSError)):
            raise ConnectionUnavailableError(f"{spec.name}: cannot open {path}: {exc}") from exc
        raise
    return SQLiteConnection(conn, spec)

