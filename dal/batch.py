"""Batched writes: many rows per round trip, grouped per physical table.

``insert_many``, ``upsert_many``, ``update_many`` and ``delete_many`` validate
every row before any I/O (an error names the row index and the field), group
rows by physical table, and send each group in batches of ``batch_size``
rows. Each batch is one transaction on its shard database's primary, in the
fastest correct form per backend:

============  ==============================  ==================================
backend       insert                          upsert / update / delete
============  ==============================  ==================================
PostgreSQL    COPY: text format when every    COPY into a temporary staging table,
              value is an int, Decimal, bool  then one MERGE (15+; INSERT ... ON
              str or NULL, else binary        CONFLICT before, or when MERGE fails)
                                              / UPDATE ... FROM / DELETE ... USING
MySQL         multi-row INSERT (executemany)  multi-row INSERT ... ON DUPLICATE KEY
                                              UPDATE / UPDATE ... JOIN (rows) /
                                              DELETE ... IN
SQLite        executemany                     executemany
============  ==============================  ==================================

COPY text is rendered a chunk of rows at a time while the first batches are
sent, so the client's work overlaps the server's; with int shard keys the
physical table of each row (its CRC32) is worked out with its text too, so
only validation comes before the first byte is sent. Batches on different shard
databases run concurrently (``fanout_concurrency`` at a time); at most
``STREAMS_PER_DATABASE`` (two) at a time send rows to one database, and a
batch waiting for its COMMIT lets the next one send. A failed batch is
rolled back as a whole and reported with the keys it held and, for
duplicates, exactly which keys already existed; batches that committed are
reported as committed. If the connection is lost while COMMIT is in flight,
the outcome is checked on the primary (inserts: are the rows there?) before it
is reported, so a row is never reported both failed and written. With
``atomic=True`` the whole call is one transaction, allowed only when every
row lands on one shard database.

:class:`BatchWriter` coalesces single-row writes from many coroutines
(write-behind): each caller's ``await`` returns when its row is committed or
raises its own error; a failing batch is split to isolate the bad rows, so one
bad row fails only its own caller.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import operator
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from dal.backends.base import Connection, unsettled
from dal.backends.copytext import (
    Form,
    join_lines,
    text_columns,
    text_forms,
    text_lines,
    text_payload,
)
from dal.cache.keys import encode_cache_key
from dal.errors import (
    BatchError,
    CommitUnknownError,
    ConnectionUnavailableError,
    CrossShardTransactionError,
    DalError,
    DuplicateKeyError,
    InputError,
    QueryTimeoutError,
    ShardKeyError,
    ValidationError,
    outcome_unknown,
)
from dal.routing.router import Target
from dal.routing.sharding import int_slot, slots_of
from dal.schema import _default_value, as_mapping, not_a_collection
from dal.sql import CONVERT_ERRORS, Compiled, compile_statement, unconvertible

if TYPE_CHECKING:
    from dal.binding import TableBinding
    from dal.cluster import Node
    from dal.schema import LogicalTable

Op = Literal["insert", "upsert", "update", "delete"]
STREAMS_PER_DATABASE = 2  # batches of one call in flight at once on one shard database


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


@dataclass
class _Batch:
    target: Target
    rows: list[tuple[Any, ...]]  # values in `columns` order
    keys: list[Any]  # primary keys (scalars or tuples), parallel to rows
    columns: tuple[str, ...]
    # upsert: the non-key columns the caller gave, the only ones an existing row gets
    # (the others in `columns` are Python-side defaults, for a new row only)
    overwrite: tuple[str, ...] | None = None
    # input rows each row stands for (repeated keys of an upsert/update are folded into one)
    weights: list[int] | None = None
    # PostgreSQL, instead of ``rows``: the rows as COPY text, rendered as it is sent
    text: _TextFeed | None = None

    @property
    def inputs(self) -> int:
        return len(self.keys) if self.weights is None else sum(self.weights)


class _Streams:
    """Runs one call's batches: at most ``STREAMS_PER_DATABASE`` of them sending rows
    to a shard database at a time, in the order they are added, databases at once
    (within ``fanout_concurrency``). A batch hands its stream to the next once its
    statements are done, so the next one sends while its COMMIT waits for the WAL
    flush (measured 4-10 ms a batch). A task exists only for a batch that runs.

    One server gains nothing from more bulk streams into its WAL (measured, 100,000
    rows into 2 databases x 4 tables: 1 or 2 COPY streams per database ~85 ms, 4
    streams ~110 ms), while a second stream hides each small batch's round trips.
    """

    def __init__(self, planner: BatchPlanner, op: Op, result: BatchResult) -> None:
        self.planner = planner
        self.op = op
        self.result = result
        self.waiting: dict[str, collections.deque[_Batch]] = {}
        self.free: dict[str, int] = {}  # streams free, per database
        self.running: set[asyncio.Task[None]] = set()
        self.added = 0

    def add(self, b: _Batch) -> None:
        db = b.target.database
        self.waiting.setdefault(db, collections.deque()).append(b)
        self.free.setdefault(db, STREAMS_PER_DATABASE)
        self.added += 1
        self._start(db)

    def _start(self, db: str) -> None:
        queue = self.waiting[db]
        while queue and self.free[db] > 0:
            self.free[db] -= 1
            task = asyncio.ensure_future(self._run(queue.popleft()))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run(self, b: _Batch) -> None:
        db = b.target.database
        held = True

        def sent() -> None:
            nonlocal held
            if held:
                held = False
                self.free[db] += 1
                self._start(db)

        try:
            await self.planner._run_batch(self.op, b, self.result, sent)
        finally:
            sent()

    async def wait(self) -> None:
        """Until every batch added has run. Cancelled (or a batch raised), the others
        are cancelled and waited for, as a gather of them would."""
        try:
            while self.running:
                await asyncio.gather(*self.running)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for queue in self.waiting.values():
            queue.clear()
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class BatchPlanner:
    """Validates rows, groups them by physical table, and runs batches for one repository."""

    def __init__(self, binding: TableBinding) -> None:
        self.binding = binding
        self.table = binding.table
        self.cluster = binding.cluster
        self.stmts = binding.statements
        self._stmt_cache: dict[tuple[Any, ...], Compiled] = {}
        self._merge_cache: dict[tuple[Any, ...], str] = {}

    # -- planning (no I/O) --------------------------------------------------------------
    def plan(self, op: Op, items: Iterable[Any], batch_size: int, *, stream: bool = False) -> list[_Batch]:
        """Validate every row, then group them into batches (no I/O).

        ``stream``: PostgreSQL COPY text is rendered as the batches are sent, a chunk
        of rows at a time, instead of here.
        """
        out = self._plan(op, items, batch_size, stream=stream, live=False)
        assert isinstance(out, list)
        return out

    def plan_load(self, op: Op, items: Iterable[Any], batch_size: int) -> list[_Batch] | _LiveBatches:
        """:meth:`plan` with ``stream``, for :meth:`run` without ``atomic``: a load that
        goes to PostgreSQL as COPY text with int shard keys gets :class:`_LiveBatches`,
        whose rows are assigned to physical tables as they are rendered."""
        return self._plan(op, items, batch_size, stream=True, live=True)

    def _plan(self, op: Op, items: Iterable[Any], batch_size: int, *, stream: bool, live: bool) -> list[_Batch] | _LiveBatches:
        if type(batch_size) is not int or batch_size < 1:
            raise ValidationError(f"batch_size must be an int >= 1, got {batch_size!r}")
        not_a_collection(items, "keys" if op == "delete" else "rows", self.table.name)
        if op in ("insert", "upsert") and isinstance(items, list) and len(items) > 1:
            fast = self._plan_columns(items, batch_size, op, stream, live)
            if fast is not None:
                return fast
        t = self.table
        pk = t.primary_key
        # One entry per row to send: [slot, key, values by column, columns given, input rows].
        # Upserts and updates of a key that repeats are folded into its first entry, later
        # values winning column by column: what applying them one after another leaves.
        # (Run as separate rows they could land in different batches, which run
        # concurrently, or in one PostgreSQL statement, which may apply either.)
        entries: list[list[Any]] = []
        by_key: dict[Any, list[Any]] = {}
        merge = op in ("upsert", "update")
        for i, item in enumerate(items):
            try:
                slot, key, data, given = self._plan_row(op, item, i)
            except InputError as exc:
                located = _at_row(exc, i, t)
                if located is exc:
                    raise
                raise located from exc
            if merge:
                e = by_key.get(key)
                if e is not None:
                    e[2].update({c: data[c] for c in given})
                    e[3].update(given)
                    e[4] += 1
                    continue
                e = by_key[key] = [slot, key, data, set(given), 1]
            else:
                e = [slot, key, data, given, 1]
            entries.append(e)
        groups: dict[tuple[Any, ...], _Batch] = {}
        targets = self.binding.primary_targets
        for slot, key, data, given, n in entries:
            columns = pk if op == "delete" else tuple(c for c in t.columns if c in data)
            overwrite = tuple(c for c in columns if c in given and c not in pk) if op == "upsert" else None
            gk = (slot, columns, overwrite)
            b = groups.get(gk)
            if b is None:
                b = groups[gk] = _Batch(targets[slot], [], [], columns, overwrite, [])
            b.rows.append(tuple(data[c] for c in columns))
            b.keys.append(key)
            b.weights.append(n)  # type: ignore[union-attr]
        out: list[_Batch] = []
        for b in groups.values():
            w = b.weights or []
            for s in range(0, len(b.rows), batch_size):
                out.append(
                    _Batch(b.target, b.rows[s : s + batch_size], b.keys[s : s + batch_size], b.columns,
                           b.overwrite, w[s : s + batch_size])
                )
        return out

    def _plan_row(self, op: Op, item: Any, index: int) -> tuple[int, Any, dict[str, Any], Iterable[str]]:
        """Validate one row: its slot, key, values by column, and the columns the caller gave."""
        t = self.table
        pk = t.primary_key
        if op == "delete":
            slot, kv = t.locate_key(item)
            return slot, item, dict(zip(pk, kv, strict=True)), pk
        data: dict[str, Any]
        if op == "update":
            data = self._update_row(item, index)
            given: Iterable[str] = data.keys()
        else:
            data = t.row_values(item, index=index)
            given = as_mapping(item, t.name).keys() if op == "upsert" else data.keys()
        if not all(c in data for c in pk):
            raise ValidationError(f"{t.name}: row {index} lacks primary key columns {list(pk)}")
        kv = tuple(data[c] for c in pk)
        slot = 0 if t.sharder is None else t.sharder.slot(kv[t.shard_key_index])
        return slot, (kv[0] if len(kv) == 1 else kv), data, given

    def _plan_columns(
        self, rows: list[Any], batch_size: int, op: Op, stream: bool, live: bool
    ) -> list[_Batch] | _LiveBatches | None:
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
        if sum(map(len, rows)) != width * len(rows):
            return None  # (every column found below, so no row is shorter: same keys)
        names = list(keys)
        if any(type(n) is not str or n not in t.checkers for n in names):
            return None
        try:
            cols = {n: list(map(operator.itemgetter(n), rows)) for n in names}
        except KeyError:
            return None
        kinds = {n: set(map(type, cols[n])) for n in names}
        if not all(t.column_ok(n, cols[n], kinds[n]) for n in names):
            return None
        from dal.schema import _default_value

        for name, default in t.defaults:
            if name not in cols:
                cols[name] = [_default_value(default) for _ in rows]
        if any(name not in cols for name in t.required) or not all(c in cols for c in t.primary_key):
            return None
        shard = cols[t.shard_key]
        shard_kinds = kinds.get(t.shard_key) or set(map(type, shard))  # (a default fills it: not in kinds)
        if shard_kinds == {int}:
            encoded: Iterable[bytes] = map(b"%d".__mod__, shard)  # = str(key).encode()
        elif shard_kinds == {str}:
            encoded = map(str.encode, shard)
        else:
            return None
        n = t.sharder.slots
        # In declared order, the order of the compiled INSERT's parameters (the rows
        # are positional: in the caller's key order, values would land in other columns).
        columns = tuple(c for c in t.columns if c in cols)
        pk = [cols[c] for c in t.primary_key]
        keys_list: list[Any] = pk[0] if len(pk) == 1 else list(zip(*pk, strict=True))
        overwrite = None
        if op == "upsert":
            if len(set(keys_list)) != len(keys_list):
                return None  # repeated keys: folded row by row
            # the columns given; the defaults filled in above are for new rows only
            overwrite = tuple(c for c in names if c not in t.primary_key)
        # COPY text when every physical table is on PostgreSQL (else decided below,
        # for the tables the rows land in), worked out once.
        all_pg = self._on_postgres(range(n))
        forms = self._text_forms(0, columns, cols, kinds) if all_pg else None
        if live and forms is not None and shard_kinds == {int}:
            # Every row is valid by now; which physical table each goes to is grouping,
            # not validation: the CRC32s are computed a chunk at a time while the first
            # COPYs are sending (a str key's UTF-8 encoding can fail: computed here).
            at = columns.index(t.shard_key)
            if forms[at] is int.__repr__:  # (no NULLs: a shard key never is)
                return _LiveBatches(
                    self.binding.primary_targets, columns, overwrite,
                    _LiveTextSource([cols[c] for c in columns], forms, batch_size, at, keys_list, n),
                )
        try:
            slots = slots_of(encoded, n)
        except UnicodeEncodeError:
            return None  # a lone surrogate: the row-by-row path names the row
        used = sorted(set(slots))
        keys_by_slot = _by_slot(slots, n, keys_list)
        targets = self.binding.primary_targets
        if not all_pg and self._on_postgres(used):
            forms = self._text_forms(used[0], columns, cols, kinds)
        if forms is not None:
            # PostgreSQL: COPY text, rendered while the first batches are on the wire.
            feeds: dict[int, list[_TextFeed]] = {}
            out = []
            for slot in used:
                ks = keys_by_slot[slot]
                for s in range(0, len(ks), batch_size):
                    feed = _TextFeed(len(ks[s : s + batch_size]))
                    feeds.setdefault(slot, []).append(feed)
                    out.append(_Batch(targets[slot], [], ks[s : s + batch_size], columns, overwrite, text=feed))
            source = _TextSource([cols[c] for c in columns], forms, slots, batch_size, feeds)
            if not stream:
                source.run()
            return out
        records = _by_slot(slots, n, zip(*(cols[c] for c in columns)))  # noqa: B905 - columns of one length
        out = []
        for slot in used:
            recs, ks = records[slot], keys_by_slot[slot]
            for s in range(0, len(recs), batch_size):
                out.append(_Batch(targets[slot], recs[s : s + batch_size], ks[s : s + batch_size], columns, overwrite))
        return out

    def _on_postgres(self, slots: Iterable[int]) -> bool:
        stmts = self.stmts
        return all(stmts[s].dialect.name == "postgresql" for s in slots)

    def _text_forms(
        self, slot: int, columns: tuple[str, ...], cols: dict[str, list[Any]], kinds: dict[str, set[type]]
    ) -> list[Form] | None:
        """How to render rows bound for PostgreSQL (``slot``: one of their tables) as
        COPY text, when every column is sent as is (no bind processor but the redundant
        Boolean one) and every value has a text form; else ``None`` (binary records)."""
        c = self.stmts[slot].insert(slot, columns)
        phys = self.table.table
        if not all(
            p is None or isinstance(phys.c[name].type, sa.Boolean)
            for name, p in zip(c.names, c.processors, strict=True)
        ):
            return None
        return text_forms(
            [cols[name] for name in columns],
            [kinds.get(name) or set(map(type, cols[name])) for name in columns],  # (defaults: not in kinds)
        )

    def as_text(self, b: _Batch) -> None:
        """Give a PostgreSQL insert batch its rows as COPY text when every value has a
        text form (as :meth:`plan` does for bulk loads): asyncpg's binary encoder
        spends about 1 µs on each Decimal, its text about 0.15 µs."""
        if not self._on_postgres([b.target.slot]):
            return
        cols = list(map(list, zip(*b.rows)))  # noqa: B905 - rows of one shape
        forms = self._text_forms(b.target.slot, b.columns, dict(zip(b.columns, cols, strict=True)), {})
        if forms is not None:
            feed = _TextFeed(0)
            feed.chunks.append(text_payload(text_lines(cols, forms)))
            b.text = feed

    def _update_row(self, item: Any, index: int) -> dict[str, Any]:
        t = self.table
        out = t.checked_values(item, index=index)
        if not all(c in out for c in t.primary_key):
            raise ValidationError(f"{t.name}: row {index} lacks primary key columns {list(t.primary_key)}")
        if len(out) == len(t.primary_key):
            raise ValidationError(f"{t.name}: row {index} has no column to update")
        from dal.schema import _default_value

        for name, default in t.onupdate:  # Column(onupdate=...), as Repository.update applies them
            if name not in out:
                out[name] = _default_value(default)
        # key columns first, then the columns to set, in a stable order
        return {**{c: out[c] for c in t.primary_key}, **{c: v for c, v in out.items() if c not in t.primary_key}}

    # -- execution -------------------------------------------------------------------------
    async def run(self, op: Op, batches: list[_Batch] | _LiveBatches, *, atomic: bool, rows: int) -> BatchResult:
        if isinstance(batches, _LiveBatches):
            assert not atomic, "an atomic call is planned with plan(), not plan_load()"
            result = BatchResult(rows=rows)
            await self._run_live(op, batches, result)
            return result
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
            streams = _Streams(self, op, result)
            for b in batches:
                streams.add(b)
            await streams.wait()
        return result

    async def _run_live(self, op: Op, live: _LiveBatches, result: BatchResult) -> None:
        """Run the batches of ``live`` as its text rendering opens them. The rendering
        is stepped here (a chunk per turn of the loop) as well as by the COPYs that
        need more rows, so batches are found even while no COPY is pulling."""
        streams = _Streams(self, op, result)
        live.started = streams.add
        try:
            for _ in iter(live.source.step, False):
                await asyncio.sleep(0)  # let the batches opened so far start and send
        except BaseException:
            await streams.stop()
            raise
        await streams.wait()
        result.batches = streams.added

    async def _run_atomic(self, op: Op, batches: list[_Batch], result: BatchResult) -> None:
        node = self.cluster.node(batches[0].target)
        try:
            async with node.session("batch", counted=False) as conn:
                done = await self._transaction(op, conn, node, batches)
        except BaseException as exc:
            if outcome_unknown(exc):  # COMMIT sent, outcome unknown: as if committed
                await self._invalidate(op, [k for b in batches for k in b.keys], exc)
            if not isinstance(exc, DalError):
                raise
            keys = [k for b in batches for k in b.keys]
            result.failures.append(
                BatchFailure(batches[0].target.table, batches[0].target.database, keys, exc,
                             await self._culprits(op, batches, exc))
            )
            return
        for b in batches:
            result.committed_batches += 1
            result.written[b.target.database] = result.written.get(b.target.database, 0) + b.inputs
        result.affected += done
        await self._invalidate(op, [k for b in batches for k in b.keys])

    async def _run_batch(self, op: Op, b: _Batch, result: BatchResult, sent: Callable[[], None]) -> None:
        """One batch within ``fanout_concurrency``, its outcome recorded in ``result``.
        A failure's culprits are looked up after the permit is given back: the lookup
        takes one of its own (with ``fanout_concurrency=1`` it would wait forever)."""
        try:
            async with self.binding.fanout:
                affected = await self.execute(op, b, sent)
        except DalError as exc:
            if b.text is not None:
                b.text.finish()  # a live batch learns its last keys as its rows are rendered
            result.failures.append(
                BatchFailure(b.target.table, b.target.database, list(b.keys), exc, await self._culprits(op, [b], exc))
            )
            return
        result.committed_batches += 1
        result.written[b.target.database] = result.written.get(b.target.database, 0) + b.inputs
        result.affected += affected

    async def execute(self, op: Op, b: _Batch, sent: Callable[[], None] | None = None) -> int:
        """One batch in one transaction; raises the batch's error (rolled back, or never committed).
        ``sent`` is called once its statements are done, before COMMIT."""
        node = self.cluster.node(b.target)
        try:
            async with node.session("batch") as conn:
                affected = await self._transaction(op, conn, node, [b], sent)
        except BaseException as exc:
            if outcome_unknown(exc):  # COMMIT sent, outcome unknown: as if committed
                if b.text is not None:
                    b.text.finish()  # (all its keys)
                await self._invalidate(op, b.keys, exc)
            raise
        await self._invalidate(op, b.keys)
        return affected

    async def _transaction(
        self, op: Op, conn: Connection, node: Node, batches: list[_Batch], sent: Callable[[], None] | None = None
    ) -> int:
        """BEGIN, the batches, COMMIT on ``conn``; the rows matched. Raises a DalError
        (rolled back, or never committed); ``conn`` is flagged broken when suspect.
        ``sent``: called between the batches' statements and COMMIT."""
        try:
            try:
                await conn.begin()
                done = 0
                try:
                    for b in batches:
                        done += await self._apply(op, conn, node, b)
                except BaseException:
                    await _rollback(conn)
                    raise
            except Exception as exc:
                if isinstance(exc, DalError):
                    raise
                # A driver error the adapter did not map (asyncpg's InternalClientError
                # when the server's FATAL arrived on an idle connection): a lost connection.
                raise _suspect(conn, node, exc) from exc
            if sent is not None:
                sent()
            await self._commit(conn, node, op, batches)
        except BaseException as exc:
            if not isinstance(exc, DalError):
                conn.broken = True
            raise
        return done

    async def _commit(self, conn: Connection, node: Node, op: Op, batches: list[_Batch]) -> None:
        try:
            await conn.commit()
        except Exception as exc:
            if isinstance(exc, DalError) and not isinstance(exc, ConnectionUnavailableError | QueryTimeoutError):
                raise  # the server answered: rolled back
            conn.broken = True
            lost = exc if isinstance(exc, DalError) else _suspect(conn, node, exc)
            # COMMIT was sent; it may or may not have taken effect. Find out.
            if not await self._committed_after_all(node, op, batches, lost):
                if lost is exc:
                    raise
                raise lost from exc
            return

    async def _committed_after_all(self, node: Node, op: Op, batches: list[_Batch], exc: DalError) -> bool:
        """Whether an insert batch whose COMMIT was cut off is on the primary (waits for it to return)."""
        if op != "insert":
            raise CommitUnknownError(
                f"{node.name}: connection lost during COMMIT of a {op} batch: outcome unknown ({exc})", node=node.name
            ) from exc
        deadline = time.monotonic() + self.binding.in_doubt_timeout
        b = batches[0]
        t = self.table
        slot, kv = t.locate_key(b.keys[0])
        st = self.stmts[slot]
        c = st.get[slot]
        params = st.key_only(c, kv)
        while True:
            # A connection of its own: the pool may be full of callers waiting on the
            # same outage, and this answer is what frees them.
            try:
                async with node.detached("in-doubt") as conn:
                    found = await conn.fetch_one(c.sql, params)
            except Exception:  # not back yet (refused, in recovery)
                if time.monotonic() > deadline:
                    raise CommitUnknownError(
                        f"connection lost during COMMIT on {node.name} and the primary did not come back "
                        f"within {self.binding.in_doubt_timeout}s: outcome unknown",
                        node=node.name,
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
            existing = await self._existing(list(dict.fromkeys(keys)))
        except Exception:
            return repeated
        return list(dict.fromkeys([*existing, *repeated]))

    async def _existing(self, keys: list[Any]) -> list[Any]:
        """Which of ``keys`` (validated already) are on their primaries: one query per
        physical table and chunk of 500 keys."""
        t = self.table
        pk = t.primary_key
        by_slot: dict[int, list[tuple[Any, ...]]] = {}
        for key in keys:
            kv = key if len(pk) > 1 else (key,)
            by_slot.setdefault(t.shard_slot(kv), []).append(kv)
        found: list[Any] = []
        for slot, kvs in by_slot.items():
            st = self.stmts[slot]
            node = self.cluster.node(self.binding.primary_targets[slot])
            for i in range(0, len(kvs), 500):
                chunk = kvs[i : i + 500]
                c = st.get_many(slot, len(chunk))
                for r in await node.fetch_all(c.sql, c.params(st.get_many_params(chunk))):
                    found.append(t.key_of(st.row(r)))
        return found

    async def _invalidate(self, op: Op, keys: list[Any], in_doubt: BaseException | None = None) -> None:
        """After a commit of ``keys`` (or one whose outcome ``in_doubt`` left unknown: then once
        more when the server confirms the interrupted statement over, if that is under way)."""
        cache = self.binding.cache
        if cache is None:
            return
        t = self.table
        encs = [encode_cache_key(k if isinstance(k, tuple) and len(t.primary_key) > 1 else (k,)) for k in keys]
        inserted = op in ("insert", "upsert")
        await cache.invalidate(encs, inserted=inserted)
        pending = unsettled(in_doubt) if in_doubt is not None else None
        if pending is not None:
            pending.add_done_callback(lambda _: cache.runtime.spawn(cache.invalidate(encs, inserted=inserted)))

    # -- statements per backend ---------------------------------------------------------------
    async def _apply(self, op: Op, conn: Connection, node: Node, b: _Batch) -> int:
        backend = node.backend
        if backend == "postgresql":
            return await self._apply_pg(op, conn, b)
        return await self._apply_generic(op, conn, b, mysql=backend == "mysql")

    def _stmts(self, b: _Batch) -> Any:
        return self.stmts[b.target.slot]

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
        try:
            return [tuple(v if p is None or v is None else p(v) for v, p in zip(r, procs, strict=True)) for r in b.rows]
        except CONVERT_ERRORS as exc:
            converted = [name for name, p in zip(c.names, procs, strict=True) if p is not None]
            raise unconvertible(" or ".join(converted), exc) from exc

    def _native_bool(self, c: Compiled) -> bool:
        # Values were validated as bool, which every driver sends as it should
        # (asyncpg natively, PyMySQL and sqlite3 as 1/0): the processor is redundant.
        return all(name in self.table.table.c for name in c.names)

    async def _copy(self, conn: Connection, table: str, b: _Batch) -> None:
        """COPY the batch's rows into ``table``: as text when planned so, else binary records."""
        copy: Any = conn
        if b.text is not None:
            await copy.copy_text(table, b.columns, b.text)
            return
        c = self._stmts(b).insert(b.target.slot, b.columns)
        await copy.copy_records(table, b.columns, self._processed(c, b))

    async def _apply_pg(self, op: Op, conn: Connection, b: _Batch) -> int:
        st = self._stmts(b)
        phys = self.table.physical[b.target.slot]
        if op == "insert":
            await self._copy(conn, phys.name, b)
            return b.inputs
        stage = f"dal_stage_{phys.name}"
        # The target's columns without its constraints (a key-only row must fit),
        # emptied at every commit; created once per connection. Emptied here too:
        # an atomic call stages several batches of one table in one transaction.
        # (One statement per call: the execution seam counts the statements it sends.)
        await conn.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" ON COMMIT DELETE ROWS AS SELECT * FROM "{phys.name}" WITH NO DATA',
            (),
        )
        await conn.execute(f'DELETE FROM "{stage}"', ())
        if op == "upsert" and b.text is None:
            # ON CONFLICT cannot touch one row twice: the last write of a key wins
            # (text lines are planned only for unique keys)
            rows = list({k: r for k, r in zip(b.keys, b.rows, strict=True)}.values())
            b = _Batch(b.target, rows, b.keys, b.columns, b.overwrite)
        await self._copy(conn, stage, b)
        s = sa.table(stage, *(sa.column(col) for col in b.columns))
        pk = self.table.primary_key
        dialect = st.dialect
        if op == "upsert":
            from sqlalchemy.dialects import postgresql

            def build() -> sa.ClauseElement:
                ins = postgresql.insert(phys).from_select(list(b.columns), sa.select(*(s.c[col] for col in b.columns)))
                sets = [col for col in (b.columns if b.overwrite is None else b.overwrite) if col not in pk]
                if sets:
                    return ins.on_conflict_do_update(index_elements=[phys.c[k] for k in pk], set_={col: ins.excluded[col] for col in sets})
                return ins.on_conflict_do_nothing(index_elements=[phys.c[k] for k in pk])

            c = self._compiled(("pg-upsert", b.target.slot, b.columns, b.overwrite), build, dialect)
            if getattr(conn, "server_version", 0) >= 15:
                await self._merge(conn, b, stage, c.sql)
                return b.inputs
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
        affected = await conn.execute(c.sql, ())
        return b.inputs if op == "upsert" else affected

    async def _merge(self, conn: Connection, b: _Batch, stage: str, on_conflict: str) -> None:
        """Upsert the staged rows with MERGE (PostgreSQL 15+), else with ``on_conflict``.

        MERGE joins the staged rows to the table once, where INSERT ... ON CONFLICT
        makes a speculative insertion per row: measured, 100,000 rows half of them
        existing, ~0.7x the time. But a key inserted concurrently by another
        transaction fails MERGE's insert, where ON CONFLICT takes it as a conflict: on
        any error but a lost connection the MERGE is rolled back to a savepoint and
        the batch upserted with ``on_conflict``, so the outcome is ON CONFLICT's.
        """
        sql = self._merge_sql(b, stage)
        await conn.execute("SAVEPOINT dal_merge", ())
        try:
            await conn.execute(sql, ())
        except DalError as exc:
            if isinstance(exc, ConnectionUnavailableError) or conn.broken:
                raise
            await conn.execute("ROLLBACK TO SAVEPOINT dal_merge", ())
            await conn.execute(on_conflict, ())

    def _merge_sql(self, b: _Batch, stage: str) -> str:
        key = (b.target.slot, b.columns, b.overwrite)
        hit = self._merge_cache.get(key)
        if hit is None:
            # Identifiers only: the declared table and column names, quoted by the dialect.
            q = self._stmts(b).dialect.identifier_preparer.quote
            pk = self.table.primary_key
            phys = q(self.table.physical[b.target.slot].name)
            sets = [c for c in (b.columns if b.overwrite is None else b.overwrite) if c not in pk]
            on = " AND ".join(f"t.{q(k)} = s.{q(k)}" for k in pk)
            matched = (
                f" WHEN MATCHED THEN UPDATE SET {', '.join(f'{q(c)} = s.{q(c)}' for c in sets)}" if sets else ""
            )
            cols = ", ".join(q(c) for c in b.columns)
            values = ", ".join(f"s.{q(c)}" for c in b.columns)
            sql = (
                f"MERGE INTO {phys} AS t USING {q(stage)} AS s ON {on}{matched}"
                f" WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({values})"
            )
            hit = self._merge_cache[key] = sql
        return hit

    async def _apply_generic(self, op: Op, conn: Connection, b: _Batch, *, mysql: bool) -> int:
        st = self._stmts(b)
        slot = b.target.slot
        if op == "insert":
            c = st.insert(slot, b.columns)
            await conn.execute_many(c.sql, self._processed(c, b))
            return b.inputs
        if op == "upsert":
            c = st.upsert(slot, b.columns, b.columns if b.overwrite is None else b.overwrite)
            await conn.execute_many(c.sql, self._processed(c, b))
            return b.inputs  # MySQL counts an updated row twice: report rows written
        pk = self.table.primary_key
        if op == "delete":
            c = st.delete_many(slot, len(b.rows))
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


