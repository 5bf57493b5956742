"""The :class:`DataLayer`: the one object an application holds.

It joins configuration and declared tables, owns the router, the cluster
(pools) and the compiled statements, and hands out repositories::

    async with DataLayer("dal.toml", metadata) as layer:
        users = layer.repository("users")
        await users.insert({"id": 1, "name": "Ada"})
        row = await users.get(1)

Nothing connects before :meth:`start` (or ``async with``); :meth:`aclose`
closes every pool. Time and randomness are injected (``clock=``, ``rng=``).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import importlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.named_types import CreateEnumType, DropEnumType
from sqlalchemy.schema import CreateIndex, CreateTable, DropTable

from dal.binding import TableBinding
from dal.clock import SystemClock
from dal.cluster import Cluster
from dal.config import Backend, Config, load_config
from dal.errors import ConfigError
from dal.events import Events, Listener
from dal.repository import Repository
from dal.routing.router import Role, Router
from dal.schema import LogicalTable, bind_tables
from dal.sql import Statements, make_dialect

if TYPE_CHECKING:
    from dal.cache.runtime import CacheRuntime
    from dal.cache.tiered import TableCache

R = TypeVar("R", bound=Repository[Any])


class _PrimaryScope:
    """``with``/``async with`` scope in which reads go to primaries."""

    __slots__ = ("_token", "_var")

    def __init__(self, var: contextvars.ContextVar[bool]) -> None:
        self._var = var
        self._token: contextvars.Token[bool] | None = None

    def __enter__(self) -> None:
        self._token = self._var.set(True)

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        self._var.reset(self._token)

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()


def import_metadata(path: str) -> sa.MetaData:
    """Import ``"package.module:attribute"`` and return the MetaData it names."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError("dal.metadata", f"expected 'module:attribute', got {path!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("dal.metadata", f"cannot import {path!r}: {exc}") from exc
    if not isinstance(obj, sa.MetaData):
        raise ConfigError("dal.metadata", f"{path!r} is a {type(obj).__name__}, not sqlalchemy.MetaData")
    return obj


class DataLayer:
    """Routing, sharding and repositories over one topology."""

    def __init__(
        self,
        config: Config | Mapping[str, Any] | str | os.PathLike[str],
        metadata: sa.MetaData | Iterable[sa.Table] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = load_config(config, env=env)
        if metadata is None:
            if self.config.metadata is None:
                metadata = sa.MetaData()
                if self.config.tables:
                    raise ConfigError("dal.metadata", "tables are configured but no MetaData was given")
            else:
                metadata = import_metadata(self.config.metadata)
        self._tables = bind_tables(self.config, metadata)
        self.router = Router(self._tables)
        self.events = Events()
        self.cluster = Cluster(self.config, clock=clock, rng=rng, events=self.events)
        self._dialects = {b: make_dialect(b) for b in {d.backend for d in self.config.databases}}
        self._statements: dict[tuple[str, Backend], Statements] = {}
        self._read_primary: contextvars.ContextVar[bool] = contextvars.ContextVar(
            f"dal.read_primary.{id(self):x}", default=False
        )
        self._fanout = asyncio.Semaphore(self.config.fanout_concurrency)
        self._clock = clock
        self._bindings: dict[str, TableBinding] = {}
        self._started = False
        self.cache: CacheRuntime | None = None
        cached = [t for t in self._tables.values() if t.spec.cache is not None]
        if cached:
            # Imported here, not at the top: the cache's dependencies (msgpack, the
            # Bloom filter) load only for a layer that caches.
            from dal.cache.runtime import CacheRuntime
            from dal.cache.tiered import TableCache

            s = self.config.cache
            self.cache = CacheRuntime(
                redis_url=s.redis.url if s.redis is not None else None,
                cluster=s.cluster,
                timeout=s.timeout,
                breaker_failures=s.breaker_failures,
                breaker_reset=s.breaker_reset,
                channel=s.channel,
                clock=SystemClock(monotonic=clock, wall=wall),
                rng=rng,
                resync_interval=s.resync_interval,
                max_keys_per_message=s.max_keys_per_message,
                signing_key=s.signing_key,
                events=self.events,
            )
            for t in cached:
                assert t.spec.cache is not None
                self.cache.add(
                    TableCache(
                        t.name, t.spec.cache, self.cache, deep_copy=t.mutable_values, scan_keys=self._key_scanner(t),
                        enums=_enum_classes(t.table), check_row=_cached_row_check(t),
                    )
                )

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Open the pools (``min_size`` connections per node). Idempotent."""
        if not self._started:
            self._started = True
            await self.cluster.start()
            if self.cache is not None:
                await self.cache.start()

    async def aclose(self) -> None:
        """Close every pool."""
        self._started = False
        if self.cache is not None:
            await self.cache.aclose()
        await self.cluster.aclose()

    async def __aenter__(self) -> DataLayer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- API --------------------------------------------------------------------------
    @property
    def tables(self) -> Mapping[str, LogicalTable]:
        return self._tables

    @overload
    def repository(self, table: str, *, row_type: type[Any] | None = None) -> Repository[Any]: ...

    @overload
    def repository(self, table: type[R], *, row_type: type[Any] | None = None) -> R: ...

    def repository(self, table: str | type[Repository[Any]], *, row_type: type[Any] | None = None) -> Repository[Any]:
        """A repository for a declared table name, or an instance of a Repository subclass."""
        if isinstance(table, type):
            if table.table_name is None:
                raise ConfigError(table.__name__, "a Repository subclass needs table_name")
            return table(self.binding(table.table_name), row_type=row_type)
        return Repository(self.binding(table), row_type=row_type)

    def binding(self, table: str) -> TableBinding:
        """What the repositories and batches of ``table`` run with (built once per table)."""
        b = self._bindings.get(table)
        if b is None:
            t = self.router.table(table)  # RoutingError for an unknown name
            b = self._bindings[table] = TableBinding(
                table=t,
                router=self.router,
                cluster=self.cluster,
                statements=tuple(self.statements(t, p.database) for p in t.placements),
                primary_targets=self.router.route_all(t, Role.PRIMARY),
                replica_targets=self.router.route_all(t, Role.REPLICA),
                cache=self.cache_of(t.name),
                cache_runtime=self.cache,
                fanout=self._fanout,
                primary_scope=self._read_primary,
                max_rows_scanned=self.config.max_rows_scanned,
                in_doubt_timeout=self.config.in_doubt_timeout,
                events=self.events,
                clock=self._clock,
                bind=self.binding,
            )
        return b

    def listen(self, listener: Listener, *kinds: str) -> Callable[[], None]:
        """Call ``listener(event)`` for each event of ``kinds`` (default: every kind) that
        this layer's statements, pools, caches and writers emit (see :mod:`dal.events`).
        Returns a function that stops it."""
        return self.events.listen(listener, *kinds)

    def cache_of(self, table: str) -> TableCache | None:
        """The cache of ``table`` in this process, if it is cached."""
        return None if self.cache is None else self.cache.tables.get(table)

    def _key_scanner(self, table: LogicalTable) -> Callable[[], AsyncIterator[tuple[Any, ...]]]:
        """Stream every primary key of ``table`` from its primaries (Bloom filter warm-up)."""

        async def scan() -> AsyncIterator[tuple[Any, ...]]:
            batch = 10_000
            for p in table.placements:
                st = self.statements(table, p.database)
                node = self.cluster.primary(p.database)
                after: tuple[Any, ...] | None = None
                while True:
                    c = st.scan_keys(p.slot, after=after is not None)
                    values: dict[str, Any] = {"lim": batch}
                    if after is not None:
                        values.update({f"a{i}": v for i, v in enumerate(after)})
                    rows = await node.fetch_all(c.sql, c.params(values), purpose="scan")
                    for r in rows:
                        yield tuple(r)
                    if len(rows) < batch:
                        break
                    after = tuple(rows[-1])

        return scan

    def read_primary(self) -> _PrimaryScope:
        """A scope (``with`` or ``async with``) in which every read goes to a primary."""
        return _PrimaryScope(self._read_primary)

    def statements(self, table: LogicalTable, database: str) -> Statements:
        """Compiled statements for ``table`` on the backend of ``database`` (cached)."""
        backend = self.cluster.backend(database)
        key = (table.name, backend)
        st = self._statements.get(key)
        if st is None:
            st = self._statements[key] = Statements(table, self._dialects[backend])
        return st

    # -- schema (for development, tests and the demo; production uses `dal migrate`) ------
    def ddl(self, tables: Iterable[str] | None = None, *, drop: bool = False) -> dict[str, list[str]]:
        """The DDL that creates (or drops) the physical tables of ``tables`` (default: all), per shard database."""
        out: dict[str, list[str]] = {db: [] for db in self.cluster.databases}
        chosen = self._tables.values() if tables is None else [self.router.table(n) for n in tables]
        for t in chosen:
            for placement, physical in zip(t.placements, t.physical, strict=True):
                dialect = self._dialects[self.cluster.backend(placement.database)]
                stmts = out[placement.database]
                enums = _native_enums(physical, dialect)
                if drop:
                    stmts.append(str(DropTable(physical, if_exists=True).compile(dialect=dialect)))
                    # (a type another table still uses stays)
                    stmts.extend(
                        _ignoring(str(DropEnumType(e).compile(dialect=dialect)), "undefined_object OR dependent_objects_still_exist")
                        for e in enums
                    )
                    continue
                # PostgreSQL's named enum types first (no CREATE TYPE IF NOT EXISTS: an existing one is kept)
                stmts.extend(_ignoring(str(CreateEnumType(e).compile(dialect=dialect)), "duplicate_object") for e in enums)
                stmts.append(str(CreateTable(physical, if_not_exists=True).compile(dialect=dialect)).strip())
                for index in sorted(physical.indexes, key=lambda i: str(i.name)):
                    stmts.append(str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect)))
        return out

    async def create_all(self, tables: Iterable[str] | None = None) -> None:
        """Create the physical tables of ``tables`` (default: all) on their primaries, if missing."""
        await self._run_ddl(self.ddl(tables))

    async def drop_all(self, tables: Iterable[str] | None = None) -> None:
        """Drop the physical tables of ``tables`` (default: all) on their primaries, if present."""
        await self._run_ddl(self.ddl(tables, drop=True))

    async def _run_ddl(self, ddl: Mapping[str, list[str]]) -> None:
        async def run(db: str, stmts: list[str]) -> None:
            node = self.cluster.primary(db)
            for stmt in stmts:
                await node.execute(stmt, (), purpose="ddl")

        await asyncio.gather(*(run(db, stmts) for db, stmts in ddl.items()))


def _native_enums(table: sa.Table, dialect: Any) -> list[Any]:
    """The named enum types ``table``'s columns need created first (PostgreSQL only), each once."""
    if dialect.name != "postgresql":
        return []
    out: dict[str, Any] = {}
    for col in table.columns:
        typ = col.type
        if isinstance(typ, sa.Enum) and typ.native_enum and typ.name:
            out.setdefault(typ.name, typ.dialect_impl(dialect))
    return list(out.values())


def _ignoring(stmt: str, condition: str) -> str:
    """``stmt`` in a PL/pgSQL block that ignores the error ``condition`` (a PostgreSQL condition name)."""
    return f"DO $dal$ BEGIN {stmt}; EXCEPTION WHEN {condition} THEN NULL; END $dal$"


def _cached_row_check(table: LogicalTable) -> Callable[[bytes, Any], bool]:
    """Whether a value read from L2 is a row of ``table`` stored under the encoded key
    given (see :data:`dal.cache.tiered.RowCheck`): exactly the table's columns, every
    value passing its column's check (as a caller's value would), and primary-key
    values that encode to that key (a row copied under another key is rejected)."""
    from dal.cache.keys import encode_cache_key

    columns = table.columns
    n = len(columns)
    # Reads every column by name (KeyError for a missing one) and runs the checks of
    # checked_values, generated into one function. A dict of n keys holding all n
    # columns has exactly the table's column set: no set comparison needed.
    read = table.row_reader(columns)
    at = tuple(columns.index(c) for c in table.primary_key)

    if len(at) == 1:
        (i,) = at

        def check(enc: bytes, value: Any) -> bool:
            try:
                if type(value) is not dict or len(value) != n:
                    return False
                values = read(value)
                return values is not None and encode_cache_key((values[i],)) == enc
            except Exception:  # whatever the value holds (a missing column: KeyError), the answer is "no"
                return False

        def check_int(enc: bytes, value: Any) -> bool:
            # read() has checked the key's exact type (int): its encoding is its decimal text.
            try:
                if type(value) is not dict or len(value) != n:
                    return False
                values = read(value)
                return values is not None and str(values[i]).encode() == enc
            except Exception:
                return False

        return check_int if table.pk_kind is int else check

    def check_composite(enc: bytes, value: Any) -> bool:
        try:
            if type(value) is not dict or len(value) != n:
                return False
            values = read(value)
            return values is not None and encode_cache_key(tuple(values[j] for j in at)) == enc
        except Exception:
            return False

    return check_composite


def _enum_classes(table: sa.Table) -> dict[str, type[enum.Enum]]:
    """The enum classes of ``table``'s ``sa.Enum`` columns, as the cache codec names them."""
    from dal.cache.codec import enum_key

    out: dict[str, type[enum.Enum]] = {}
    for col in table.columns:
        cls = getattr(col.type, "enum_class", None) if isinstance(col.type, sa.Enum) else None
        if cls is not None:
            out[enum_key(cls)] = cls
    return out
