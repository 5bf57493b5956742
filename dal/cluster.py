"""The cluster: one pool per node, node availability, and execution of routed work.

The router decides *where* (a :class:`~dal.routing.router.Target`); the cluster
turns a target into a :class:`Node` (the primary, or a replica chosen by the
balancer among the available ones) and runs statements on it. Availability is
an interface for health checks and breakers: :meth:`Cluster.mark_down` takes a
node out of rotation (reads fall back to other replicas, then the primary;
writes to a down primary fail fast with
:class:`~dal.errors.ConnectionUnavailableError`), :meth:`Cluster.mark_up` puts
it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from dal.backends import Connection, Pool, connector_for
from dal.backends.base import Row, mark_if_lost, unsettled
from dal.config import Backend, Config, NodeSpec
from dal.errors import (
    CommitUnknownError,
    ConnectionUnavailableError,
    DalError,
    QueryTimeoutError,
    RoutingError,
)
from dal.events import Events, NodeStateChanged, Outcome, PoolWait, QueryFinished, outcome_of
from dal.routing.balancing import Balancer, BalancerFactory, balancer_factory
from dal.routing.router import Role, Target

log = logging.getLogger("dal.cluster")

T = TypeVar("T")


Observer = Callable[["Node", str], None]
"""Called with the node and SQL text before each statement (instrumentation, demo, tests)."""


class Node:
    """One server and its pool, with the counters a balancer and tests look at."""

    __slots__ = (
        "available",
        "backend",
        "clock",
        "database",
        "down_reason",
        "events",
        "in_flight",
        "name",
        "observer",
        "pool",
        "queries",
        "role",
        "spec",
        "weight",
    )

    def __init__(
        self,
        spec: NodeSpec,
        database: str,
        pool: Pool,
        *,
        events: Events | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.database = database
        self.role = Role.PRIMARY if spec.role == "primary" else Role.REPLICA
        self.weight = spec.weight
        self.backend: Backend = spec.backend
        self.pool = pool
        self.available = True
        self.down_reason: str | None = None
        self.in_flight = 0
        self.queries = 0  # statements run outside transactions
        self.observer: Observer | None = None
        self.events = events if events is not None else Events()
        self.clock = clock

    def __repr__(self) -> str:
        state = "up" if self.available else f"down: {self.down_reason}"
        return f"<Node {self.name} {self.role.value} {self.spec.dsn.masked} ({state})>"

    def session(self, purpose: str, *, counted: bool = True) -> Session:
        """``async with node.session(purpose) as conn``: a pooled connection of this node for
        one piece of work (see :class:`Session`). ``counted``: the work is one of the
        node's ``queries`` (a statement or a batch outside a caller's transaction)."""
        return Session(self, purpose, counted)

    @contextlib.asynccontextmanager
    async def detached(self, purpose: str) -> AsyncIterator[Connection]:
        """A connection of its own, outside the pool, closed at once after ``purpose`` (the
        lookup of a COMMIT in doubt: the pool may be full of callers waiting on the same
        outage, and the answer is what frees them)."""
        conn = await self.pool.connect_detached()
        try:
            yield conn if not self.events.query else Watched(conn, self, purpose)
        finally:
            conn.terminate()

    async def fetch_one(self, sql: str, params: Sequence[Any]) -> Row | None:
        async with Session(self, "read", True) as conn:
            if self.observer is not None:
                self.observer(self, sql)
            return await conn.fetch_one(sql, params)

    async def fetch_all(self, sql: str, params: Sequence[Any], *, purpose: str = "read") -> list[Row]:
        async with Session(self, purpose, True) as conn:
            if self.observer is not None:
                self.observer(self, sql)
            return await conn.fetch_all(sql, params)

    async def execute(self, sql: str, params: Sequence[Any], *, purpose: str = "write") -> int:
        async with Session(self, purpose, True) as conn:
            if self.observer is not None:
                self.observer(self, sql)
            try:
                return await conn.execute(sql, params)
            except ConnectionUnavailableError as exc:
                # Sent outside a transaction, so it commits by itself: the write may have landed.
                mark_if_lost(conn, exc)
                raise in_doubt(self.name, "a write", exc) from exc

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A connection inside BEGIN; COMMIT on normal exit, ROLLBACK on error."""
        session = Session(self, "transaction", False)
        async with session as conn:
            await conn.begin()
            try:
                yield conn
            except BaseException:
                # The caller's block failed: its error says nothing of the connection's
                # state; the ROLLBACK does (a failed one flags the connection).
                session.judged = True
                if not conn.broken:
                    try:
                        # Shielded so a cancelled caller does not cut the rollback short.
                        await asyncio.shield(_rollback_quietly(conn))
                    except asyncio.CancelledError:
                        conn.broken = True  # rollback may still be running: never reuse
                        raise
                raise
            try:
                await conn.commit()
            except (ConnectionUnavailableError, QueryTimeoutError) as exc:
                mark_if_lost(conn, exc)
                raise in_doubt(self.name, "COMMIT", exc) from exc


