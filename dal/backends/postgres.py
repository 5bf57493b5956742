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

DSN query arguments (checked when the :class:`~dal.config.DSN` is built, a
problem is a :class:`~dal.errors.ConfigError`) go to asyncpg as what they are:

- ``password`` (or the userinfo's, not both) as the password; ``passfile`` as
  the password file; ``target_session_attrs`` as is;
- ``sslmode`` (or its alias ``ssl``), ``sslrootcert``, ``sslcert``, ``sslkey``,
  ``sslpassword``, ``sslcrl``, ``ssl_min_protocol_version``,
  ``ssl_max_protocol_version``, ``sslnegotiation``, ``krbsrvname``, ``gsslib``
  through asyncpg's libpq-compatible handling (it builds the SSLContext);
- any other argument whose name is a plain server setting name
  (``application_name``, ``options``, ``search_path``, ``custom.name``) as a
  server setting in the startup packet;
- refused: libpq parameters dal does not implement (``connect_timeout``,
  ``client_encoding``, ``service``, ``keepalives``, ``channel_binding``, ...;
  dal's own settings cover the timeouts), repeated arguments, names that are no
  setting names, and unknown names that look secret (containing "password",
  "secret" or "token"), so a secret never reaches the server as a setting.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import asyncpg
import asyncpg.exceptions as pgx
from asyncpg.exceptions._base import (
    DataError as ClientDataError,  # (asyncpg exports only the server one)
)

from dal.config import NodeSpec
from dal.dsn import PG_CONNECT_ARGUMENTS
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

from .base import Row, retry_until, settle, timed_out

# InternalClientError: asyncpg's state machine after the server's FATAL arrived on an
# idle connection ("cannot switch to state ..."): the connection is gone.
# UnicodeEncodeError: a str value UTF-8 cannot encode (a lone surrogate), raised bare
# by asyncpg's binary COPY encoder.
_ERRORS = (pgx.PostgresError, asyncpg.InterfaceError, pgx.InternalClientError, OSError, UnicodeEncodeError)

# A COPY with BEGIN in front goes through asyncpg's protocol object, whose copy_in()
# takes the statement's text (the public copy methods build it themselves). That is
# asyncpg's internal API, the same from 0.29 to 0.32 (what dal is tested with); on
# other versions BEGIN goes on its own, through the public API.
log = logging.getLogger("dal.postgres")

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
        return QueryTimeoutError(msg, node=node)
    if isinstance(exc, pgx.ReadOnlySQLTransactionError):
        return ReadOnlyError(msg)
    if isinstance(exc, pgx.UndefinedTableError | pgx.UndefinedColumnError):
        return SchemaMismatchError(msg)
    if isinstance(exc, pgx.DataError | ClientDataError | UnicodeEncodeError):  # server class 22 / client-side encode
        return DataError(msg)
    if isinstance(exc, TimeoutError):
        # Before OSError, of which the builtin TimeoutError (asyncpg's command_timeout) is a subclass.
        return QueryTimeoutError(f"{node}: the statement did not finish in time ({type(exc).__name__}: {exc})", node=node)
    if isinstance(
        exc,
        pgx.PostgresConnectionError
        | pgx.CannotConnectNowError
        | pgx.AdminShutdownError
        | pgx.CrashShutdownError
        | pgx.ConnectionDoesNotExistError
        | asyncpg.InterfaceError
        | pgx.InternalClientError
        | OSError
        | EOFError,
    ):
        return ConnectionUnavailableError(msg)
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
    """One asyncpg connection.

    A statement interrupted on this side (the caller cancelled, or asyncpg's
    ``command_timeout``, which is ``query_timeout``, passed) has asyncpg send the
    server a cancel request; before the interruption propagates, the
    connection waits for the server to answer the cancelled statement
    (:func:`~dal.backends.base.settle`), or ends the backend with
    ``pg_terminate_backend`` from a connection of its own and waits until it is
    gone from ``pg_stat_activity``.
    """

    __slots__ = (
        "_begin", "_conn", "_node", "_open", "_sent", "_spec", "broken", "created_at", "last_used", "server_version",
        "unsettled",
    )

    def __init__(self, conn: asyncpg.Connection, spec: NodeSpec) -> None:
        self._conn = conn
        self._spec = spec
        self._node = spec.name
        self.unsettled: asyncio.Future[bool] | None = None
        self._begin = False  # begin() was called and BEGIN is not sent yet
        # begin() was called and neither commit() nor rollback() since: asyncpg learns
        # the server's transaction state from its replies, and a COPY that failed on
        # this side may have none read yet when the connection goes back to the pool.
        self._open = False
        self.server_version: int = conn.get_server_version().major
        self.broken = False
        self.created_at = 0.0
        self.last_used = 0.0
        self._sent = 0

    async def fetch_one(self, sql: str, params: Sequence[Any]) -> Row | None:
        try:
            if self._begin:
                await self._send_begin()
            self._sent += 1
            return await self._conn.fetchrow(sql, *params)  # type: ignore[no-any-return]
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=False) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout, read=True)
            raise

    async def fetch_all(self, sql: str, params: Sequence[Any]) -> list[Row]:
        try:
            if self._begin:
                await self._send_begin()
            self._sent += 1
            return await self._conn.fetch(sql, *params)  # type: ignore[no-any-return]
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=False) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout, read=True)
            raise

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        try:
            if self._begin:
                await self._send_begin()
            self._sent += 1
            return _rowcount(await self._conn.execute(sql, *params))
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=True) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise

    async def execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> int:
        # Pipelined by asyncpg, which reports no row counts: -1.
        try:
            if self._begin:
                await self._send_begin()
            self._sent += len(params)
            await self._conn.executemany(sql, params)
            return -1
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=True) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise

    async def copy_records(self, table: str, columns: Sequence[str], records: Sequence[Sequence[Any]]) -> None:
        """COPY ``records`` into ``table`` (binary protocol)."""
        try:
            await self._copy(table, columns, "binary", records=records)
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=True) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            # A value asyncpg's binary encoder rejects (an aware datetime for a naive
            # timestamp column, ...): asyncpg has sent CopyFail, the connection is fine.
            raise DataError(f"{self._node}: {type(exc).__name__}: {exc}") from exc

    async def copy_text(self, table: str, columns: Sequence[str], source: AsyncIterable[memoryview]) -> None:
        """COPY text-format data (see :mod:`dal.backends.copytext`) into ``table``."""
        try:
            await self._copy(table, columns, "text", source=source)
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=True) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise

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
            self._sent += 1
            if records is not None:
                await conn.copy_records_to_table(table, records=records, columns=list(columns))
            else:
                await conn.copy_to_table(table, source=source, columns=list(columns), format=fmt)
            return
        tab = _quote(table)
        cols = ", ".join(map(_quote, columns))
        state = None
        if records is not None:  # the columns' binary codecs, from a cached statement as asyncpg gets them
            # asyncpg has no public API for either step: its prepared-statement state and
            # its protocol's copy_in are what copy_records_to_table uses inside.
            prepared = await conn._prepare(f"SELECT {cols} FROM {tab} LIMIT 1", use_cache=True)  # noqa: SLF001
            state = prepared._state  # noqa: SLF001
        self._begin = False
        self._sent += 2
        protocol = conn._protocol  # noqa: SLF001  (see above)
        await protocol.copy_in(f"BEGIN;COPY {tab} ({cols}) FROM STDIN (FORMAT {fmt})", source, None, records, state, None)

    async def _send_begin(self) -> None:
        self._begin = False
        self._sent += 1
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
        except QueryTimeoutError as exc:
            exc.may_have_landed = sql == "COMMIT"  # cancelled while committing: maybe committed
            raise
        finally:
            # Ended (or, when the connection failed, it is broken and will not be reused).
            self._open = False

    @property
    def sent(self) -> int:
        return self._sent + int(self._conn.dal_sent)

    @property
    def driver(self) -> asyncpg.Connection:
        """The asyncpg connection itself, for this adapter's own side work (no settling)."""
        return self._conn

    def in_transaction(self) -> bool:
        return self._open or bool(self._conn.is_in_transaction())

    def is_closed(self) -> bool:
        return bool(self._conn.is_closed())

    async def close(self) -> None:
        await self._conn.close(timeout=5)

    def terminate(self) -> None:
        self._conn.terminate()

    async def _timed_out(self, exc: BaseException, *, write: bool) -> QueryTimeoutError:
        """asyncpg's ``command_timeout`` passed and it asked the server to cancel. A write
        outside a transaction may have committed before the cancel arrived."""
        return await timed_out(
            self, self._settle, self._spec, "was cancelled on the server", landed=write and not self._open, read=not write
        )

    async def _settle(self) -> bool:
        """The interrupted statement is over on the server (True), or its backend ended (False:
        given up). asyncpg runs a statement only once the server answered the cancelled one,
        so a ``SELECT 1`` that gets any answer proves it over."""
        timeout = self._spec.pool.cancel_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._conn.fetchval("SELECT 1")
            return True
        except pgx.PostgresError:
            return True  # an answer (the aborted transaction's, a late cancel's): over
        except Exception as exc:  # no answer in time, or the connection is gone
            log.warning("%s: no answer to a cancelled statement (%r): ending its backend", self._node, exc)
        pid = self._conn.get_server_pid()
        self._conn.terminate()
        return await terminate_backend(self._spec, pid)

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


