"""Repositories: the public API over one logical table.

A :class:`Repository` validates what the caller passes (before any I/O), asks
the router where it goes, takes compiled SQL from :mod:`dal.sql`, and has the
cluster run it. Reads go to a replica unless told otherwise
(``primary=True``, :meth:`DataLayer.read_primary`, or inside a transaction);
writes go to the primary.

Queries without a shard key fan out to every physical table, at most
``fanout_concurrency`` at a time, and are merged with a k-way merge on
``order_by``; ``limit``/``offset`` are applied after the merge (each table is
asked for ``limit + offset`` rows). Fan-outs read at most ``max_rows_scanned``
rows, else :class:`~dal.errors.ScanLimitExceededError`.

Ordering contract: rows are ordered by ``order_by`` and then by the primary
key, so pages are deterministic; NULLs sort first ascending and last
descending on every backend. Cross-shard merging compares values in Python,
so for text columns under a case-insensitive collation (MySQL's default) the
merged order of values differing only in case may differ from the server's.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

from dal.backends.base import Connection, Row, unsettled
from dal.binding import TableBinding
from dal.cache.local import MISS
from dal.errors import (
    CrossShardTransactionError,
    ScanLimitExceededError,
    TransactionError,
    ValidationError,
    outcome_unknown,
)
from dal.query import build_query, gather_bounded, sort_key
from dal.routing.router import Role, Target
from dal.routing.sharding import encode_cache_key
from dal.schema import Key, LogicalTable, as_mapping, not_a_collection
from dal.sql import Compiled, Query

if TYPE_CHECKING:
    from dal.batch import BatchResult, BatchWriter, Op
    from dal.cache.tiered import TableCache

RowT = TypeVar("RowT")
T = TypeVar("T")



class _Tx:
    """The state of one single-shard transaction shared by its bound repositories."""

    __slots__ = ("after_commit", "conn", "database", "failure", "open")

    def __init__(self, database: str, conn: Connection) -> None:
        self.database = database
        self.conn = conn
        self.open = True
        self.failure: str | None = None
        # Cache invalidations of the writes, run once the transaction commits.
        self.after_commit: list[tuple[TableCache, list[bytes], bool]] = []

    def check(self, target: Target, table: str) -> Connection:
        if not self.open:
            raise TransactionError("the transaction has already ended")
        if self.failure is not None:
            raise TransactionError(f"the transaction is rolled back: {self.failure}")
        if target.database != self.database:
            self.failure = (
                f"{table} routes to shard database {target.database!r}, "
                f"but the transaction is on {self.database!r}"
            )
            raise CrossShardTransactionError(self.failure + "; the transaction is rolled back")
        return self.conn


class Repository(Generic[RowT]):
    """Operations on one logical table.

    Get one with ``layer.repository("users")``, or subclass to fix the table
    and row type::

        @dataclass
        class User: id: int; name: str

        class Users(Repository[User]):
            table_name = "users"
            row_type = User

        users = layer.repository(Users)

    Keys are primary keys: a scalar, or a tuple in primary-key column order
    for composite keys (which always include the shard key).
    """

    table_name: ClassVar[str | None] = None
    row_type: ClassVar[type[Any] | None] = None

    def __init__(
        self,
        binding: TableBinding,
        *,
        row_type: type[Any] | None = None,
        _tx: _Tx | None = None,
    ) -> None:
        self.binding = binding
        table = binding.table
        self._table = table
        self._router = binding.router
        self._cluster = binding.cluster
        self._tx = _tx
        rt: Any = row_type if row_type is not None else type(self).row_type
        if rt is dict:
            rt = None
        if rt is not None and not is_dataclass(rt):
            raise ValidationError(f"row_type must be dict or a dataclass, got {rt!r}")
        self._row_type: type[Any] | None = cast("type[Any] | None", rt)
        self._cache: TableCache | None = binding.cache
        self._read_primary = binding.primary_scope  # (the ContextVar itself: one .get() per read)
        self._fanout = binding.fanout
        self._primary_targets = binding.primary_targets
        self._replica_targets = binding.replica_targets
        self._stmts = binding.statements

    @property
    def table(self) -> LogicalTable:
        return self._table

    def repository(self, table: str) -> Repository[dict[str, Any]]:
        """A repository for another table; inside a transaction it shares the transaction."""
        return Repository(self.binding.bind(table), _tx=self._tx)

    # -- plumbing ----------------------------------------------------------------
    def _role(self, primary: bool) -> Role:
        if primary or self._tx is not None or self._read_primary.get():
            return Role.PRIMARY
        return Role.REPLICA

    def _out(self, row: dict[str, Any]) -> RowT:
        rt = self._row_type
        return cast(RowT, row if rt is None else rt(**row))

    async def _fetch_one(self, target: Target, c: Compiled, params: tuple[Any, ...]) -> Row | None:
        if self._tx is not None:
            return await self._tx.check(target, self._table.name).fetch_one(c.sql, params)
        return await self._cluster.node(target).fetch_one(c.sql, params)

    async def _fetch_all(self, target: Target, c: Compiled, params: tuple[Any, ...]) -> list[Row]:
        if self._tx is not None:
            return await self._tx.check(target, self._table.name).fetch_all(c.sql, params)
        return await self._cluster.node(target).fetch_all(c.sql, params)

    async def _execute(self, target: Target, c: Compiled, params: tuple[Any, ...]) -> int:
        if self._tx is not None:
            return await self._tx.check(target, self._table.name).execute(c.sql, params)
        return await self._cluster.node(target).execute(c.sql, params)

    def _check_targets(self, targets: Iterable[Target]) -> None:
        if self._tx is not None:
            for target in targets:
                self._tx.check(target, self._table.name)

    # -- reads by key --------------------------------------------------------------
    async def get(self, key: Any, *, primary: bool = False) -> RowT | None:
        """The row with primary key ``key``, or ``None``."""
        cache = self._cache
        # (The bypass test of _cache_for, inline: this is the L1-hit path.)
        if cache is not None and self._tx is None and not primary and not self._read_primary.get():
            # L1 holds only keys that passed validation, so a key of the column's
            # exact type may probe it before being validated (the L1-hit fast path).
            # Either way L1 is probed once and the key located once (its cache bytes
            # also give the slot of the load).
            t = self._table
            if type(key) is int and t.pk_kind is int:
                enc = b"%d" % key  # (encode_key's bytes of an int)
                hit = cache.cached(enc)
                if hit is MISS:
                    k = t.locate_cached(key, enc)
            else:
                k = t.locate_cached(key)
                hit = cache.cached(k.cache_key)
            if hit is MISS:
                hit = await cache.get(k.cache_key, lambda fresh: self._load_row(k, fresh))
            if hit is None:
                return None
            return cast(RowT, hit if self._row_type is None else self._row_type(**hit))
        slot, kv = self._table.locate_key(key)
        st = self._stmts[slot]
        c = st.get[slot]
        params = kv if st.key_direct else c.params(st.key_params(kv))
        if self._tx is None:
            # The hot path: no transaction, so straight to the node.
            if primary or self._read_primary.get():
                node = self._cluster.node(self._primary_targets[slot])
            else:
                node = self._cluster.node(self._replica_targets[slot])
            row = await node.fetch_one(c.sql, params)
        else:
            row = await self._fetch_one(self._primary_targets[slot], c, params)
        if row is None:
            return None
        out = st.row(row)
        return cast(RowT, out if self._row_type is None else self._row_type(**out))

    def _cache_for(self, primary: bool) -> TableCache | None:
        """The cache, unless this read must bypass it (transaction, forced primary)."""
        if self._cache is None or self._tx is not None or primary or self._read_primary.get():
            return None
        return self._cache

    def _write_cache(self) -> TableCache | None:
        """The cache a write outside a transaction invalidates at once (inside one, its
        keys are invalidated at commit)."""
        return self._cache if self._tx is None else None

    async def _load_row(self, k: Key, primary: bool) -> dict[str, Any] | None:
        """One row from the database, for a cache fill of key ``k``."""
        slot = k.slot
        st = self._stmts[slot]
        c = st.get[slot]
        target = (self._primary_targets if primary else self._replica_targets)[slot]
        row = await self._cluster.node(target).fetch_one(c.sql, st.key_only(c, k.values))
        return None if row is None else st.row(row)

    async def _invalidate(self, keys: Sequence[Key], *, inserted: bool) -> None:
        """After a committed write: now, or at commit when inside a transaction."""
        cache = self._cache
        if cache is None:
            return
        encs = [k.cache_key for k in keys]
        if self._tx is not None:
            self._tx.after_commit.append((cache, encs, inserted))
        else:
            await cache.invalidate(encs, inserted=inserted)

    async def _invalidate_in_doubt(self, keys: Sequence[Key], inserted: bool, exc: BaseException) -> None:
        """A write outside a transaction failed with ``exc``: if it may have landed, invalidate
        its keys as if it had, before the error reaches the caller; and once more when the
        server confirms it over, if that is still under way (see dal.backends.base)."""
        cache = self._write_cache()
        if cache is None or not outcome_unknown(exc):
            return
        await cache.invalidate_in_doubt([k.cache_key for k in keys], inserted=inserted, exc=exc)

    async def _invalidate_written(
        self, values: Mapping[str, Any], slot: int, exc: BaseException | None = None
    ) -> None:
        """After an insert/upsert of ``values`` into ``slot`` (or one in doubt, failed with ``exc``)."""
        t = self._table
        if all(c in values for c in t.primary_key):
            k = Key(tuple(values[c] for c in t.primary_key), slot)
            if exc is not None:
                await self._invalidate_in_doubt([k], True, exc)
            else:
                await self._invalidate([k], inserted=True)
        elif self._cache is not None and self._cache.bloom is not None:
            # A key the server generated: the filter cannot learn it, so it must
            # stop answering "absent" for anything.
            self._cache.bloom.saturated = True

    async def get_many(self, keys: Iterable[Any], *, primary: bool = False) -> dict[Any, RowT]:
        """Rows for ``keys`` (missing ones are absent), keyed by key.

        One query per physical table (in chunks of 500 keys), run concurrently.
        """
        t = self._table
        not_a_collection(keys, "keys", t.name)
        checked: dict[Any, tuple[Any, ...]] = {}
        for key in keys:
            kv = t.key_values(key)  # validate first: a bad key may not even be hashable
            checked.setdefault(key, kv)
        cache = self._cache_for(primary)
        if cache is not None:
            return await self._get_many_cached(cache, checked)
        rows = await self._fetch_many(list(checked.values()), self._role(primary))
        return {t.key_of(r): self._out(r) for r in rows}

    async def _fetch_many(self, kvs: Sequence[tuple[Any, ...]], role: Role) -> list[dict[str, Any]]:
        """Rows for key values, one query per physical table (chunked), concurrently."""
        queries = self.binding.key_queries(kvs, role)
        self._check_targets(q[0] for q in queries)
        jobs = [self._get_chunk_job(target, c, params) for target, c, params in queries]
        rows: list[dict[str, Any]] = []
        for part in await gather_bounded(jobs, self._fanout):
            rows.extend(part)
        return rows

    async def _get_many_cached(self, cache: TableCache, checked: dict[Any, tuple[Any, ...]]) -> dict[Any, RowT]:
        out: dict[Any, RowT] = {}
        missing: dict[bytes, tuple[Any, ...]] = {}
        enc_to_key: dict[bytes, Any] = {}
        for key, kv in checked.items():
            enc = encode_cache_key(kv)
            hit = cache.cached(enc)
            if hit is MISS:
                missing[enc] = kv
                enc_to_key[enc] = key
            elif hit is not None:
                out[key] = self._out(hit)
        if missing:
            t = self._table

            async def load(kvs: Sequence[tuple[Any, ...]], primary: bool) -> dict[bytes, dict[str, Any]]:
                rows = await self._fetch_many(kvs, Role.PRIMARY if primary else Role.REPLICA)
                # (the database's own key values: validated when they were written)
                pk = t.primary_key
                return {encode_cache_key(tuple(r[c] for c in pk)): r for r in rows}

            for enc, row in (await cache.get_many(missing, load)).items():
                if row is not None:
                    out[enc_to_key[enc]] = self._out(row)
        return out

    def _get_chunk_job(
        self, target: Target, c: Compiled, params: tuple[Any, ...]
    ) -> Callable[[], Awaitable[list[dict[str, Any]]]]:
        st = self._stmts[target.slot]

        async def job() -> list[dict[str, Any]]:
            return [st.row(r) for r in await self._fetch_all(target, c, params)]

        return job

    # -- writes ---------------------------------------------------------------------
    def _row_target(self, row: object) -> tuple[Target, dict[str, Any]]:
        t = self._table
        values = t.row_values(row)
        shard_value = values[t.shard_key] if t.shard_key is not None else None
        return self._router.route(t, shard_value, Role.PRIMARY), values

    async def insert(self, row: Mapping[str, Any] | Any) -> None:
        """Insert one row; :class:`~dal.errors.DuplicateKeyError` when its key exists."""
        target, values = self._row_target(row)
        st = self._stmts[target.slot]
        await self._write_row(target, st.insert(target.slot, tuple(values)), values)

    async def upsert(self, row: Mapping[str, Any] | Any) -> None:
        """Insert one row, or overwrite the given columns of the row with its key."""
        target, values = self._row_target(row)
        # Python-side defaults fill omitted columns of a new row only: an
        # existing row keeps what the caller did not give.
        given = as_mapping(row, self._table.name)
        st = self._stmts[target.slot]
        await self._write_row(target, st.upsert(target.slot, tuple(values), tuple(k for k in values if k in given)), values)

    async def _write_row(self, target: Target, c: Compiled, values: dict[str, Any]) -> None:
        """Run an insert/upsert of ``values``; its keys are invalidated after it, or before its
        error when its outcome is unknown."""
        try:
            await self._execute(target, c, c.params(values))
        except BaseException as exc:
            if self._write_cache() is not None and outcome_unknown(exc):
                await self._invalidate_written(values, target.slot, exc)
            raise
        if self._cache is not None:
            await self._invalidate_written(values, target.slot)

    async def update(self, key: Any, values: Mapping[str, Any]) -> bool:
        """Set ``values`` on the row with ``key``; ``False`` when there is no such row."""
        k = self._table.locate(key)
        target = self._primary_targets[k.slot]
        vals = self._table.update_values(values)
        st = self._stmts[k.slot]
        c = st.update(k.slot, tuple(vals))
        params = st.key_params(k.values)
        params.update({f"v_{name}": v for name, v in vals.items()})
        try:
            found = await self._execute(target, c, c.params(params)) > 0
        except BaseException as exc:
            await self._invalidate_in_doubt([k], False, exc)
            raise
        await self._invalidate([k], inserted=False)
        return found

    async def delete(self, key: Any) -> bool:
        """Delete the row with ``key``; ``False`` when there was none."""
        k = self._table.locate(key)
        target = self._primary_targets[k.slot]
        st = self._stmts[k.slot]
        c = st.delete[k.slot]
        try:
            found = await self._execute(target, c, st.key_only(c, k.values)) > 0
        except BaseException as exc:
            await self._invalidate_in_doubt([k], False, exc)
            raise
        await self._invalidate([k], inserted=False)
        return found

    # -- batches ------------------------------------------------------------------------
    async def insert_many(
        self, rows: Iterable[Any], *, batch_size: int = 10_000, atomic: bool = False, raise_on_error: bool = True
    ) -> BatchResult:
        """Insert rows in batches per physical table (see :mod:`dal.batch`).

        Raises :class:`~dal.batch.BatchError` (with the full result) when a batch
        failed, unless ``raise_on_error=False``. ``atomic=True``: one transaction
        for everything (all rows must land on one shard database).
        """
        return await self._many("insert", rows, batch_size, atomic, raise_on_error)

    async def upsert_many(
        self, rows: Iterable[Any], *, batch_size: int = 10_000, atomic: bool = False, raise_on_error: bool = True
    ) -> BatchResult:
        """Insert rows, or overwrite the given columns of existing ones, in batches."""
        return await self._many("upsert", rows, batch_size, atomic, raise_on_error)

    async def update_many(
        self, rows: Iterable[Any], *, batch_size: int = 1000, atomic: bool = False, raise_on_error: bool = True
    ) -> BatchResult:
        """Each row holds a primary key and the columns to set on that row; ``affected`` counts matches."""
        return await self._many("update", rows, batch_size, atomic, raise_on_error)

    async def delete_many(
        self, keys: Iterable[Any], *, batch_size: int = 1000, atomic: bool = False, raise_on_error: bool = True
    ) -> BatchResult:
        """Delete rows by key in batches; ``affected`` counts the rows deleted."""
        return await self._many("delete", keys, batch_size, atomic, raise_on_error)

    async def _many(self, op: Op, items: Iterable[Any], batch_size: int, atomic: bool, raise_on_error: bool) -> BatchResult:
        from dal.batch import run_many

        if self._tx is not None:
            raise TransactionError("batched writes run their own transactions; call them outside a transaction")
        return await run_many(
            self.binding, op, items, batch_size=batch_size, atomic=atomic, raise_on_error=raise_on_error
        )

    def writer(self, *, max_rows: int = 500, max_delay: float = 0.005, max_pending: int = 100_000) -> BatchWriter:
        """A write-behind :class:`~dal.batch.BatchWriter` for this table (``async with`` it)."""
        from dal.batch import BatchWriter

        return BatchWriter(self.binding, max_rows=max_rows, max_delay=max_delay, max_pending=max_pending)

    # -- queries ---------------------------------------------------------------------
    def _targets(self, query: Query, role: Role) -> tuple[Target, ...]:
        """Only the physical tables a shard-key condition allows; all of them otherwise."""
        t = self._table
        if t.sharder is not None:
            for col, f in query.conditions:
                if col != t.shard_key:
                    continue
                if f.op == "eq":
                    return (self._router.route(t, f.value, role),)
                if f.op == "in":
                    slots = sorted({t.sharder.slot(v) for v in f.value})
                    return tuple(self._router.route_slot(t, s, role) for s in slots)
        return self._router.route_all(t, role)

    async def find(
        self,
        where: Mapping[str, Any] | None = None,
        *,
        order_by: str | Sequence[str] = (),
        limit: int | None = None,
        offset: int = 0,
        after: Mapping[str, Any] | None = None,
        primary: bool = False,
    ) -> list[RowT]:
        """Rows matching ``where``, ordered by ``order_by`` then the primary key.

        ``order_by`` takes column names, ``"-name"`` for descending. ``after``
        is a keyset cursor: pass the last row of the previous page to get the
        rows that follow it (cheaper than a growing ``offset``).
        """
        query = build_query(self._table, where, order_by, limit, offset, after)
        targets = self._targets(query, self._role(primary))
        self._check_targets(targets)
        cap = self.binding.max_rows_scanned
        values = query.values()
        if len(targets) == 1:
            # One physical table: the server applies limit and offset itself.
            target = targets[0]
            st = self._stmts[target.slot]
            lim = cap + 1 if limit is None else min(limit, cap + 1)
            c = st.select(target.slot, query)
            params = dict(values, lim=lim, off=offset)
            rows = await self._fetch_all(target, c, c.params(params))
            if len(rows) > cap:
                raise ScanLimitExceededError(self._table.name, cap)
            return [self._out(st.row(r)) for r in rows]
        window = cap + 1 if limit is None else min(limit + offset, cap + 1)
        scanned = 0

        def job(target: Target) -> Callable[[], Awaitable[list[dict[str, Any]]]]:
            st = self._stmts[target.slot]
            c = st.select(target.slot, query, fanout=True)
            params = c.params(dict(values, lim=window))

            async def run() -> list[dict[str, Any]]:
                nonlocal scanned
                rows = await self._fetch_all(target, c, params)
                scanned += len(rows)
                if scanned > cap:
                    raise ScanLimitExceededError(self._table.name, cap)
                return [st.row(r) for r in rows]

            return run

        parts = await gather_bounded([job(t) for t in targets], self._fanout)
        merged = heapq.merge(*parts, key=sort_key(query.order))
        end = None if limit is None else offset + limit
        out = []
        for i, row in enumerate(merged):
            if end is not None and i >= end:
                break
            if i >= offset:
                out.append(self._out(row))
        return out

    async def count(self, where: Mapping[str, Any] | None = None, *, primary: bool = False) -> int:
        """The number of rows matching ``where`` (summed over the physical tables it touches)."""
        query = build_query(self._table, where, (), None, 0, None)
        targets = self._targets(query, self._role(primary))
        self._check_targets(targets)
        values = query.values()

        def job(target: Target) -> Callable[[], Awaitable[int]]:
            st = self._stmts[target.slot]
            c = st.select(target.slot, query, count=True)
            params = c.params(values)

            async def run() -> int:
                row = await self._fetch_one(target, c, params)
                return int(row[0]) if row is not None else 0

            return run

        return sum(await gather_bounded([job(t) for t in targets], self._fanout))

    # -- transactions --------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def transaction(self, shard_value: Any) -> AsyncIterator[Repository[RowT]]:
        """A single-shard transaction on the shard database that holds ``shard_value``.

        ``shard_value`` is a value of the table's shard key (for a table keyed by
        its shard key, simply the key). The yielded repository, and those it
        returns from :meth:`repository`, run on one connection to that
        database's primary; everything commits at the end of the block or rolls
        back on error. An operation that routes to another shard database raises
        :class:`~dal.errors.CrossShardTransactionError` and rolls back.
        """
        if self._tx is not None:
            raise TransactionError("transactions do not nest")
        t = self._table
        if t.sharder is not None:
            t.check_value(t.shard_key, shard_value)  # type: ignore[arg-type]
        target = self._router.route(t, shard_value, Role.PRIMARY)
        node = self._cluster.node(target)
        tx: _Tx | None = None
        committing = False
        try:
            async with node.transaction() as conn:
                tx = _Tx(target.database, conn)
                bound: Repository[RowT] = type(self).__new__(type(self))
                Repository.__init__(bound, self.binding, row_type=self._row_type or dict, _tx=tx)
                try:
                    yield bound
                finally:
                    tx.open = False
                if tx.failure is not None:
                    raise TransactionError(f"the transaction was rolled back: {tx.failure}")
                committing = True  # leaving the block sends COMMIT
        except BaseException as exc:
            runtime = self.binding.cache_runtime
            if committing and tx is not None and tx.after_commit and runtime is not None and outcome_unknown(exc):
                # COMMIT sent, outcome unknown: its writes are treated as committed.
                await runtime.shielded(_invalidate_all(tx.after_commit))
                pending = unsettled(exc)
                if pending is not None:
                    items, spawn = tx.after_commit, runtime.spawn
                    pending.add_done_callback(lambda _: spawn(_invalidate_all(items)))
            raise
        assert tx is not None
        runtime = self.binding.cache_runtime
        if tx.after_commit and runtime is not None:
            # All of them in one task that a cancelled caller does not stop: the
            # later writes of the transaction must not stay cached with old rows.
            await runtime.shielded(_invalidate_all(tx.after_commit))


async def _invalidate_all(items: Sequence[tuple[TableCache, list[bytes], bool]]) -> None:
    for cache, encs, inserted in items:
        await cache.invalidate(encs, inserted=inserted)
