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

Client-side escaping is safe only in a known session state, so :func:`connect`
forces it and reads it back, whatever the server's defaults: character set
``utf8mb4`` for client, connection and results (a multi-byte charset such as
gbk has characters whose second byte is a backslash, which would swallow
PyMySQL's escaping backslash), and the server's ``sql_mode`` without
``NO_BACKSLASH_ESCAPES`` (PyMySQL escapes bytes values with backslashes in any
mode) plus ``STRICT_ALL_TABLES``. A session that does not read back so is
refused with :class:`~dal.errors.ConnectionUnavailableError`. The DSN takes no
query argument that could change this (:class:`~dal.config.DSN`: only
``charset=utf8mb4`` and ``password``, which goes to aiomysql as the password).

Errors: server errors (codes outside the client range 2000-2999) are a
:class:`~dal.errors.QueryError` subclass; a CHECK constraint violation (MariaDB
4025, MySQL 3819) an :class:`~dal.errors.IntegrityError`; a statement larger
than the server's ``max_allowed_packet`` (read at connect) a
:class:`~dal.errors.DataError` raised before it is sent (the server would reject
it by closing the connection, and its answer can be lost in a reset while the
statement is still being written; if the limit shrank since, the server's
refusal is mapped to the same error and the connection discarded); a str value the connection cannot encode (a lone surrogate) a
:class:`~dal.errors.DataError`, raised before anything is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiomysql
import pymysql
from pymysql.constants import CLIENT, SERVER_STATUS

from dal.config import NodeSpec
from dal.dsn import MYSQL_CHARSET
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

_DUPLICATE = {1062, 1586}
_FOREIGN_KEY = {1216, 1217, 1451, 1452}
_NOT_NULL = {1048, 1364}
_CHECK = {3819, 4025}  # ER_CHECK_CONSTRAINT_VIOLATED (MySQL), ER_CONSTRAINT_FAILED (MariaDB)
_DATA = {1264, 1265, 1292, 1366, 1406, 1690}
# Errors after which the server closes the connection although the client does not know yet.
_FATAL = {1153}  # ER_NET_PACKET_TOO_LARGE: a value bigger than max_allowed_packet
_SCHEMA = {1054, 1146}
_READ_ONLY = {1290, 1792, 1836}
_TIMEOUT = {1205, 1317, 1969, 3024}
_CONNECTION = {1040, 1053, 1927, 2002, 2003, 2006, 2013, 2055, 4031}
# What aiomysql raises when the server answers a statement sent in several packets
# (over 16 MiB) after its first one: only an error does that, and the one error
# there is ER_NET_PACKET_TOO_LARGE (the statement is not run; the server closes
# the connection, and aiomysql closes its side).
_EARLY_ANSWER = "Packet sequence number wrong - got 1 expected"

# UnicodeEncodeError: a str value the connection's encoding cannot take (a lone
# surrogate outside U+DC80..U+DCFF), raised by aiomysql before anything is sent.
_ERRORS = (pymysql.err.MySQLError, OSError, asyncio.IncompleteReadError, RuntimeError, UnicodeEncodeError)


def map_error(exc: BaseException, node: str) -> DalError:
    """The dal error for a PyMySQL/aiomysql/OS exception raised while talking to ``node``."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    msg = f"{node}: {exc}"
    if isinstance(exc, UnicodeEncodeError):
        return DataError(f"{node}: a str value cannot be encoded as {MYSQL_CHARSET}: {exc}")
    if code in _FATAL or (isinstance(exc, pymysql.err.InternalError) and str(exc).startswith(_EARLY_ANSWER)):
        return DataError(
            f"{node}: the statement is larger than the server's max_allowed_packet; the server "
            f"rejected it without running it and closed the connection ({exc})"
        )
    if code in _CHECK:
        return IntegrityError(msg)
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
        return QueryTimeoutError(msg, node=node)
    if code in _CONNECTION:
        return ConnectionUnavailableError(msg)
    if isinstance(exc, pymysql.err.IntegrityError):
        return IntegrityError(msg)
    if isinstance(exc, pymysql.err.DataError):
        return DataError(msg)
    if isinstance(exc, pymysql.err.ProgrammingError | pymysql.err.NotSupportedError):
        return QueryError(msg)
    if isinstance(exc, pymysql.err.OperationalError | pymysql.err.InternalError) and code is not None and not 2000 <= code < 3000:
        # A server error (the client's own are 2000-2999): PyMySQL raises the codes it
        # does not know as OperationalError, MariaDB's 4000s among them.
        return QueryError(msg)
    return ConnectionUnavailableError(msg)


class _Cursor(aiomysql.Cursor):  # type: ignore[misc]
    """aiomysql's cursor without the extra SHOW WARNINGS round trip after a note.

    aiomysql turns server notes (``DROP TABLE IF EXISTS`` of a missing table,
    ...) into Python warnings at the cost of one more round trip; under
    ``STRICT_ALL_TABLES`` anything that would change data is an error instead.
    """

    sent = 0  # statements this cursor sent (executemany's rewritten INSERTs one each)

    async def _show_warnings(self, conn: Any) -> None:
        return None

    async def execute(self, query: str, args: Any = None) -> int:
        self.sent += 1
        return int(await super().execute(query, args))


class MySQLConnection:
    """One aiomysql connection.

    ``query_timeout`` is enforced twice: by the server (``max_statement_time``
    on MariaDB, ``max_execution_time`` for SELECTs on MySQL), which aborts the
    statement cleanly (nothing of it lands), and on this side, a little later
    (``_deadline``), for what the server does not bound (a hung server, a COMMIT,
    MySQL's writes). A statement interrupted on this side (timeout, or the caller
    cancelled) has an unknown protocol state and may still run on the server:
    before the interruption propagates, its session is ended with ``KILL
    CONNECTION`` from a connection of its own and waited for until it is gone
    from the process list (:func:`~dal.backends.base.settle`). ``KILL QUERY``
    would not do: a statement the server has not read yet when it arrives
    would still run.
    """

    __slots__ = ("_conn", "_cur", "_deadline", "_in_tx", "_max_statement", "_node", "_spec", "_tx_sent", "broken", "created_at",
                 "last_used", "unsettled")

    def __init__(
        self,
        conn: aiomysql.Connection,
        cursor: aiomysql.Cursor,
        spec: NodeSpec,
        *,
        server_timeout: bool,
        max_packet: int = 1 << 30,
    ) -> None:
        self._conn = conn
        # The server's max_allowed_packet, less room for the packet header: a statement
        # bigger than that is refused before it is sent (the server would answer it by
        # closing the connection, and the answer can be lost in a reset while the rest
        # of the statement is still being written).
        self._max_statement = max_packet - 64
        self._cur = cursor
        self._spec = spec
        self._node = spec.name
        qt = spec.pool.query_timeout
        # The server's own timeout first, where it has one: it leaves the connection usable.
        self._deadline: float | None = None if qt is None else qt + 1.0 if server_timeout else qt
        self.unsettled: asyncio.Future[bool] | None = None
        self._in_tx = False
        self._tx_sent = 0  # BEGIN, COMMIT and ROLLBACK sent (the driver sends them without the cursor)
        self.broken = False
        self.created_at = 0.0
        self.last_used = 0.0

    async def fetch_one(self, sql: str, params: Sequence[Any]) -> Row | None:
        self._check_size(sql, params)
        try:
            async with asyncio.timeout(self._deadline):
                await self._cur.execute(sql, params or None)
                return await self._cur.fetchone()  # type: ignore[no-any-return]
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=False) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout, read=True)
            raise

    async def fetch_all(self, sql: str, params: Sequence[Any]) -> list[Row]:
        self._check_size(sql, params)
        try:
            async with asyncio.timeout(self._deadline):
                await self._cur.execute(sql, params or None)
                return list(await self._cur.fetchall())
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=False) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout, read=True)
            raise

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        self._check_size(sql, params)
        try:
            async with asyncio.timeout(self._deadline):
                return int(await self._cur.execute(sql, params or None))
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=True) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise

    async def execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> int:
        for row in params:
            self._check_size(sql, row)
        try:
            async with asyncio.timeout(self._deadline):
                await self._cur.executemany(sql, params)
            return max(int(self._cur.rowcount), 0)
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=True) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise

    async def begin(self) -> None:
        try:
            async with asyncio.timeout(self._deadline):
                self._tx_sent += 1
                await self._conn.begin()
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=False) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise
        self._in_tx = True

    async def commit(self) -> None:
        try:
            async with asyncio.timeout(self._deadline):
                self._tx_sent += 1
                await self._conn.commit()
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=True, commit=True) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise
        finally:
            self._in_tx = False

    async def rollback(self) -> None:
        try:
            async with asyncio.timeout(self._deadline):
                self._tx_sent += 1
                await self._conn.rollback()
        except TimeoutError as exc:
            raise await self._timed_out(exc, write=False) from exc
        except _ERRORS as exc:
            raise self._lost(exc) from exc
        except asyncio.CancelledError as exc:
            await settle(self, self._settle, exc, self._spec.pool.cancel_timeout)
            raise
        finally:
            self._in_tx = False

    def _check_size(self, sql: str, params: Sequence[Any]) -> None:
        """A :class:`~dal.errors.DataError` for a statement larger than the server takes.

        Cheap for every statement (a sum of lengths); the exact size (the statement as
        it will be sent: values escaped, UTF-8) is computed only when that sum says it
        could be too large (a character takes at most 4 bytes, escaped at most 8)."""
        rough = len(sql)
        for p in params:
            if type(p) is str or type(p) is bytes:
                rough += len(p)
        if rough * 8 < self._max_statement:
            return
        size = len(self._cur.mogrify(sql, params or None).encode("utf-8", "surrogateescape"))
        if size > self._max_statement:
            raise DataError(
                f"{self._node}: the statement is {size} bytes, larger than the server's max_allowed_packet "
                f"({self._max_statement + 64} bytes); it was not sent"
            )

    @property
    def cursor(self) -> aiomysql.Cursor:
        """The driver's cursor itself, for this adapter's own side work (no timeout, no settling)."""
        return self._cur

    @property
    def sent(self) -> int:
        return int(self._cur.sent) + self._tx_sent

    def in_transaction(self) -> bool:
        return self._in_tx

    def is_closed(self) -> bool:
        # aiomysql reads only when asked, but its stream hears the server's close (EOF) at once
        reader = getattr(self._conn, "_reader", None)
        return bool(self._conn.closed or (reader is not None and reader.at_eof()))

    async def close(self) -> None:
        await self._conn.ensure_closed()

    def terminate(self) -> None:
        self._conn.close()

    async def _timed_out(self, exc: BaseException, *, write: bool, commit: bool = False) -> QueryTimeoutError:
        """Past the client-side deadline. A write outside a transaction (or a COMMIT) may
        have landed before the kill."""
        return await timed_out(
            self, self._settle, self._spec, "its session was ended on the server",
            landed=commit or (write and not self._in_tx), read=not write,
        )  # fmt: skip

    async def _settle(self) -> bool:
        """End this connection's server session and wait until it is gone (class docstring)."""
        thread_id = self._conn.server_thread_id[0]
        self._conn.close()
        return await kill_connection(self._spec, thread_id)

    def _lost(self, exc: BaseException) -> DalError:
        err = map_error(exc, self._node)
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if isinstance(err, ConnectionUnavailableError | QueryTimeoutError) or self._conn.closed or code in _FATAL:
            self.broken = True
        return err


async def kill_connection(spec: NodeSpec, thread_id: int, *, deadline: float = 30.0) -> bool:
    """``KILL CONNECTION thread_id`` on ``spec``'s server from a connection of its own, then wait
    until the thread is gone from the process list (its statement over, its transaction rolled
    back). True once gone; False when the server could not be reached within ``deadline`` s."""

    async def attempt() -> None:
        side = await connect(spec)
        try:
            async with asyncio.timeout(spec.pool.cancel_timeout):
                try:
                    await side.cursor.execute("KILL CONNECTION %s", (thread_id,))
                except pymysql.err.MySQLError as exc:
                    if not (exc.args and exc.args[0] == 1094):  # unknown thread: gone already
                        raise
                while True:
                    await side.cursor.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s", (thread_id,))
                    row = await side.cursor.fetchone()
                    if not row or not row[0]:
                        return
                    await asyncio.sleep(0.01)
        finally:
            side.terminate()

    return await retry_until(attempt, (DalError, *_ERRORS), deadline)


_SESSION_INIT = (
    f"SET NAMES {MYSQL_CHARSET} COLLATE {MYSQL_CHARSET}_general_ci",
    "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(TRIM(BOTH ',' FROM REPLACE(CONCAT(',', @@SESSION.sql_mode, ','),"
    " ',NO_BACKSLASH_ESCAPES,', ',')), ''), 'STRICT_ALL_TABLES')",
)


def _session_problem(row: Sequence[Any] | None, conn: aiomysql.Connection) -> str | None:
    """What is wrong with the session as read back after :data:`_SESSION_INIT`, or None."""
    if row is None:
        return "the session settings could not be read back"
    modes = {m.strip().upper() for m in str(row[0] or "").split(",")}
    if "NO_BACKSLASH_ESCAPES" in modes or conn.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES:
        return f"sql_mode still has NO_BACKSLASH_ESCAPES ({row[0]})"
    if "STRICT_ALL_TABLES" not in modes:
        return f"sql_mode lacks STRICT_ALL_TABLES ({row[0]})"
    for name, value in zip(("character_set_client", "character_set_connection", "character_set_results"), row[1:4], strict=True):
        if str(value).lower() != MYSQL_CHARSET:
            return f"{name} is {value}, not {MYSQL_CHARSET}"
    if conn.charset != MYSQL_CHARSET:
        return f"the client encodes in {conn.charset}, not {MYSQL_CHARSET}"
    return None


async def connect(spec: NodeSpec) -> MySQLConnection:
    """Open a session in the state dal's client-side escaping relies on (module docstring), or refuse it."""
    url = spec.dsn.url
    try:
        conn = await aiomysql.connect(
            host=url.host or "localhost",
            port=url.port or 3306,
            user=url.username or "root",
            password=spec.dsn.password or "",
            db=url.database,
            charset=MYSQL_CHARSET,  # the DSN refuses any other
            autocommit=True,
            connect_timeout=spec.pool.connect_timeout,
            client_flag=CLIENT.FOUND_ROWS,
        )
        try:
            init = list(_SESSION_INIT)
            if spec.pool.query_timeout is not None:
                if "mariadb" in conn.get_server_info().lower():
                    init.append(f"SET SESSION max_statement_time = {float(spec.pool.query_timeout)!r}")
                else:
                    init.append(f"SET SESSION max_execution_time = {int(spec.pool.query_timeout * 1000)}")
            cursor = await conn.cursor(_Cursor)
            for stmt in init:
                await cursor.execute(stmt)
            await cursor.execute(
                "SELECT @@SESSION.sql_mode, @@SESSION.character_set_client, "
                "@@SESSION.character_set_connection, @@SESSION.character_set_results, "
                "@@SESSION.max_allowed_packet"
            )
            row = await cursor.fetchone()
            problem = _session_problem(row, conn)
        except BaseException:
            conn.close()
            raise
        if problem is not None:
            conn.close()
            raise ConnectionUnavailableError(
                f"{spec.name}: refusing the connection: {problem}; dal escapes values client-side, "
                "which is safe only with backslash escapes on and utf8mb4 (check the server's or a proxy's "
                "init_connect, sql_mode and character set settings)"
            )
    except _ERRORS as exc:
        err = map_error(exc, spec.name)
        if not isinstance(err, ConnectionUnavailableError):
            err = ConnectionUnavailableError(f"{spec.name}: cannot connect: {exc}")
        raise err from exc
    assert row is not None
    return MySQLConnection(
        conn, cursor, spec, server_timeout="mariadb" in conn.get_server_info().lower(), max_packet=int(row[4])
    )