async def terminate_backend(spec: NodeSpec, pid: int, *, deadline: float = 30.0) -> bool:
    """End backend ``pid`` of ``spec``'s server from a connection of its own and wait until it is
    gone (its transaction rolled back, its statement over). True once gone; False when the
    server could not be reached within ``deadline`` seconds."""

    async def attempt() -> None:
        side = await connect(spec)
        try:
            async with asyncio.timeout(spec.pool.cancel_timeout):
                await side.driver.execute("SELECT pg_terminate_backend($1)", pid)
                while await side.driver.fetchval(  # noqa: ASYNC110 - polling another server's state
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
                ):
                    await asyncio.sleep(0.01)
        finally:
            side.terminate()

    return await retry_until(attempt, (DalError, *_ERRORS), deadline)


class _Driver(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, counting the statements asyncpg sends of its own accord.

    The first time a statement of this connection uses a type asyncpg has no codec
    for yet (a native enum, a domain...), asyncpg looks the type up with statements
    on the same connection, inside the caller's call; they count in
    ``PostgresConnection.sent`` with that call. ``dal_jit``: whether JIT is on for
    this session (asyncpg turns it off around the lookup and back on after).
    """

    __slots__ = ("dal_jit", "dal_sent")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dal_sent = 0
        self.dal_jit = True

    async def _introspect_types(self, typeoids: Any, timeout: Any) -> Any:
        # the lookup, and when the server has JIT: "JIT off" first, "JIT back on" after if it was on
        self.dal_sent += 1 + ((1 + self.dal_jit) if self._server_caps.jit else 0)
        return await super()._introspect_types(typeoids, timeout)


def connector(spec: NodeSpec) -> Callable[[], Awaitable[PostgresConnection]]:
    """Open pool connections to ``spec``. The first asks the server whether JIT is on for
    its sessions (see :class:`_Driver`); the others take its answer (same DSN, same
    settings) instead of a round trip of their own."""
    jit: list[bool] = []

    async def connect_one() -> PostgresConnection:
        return await connect(spec, jit=jit)

    return connect_one


async def connect(spec: NodeSpec, *, jit: list[bool] | None = None) -> PostgresConnection:
    """Connect to ``spec``'s server; the DSN's query arguments are sorted as the module docstring
    says. ``jit``: where the session's JIT setting is kept once known (a side connection,
    which runs only dal's own fixed statements, passes none)."""
    url = spec.dsn.url
    query = {str(k): str(v) for k, v in url.query.items()}  # single values: the DSN refuses repeated ones
    options = {k: query.pop(k) for k in list(query) if k in PG_CONNECT_ARGUMENTS}
    options.pop("password", None)  # spec.dsn.password below
    passfile = options.pop("passfile", None)
    target_session_attrs = options.pop("target_session_attrs", None)
    ssl: Any = options.pop("ssl", None)
    # The TLS options (and krbsrvname, gsslib) go through asyncpg's own DSN parsing,
    # which builds the SSLContext (sslrootcert, sslcert, sslkey with sslpassword, ...)
    # as libpq would; every name passed here is one it consumes, so none becomes a
    # server setting.
    dsn = f"postgresql://?{urlencode(options)}" if options else None
    try:
        conn = await asyncpg.connect(
            dsn,
            host=url.host or None,
            port=url.port or None,
            user=url.username or None,
            password=spec.dsn.password or None,
            passfile=passfile,
            database=url.database or None,
            timeout=spec.pool.connect_timeout,
            statement_cache_size=spec.pool.statement_cache_size,
            command_timeout=spec.pool.query_timeout,
            ssl=ssl,
            target_session_attrs=target_session_attrs,
            server_settings=query or None,  # only plain setting names remain (DSN)
            connection_class=_Driver,
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
    if jit is not None:
        if not jit:
            jit.append(await conn.fetchval("SELECT current_setting('jit', true)") not in (None, "off"))
        conn.dal_jit = jit[0]
    conn.dal_sent = 0  # (the statements above are the connection's setup, not work)
    return PostgresConnection(conn, spec)