class _TextFeed:
    """One batch's COPY text: an async iterable of chunks for asyncpg's ``copy_to_table``.

    When it has no chunk ready it has its :class:`_TextSource` render the next rows
    (synchronously): rendering is driven by the COPYs that are sending, and the
    batches still queued collect their chunks meanwhile. It ends once ``closed`` (its
    batch has all its rows) and every chunk is taken.
    """

    __slots__ = ("chunks", "closed", "missing", "source")

    def __init__(self, rows: int) -> None:
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.missing = rows  # rows not rendered yet (a live batch: unknown, 0)
        self.closed = rows == 0
        self.source: _TextSource | None = None

    def __aiter__(self) -> _TextFeed:
        return self

    async def __anext__(self) -> memoryview:
        while not self.chunks:
            if self.closed or self.source is None:
                raise StopAsyncIteration
            if not self.source.step():
                raise RuntimeError("COPY text source ended before a batch had its rows")  # a bug, not bad input
            # Let the other COPYs send what this chunk gave them (and start): asyncpg
            # writes to a socket that takes all, so without this, the first COPY would
            # render every chunk before any other stream began.
            await asyncio.sleep(0)
        return self.chunks.popleft()

    def finish(self) -> None:
        """Render until this batch has all its rows (and keys)."""
        while not self.closed and self.source is not None and self.source.step():
            pass


