"""Batched writes: many rows per round trip, grouped per physical table.

``insert_many``, ``upsert_many``, ``update_many`` and ``delete_many`` validate
every row before any I/O (an error names the row index and the field), group
rows by physical table, and send each group in batches of ``batch_size``
rows. Each batch is one transaction on its shard database's primary, in the
fastest correct form per backend:

============  ==============================  ==================================
backend       insert                          upsert / update / delete
============  ==============================  ==================================
PostgreSQL    COPY (binary)                   COPY into a temporary staging table,
                                              then one INSERT ... ON CONFLICT /
                                              UPDATE ... FROM / DELETE ... USING
MySQL         multi-row INSERT (executemany)  multi-row INSERT ... ON DUPLICATE KEY
                                              UPDATE / UPDATE ... JOIN (rows) /
                                              DELETE ... IN
SQLite        executemany                     executemany
============  ==============================  ==================================

Batches on different physical tables run concurrently (``fanout_concurrency``
at a time). A failed batch is rolled back as a whole and reported with the keys
it held and, for duplicates, exactly which keys already existed; batches that
committed are reported as committed. If the connection is lost while COMMIT
is in flight, the outcome is checked on the primary (inserts: are the rows
there?) before it is reported, so a row is never reported both failed and
written. With ``atomic=True`` the whole call is one transaction, allowed only
when every row lands on one shard database.

:class:`BatchWriter` coalesces single-row writes from many coroutines
(write-behind): each caller's ``await`` returns when its row is committed or
raises its own error; a failing batch is split to isolate the bad rows, so one
bad row fails only its own caller.
"""

from __future__ import annotations

import asyncio
import operator
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from dal.backends.base import Connection
from dal.cache.keys import encode_cache_key
from dal.errors import (
    ConnectionUnavailableError,
    CrossShardTransactionError,
    DalError,
    DuplicateKeyError,
    ValidationError,
)
from dal.routing.router import Target
from dal.sql import Compiled, compile_statement

if TYPE_CHECKING:
    from dal.cluster import Node
    from dal.repository import Repository

Op = Literal["insert", "upsert", "update", "delete"]


class CommitUnknownError(ConnectionUnavailableError):
    """The connection was lost during COMMIT and the outcome could not be checked."""


@dataclass
class BatchFailure:
    """One batch that did not commit (it was rolled back as a whole)."""

    table: str
    database: str
    keys: list[Any]
    error: DalError
    failed_keys: list[Any] = field(default_factory=list)  # the keys that caused it, when known