class Session:
    """One piece of work's connection to one node: the one place where dal takes a pooled
    connection and gives it back (every statement, transaction and batch goes through it).

    Entering acquires a connection (:class:`~dal.errors.PoolTimeoutError` after
    ``acquire_timeout``) and counts the work in the node's ``in_flight`` (and ``queries``
    when ``counted``); leaving releases it, first flagging it for discard when the work
    failed in a way that leaves its state unknown (lost, timed out, cancelled, not a dal
    error). ``purpose`` names the work ("read", "write", "transaction", "batch").
    """

    __slots__ = ("_counted", "_node", "conn", "judged", "purpose")

    def __init__(self, node: Node, purpose: str, counted: bool) -> None:
        self._node = node
        self.purpose = purpose
        self._counted = counted
        self.judged = False  # the connection's fate is decided already: leave it as it is

    async def __aenter__(self) -> Connection:
        node = self._node
        pool = node.pool
        if node.events.pool and not pool.idle:
            conn = await self._waited(node)
        else:
            conn = await pool.acquire()
        self.conn = conn
        node.in_flight += 1
        if self._counted:
            node.queries += 1
        if node.events.query:
            return Watched(conn, node, self.purpose)
        return conn

    async def _waited(self, node: Node) -> Connection:
        """An acquire that may wait (no idle connection), reported as a PoolWait."""
        start = node.clock()
        outcome: Outcome = "ok"
        try:
            return await node.pool.acquire()
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            node.events.emit(PoolWait(node.name, node.database, node.clock() - start, outcome))

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        node = self._node
        node.in_flight -= 1
        if exc is not None and not self.judged:
            mark_if_lost(self.conn, exc)
        node.pool.release(self.conn)


class Watched:
    """A connection whose every call is reported as a :class:`~dal.events.QueryFinished`:
    what a :class:`Session` hands out while someone listens for "query" events (else
    the connection itself, so the cost without a listener is one attribute test).

    The statements of a call are what the adapter counts as sent (``Connection.sent``):
    a BEGIN sent lazily with the first statement of a transaction counts with it, a
    COMMIT of a transaction that sent nothing counts 0.
    """

    __slots__ = ("_conn", "_node", "_purpose")

    def __init__(self, conn: Connection, node: Node, purpose: str) -> None:
        self._conn = conn
        self._node = node
        self._purpose = purpose

    # what callers read or set on a connection besides its calls
    @property
    def broken(self) -> bool:
        return self._conn.broken

    @broken.setter
    def broken(self, value: bool) -> None:
        self._conn.broken = value

    @property
    def unsettled(self) -> asyncio.Future[bool] | None:
        return self._conn.unsettled

    @unsettled.setter
    def unsettled(self, value: asyncio.Future[bool] | None) -> None:
        self._conn.unsettled = value

    @property
    def sent(self) -> int:
        return self._conn.sent

    @property
    def server_version(self) -> int:
        return int(getattr(self._conn, "server_version", 0))

    @property
    def created_at(self) -> float:
        return self._conn.created_at

    @created_at.setter
    def created_at(self, value: float) -> None:
        self._conn.created_at = value

    @property
    def last_used(self) -> float:
        return self._conn.last_used

    @last_used.setter
    def last_used(self, value: float) -> None:
        self._conn.last_used = value

    def in_transaction(self) -> bool:
        return self._conn.in_transaction()

    def is_closed(self) -> bool:
        return self._conn.is_closed()

    async def close(self) -> None:
        await self._conn.close()

    def terminate(self) -> None:
        self._conn.terminate()

    async def _watch(self, operation: str, call: Awaitable[T]) -> T:
        node = self._node
        before = self._conn.sent
        start = node.clock()
        outcome: Outcome = "ok"
        try:
            return await call
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            node.events.emit(QueryFinished(
                node.name, node.database, node.role.value, self._purpose, operation,
                self._conn.sent - before, node.clock() - start, outcome,
            ))

    async def fetch_one(self, sql: str, params: Sequence[Any]) -> Row | None:
        return await self._watch("fetch", self._conn.fetch_one(sql, params))

    async def fetch_all(self, sql: str, params: Sequence[Any]) -> list[Row]:
        return await self._watch("fetch", self._conn.fetch_all(sql, params))

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        return await self._watch("execute", self._conn.execute(sql, params))

    async def execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> int:
        return await self._watch("execute_many", self._conn.execute_many(sql, params))

    async def begin(self) -> None:
        await self._watch("begin", self._conn.begin())

    async def commit(self) -> None:
        await self._watch("commit", self._conn.commit())

    async def rollback(self) -> None:
        await self._watch("rollback", self._conn.rollback())

    async def copy_records(self, table: str, columns: Sequence[str], records: Sequence[Sequence[Any]]) -> None:
        conn: Any = self._conn
        await self._watch("copy", conn.copy_records(table, columns, records))

    async def copy_text(self, table: str, columns: Sequence[str], source: AsyncIterable[memoryview]) -> None:
        conn: Any = self._conn
        await self._watch("copy", conn.copy_text(table, columns, source))