class _TextSource:
    """Renders a call's rows as COPY text ``CHUNK`` rows at a time, in the caller's
    order (where the values lie in memory: rendered after grouping by slot, the same
    work costs twice), handing each batch the lines of its rows as they come."""

    CHUNK = 8192

    def __init__(
        self, columns: list[list[Any]], forms: list[Form], slots: list[int], batch_size: int,
        feeds: dict[int, list[_TextFeed]],
    ) -> None:
        self.columns = columns
        self.forms = forms
        self.slots = slots
        self.batch_size = batch_size
        self.feeds = feeds
        self.filled = dict.fromkeys(feeds, 0)  # rows of each slot rendered so far
        self.pos = 0
        self.total = len(columns[0])
        for fs in feeds.values():
            for f in fs:
                f.source = self

    def step(self) -> bool:
        """Render the next chunk of rows; ``False`` when every row is rendered already."""
        start, end = self.pos, min(self.pos + self.CHUNK, self.total)
        if start >= end:
            return False
        self.pos = end
        self._hand_out(start, end, text_lines([c[start:end] for c in self.columns], self.forms))
        return True

    def _hand_out(self, start: int, end: int, lines: list[str]) -> None:
        size = self.batch_size
        by_slot = _by_slot(self.slots[start:end], max(self.feeds) + 1, lines)
        for slot, feeds in self.feeds.items():
            ls = by_slot[slot]
            done = self.filled[slot]
            i = 0
            while i < len(ls):
                feed = feeds[done // size]
                part = ls[i : i + size - done % size]
                feed.chunks.append(text_payload(part))
                feed.missing -= len(part)
                feed.closed = feed.missing == 0
                done += len(part)
                i += len(part)
            self.filled[slot] = done

    def run(self) -> None:
        """Render every row now."""
        while self.step():
            pass


class _LiveTextSource(_TextSource):
    """A :class:`_TextSource` that also works out which physical table each row goes
    to, a chunk at a time (the CRC32 of its int shard key), opening a batch for every
    ``batch_size`` rows of a table as they come (``open_batch``) and filling its keys.
    """

    def __init__(
        self, columns: list[list[Any]], forms: list[Form], batch_size: int, shard_at: int, keys: list[Any],
        slots: int,
    ) -> None:
        super().__init__(columns, forms, [], batch_size, {})
        self.shard_at = shard_at  # the shard key's column, ints
        self.keys = keys
        self.n = slots
        self.open: dict[int, _Batch] = {}  # per slot, its batch still taking rows
        self.open_batch: Callable[[int], _Batch] = _no_batch

    def step(self) -> bool:
        start, end = self.pos, min(self.pos + self.CHUNK, self.total)
        if start >= end:
            return False
        self.pos = end
        texts = text_columns([c[start:end] for c in self.columns], self.forms)
        # = the sharder's slot of each key (str(key).encode(), CRC32 IEEE, mod n), from
        # the key's COPY text (int.__repr__), which is rendered anyway
        n = self.n
        slots = slots_of(map(str.encode, texts[self.shard_at]), n)
        self._place(start, end, join_lines(texts), slots)
        return True

    def _place(self, start: int, end: int, lines: list[str], slots: list[int]) -> None:
        """Hand rows ``start:end`` (their lines and slots) to their tables' open batches."""
        n = self.n
        lines_by = _by_slot(slots, n, lines)
        keys_by = _by_slot(slots, n, self.keys[start:end])
        size = self.batch_size
        for slot in range(n):
            ls, ks = lines_by[slot], keys_by[slot]
            i = 0
            while i < len(ls):
                b = self.open.get(slot)
                if b is None:
                    b = self.open[slot] = self.open_batch(slot)
                feed = b.text
                assert feed is not None
                room = size - len(b.keys)
                feed.chunks.append(text_payload(ls[i : i + room]))
                b.keys.extend(ks[i : i + room])
                i += room
                if len(b.keys) == size:
                    feed.closed = True
                    del self.open[slot]
        if end == self.total:
            for b in self.open.values():
                b.text.closed = True  # type: ignore[union-attr]
            self.open.clear()


def _no_batch(slot: int) -> _Batch:
    raise RuntimeError("a live COPY text source was stepped before its batches were wired")


def _no_start(b: _Batch) -> None:
    raise RuntimeError("a live batch was opened before anything would run it")  # (it would be lost)


class _LiveBatches:
    """A bulk load planned before its rows' physical tables are known: its
    :class:`_LiveTextSource` opens the batches as it renders the rows, and each is
    handed to ``started`` (:meth:`BatchPlanner._run_live` runs it)."""

    def __init__(
        self, targets: Sequence[Target], columns: tuple[str, ...], overwrite: tuple[str, ...] | None,
        source: _LiveTextSource,
    ) -> None:
        self.targets = targets
        self.columns = columns
        self.overwrite = overwrite
        self.source = source
        self.started: Callable[[_Batch], None] = _no_start
        source.open_batch = self._open

    def _open(self, slot: int) -> _Batch:
        feed = _TextFeed(0)
        feed.closed = False
        feed.source = self.source
        b = _Batch(self.targets[slot], [], [], self.columns, self.overwrite, text=feed)
        self.started(b)
        return b


def _by_slot(slots: list[int], n: int, values: Iterable[Any]) -> list[list[Any]]:
    """``values`` split into ``n`` lists by their slot, in order (a C-level loop: no per-row bytecode)."""
    out: list[list[Any]] = [[] for _ in range(n)]
    collections.deque(map(operator.call, map([o.append for o in out].__getitem__, slots), values), maxlen=0)
    return out


def _suspect(conn: Connection, node: Node, exc: BaseException) -> ConnectionUnavailableError:
    conn.broken = True
    return ConnectionUnavailableError(f"{node.name}: connection lost or in an unknown state: {type(exc).__name__}: {exc}")


def _at_row(exc: InputError, index: int, table: LogicalTable) -> InputError:
    """``exc`` naming the row index (and, for a shard key, the column) when it does not yet."""
    msg = str(exc)
    if f"(row {index})" in msg or f"row {index} " in msg:
        return exc
    if isinstance(exc, ShardKeyError) and not msg.startswith(f"{table.name}."):
        msg = f"{table.name}.{table.shard_key}: {msg}"
    return type(exc)(f"{msg} (row {index})")


async def _rollback(conn: Connection) -> None:
    try:
        await asyncio.shield(conn.rollback())
    except BaseException:
        conn.broken = True


# -- write-behind ---------------------------------------------------------------------------------


class _Pending:
    """One accepted row of a BatchWriter: its caller's future, and what its batch needs."""

    __slots__ = ("future", "item", "key", "values")

    def __init__(self, future: asyncio.Future[None], item: Any, key: Any, values: tuple[Any, ...]) -> None:
        self.future = future
        self.item = item
        self.key = key
        self.values = values  # validated, in the shape's column order


Shape = tuple[tuple[str, ...], tuple[str, ...] | None]
"""(columns, overwrite): the rows of one shape make one statement."""


class _Run:
    """Consecutive operations of one kind and one shape on one physical table, at most
    ``max_rows``: the batch they will be sent in."""

    __slots__ = ("items", "op", "shape")

    def __init__(self, op: Op, shape: Shape, first: _Pending) -> None:
        self.op = op
        self.shape = shape
        self.items = [first]


class _TableQueue:
    """One physical table's accepted rows, in order."""

    __slots__ = ("busy", "rows", "runs", "timer")

    def __init__(self) -> None:
        self.runs: collections.deque[_Run] = collections.deque()
        self.rows = 0  # in `runs`
        self.busy = False  # a batch of this table is in flight
        self.timer: asyncio.TimerHandle | None = None


class _RowShape:
    """How a dict row with one sequence of keys is validated and queued.

    Worked out once per key sequence, so accepting a row costs one generated
    read-and-check of its values (:meth:`LogicalTable.row_reader`) and the CRC32
    of its shard key."""

    __slots__ = ("defaults", "insert", "key", "read", "shard", "upsert")

    def __init__(self, table: LogicalTable, names: tuple[str, ...], present: set[str]) -> None:
        pk = table.primary_key
        columns = tuple(c for c in table.columns if c in present)
        given = tuple(c for c in columns if c in names)  # in declared order
        self.read = table.row_reader(given)
        # Python-side defaults of the columns not given, by position in `columns`, ascending
        self.defaults = tuple(sorted((columns.index(n), d) for n, d in table.defaults if n not in names))
        self.key = operator.itemgetter(*(columns.index(c) for c in pk))  # a scalar for a 1-column key
        self.shard = -1 if table.shard_key is None else columns.index(table.shard_key)
        self.insert: Shape = (columns, None)
        self.upsert: Shape = (columns, tuple(c for c in columns if c in names and c not in pk))


_SHAPES = 64  # key sequences of dict rows a BatchWriter keeps a _RowShape of


class BatchWriter:
    """Coalesces single-row writes from many coroutines into batches (write-behind).

    ``await writer.insert(row)`` (also ``upsert``, ``delete``) returns when the
    row is committed, or raises that row's own error. An idle physical table's
    queue is sent when it holds ``max_rows`` rows or its oldest row has waited
    ``max_delay`` seconds; while one batch of a table is in flight, the rows that
    arrive form its next batch (up to ``max_rows``), so batches grow with the load. A batch that fails is split in halves until the
    failing rows are isolated, so one bad row fails only its own caller (a
    lost connection fails the whole batch: no row caused it). At most
    ``max_pending`` rows wait at once; further callers wait for room
    (backpressure). ``aclose()`` flushes everything accepted; after it, new
    writes raise.

    Operations on one physical table are applied in the order they were
    accepted: a batch holds consecutive operations of one kind (and one set of
    columns), and a table's batches run one after another.
    """

    def __init__(
        self,
        binding: TableBinding,
        *,
        max_rows: int = 500,
        max_delay: float = 0.005,
        max_pending: int = 100_000,
    ) -> None:
        if max_rows < 1 or max_pending < 1 or max_delay < 0:
            raise ValidationError("max_rows and max_pending must be >= 1, max_delay >= 0")
        self._planner = BatchPlanner(binding)
        self._table = binding.table
        self._targets = binding.primary_targets
        self.max_rows = max_rows
        self.max_delay = max_delay
        self._max_pending = max_pending
        # Backpressure: rows accepted and not yet settled (plus room handed to a waiter
        # that has not taken it yet), and the callers waiting for room, in arrival order.
        # While anyone waits, _held >= max_pending: a new caller queues up behind them.
        self._held = 0
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._queues = [_TableQueue() for _ in self._table.placements]  # by slot
        self._shapes: dict[tuple[str, ...], _RowShape] = {}
        self._delete_shape: Shape = (self._table.primary_key, None)
        self._flushing: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first write
        self._slots = 0 if self._table.sharder is None else self._table.sharder.slots
        self._closed = False
        self.batches = 0
        self.rows = 0

    async def __aenter__(self) -> BatchWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # insert, upsert and delete: validate (a bad row fails its caller before it is
    # queued), wait for room when max_pending rows wait, queue, wait for the commit.
    # Written out in each rather than shared, to save a coroutine per row.
    async def insert(self, row: Mapping[str, Any] | Any) -> None:
        # The common case under load, written out: a dict of a known key sequence with
        # no defaults to fill, an int shard key, room to queue, and its table's last
        # batch open to it. No call per row but the check of its values (about 5% of
        # the writer's time per row, measured); anything else goes through _queue.
        if (
            type(row) is dict
            and (shape := self._shapes.get(tuple(row))) is not None
            and not shape.defaults
            and self._held < self._max_pending
            and not self._room_waiters
            and not self._closed
            and (loop := self._loop) is not None
            and (values := shape.read(row)) is not None
            and type(v := values[shape.shard]) is int
            and self._slots
        ):
            slot = int_slot(v, self._slots)
            q = self._queues[slot]
            if q.runs and (run := q.runs[-1]).shape is shape.insert and run.op == "insert" and len(run.items) < self.max_rows:
                self._held += 1
                fut: asyncio.Future[None] = loop.create_future()
                run.items.append(_Pending(fut, row, shape.key(values), values))
                q.rows += 1
                if not q.busy:
                    self._due(slot, q, loop)
                await fut
                return
        accepted = self._accept("insert", row)
        if self._held >= self._max_pending or self._room_waiters:
            await self._wait_room()
        # Not shielded: a caller that stops waiting leaves its accepted row queued.
        await self._queue("insert", row, accepted)

    async def upsert(self, row: Mapping[str, Any] | Any) -> None:
        accepted = self._accept("upsert", row)
        if self._held >= self._max_pending or self._room_waiters:
            await self._wait_room()
        await self._queue("upsert", row, accepted)

    async def delete(self, key: Any) -> None:
        accepted = self._accept("delete", key)
        if self._held >= self._max_pending or self._room_waiters:
            await self._wait_room()
        await self._queue("delete", key, accepted)

    def _queue(self, op: Op, item: Any, accepted: tuple[int, Any, tuple[Any, ...], Shape]) -> asyncio.Future[None]:
        """Queue an accepted row (its room taken); the future its caller waits on."""
        slot, key, values, shape = accepted
        self._held += 1
        # Of the writer's loop, named: asyncio.Future() looks the running loop up for
        # every row (on CPython 3.11 that is a getpid() system call).
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        p = _Pending(fut, item, key, values)
        q = self._queues[slot]
        runs = q.runs
        if runs:
            run = runs[-1]
            if (run.shape is shape or run.shape == shape) and run.op == op and len(run.items) < self.max_rows:
                run.items.append(p)
            else:
                runs.append(_Run(op, shape, p))
        else:
            runs.append(_Run(op, shape, p))
        q.rows += 1
        if not q.busy:
            self._due(slot, q, loop)
        return fut

    def _due(self, slot: int, q: _TableQueue, loop: asyncio.AbstractEventLoop) -> None:
        """An idle table's queue: send it when full, else once its oldest row waited max_delay."""
        if q.rows >= self.max_rows:
            self._drain(slot)
        elif q.timer is None:
            q.timer = loop.call_later(self.max_delay, self._drain, slot)

    def _accept(self, op: Op, item: Any) -> tuple[int, Any, tuple[Any, ...], Shape]:
        """Validate one row (or key): its slot, key, values in the shape's column order, and shape.

        A dict takes its key sequence's fast path (:class:`_RowShape`), which checks
        what :meth:`LogicalTable.row_values` checks. A row it does not pass (or that
        is no dict) goes through :meth:`BatchPlanner._plan_row`, as before: that
        raises the row's error, naming the field."""
        if self._closed:
            raise DalError("the BatchWriter is closed")
        t = self._table
        if op == "delete":
            slot, kv = t.locate_key(item)
            return slot, item, kv, self._delete_shape
        if type(item) is dict:
            names = tuple(item)
            shape = self._shapes.get(names)
            if shape is None:
                shape = self._shape_for(names)
            if shape is not None and (values := shape.read(item)) is not None:
                if shape.defaults:
                    filled = list(values)
                    for pos, default in shape.defaults:
                        filled.insert(pos, _default_value(default))
                    values = tuple(filled)
                sharder = t.sharder
                if sharder is None:
                    slot = 0
                else:
                    v = values[shape.shard]
                    slot = int_slot(v, sharder.slots) if type(v) is int else self._slot(v)
                if slot >= 0:
                    return slot, shape.key(values), values, shape.insert if op == "insert" else shape.upsert
        slot, key, data, given = self._planner._plan_row(op, item, 0)
        columns = tuple(c for c in t.columns if c in data)
        overwrite = tuple(c for c in columns if c in given and c not in t.primary_key) if op == "upsert" else None
        return slot, key, tuple(data[c] for c in columns), (columns, overwrite)

    def _slot(self, shard_value: Any) -> int:
        """The slot of a shard key, or -1 when it is not a valid one (_plan_row raises it)."""
        try:
            return self._table.sharder.slot(shard_value)  # type: ignore[union-attr]
        except ShardKeyError:
            return -1

    def _shape_for(self, names: tuple[Any, ...]) -> _RowShape | None:
        """The fast path of dict rows with these keys (in this order), kept for the next
        rows; ``None``: check them row by row (also when _SHAPES shapes are kept)."""
        t = self._table
        if len(self._shapes) >= _SHAPES or not names:
            return None
        if not all(type(n) is str and n in t.checkers for n in names):
            return None
        present = set(names).union(n for n, _ in t.defaults)
        if not all(c in present for c in (*t.required, *t.primary_key)):
            return None
        shape = self._shapes[names] = _RowShape(t, names, present)
        return shape

    async def _wait_room(self) -> None:
        """Wait for room for one row: _release hands it over (counts it in _held, for
        nobody to take it meanwhile), and _queue, called next, counts it."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._room_waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release(1)  # room was handed to this caller, who no longer takes it
            else:
                with contextlib.suppress(ValueError):
                    self._room_waiters.remove(fut)
            raise
        self._held -= 1  # _queue takes it
        if self._closed:
            self._release(0)
            raise DalError("the BatchWriter is closed")

    def _release(self, n: int) -> None:
        """``n`` rows settled: hand their room to the callers waiting for it, in order."""
        self._held -= n
        waiters = self._room_waiters
        while waiters and self._held < self._max_pending:
            w = waiters.popleft()
            if not w.done():
                self._held += 1
                w.set_result(None)

    def _drain(self, slot: int) -> None:
        """Start writing a table's queue, unless a batch of it is in flight already."""
        q = self._queues[slot]
        if q.timer is not None:
            q.timer.cancel()
            q.timer = None
        if q.busy or not q.runs:
            return
        q.busy = True
        task = asyncio.ensure_future(self._drain_loop(slot, q))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _drain_loop(self, slot: int, q: _TableQueue) -> None:
        # One batch of a table at a time, in order: rows that arrive while one is in
        # flight form the next (so batches grow with the load, not with max_delay).
        # A batch: the longest run of one kind of operation on one set of columns (one
        # statement), at most max_rows: the runs _queue cuts as it accepts rows.
        try:
            runs = q.runs
            while runs:
                run = runs.popleft()
                q.rows -= len(run.items)
                await self._write(run.op, run.items, slot, run.shape)
        finally:
            q.busy = False

    async def _write(self, op: Op, items: list[_Pending], slot: int, shape: Shape) -> None:
        try:
            if op == "upsert":  # one batch, repeated keys folded as upsert_many does
                (batch,) = self._planner.plan(op, [p.item for p in items], len(items))
            else:  # validated on submit: one shape, one physical table
                batch = _Batch(self._targets[slot], [p.values for p in items], [p.key for p in items], shape[0])
                if op == "insert":
                    self._planner.as_text(batch)
            self.batches += 1
            await self._planner.execute(op, batch)
        except DalError as exc:
            # A lost connection (or an unknown COMMIT outcome) is no row's fault: splitting
            # would not isolate anything, only multiply the attempts on a server that is
            # gone (starving the lookups of in-doubt COMMITs of connections).
            if len(items) == 1 or isinstance(exc, ConnectionUnavailableError | CommitUnknownError | QueryTimeoutError):
                self._settle_all(items, exc)
                return
            # Rolled back as a whole: split to isolate the rows that fail, in order
            # (of two inserts of one key, the first accepted wins).
            half = len(items) // 2
            await self._write(op, items[:half], slot, shape)
            await self._write(op, items[half:], slot, shape)
            return
        except BaseException as exc:
            self._settle_all(items, exc)
            raise
        self.rows += len(items)
        for p in items:
            fut = p.future
            if not fut.done():  # (a caller that stopped waiting)
                fut.set_result(None)
        self._release(len(items))

    def _settle_all(self, items: list[_Pending], exc: BaseException) -> None:
        for p in items:
            _settle(p.future, exc)
        self._release(len(items))

    async def flush(self) -> None:
        """Send everything queued now and wait for it. Cancelling the wait (a timeout
        around flush()) leaves the writes going: their callers still get their outcome."""
        for slot in range(len(self._queues)):
            self._drain(slot)
        while self._flushing:
            await asyncio.gather(*map(asyncio.shield, list(self._flushing)), return_exceptions=True)

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
    binding: TableBinding, op: Op, items: Iterable[Any], *, batch_size: int, atomic: bool, raise_on_error: bool
) -> BatchResult:
    planner = BatchPlanner(binding)
    not_a_collection(items, "keys" if op == "delete" else "rows", binding.table.name)
    items = list(items)
    if atomic:
        batches: list[_Batch] | _LiveBatches = planner.plan(op, items, batch_size, stream=True)
    else:
        batches = planner.plan_load(op, items, batch_size)
    result = await planner.run(op, batches, atomic=atomic, rows=len(items))
    if result.failures and raise_on_error:
        raise BatchError(result)
    return result