@dataclass
class BatchResult:
    """What a batched call did."""

    rows: int = 0
    batches: int = 0
    committed_batches: int = 0
    written: dict[str, int] = field(default_factory=dict)  # rows committed per shard database
    affected: int = 0  # rows the statements matched (update/delete), else rows written
    failures: list[BatchFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def committed(self) -> int:
        return sum(self.written.values())

    @property
    def failed_keys(self) -> list[Any]:
        return [k for f in self.failures for k in (f.failed_keys or f.keys)]


class BatchError(DalError):
    """Some batches failed; ``result`` says which rows committed and which did not."""

    def __init__(self, result: BatchResult) -> None:
        self.result = result
        first = result.failures[0]
        super().__init__(
            f"{len(result.failures)} of {result.batches} batches failed "
            f"({result.committed} of {result.rows} rows committed); first: {first.table} on "
            f"{first.database}: {type(first.error).__name__}: {first.error}"
        )


@dataclass
class _Batch:
    target: Target
    rows: list[tuple[Any, ...]]  # values in `columns` order
    keys: list[Any]  # primary keys (scalars or tuples), parallel to rows
    columns: tuple[str, ...]


class BatchPlanner:
    """Validates rows, groups them by physical table, and runs batches for one repository."""

    def __init__(self, repo: Repository[Any]) -> None:
        self.repo = repo
        self.table = repo._table
        self.layer = repo._layer
        self.cluster = repo._cluster
        self._stmt_cache: dict[tuple[Any, ...], Compiled] = {}

    # -- planning (no I/O) --------------------------------------------------------------
    def plan(self, op: Op, items: Iterable[Any], batch_size: int) -> list[_Batch]:
        if type(batch_size) is not int or batch_size < 1:
            raise ValidationError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if op in ("insert", "upsert") and isinstance(items, list) and len(items) > 1:
            fast = self._plan_columns(items, batch_size)
            if fast is not None:
                return fast
        t = self.table
        groups: dict[tuple[int, tuple[str, ...]], _Batch] = {}
        order: list[tuple[int, tuple[str, ...]]] = []
        targets = self.repo._primary_targets
        for i, item in enumerate(items):
            if op == "delete":
                slot, kv = t.locate_key(item)
                values: tuple[Any, ...] = kv
                columns = t.primary_key
                key = item
            else:
                data = t.row_values(item, index=i) if op != "update" else self._update_row(item, i)
                columns = tuple(data)
                if not all(c in data for c in t.primary_key):
                    raise ValidationError(f"{t.name}: row {i} lacks primary key columns {list(t.primary_key)}")
                kv = tuple(data[c] for c in t.primary_key)
                slot = 0 if t.sharder is None else t.sharder.slot(kv[t._shard_key_index])
                values = tuple(data[c] for c in columns)
                key = kv[0] if len(kv) == 1 else kv
            gk = (slot, columns)
            b = groups.get(gk)
            if b is None:
                b = groups[gk] = _Batch(targets[slot], [], [], columns)
                order.append(gk)
            b.rows.append(values)
            b.keys.append(key)
        out: list[_Batch] = []
        for gk in order:
            b = groups[gk]
            for s in range(0, len(b.rows), batch_size):
                out.append(_Batch(b.target, b.rows[s : s + batch_size], b.keys[s : s + batch_size], b.columns))
        return out

    def _plan_columns(self, rows: list[Any], batch_size: int) -> list[_Batch] | None:
        """The same plan as row by row, a column at a time: for lists of dicts with one
        set of keys whose values all pass the fast column checks. ``None`` sends the
        caller down the row-by-row path, which also names the bad row and field.

        Bulk loads are dominated by per-row Python work, so every loop here is a
        ``map``/``zip``/``compress`` that runs in C."""
        t = self.table
        if t.sharder is None or set(map(type, rows)) != {dict}:
            return None
        keys = rows[0].keys()
        width = len(keys)
        if not all(map(width.__eq__, map(len, rows))):
            return None  # (equal sizes + every column found below = same keys)
        names = list(keys)
        if any(type(n) is not str or n not in t._checkers for n in names):
            return None
        try:
            cols = {n: list(map(operator.itemgetter(n), rows)) for n in names}
        except KeyError:
            return None
        if not all(t.column_ok(n, cols[n]) for n in names):
            return None
        from dal.schema import _default_value

        for name, default in t._defaults:
            if name not in cols:
                cols[name] = [_default_value(default) for _ in rows]
        if any(name not in cols for name in t._required) or not all(c in cols for c in t.primary_key):
            return None
        shard = cols[t.shard_key]
        kinds = set(map(type, shard))
        if kinds == {int}:
            encoded: Iterable[bytes] = map(str.encode, map(str, shard))
        elif kinds == {str}:
            encoded = map(str.encode, shard)
        else:
            return None
        n = t.sharder.slots
        slots = [c % n for c in map(zlib.crc32, encoded)]
        columns = tuple(cols)
        records = list(zip(*(cols[c] for c in columns)))  # noqa: B905 - columns of one length
        pk = [cols[c] for c in t.primary_key]
        keys_list: list[Any] = pk[0] if len(pk) == 1 else list(zip(*pk, strict=True))
        by_slot: dict[int, tuple[list[tuple[Any, ...]], list[Any]]] = {}
        for slot, rec, key in zip(slots, records, keys_list):  # noqa: B905 - same length by construction
            group = by_slot.get(slot)
            if group is None:
                group = by_slot[slot] = ([], [])
            group[0].append(rec)
            group[1].append(key)
        targets = self.repo._primary_targets
        out = []
        for slot in sorted(by_slot):
            recs, ks = by_slot[slot]
            for s in range(0, len(recs), batch_size):
                out.append(_Batch(targets[slot], recs[s : s + batch_size], ks[s : s + batch_size], columns))
        return out

    def _update_row(self, item: Any, index: int) -> dict[str, Any]:
        t = self.table
        from dal.schema import as_mapping

        data = as_mapping(item, t.name)
        out: dict[str, Any] = {}
        for name, value in data.items():
            if type(name) is not str or name not in t._checkers:
                from dal.errors import UnknownColumnError

                raise UnknownColumnError(f"table {t.name!r} has no column {name!r} (row {index})")
            problem = t._checkers[name](value)
            if problem is not None:
                raise ValidationError(f"{t.name}.{name}: {problem} (row {index})")
            out[name] = value
        if not all(c in out for c in t.primary_key):
            raise ValidationError(f"{t.name}: row {index} lacks primary key columns {list(t.primary_key)}")
        if len(out) == len(t.primary_key):
            raise ValidationError(f"{t.name}: row {index} has no column to update")
        # key columns first, then the columns to set, in a stable order
        return {**{c: out[c] for c in t.primary_key}, **{c: v for c, v in out.items() if c not in t.primary_key}}

    # -- execution -------------------------------------------------------------------------
    async def run(self, op: Op, batches: list[_Batch], *, atomic: bool, rows: int) -> BatchResult:
        result = BatchResult(rows=rows, batches=len(batches))
        if not batches:
            return result
        if atomic:
            dbs = {b.target.database for b in batches}
            if len(dbs) > 1:
                raise CrossShardTransactionError(
                    f"{self.table.name}: atomic batch spans shard databases {sorted(dbs)}"
                )
            await self._run_atomic(op, batches, result)
        else:
            sem = self.layer._fanout

            async def one(b: _Batch) -> None:
                async with sem:
                    await self._run_batch(op, b, result)

            await asyncio.gather(*(one(b) for b in batches))
        return result

    async def _run_atomic(self, op: Op, batches: list[_Batch], result: BatchResult) -> None:
        node = self.cluster.node(batches[0].target)
        conn = await node.pool.acquire()
        done = 0
        try:
            await conn.begin()
            try:
                for b in batches:
                    done += await self._apply(op, conn, node, b)
            except BaseException:
                await _rollback(conn)
                raise
            await self._commit(conn, node, op, batches)
        except DalError as exc:
            keys = [k for b in batches for k in b.keys]
            result.failures.append(
                BatchFailure(batches[0].target.table, batches[0].target.database, keys, exc,
                             await self._culprits(op, batches, exc))
            )
            return
        finally:
            node.pool.release(conn)
        for b in batches:
            result.committed_batches += 1
            result.written[b.target.database] = result.written.get(b.target.database, 0) + len(b.rows)
        result.affected += done
        await self._invalidate(op, [k for b in batches for k in b.keys])

    async def _run_batch(self, op: Op, b: _Batch, result: BatchResult) -> None:
        try:
            affected = await self.execute(op, b)
        except DalError as exc:
            result.failures.append(
                BatchFailure(b.target.table, b.target.database, list(b.keys), exc, await self._culprits(op, [b], exc))
            )
            return
        result.committed_batches += 1
        result.written[b.target.database] = result.written.get(b.target.database, 0) + len(b.rows)
        result.affected += affected

    async def execute(self, op: Op, b: _Batch) -> int:
        """One batch in one transaction; raises the batch's error (rolled back, or never committed)."""
        node = self.cluster.node(b.target)
        conn = await node.pool.acquire()
        node.in_flight += 1
        node.queries += 1
        try:
            await conn.begin()
            try:
                affected = await self._apply(op, conn, node, b)
            except BaseException:
                await _rollback(conn)
                raise
            await self._commit(conn, node, op, [b])
        except BaseException as exc:
            if not isinstance(exc, DalError):
                conn.broken = True
            raise
        finally:
            node.in_flight -= 1
            node.pool.release(conn)
        await self._invalidate(op, b.keys)
        return affected

    async def _commit(self, conn: Connection, node: Node, op: Op, batches: list[_Batch]) -> None:
        try:
            await conn.commit()
        except ConnectionUnavailableError as exc:
            conn.broken = True
            # COMMIT was sent; it may or may not have taken effect. Find out.
            if not await self._committed_after_all(node, op, batches, exc):
                raise
            return

    async def _committed_after_all(self, node: Node, op: Op, batches: list[_Batch], exc: DalError) -> bool:
        """Whether an insert batch whose COMMIT was cut off is on the primary (waits for it to return)."""
        if op != "insert":
            raise CommitUnknownError(f"connection lost during COMMIT of a {op} batch: outcome unknown ({exc})") from exc
        deadline = time.monotonic() + self.layer.config.in_doubt_timeout
        b = batches[0]
        probe = b.keys[0]
        while True:
            try:
                found = await self.repo.get(probe, primary=True)
            except ConnectionUnavailableError:
                if time.monotonic() > deadline:
                    raise CommitUnknownError(
                        f"connection lost during COMMIT on {node.name} and the primary did not come back "
                        f"within {self.layer.config.in_doubt_timeout}s: outcome unknown"
                    ) from exc
                await asyncio.sleep(0.2)
                continue
            return found is not None

    async def _culprits(self, op: Op, batches: list[_Batch], exc: DalError) -> list[Any]:
        """For a duplicate-key failure of an insert: exactly which keys already existed or repeat."""
        if op != "insert" or not isinstance(exc, DuplicateKeyError):
            return []
        keys = [k for b in batches for k in b.keys]
        seen: set[Any] = set()
        repeated = [k for k in keys if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
        try:
            existing = await self.repo.get_many(list(dict.fromkeys(keys)), primary=True)
        except DalError:
            return repeated
        return list(dict.fromkeys([*existing, *repeated]))

    async def _invalidate(self, op: Op, keys: list[Any]) -> None:
        cache = self.repo._cache
        if cache is None:
            return
        t = self.table
        encs = [encode_cache_key(k if isinstance(k, tuple) and len(t.primary_key) > 1 else (k,)) for k in keys]
        await cache.invalidate(encs, inserted=op in ("insert", "upsert"))

    # -- statements per backend ---------------------------------------------------------------
    async def _apply(self, op: Op, conn: Connection, node: Node, b: _Batch) -> int:
        backend = node.backend
        if backend == "postgresql":
            return await self._apply_pg(op, conn, b)
        return await self._apply_generic(op, conn, b, mysql=backend == "mysql")

    def _stmts(self, b: _Batch) -> Any:
        return self.repo._stmts[b.target.slot]

    def _compiled(self, key: tuple[Any, ...], build: Callable[[], sa.ClauseElement], dialect: Any) -> Compiled:
        hit = self._stmt_cache.get(key)
        if hit is None:
            hit = self._stmt_cache[key] = compile_statement(build(), dialect)
        return hit

    def _processed(self, c: Compiled, b: _Batch) -> list[tuple[Any, ...]]:
        """Rows as positional parameters of ``c`` (whose names are the batch's columns)."""
        procs = c.processors
        if self._native_bool(c):
            # SQLAlchemy's Boolean processor only re-checks what validation checked.
            phys = self.table.table
            procs = tuple(
                None if isinstance(phys.c[name].type, sa.Boolean) else p
                for name, p in zip(c.names, procs, strict=True)
            )
        if not any(procs):
            return b.rows
        return [tuple(v if p is None or v is None else p(v) for v, p in zip(r, procs, strict=True)) for r in b.rows]

    def _native_bool(self, c: Compiled) -> bool:
        return all(name in self.table.table.c for name in c.names) and bool(
            getattr(self.repo._stmts[0].dialect, "supports_native_boolean", False)
        )

    async def _apply_pg(self, op: Op, conn: Connection, b: _Batch) -> int:
        st = self._stmts(b)
        phys = self.table.physical[b.target.slot]
        copy = conn.copy_records  # type: ignore[attr-defined]
        if op == "insert":
            c = st.insert(b.target.slot, b.columns)
            await copy(phys.name, b.columns, self._processed(c, b))
            return len(b.rows)
        stage = f"dal_stage_{phys.name}"
        # The target's columns without its constraints (a key-only row must fit),
        # emptied at every commit; created once per connection.
        await conn.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" ON COMMIT DELETE ROWS AS SELECT * FROM "{phys.name}" WITH NO DATA',
            (),
        )
        rows = b.rows
        if op == "upsert":  # ON CONFLICT cannot touch one row twice: the last write of a key wins
            rows = list({k: r for k, r in zip(b.keys, b.rows, strict=True)}.values())
        c_ins = st.insert(b.target.slot, b.columns)
        await copy(stage, b.columns, self._processed(c_ins, _Batch(b.target, rows, b.keys, b.columns)))
        s = sa.table(stage, *(sa.column(col) for col in b.columns))
        pk = self.table.primary_key
        dialect = st.dialect
        if op == "upsert":
            from sqlalchemy.dialects import postgresql

            def build() -> sa.ClauseElement:
                ins = postgresql.insert(phys).from_select(list(b.columns), sa.select(*(s.c[col] for col in b.columns)))
                sets = [col for col in b.columns if col not in pk]
                if sets:
                    return ins.on_conflict_do_update(index_elements=[phys.c[k] for k in pk], set_={col: ins.excluded[col] for col in sets})
                return ins.on_conflict_do_nothing(index_elements=[phys.c[k] for k in pk])

            c = self._compiled(("pg-upsert", b.target.slot, b.columns), build, dialect)
        elif op == "update":
            sets = [col for col in b.columns if col not in pk]
            c = self._compiled(
                ("pg-update", b.target.slot, b.columns),
                lambda: sa.update(phys).values({col: s.c[col] for col in sets}).where(*(phys.c[k] == s.c[k] for k in pk)),
                dialect,
            )
        else:
            c = self._compiled(
                ("pg-delete", b.target.slot),
                lambda: sa.delete(phys).where(*(phys.c[k] == s.c[k] for k in pk)),
                dialect,
            )
        return await conn.execute(c.sql, ())

    async def _apply_generic(self, op: Op, conn: Connection, b: _Batch, *, mysql: bool) -> int:
        st = self._stmts(b)
        slot = b.target.slot
        if op == "insert":
            c = st.insert(slot, b.columns)
            await conn.execute_many(c.sql, self._processed(c, b))
            return len(b.rows)
        if op == "upsert":
            c = st.upsert(slot, b.columns, b.columns)
            await conn.execute_many(c.sql, self._processed(c, b))
            return len(b.rows)  # MySQL counts an updated row twice: report rows written
        pk = self.table.primary_key
        if op == "delete":
            phys = self.table.physical[slot]
            n = len(b.rows)

            def build() -> sa.ClauseElement:
                if len(pk) == 1:
                    return sa.delete(phys).where(phys.c[pk[0]].in_([sa.bindparam(f"m{i}_0") for i in range(n)]))
                return sa.delete(phys).where(
                    sa.or_(*(sa.and_(*(phys.c[k] == sa.bindparam(f"m{i}_{j}") for j, k in enumerate(pk))) for i in range(n)))
                )

            c = self._compiled(("delete", slot, n), build, st.dialect)
            return await conn.execute(c.sql, c.params(st.get_many_params([tuple(r) for r in b.rows])))
        # update: one statement per row, all in this batch's transaction
        sets = tuple(col for col in b.columns if col not in pk)
        c = st.update(slot, sets)
        params = []
        for r in b.rows:
            values = dict(zip(b.columns, r, strict=True))
            p = st.key_params(tuple(values[k] for k in pk))
            p.update({f"v_{col}": values[col] for col in sets})
            params.append(c.params(p))
        return await conn.execute_many(c.sql, params)


async def _rollback(conn: Connection) -> None:
    try:
        await asyncio.shield(conn.rollback())
    except BaseException:
        conn.broken = True


# -- write-behind ---------------------------------------------------------------------------------


@dataclass
class _Pending:
    op: Op
    item: Any
    future: asyncio.Future[None]


class BatchWriter:
    """Coalesces single-row writes from many coroutines into batches (write-behind).

    ``await writer.insert(row)`` (also ``upsert``, ``delete``) returns when the
    row is committed, or raises that row's own error. A physical table's queue
    is flushed when it holds ``max_rows`` rows or its oldest row has waited
    ``max_delay`` seconds. A batch that fails is split in halves until the
    failing rows are isolated, so one bad row fails only its own caller. At most
    ``max_pending`` rows wait at once; further callers wait for room
    (backpressure). ``aclose()`` flushes everything accepted; after it, new
    writes raise.

    Operations on one physical table are applied in the order they were
    accepted (a batch holds consecutive operations of one kind).
    """

    def __init__(
        self,
        repo: Repository[Any],
        *,
        max_rows: int = 500,
        max_delay: float = 0.005,
        max_pending: int = 100_000,
    ) -> None:
        if max_rows < 1 or max_pending < 1 or max_delay < 0:
            raise ValidationError("max_rows and max_pending must be >= 1, max_delay >= 0")
        self._planner = BatchPlanner(repo)
        self._table = repo._table
        self.max_rows = max_rows
        self.max_delay = max_delay
        self._room = asyncio.Semaphore(max_pending)
        self._queues: dict[int, list[_Pending]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._flushing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0
        self.rows = 0

    async def __aenter__(self) -> BatchWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def insert(self, row: Mapping[str, Any] | Any) -> None:
        await self._submit("insert", row)

    async def upsert(self, row: Mapping[str, Any] | Any) -> None:
        await self._submit("upsert", row)

    async def delete(self, key: Any) -> None:
        await self._submit("delete", key)

    async def _submit(self, op: Op, item: Any) -> None:
        if self._closed:
            raise DalError("the BatchWriter is closed")
        # Validate now: a bad row fails its caller before it is queued.
        batch = self._planner.plan(op, [item], 1)[0]
        slot = batch.target.slot
        await self._room.acquire()
        if self._closed:
            self._room.release()
            raise DalError("the BatchWriter is closed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(slot, [])
        queue.append(_Pending(op, item, fut))
        if len(queue) >= self.max_rows:
            self._flush(slot)
        elif slot not in self._timers:
            self._timers[slot] = asyncio.get_running_loop().call_later(self.max_delay, self._flush, slot)
        await asyncio.shield(fut)

    def _flush(self, slot: int) -> None:
        timer = self._timers.pop(slot, None)
        if timer is not None:
            timer.cancel()
        queue = self._queues.get(slot)
        if not queue:
            return
        # A batch: the longest run of one kind of operation, at most max_rows.
        op = queue[0].op
        n = 0
        while n < len(queue) and n < self.max_rows and queue[n].op == op:
            n += 1
        items, self._queues[slot] = queue[:n], queue[n:]
        task = asyncio.ensure_future(self._write(op, items))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)
        if self._queues[slot]:
            if len(self._queues[slot]) >= self.max_rows or self._queues[slot][0].op != op:
                self._flush(slot)
            else:
                self._timers[slot] = asyncio.get_running_loop().call_later(self.max_delay, self._flush, slot)

    async def _write(self, op: Op, items: list[_Pending]) -> None:
        try:
            batch = self._planner.plan(op, [p.item for p in items], len(items))[0]
            self.batches += 1
            await self._planner.execute(op, batch)
        except DalError as exc:
            if len(items) == 1 or isinstance(exc, CommitUnknownError):
                for p in items:
                    _settle(p.future, exc)
                    self._room.release()
                return
            # Rolled back as a whole: split to isolate the rows that fail.
            half = len(items) // 2
            await asyncio.gather(self._write(op, items[:half]), self._write(op, items[half:]))
            return
        except BaseException as exc:
            for p in items:
                _settle(p.future, exc)
                self._room.release()
            raise
        self.rows += len(items)
        for p in items:
            _settle(p.future, None)
            self._room.release()

    async def flush(self) -> None:
        """Send everything queued now and wait for it."""
        for slot in list(self._queues):
            while self._queues.get(slot):
                self._flush(slot)
        while self._flushing:
            await asyncio.gather(*list(self._flushing), return_exceptions=True)

    async def aclose(self) -> None:
        """Flush every accepted row; later writes raise."""
        self._closed = True
        await self.flush()


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


async def run_many(
    repo: Repository[Any], op: Op, items: Iterable[Any], *, batch_size: int, atomic: bool, raise_on_error: bool
) -> BatchResult:
    planner = BatchPlanner(repo)
    items = list(items)
    batches = planner.plan(op, items, batch_size)
    result = await planner.run(op, batches, atomic=atomic, rows=len(items))
    if result.failures and raise_on_error:
        raise BatchError(result)
    return result
