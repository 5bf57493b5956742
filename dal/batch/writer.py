"""Write-behind: :class:`BatchWriter` coalesces single-row writes from many coroutines.

Each caller's ``await`` returns when its row is committed or raises its own
error; a failing batch is split to isolate the bad rows, so one bad row fails
only its own caller. Every batch it sends is reported as a
:class:`~dal.events.BatchFlushed` event (kind ``batch``), with why it was sent
and how it ended.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from dal.batch.planning import BatchPlanner
from dal.batch.results import Batch, Op
from dal.batch.running import BatchRunner
from dal.errors import (
    CommitUnknownError,
    ConnectionUnavailableError,
    DalError,
    QueryTimeoutError,
    ShardKeyError,
    ValidationError,
)
from dal.events import BatchFlushed, outcome_of
from dal.routing.sharding import int_slot
from dal.schema import default_value

if TYPE_CHECKING:
    from dal.binding import TableBinding
    from dal.schema import LogicalTable

Reason = Literal["size", "delay", "flush"]
"""Why a table's batch was sent (:class:`~dal.events.BatchFlushed`): it holds ``max_rows``
rows; its rows waited (``max_delay``, or for the table's batch in flight before it);
``flush()``/``aclose()`` asked for everything queued."""


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

    __slots__ = ("busy", "reason", "rows", "runs", "timer")

    def __init__(self) -> None:
        self.runs: collections.deque[_Run] = collections.deque()
        self.rows = 0  # in `runs`
        self.busy = False  # a batch of this table is in flight
        self.timer: asyncio.TimerHandle | None = None
        self.reason: Reason = "delay"  # why its next batch goes (unless it is full)


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

    Each batch sent (a split half too) is reported to the layer's ``batch``
    listeners as a :class:`~dal.events.BatchFlushed`.
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
        self._runner = BatchRunner(binding)
        self._events = binding.events
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
            self._drain(slot, "size")
        elif q.timer is None:
            q.timer = loop.call_later(self.max_delay, self._drain, slot)

    def _accept(self, op: Op, item: Any) -> tuple[int, Any, tuple[Any, ...], Shape]:
        """Validate one row (or key): its slot, key, values in the shape's column order, and shape.

        A dict takes its key sequence's fast path (:class:`_RowShape`), which checks
        what :meth:`LogicalTable.row_values` checks. A row it does not pass (or that
        is no dict) goes through :meth:`BatchPlanner.plan_row`, as before: that
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
                        filled.insert(pos, default_value(default))
                    values = tuple(filled)
                sharder = t.sharder
                if sharder is None:
                    slot = 0
                else:
                    v = values[shape.shard]
                    slot = int_slot(v, sharder.slots) if type(v) is int else self._slot(v)
                if slot >= 0:
                    return slot, shape.key(values), values, shape.insert if op == "insert" else shape.upsert
        slot, key, data, given = self._planner.plan_row(op, item, 0)
        columns = tuple(c for c in t.columns if c in data)
        overwrite = tuple(c for c in columns if c in given and c not in t.primary_key) if op == "upsert" else None
        return slot, key, tuple(data[c] for c in columns), (columns, overwrite)

    def _slot(self, shard_value: Any) -> int:
        """The slot of a shard key, or -1 when it is not a valid one (plan_row raises it)."""
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

    def _drain(self, slot: int, reason: Reason = "delay") -> None:
        """Start writing a table's queue for ``reason`` (by default the timer's: its oldest
        row waited ``max_delay``), unless a batch of it is in flight already; a flush
        asked for meanwhile is noted, for the batches after that one."""
        q = self._queues[slot]
        if q.timer is not None:
            q.timer.cancel()
            q.timer = None
        if q.busy or not q.runs:
            if reason == "flush" and q.runs:
                q.reason = reason
            return
        q.reason = reason
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
                reason = "size" if len(run.items) >= self.max_rows else q.reason
                if q.reason != "flush":
                    q.reason = "delay"  # the rows queued meanwhile wait for this batch
                await self._write(run.op, run.items, slot, run.shape, reason)
        finally:
            q.busy = False

    async def _write(self, op: Op, items: list[_Pending], slot: int, shape: Shape, reason: Reason) -> None:
        try:
            if op == "upsert":  # one batch, repeated keys folded as upsert_many does
                (batch,) = self._planner.plan(op, [p.item for p in items], len(items))
            else:  # validated on submit: one shape, one physical table
                batch = Batch(self._targets[slot], [p.values for p in items], [p.key for p in items], shape[0])
                if op == "insert":
                    self._planner.as_text(batch)
            self.batches += 1
            try:
                await self._runner.execute(op, batch)
            except BaseException as exc:
                self._flushed(slot, len(items), reason, exc)
                raise
            self._flushed(slot, len(items), reason, None)
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
            await self._write(op, items[:half], slot, shape, reason)
            await self._write(op, items[half:], slot, shape, reason)
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

    def _flushed(self, slot: int, rows: int, reason: Reason, exc: BaseException | None) -> None:
        """Report a batch sent (``exc``: what it raised) to the ``batch`` listeners."""
        hub = self._events
        if hub.batch:
            hub.emit(BatchFlushed(self._table.name, self._targets[slot].database, rows, reason,
                                  "ok" if exc is None else outcome_of(exc)))

    def _settle_all(self, items: list[_Pending], exc: BaseException) -> None:
        for p in items:
            _settle(p.future, exc)
        self._release(len(items))

    async def flush(self) -> None:
        """Send everything queued now and wait for it. Cancelling the wait (a timeout
        around flush()) leaves the writes going: their callers still get their outcome."""
        for slot in range(len(self._queues)):
            self._drain(slot, "flush")
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