def in_doubt(node: str, what: str, exc: DalError) -> CommitUnknownError:
    """The error for ``what`` (a write outside a transaction, a COMMIT) cut off by ``exc`` after
    it was sent: its outcome is unknown. Carries on ``exc``'s unfinished settling, if any."""
    err = CommitUnknownError(
        f"{node}: {what} was sent and its outcome is unknown ({type(exc).__name__}: {exc}); "
        "it may have landed",
        node=node,
    )
    pending = unsettled(exc)
    if pending is not None:
        err.dal_unsettled = pending  # type: ignore[attr-defined]
    return err


async def _rollback_quietly(conn: Connection) -> None:
    try:
        await conn.rollback()
    except BaseException:
        conn.broken = True


class _Group:
    """The nodes of one shard database and its balancer."""

    __slots__ = ("balancer", "name", "primary", "replicas")

    def __init__(self, name: str, primary: Node, replicas: list[Node], balancer: Balancer) -> None:
        self.name = name
        self.primary = primary
        self.replicas = replicas
        self.balancer = balancer


class Cluster:
    """Pools for every node of a :class:`~dal.config.Config`, and node selection."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        balancers: BalancerFactory | None = None,
        events: Events | None = None,
    ) -> None:
        self.config = config
        self.events = events if events is not None else Events()
        make_balancer = balancers or balancer_factory(config.balancing, rng=rng)
        self.nodes: dict[str, Node] = {}
        self._groups: dict[str, _Group] = {}
        for db in config.databases:
            nodes = []
            for spec in db.nodes:
                spec = _sqlite_memory_fix(spec)
                pool = Pool(spec.name, connector_for(spec), spec.pool, clock=clock)
                node = Node(spec, db.name, pool, events=self.events, clock=clock)
                self.nodes[spec.name] = node
                nodes.append(node)
            self._groups[db.name] = _Group(db.name, nodes[0], nodes[1:], make_balancer())
        self._reaper: asyncio.Task[None] | None = None

    # -- selection ---------------------------------------------------------------
    def node(self, target: Target) -> Node:
        """The node that serves ``target``: the primary, or a balanced available replica."""
        group = self._groups[target.database]
        if target.role is Role.PRIMARY:
            primary = group.primary
            if not primary.available:
                raise ConnectionUnavailableError(
                    f"primary {primary.name} of {group.name} is down: {primary.down_reason}"
                )
            return primary
        replicas = group.replicas
        if replicas:
            candidates = [n for n in replicas if n.available]
            if candidates:
                return group.balancer.choose(candidates)
        primary = group.primary
        if not primary.available:
            raise ConnectionUnavailableError(f"no available node in {group.name}")
        return primary

    def primary(self, database: str) -> Node:
        try:
            return self._groups[database].primary
        except KeyError:
            raise RoutingError(f"unknown shard database {database!r}") from None

    def replicas(self, database: str) -> list[Node]:
        return list(self._groups[database].replicas)

    def backend(self, database: str) -> Backend:
        return self._groups[database].primary.backend

    @property
    def databases(self) -> list[str]:
        return list(self._groups)

    def observe(self, observer: Observer | None) -> None:
        """Call ``observer(node, sql)`` before every statement run outside a transaction."""
        for node in self.nodes.values():
            node.observer = observer

    # -- availability (health checks and breakers drive these) -----------------------
    def mark_down(self, name: str, reason: str) -> None:
        node = self.nodes[name]
        was = node.available
        if was:
            log.warning("node %s marked down: %s", name, reason)
        node.available = False
        node.down_reason = reason
        if was and self.events.node:
            self.events.emit(NodeStateChanged(name, node.database, False, reason))

    def mark_up(self, name: str) -> None:
        node = self.nodes[name]
        was = node.available
        if not was:
            log.info("node %s marked up", name)
        node.available = True
        node.down_reason = None
        if not was and self.events.node:
            self.events.emit(NodeStateChanged(name, node.database, True, None))

    # -- lifecycle ---------------------------------------------------------------
    async def start(self, *, reap_interval: float = 30.0) -> None:
        """Open ``min_size`` connections per node; a node that fails is logged, not fatal.

        A replica down at start must not keep the application from starting, nor
        stay unused once it comes back: it is simply tried again on use.
        """
        results = await asyncio.gather(*(n.pool.fill() for n in self.nodes.values()), return_exceptions=True)
        for node, res in zip(self.nodes.values(), results, strict=True):
            if isinstance(res, BaseException):
                log.warning("could not warm up %s: %s", node.name, res)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap(reap_interval))

    async def _reap(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for node in self.nodes.values():
                node.pool.reap()

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await asyncio.gather(*(n.pool.close() for n in self.nodes.values()))


def _sqlite_memory_fix(spec: NodeSpec) -> NodeSpec:
    """An in-memory SQLite database lives as long as its one connection: never recycle it."""
    if spec.backend == "sqlite" and (spec.dsn.url.database or ":memory:") == ":memory:":
        pool = replace(spec.pool, min_size=1, max_size=1, max_lifetime=None, max_idle_time=None)
        return replace(spec, pool=pool)
    return spec
