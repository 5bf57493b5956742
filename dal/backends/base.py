"""The protocol every driver adapter implements, and the connection pool they share.

An adapter wraps one driver connection and exposes five operations: fetch one,
fetch all, execute, execute many, and begin/commit/rollback. It maps the
driver's exceptions into dal's error tree at this boundary (``raise ... from``)
and makes no routing decision: it runs what it is given on the connection it
holds.

:class:`Pool` is one pool implementation for all drivers, so every backend
honours the same settings (min/max size, acquire timeout, max lifetime, max
idle time). It hands out idle connections LIFO (the warm ones stay warm, the
surplus ages out), never runs a query on release (a connection is rolled back
only when it is returned inside a transaction), and discards a connection
whose last operation lost it.

A statement interrupted on the client side (the caller was cancelled, or its
``query_timeout`` passed) is not over on the server: it may still be waiting
for a lock, and commit when it gets it. Every adapter therefore *settles* an
interrupted statement before the interruption propagates (:func:`settle`):
it cancels the statement on the server and waits, up to ``cancel_timeout``,
for the server to confirm that it is over; failing that, it ends the server
session from a connection of its own (``pg_terminate_backend``, ``KILL
CONNECTION``) and waits for it to be gone. A settle that takes longer goes on
in the background: the exception then carries it as ``dal_unsettled`` (see
:func:`unsettled`), so that whoever invalidates cache keys of a write in doubt
does so once more when it is over. An interrupted connection is never reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from dal.config import NodeSpec, PoolSettings
from dal.errors import (
    CommitUnknownError,
    ConnectionUnavailableError,
    DalError,
    PoolTimeoutError,
    QueryTimeoutError,
)

log = logging.getLogger("dal.pool")

Row = Sequence[Any]


class Connection(Protocol):
    """One open driver connection, already mapped to dal's errors."""

    created_at: float
    last_used: float
    broken: bool
    unsettled: asyncio.Future[bool] | None
    """The settling of an interrupted statement while it is under way (module docstring)."""

    @property
    def sent(self) -> int:
        """How many statements this connection has sent to the server, ever: a lazily sent
        BEGIN counts with the statement it went with, an ``execute_many`` as many as the
        driver sent (the execution seam reports each call's difference)."""
        ...

    async def fetch_one(self, sql: str, params: Sequence[Any]) -> Row | None: ...

    async def fetch_all(self, sql: str, params: Sequence[Any]) -> list[Row]: ...

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        """Run a statement; return the number of rows it matched."""
        ...

    async def execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> int:
        """Run a statement once per parameter set; the rows matched in total, or -1 if the driver does not say."""
        ...

    async def begin(self) -> None: ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...

    def in_transaction(self) -> bool: ...

    def is_closed(self) -> bool:
        """Whether the driver already knows the connection is gone (no round trip)."""
        ...

    async def close(self) -> None: ...

    def terminate(self) -> None:
        """Close at once without a round trip (used when the connection is suspect)."""
        ...


Connector = Callable[[], Awaitable[Connection]]


async def settle(
    conn: Connection, work: Callable[[], Awaitable[bool]], exc: BaseException, timeout: float, *, read: bool = False
) -> None:
    """Run ``work`` (make an interrupted statement end on the server; True once the
    server confirmed it) before ``exc`` propagates: shielded from the caller's
    cancellation, waited for up to ``timeout``. Past that, or when the caller is
    cancelled again, it goes on as ``conn.unsettled`` and ``exc.dal_unsettled``.
    A ``read`` cannot land, so its caller does not wait: the settling runs in the
    background (the server stops the statement all the same; the pool closes the
    connection once it is over). ``conn`` is flagged broken: its protocol state
    is not to be trusted again."""
    conn.broken = True
    if conn.unsettled is not None:  # already settling (an interrupted COMMIT's ROLLBACK, ...)
        return
    task = asyncio.ensure_future(work())
    conn.unsettled = task
    if read:
        return
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(task)
    except TimeoutError:
        pass
    except asyncio.CancelledError:
        if not task.done():
            exc.dal_unsettled = task  # type: ignore[attr-defined]
        raise
    if not task.done():
        exc.dal_unsettled = task  # type: ignore[attr-defined]
        log.warning("a statement interrupted on the client is not confirmed over on the server yet; ending it in the background")


