"""MySQL and MariaDB through aiomysql.

Connections run in **autocommit**. aiomysql's default (``autocommit=False``)
leaves every pooled connection inside an open REPEATABLE READ transaction
between checkouts, so a read can return a snapshot older than writes that
committed before it started. With autocommit each statement sees every commit
that preceded it; a transaction is an explicit ``BEGIN`` ... ``COMMIT``.

The MySQL protocol as aiomysql speaks it has no server-side prepared
statements: parameters are escaped client-side into the compiled text, which
dal caches per statement shape. ``CLIENT.FOUND_ROWS`` makes an UPDATE report
the rows it matched, not only those it changed, like PostgreSQL and SQLite.
Sessions run with ``STRICT_ALL_TABLES`` so an oversized value is an error, not
a silent truncation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiomysql
import pymysql
from pymysql.constants import CLIENT

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

from .base import Row

_DUPLICATE = {1062, 1586}
_FOREIGN_KEY = {1216, 1217, 1451, 1452}
_NOT_NULL = {1048, 1364}
_DATA = {1153, 1264, 1265, 1292, 1366, 1406, 1690}
# Errors after which the server closes the connection although the client does not know yet.
_FATAL = {1153}  # ER_NET_PACKET_TOO_LARGE: a value bigger than max_allowed_packet
_SCHEMA = {1054, 1146}
_READ_ONLY = {1290, 1792, 1836}
_TIMEOUT = {1205, 1317, 1969, 3024}
_CONNECTION = {1040, 1053, 1927, 2002, 2003, 2006, 2013, 2055}

_ERRORS = (pymysql.err.MySQLError, OSError, asyncio.IncompleteReadError, RuntimeError)


def map_error(exc: BaseException, node: str) -> DalError:
    """The dal error for a PyMySQL/aiomysql/OS exception raised while talking to ``node``."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    msg = f"{node}: {exc}"
    if code in _DUPLICATE:
        return DuplicateKeyError(msg)
    if code in _FOREIGN_KEY:
        return ForeignKeyError(msg)
    if code in _NOT_NULL:
        return NotNullError(msg)
    if code in _DATA:
        return DataError(msg)
    if code in _SCHEMA:
        return SchemaMismatchError(msg)
    if code in _READ_ONLY:
        return ReadOnlyError(msg)
    if code in _TIMEOUT:
        return QueryTimeoutError(msg)
    if code in _CONNECTION:
        return ConnectionUnavailableError(msg)
    if isinstance(exc, pymysql.err.IntegrityError):
        return IntegrityError(msg)
    if isinstance(exc, pymysql.err.DataError):
        return DataError(msg)
    if isinstance(exc, pymysql.err.ProgrammingError | pymysql.err.NotSupportedError):
        return QueryError(msg)
    if isinstance(exc, pymysql.err.OperationalError | pymysql.err.InternalError) and code is not None and code < 2000:
        return QueryError(msg)
    return ConnectionUnavailableError(msg)


class _Cursor(aiomysql.Cursor):  # type: ignore[misc]
    """aiomysql's cursor without the extra SHOW WARNINGS round trip after a note.

    aiomysql turns server notes (``DROP TABLE IF EXISTS`` of a missing table,
    ...) into Python warnings at the cost of one more round trip; under
    ``STRICT_ALL_TABLES`` anything that would change data is an error instead.
    """

    async def _show_warnings(self, conn: Any) -> None:
        return None


class MySQLConnection:
    __slots__ = ("_conn", "_cur", "_in_tx", "_node", "broken", "created_at", "last_used")

    def __init__(self, conn: aiomysql.Connection, cursor: aiomysql.Cursor, node: str) -> None:
        self._conn = conn
        self._cur = cursor
        self._node = node
        self._in_tx = False
        self.broken = False
        self.created_at = 0.0
        self.last_used = 0.0

    async def fetch_one(self, sql: str, params: Sequence[Any]) -> Row | None:
        try:
            await self._cur.execute(sql, params or None)
            return await self._cur.fetchone()  # type: ignore[no-any-return]
        except _ERRORS as exc:
            raise self._lost(exc) from exc

    async def fetch_all(self, sql: str, params: Sequence[Any]) -> list[Row]:
        try:
            await self._cur.execute(sql, params or None)
            return list(await self._cur.fetchall())
        except _ERRORS as exc:
            raise self._lost(exc) from exc

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        try:
            return int(await self._cur.execute(sql, params or None))
        except _ERRORS as exc:
            raise self._lost(exc) from exc

    async def execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> int:
        try:
            await self._cur.executemany(sql, params)
            return max(int(self._cur.rowcount), 0)
        except _ERRORS as exc:
            raise self._lost(exc) from exc

    async def begin(self) -> None:
        try:
            await self._conn.begin()
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        self._in_tx = True

    async def commit(self) -> None:
        try:
            await self._conn.commit()
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        finally:
            self._in_tx = False

    async def rollback(self) -> None:
        try:
            await self._conn.rollback()
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        finally:
            self._in_tx = False

    def in_transaction(self) -> bool:
        return self._in_tx

    async def close(self) -> None:
        await self._conn.ensure_closed()

    def terminate(self) -> None:
        self._conn.close()

    def _lost(self, exc: BaseException) -> DalError:
        err = map_error(exc, self._node)
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if isinstance(err, ConnectionUnavailableError | QueryTimeoutError) or self._conn.closed or code in _FATAL:
            self.broken = True
        return err


async def connect(spec: NodeSpec) -> MySQLConnection:
    url = spec.dsn.url
    query = dict(url.query)
    try:
        conn = await aiomysql.connect(
            host=url.host or "localhost",
            port=url.port or 3306,
            user=url.username or "root",
            password=url.password or "",
            db=url.database,
            charset=str(query.get("charset", "utf8mb4")),
            autocommit=True,
            connect_timeout=spec.pool.connect_timeout,
            client_flag=CLIENT.FOUND_ROWS,
        )
        init = ["SET SESSION sql_mode = CONCAT_WS(',', @@SESSION.sql_mode, 'STRICT_ALL_TABLES')"]
        if spec.pool.query_timeout is not None:
            if "mariadb" in conn.get_server_info().lower():
                init.append(f"SET SESSION max_statement_time = {float(spec.pool.query_timeout)!r}")
            else:
                init.append(f"SET SESSION max_execution_time = {int(spec.pool.query_timeout * 1000)}")
        cursor = await conn.cursor(_Cursor)
        for stmt in init:
            await cursor.execute(stmt)
    except _ERRORS as exc:
        err = map_error(exc, spec.name)
        if not isinstance(err, ConnectionUnavailableError):
            err = ConnectionUnavailableError(f"{spec.name}: cannot connect: {exc}")
        raise err from exc
    return MySQLConnection(conn, cursor, spec.name)
