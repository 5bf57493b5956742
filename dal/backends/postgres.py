"""PostgreSQL through asyncpg.

asyncpg prepares every statement it runs and keeps it in a per-connection LRU
(``statement_cache_size``), so a repeated query text costs one round trip:
Bind/Execute of the cached statement. Connections stay in autocommit; a
transaction is an explicit ``BEGIN`` ... ``COMMIT``.

``BEGIN`` is sent with the transaction's first statement rather than on its
own: in front of it when that statement is a COPY (``BEGIN;COPY ...``, one
simple query), else just before it. A batch transaction (BEGIN, COPY,
COMMIT) then costs two round trips instead of three. Nothing changes for the
server: a transaction takes its snapshot at its first statement either way,
and one that ends before any statement did nothing. Only dal's own COPY
statement, built from quoted identifiers, gets BEGIN in front: the server
parses a query string whole, so a statement it could not parse would take
BEGIN down with it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Sequence
from typing import Any

import asyncpg
import asyncpg.exceptions as pgx

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

# InternalClientError: asyncpg's state machine after the server's FATAL arrived on an
# idle connection ("cannot switch to state ..."): the connection is gone.
# UnicodeEncodeError: a str value UTF-8 cannot encode (a lone surrogate), raised bare
# by asyncpg's binary COPY encoder.
_ERRORS = (pgx.PostgresError, asyncpg.InterfaceError, pgx._base.InternalClientError, OSError, UnicodeEncodeError)

# A COPY with BEGIN in front goes through asyncpg's protocol object, whose copy_in()
# takes the statement's text (the public copy methods build it themselves). That is
# asyncpg's internal API, the same from 0.29 to 0.32 (what dal is tested with); on
# other versions BEGIN goes on its own, through the public API.
_FOLD_COPY = tuple(int(p) for p in asyncpg.__version__.split(".")[:2] if p.isdigit()) <= (0, 32)


def map_error(exc: BaseException, node: str) -> DalError:
    """The dal error for an asyncpg/OS exception raised while talking to ``node``."""
    msg = f"{node}: {exc}"
    if isinstance(exc, pgx.UniqueViolationError):
        return DuplicateKeyError(msg)
    if isinstance(exc, pgx.ForeignKeyViolationError):
        return ForeignKeyError(msg)
    if isinstance(exc, pgx.NotNullViolationError):
        return NotNullError(msg)
    if isinstance(exc, pgx.IntegrityConstraintViolationError):
        return IntegrityError(msg)
    if isinstance(exc, pgx.QueryCanceledError):
        return QueryTimeoutError(msg)
    if isinstance(exc, pgx.ReadOnlySQLTransactionError):
        return ReadOnlyError(msg)
    if isinstance(exc, pgx.UndefinedTableError | pgx.UndefinedColumnError):
        return SchemaMismatchError(msg)
    if isinstance(exc, pgx.DataError | pgx._base.DataError | UnicodeEncodeError):  # server class 22 / client-side encode
        return DataError(msg)
    if isinstance(
        exc,
        pgx.PostgresConnectionError
        | pgx.CannotConnectNowError
        | pgx.AdminShutdownError
        | pgx.CrashShutdownError
        | pgx.ConnectionDoesNotExistError
        | asyncpg.InterfaceError
        | pgx._base.InternalClientError
        | OSError
        | EOFError,
    ):
        return ConnectionUnavailableError(msg)
    if isinstance(exc, TimeoutError):
        return QueryTimeoutError(msg)
    if isinstance(exc, pgx.PostgresError):
        return QueryError(msg)
    return ConnectionUnavailableError(msg)


def _rowcount(status: str) -> int:
    # "UPDATE 3", "DELETE 0", "INSERT 0 1"
    tail = status.rpartition(" ")[2]
    return int(tail) if tail.isdigit() else 0


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresConnection:
    __slots__ = ("_begin", "_conn", "_node", "_open", "broken", "created_at", "last_used", "server_version")

    def __init__(self, conn: asyncpg.Connection, node: str) -> None:
        self._conn = conn
        self._node = node
        self._begin = False  # begin() was called and BEGIN is not sent yet
        # begin() was called and neither commit() nor rollback() since: asyncpg learns
        # the server's transaction state from its replies, and a COPY that failed on
        # this side may have none read yet when the connection goes back to the pool.
        self._open = False
        self.server_version: int = conn.get_server_version().major
        self.broken = False
        self.created_at = 0.0
        self.last_used = 0.0

    async def fetch_one(self, sql: str, params: Sequence[Any]) -> Row | None:
        try:
            if self._begin:
                await self._send_begin()
            return await self._conn.fetchrow(sql, *params)  # type: ignore[no-any-return]
        except _ERRORS as exc:
            raise self._lost(exc) from exc

    async def fetch_all(self, sql: str, params: Sequence[Any]) -> list[Row]:
        try:
            if self._begin:
                await self._send_begin()
            return await self._conn.fetch(sql, *params)  # type: ignore[no-any-return]
        except _ERRORS as exc:
            raise self._lost(exc) from exc

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        try:
            if self._begin:
                await self._send_begin()
            return _rowcount(await self._conn.execute(sql, *params))
        except _ERRORS as exc:
            raise self._lost(exc) from exc

    async def execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> int:
        # Pipelined by asyncpg, which reports no row counts: -1.
        try:
            if self._begin:
                await self._send_begin()
            await self._conn.executemany(sql, params)
            return -1
        except _ERRORS as exc:
            raise self._lost(exc) from exc

    async def copy_records(self, table: str, columns: Sequence[str], records: Sequence[Sequence[Any]]) -> None:
        """COPY ``records`` into ``table`` (binary protocol)."""
        try:
            await self._copy(table, columns, "binary", records=records)
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except (TypeError, ValueError, OverflowError) as exc:
            # A value asyncpg's binary encoder rejects (an aware datetime for a naive
            # timestamp column, ...): asyncpg has sent CopyFail, the connection is fine.
            raise DataError(f"{self._node}: {type(exc).__name__}: {exc}") from exc

    async def copy_text(self, table: str, columns: Sequence[str], source: AsyncIterable[memoryview]) -> None:
        """COPY text-format data (see :mod:`dal.backends.copytext`) into ``table``."""
        try:
            await self._copy(table, columns, "text", source=source)
        except _ERRORS as exc:
            raise self._lost(exc) from exc

    async def _copy(
        self,
        table: str,
        columns: Sequence[str],
        fmt: str,
        *,
        records: Sequence[Sequence[Any]] | None = None,
        source: AsyncIterable[memoryview] | None = None,
    ) -> None:
        """COPY ``records`` (binary) or ``source`` (text) into ``table``. In a
        transaction whose BEGIN is not sent yet: ``BEGIN;COPY ... FROM STDIN`` as one
        simple query, its data right behind it, one round trip. That is what asyncpg's
        copy_records_to_table / copy_to_table do, with BEGIN in front (asyncpg's COPY
        state skips the server's answer to BEGIN)."""
        conn = self._conn
        if not (self._begin and _FOLD_COPY):
            if self._begin:
                await self._send_begin()
            if records is not None:
                await conn.copy_records_to_table(table, records=records, columns=list(columns))
            else:
                await conn.copy_to_table(table, source=source, columns=list(columns), format=fmt)
            return
        tab = _quote(table)
        cols = ", ".join(map(_quote, columns))
        state = None
        if records is not None:  # the columns' binary codecs, from a cached statement as asyncpg gets them
            state = (await conn._prepare(f"SELECT {cols} FROM {tab} LIMIT 1", use_cache=True))._state
        self._begin = False
        await conn._protocol.copy_in(f"BEGIN;COPY {tab} ({cols}) FROM STDIN (FORMAT {fmt})", source, None, records, state, None)

    async def _send_begin(self) -> None:
        self._begin = False
        await self._conn.execute("BEGIN")

    async def begin(self) -> None:
        """Start a transaction: BEGIN goes with its first statement (module docstring)."""
        if self._open or self._conn.is_in_transaction():
            raise QueryError(f"{self._node}: a transaction is already open on this connection")
        self._begin = self._open = True

    async def commit(self) -> None:
        await self._end("COMMIT")

    async def rollback(self) -> None:
        await self._end("ROLLBACK")

    async def _end(self, sql: str) -> None:
        if self._begin:  # nothing was sent in it
            self._begin = self._open = False
            return
        try:
            await self.execute(sql, ())
        finally:
            # Ended (or, when the connection failed, it is broken and will not be reused).
            self._open = False

    def in_transaction(self) -> bool:
        return self._open or bool(self._conn.is_in_transaction())

    async def close(self) -> None:
        await self._conn.close(timeout=5)

    def terminate(self) -> None:
        self._conn.terminate()

    def _lost(self, exc: BaseException) -> DalError:
        err = map_error(exc, self._node)
        if isinstance(err, ConnectionUnavailableError | QueryTimeoutError) or self._conn.is_closed():
            self.broken = True
        return err


def _jsonb_encode(text: str) -> bytes:
    return b"\x01" + text.encode()


def _jsonb_decode(data: bytes) -> Any:
    if data[:1] != b"\x01":
        raise ValueError(f"unknown jsonb binary format version {data[:1]!r}")
    return json.loads(data[1:])


async def connect(spec: NodeSpec) -> PostgresConnection:
    url = spec.dsn.url
    query = dict(url.query)
    ssl: Any = query.pop("ssl", None) or query.pop("sslmode", None)
    try:
        conn = await asyncpg.connect(
            host=url.host or None,
            port=url.port or None,
            user=url.username or None,
            password=url.password or None,
            database=url.database or None,
            timeout=spec.pool.connect_timeout,
            statement_cache_size=spec.pool.statement_cache_size,
            command_timeout=spec.pool.query_timeout,
            ssl=ssl,
            server_settings={str(k): str(v) for k, v in query.items()} or None,
        )
    except (*_ERRORS, TimeoutError) as exc:
        err = map_error(exc, spec.name)
        if not isinstance(err, ConnectionUnavailableError):
            err = ConnectionUnavailableError(f"{spec.name}: cannot connect: {exc}")
        raise err from exc
    # json/jsonb arrive as text by default; SQLAlchemy's JSON type expects the
    # driver to decode them (its bind side already encodes to text). Binary codecs,
    # because binary COPY has no other: json's binary form is its text, jsonb's is
    # a version byte (1) and the text.
    await conn.set_type_codec(
        "json", encoder=str.encode, decoder=json.loads, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "jsonb", encoder=_jsonb_encode, decoder=_jsonb_decode, schema="pg_catalog", format="binary"
    )
    return PostgresConnection(conn, spec.name)