async def timed_out(
    conn: Connection, work: Callable[[], Awaitable[bool]], spec: NodeSpec, how: str, *, landed: bool, read: bool
) -> QueryTimeoutError:
    """The error of a statement past ``query_timeout`` on the client side, raised once it is
    settled (:func:`settle`, ``read`` as there): it names the node, says ``how`` the server
    was made to stop, and whether the write may have ``landed``."""
    err = QueryTimeoutError(
        f"{spec.name}: statement timed out after {spec.pool.query_timeout}s and {how}"
        + ("; the write may have landed" if landed else ""),
        node=spec.name,
        may_have_landed=landed,
    )
    await settle(conn, work, err, spec.pool.cancel_timeout, read=read)
    return err


async def retry_until(attempt: Callable[[], Awaitable[None]], errors: tuple[type[BaseException], ...], deadline: float) -> bool:
    """Call ``attempt`` until it returns (True), retrying with backoff after ``errors``, or
    until ``deadline`` seconds have passed (False). Ending a session of a server that is
    restarting or briefly unreachable is worth a few tries."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    delay = 0.05
    while True:
        try:
            await attempt()
            return True
        except errors:
            if loop.time() > end:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def unsettled(exc: BaseException) -> asyncio.Future[bool] | None:
    """The settling still under way of the statement ``exc`` interrupted, if any."""
    fut = getattr(exc, "dal_unsettled", None)
    return fut if fut is not None and not fut.done() else None


def mark_if_lost(conn: Connection, exc: BaseException) -> None:
    """Flag ``conn`` for discard when ``exc`` says its state is unknown or gone."""
    if isinstance(exc, ConnectionUnavailableError | QueryTimeoutError | CommitUnknownError | asyncio.CancelledError) or not isinstance(exc, DalError):
        conn.broken = True


class _Expired(Exception):
    """Set on a waiter whose acquire_timeout passed."""


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class Pool:
    """A bounded pool of connections to one node.

    ``acquire()`` returns a connection or raises :class:`PoolTimeoutError` after
    ``acquire_timeout``; ``release()`` never blocks and never does I/O unless
    the connection must be rolled back or closed (then in a background task,
    shielded from the caller's cancellation).
    """

    def __init__(
        self,
        name: str,
        connect: Connector,
        settings: PoolSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._connect = connect
        self._settings = settings
        self._clock = clock
        self._idle: deque[Connection] = deque()
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._size = 0  # open connections plus those being opened
        self._closed = False
        self._background: set[asyncio.Future[Any]] = set()

    @property
    def size(self) -> int:
        return self._size

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _expired(self, conn: Connection, now: float) -> bool:
        s = self._settings
        if s.max_lifetime is not None and now - conn.created_at > s.max_lifetime:
            return True
        return s.max_idle_time is not None and now - conn.last_used > s.max_idle_time

    async def acquire(self) -> Connection:
        if self._closed:
            raise ConnectionUnavailableError(f"pool {self.name} is closed")
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.is_closed():  # the server closed it while idle (restart, idle timeout)
                conn.broken = True
                self._discard(conn)
                continue
            if self._expired(conn, self._clock()):
                self._discard(conn)
                continue
            return conn
        if self._size < self._settings.max_size:
            return await self._open()
        return await self._wait()

    async def _open(self) -> Connection:
        """Open a connection in a task of its own, which a cancelled caller does not stop:
        a driver's handshake cut off half-way leaves futures nobody reads (and wastes the
        connect); the connection goes to the pool instead."""
        self._size += 1
        opening = asyncio.ensure_future(self._open_within_timeout())
        try:
            conn = await asyncio.shield(opening)
        except asyncio.CancelledError:
            if opening.done():
                self._opened_for_nobody(opening)
            else:
                self._background.add(opening)
                opening.add_done_callback(self._opened_for_nobody)
            raise
        except BaseException:
            self._size -= 1
            self._wake_one()
            raise
        now = self._clock()
        conn.created_at = now
        conn.last_used = now
        return conn

    async def connect_detached(self) -> Connection:
        """A new connection to the node that the pool does not own or count (the caller
        closes it), within ``connect_timeout``."""
        return await self._open_within_timeout()

    async def _open_within_timeout(self) -> Connection:
        try:
            async with asyncio.timeout(self._settings.connect_timeout):
                return await self._connect()
        except TimeoutError:
            raise ConnectionUnavailableError(
                f"{self.name}: no connection within connect_timeout={self._settings.connect_timeout}s"
            ) from None

    def _opened_for_nobody(self, opening: asyncio.Future[Connection]) -> None:
        """A connection opened for a caller that was cancelled meanwhile: pooled, or its slot freed."""
        self._background.discard(opening)
        if not opening.cancelled() and opening.exception() is None:
            conn = opening.result()
            now = self._clock()
            conn.created_at = now
            conn.last_used = now
            self.release(conn)
        else:
            self._size -= 1
            self._wake_one()

    async def _wait(self) -> Connection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.acquire_timeout
        while True:
            fut: asyncio.Future[Connection | None] = loop.create_future()
            self._waiters.append(fut)
            # One timer per wait rather than asyncio.timeout(): this is the hot path
            # of a saturated pool. Done futures stay in the deque; _wake_one skips them.
            timer = loop.call_at(deadline, _expire, fut)
            try:
                got = await fut
            except BaseException as exc:
                # Handed a connection (or a free slot) just as we were cancelled:
                # pass it on rather than leak it.
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    handed = fut.result()
                    if handed is not None:
                        self.release(handed)
                    else:
                        self._wake_one()
                if isinstance(exc, _Expired):
                    raise PoolTimeoutError(
                        f"{self.name}: no free connection within acquire_timeout="
                        f"{self._settings.acquire_timeout}s (max_size={self._settings.max_size})"
                    ) from None
                raise
            finally:
                timer.cancel()
            if got is not None:
                return got
            # A slot was freed (a connection discarded): open one ourselves.
            if self._size < self._settings.max_size:
                return await self._open()

    def _wake_one(self, conn: Connection | None = None) -> bool:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def release(self, conn: Connection) -> None:
        """Return ``conn``; discard it when broken, expired or inside a transaction."""
        if conn.broken or self._closed:
            self._discard(conn)
            return
        if conn.in_transaction():
            # Someone left a transaction open (cancelled mid-way): roll it back
            # off the caller's path before anyone else may use the connection.
            self._spawn(self._rollback_then_release(conn))
            return
        now = self._clock()
        conn.last_used = now
        s = self._settings
        if s.max_lifetime is not None and now - conn.created_at > s.max_lifetime:
            self._discard(conn)
            return
        if not self._wake_one(conn):
            self._idle.append(conn)

    async def _rollback_then_release(self, conn: Connection) -> None:
        try:
            await conn.rollback()
        except BaseException:
            conn.broken = True
        self.release(conn)

    def _discard(self, conn: Connection) -> None:
        self._size -= 1
        if conn.unsettled is not None and not conn.unsettled.done():
            # Closing now would stop the settling (asyncpg drops the cancel request
            # in flight): close once it is over.
            self._spawn(self._terminate_when_settled(conn, conn.unsettled))
        elif conn.broken:
            conn.terminate()
        else:
            self._spawn(self._close_quietly(conn))
        if not self._closed:
            self._wake_one(None)

    @staticmethod
    async def _terminate_when_settled(conn: Connection, settling: asyncio.Future[bool]) -> None:
        try:
            await asyncio.wait([settling])
        except asyncio.CancelledError:
            settling.cancel()  # (the pool is closing)
            raise
        finally:
            conn.terminate()

    @staticmethod
    async def _close_quietly(conn: Connection) -> None:
        try:
            await conn.close()
        except BaseException:  # closing a dead connection: nothing to do
            conn.terminate()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def fill(self) -> None:
        """Open connections until ``min_size`` are idle (warm-up at start)."""
        while self._size < self._settings.min_size:
            conn = await self._open()
            self._idle.append(conn)

    def reap(self) -> int:
        """Close idle connections past max_idle_time/max_lifetime beyond ``min_size``."""
        now = self._clock()
        closed = 0
        keep: deque[Connection] = deque()
        # Oldest-used first: the left end of the deque.
        while self._idle:
            conn = self._idle.popleft()
            if self._size > self._settings.min_size and self._expired(conn, now):
                self._discard(conn)
                closed += 1
            else:
                keep.append(conn)
        self._idle = keep
        return closed

    async def close(self) -> None:
        """Close idle connections now; connections in use are closed when released."""
        self._closed = True
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(ConnectionUnavailableError(f"pool {self.name} is closed"))
        self._waiters.clear()
        idle, self._idle = list(self._idle), deque()
        self._size -= len(idle)
        await asyncio.gather(*(self._close_quietly(c) for c in idle))
        if self._background:
            # Settlings of interrupted statements may wait for a server that is gone
            # (each is bounded, but by tens of seconds): closing waits a bounded time.
            _, pending = await asyncio.wait(list(self._background), timeout=2 * self._settings.cancel_timeout)
            if pending:
                log.warning("%s: %d interrupted statements not confirmed over at close", self.name, len(pending))
                for task in pending:
                    task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
