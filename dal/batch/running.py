"""Running a call's batches: each one transaction on its shard database's primary.

Batches on different shard databases run concurrently (``fanout_concurrency`` at
a time); at most ``STREAMS_PER_DATABASE`` (two) at a time send rows to one
database, and a batch waiting for its COMMIT lets the next one send. A failed
batch is rolled back as a whole and reported with the keys it held and, for
duplicates, exactly which keys already existed; batches that committed are
reported as committed. If the connection is lost while COMMIT is in flight, the
outcome is checked on the primary before it is reported
(:mod:`dal.batch.in_doubt`). With ``atomic=True`` the whole call is one
transaction, allowed only when every row lands on one shard database.

:func:`run_many` is what the repository's ``*_many`` methods call.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from dal.backends.base import Connection
from dal.batch.dialects import BatchSql
from dal.batch.in_doubt import PrimaryLookups
from dal.batch.planning import BatchPlanner, LiveBatches
from dal.batch.results import Batch, BatchFailure, BatchResult, Op
from dal.cache.keys import encode_cache_key
from dal.errors import (
    BatchError,
    ConnectionUnavailableError,
    CrossShardTransactionError,
    DalError,
    QueryTimeoutError,
    outcome_unknown,
)
from dal.schema import not_a_collection

if TYPE_CHECKING:
    from dal.binding import TableBinding
    from dal.cluster import Node

STREAMS_PER_DATABASE = 2  # batches of one call in flight at once on one shard database


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

    def __init__(self, runner: BatchRunner, op: Op, result: BatchResult) -> None:
        self.runner = runner
        self.op = op
        self.result = result
        self.waiting: dict[str, collections.deque[Batch]] = {}
        self.free: dict[str, int] = {}  # streams free, per database
        self.running: set[asyncio.Task[None]] = set()
        self.added = 0

    def add(self, b: Batch) -> None:
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

    async def _run(self, b: Batch) -> None:
        db = b.target.database
        held = True

        def sent() -> None:
            nonlocal held
            if held:
                held = False
                self.free[db] += 1
                self._start(db)

        try:
            await self.runner.run_batch(self.op, b, self.result, sent)
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


class BatchRunner:
    """Runs planned batches of one table: transactions, COMMIT, outcomes, cache invalidation."""

    def __init__(self, binding: TableBinding) -> None:
        self.binding = binding
        self.table = binding.table
        self.cluster = binding.cluster
        self.sql = BatchSql(binding)
        self.lookups = PrimaryLookups(binding)

    async def run(self, op: Op, batches: list[Batch] | LiveBatches, *, atomic: bool, rows: int) -> BatchResult:
        if isinstance(batches, LiveBatches):
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

    async def _run_live(self, op: Op, live: LiveBatches, result: BatchResult) -> None:
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

    async def _run_atomic(self, op: Op, batches: list[Batch], result: BatchResult) -> None:
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
                             await self.lookups.culprits(op, batches, exc))
            )
            return
        for b in batches:
            result.committed_batches += 1
            result.written[b.target.database] = result.written.get(b.target.database, 0) + b.inputs
        result.affected += done
        await self._invalidate(op, [k for b in batches for k in b.keys])

    async def run_batch(self, op: Op, b: Batch, result: BatchResult, sent: Callable[[], None]) -> None:
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
                BatchFailure(b.target.table, b.target.database, list(b.keys), exc,
                             await self.lookups.culprits(op, [b], exc))
            )
            return
        result.committed_batches += 1
        result.written[b.target.database] = result.written.get(b.target.database, 0) + b.inputs
        result.affected += affected

    async def execute(self, op: Op, b: Batch, sent: Callable[[], None] | None = None) -> int:
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
        self, op: Op, conn: Connection, node: Node, batches: list[Batch], sent: Callable[[], None] | None = None
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
                        done += await self.sql.apply(op, conn, node, b)
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

    async def _commit(self, conn: Connection, node: Node, op: Op, batches: list[Batch]) -> None:
        try:
            await conn.commit()
        except Exception as exc:
            if isinstance(exc, DalError) and not isinstance(exc, ConnectionUnavailableError | QueryTimeoutError):
                raise  # the server answered: rolled back
            conn.broken = True
            lost = exc if isinstance(exc, DalError) else _suspect(conn, node, exc)
            # COMMIT was sent; it may or may not have taken effect. Find out.
            if not await self.lookups.committed_after_all(node, op, batches, lost):
                if lost is exc:
                    raise
                raise lost from exc
            return

    async def _invalidate(self, op: Op, keys: list[Any], in_doubt: BaseException | None = None) -> None:
        """After a commit of ``keys`` (or one whose outcome ``in_doubt`` left unknown: then once
        more when the server confirms the interrupted statement over, if that is under way)."""
        cache = self.binding.cache
        if cache is None:
            return
        t = self.table
        encs = [encode_cache_key(k if isinstance(k, tuple) and len(t.primary_key) > 1 else (k,)) for k in keys]
        inserted = op in ("insert", "upsert")
        if in_doubt is None:
            await cache.invalidate(encs, inserted=inserted)
        else:
            await cache.invalidate_in_doubt(encs, inserted=inserted, exc=in_doubt)


def _suspect(conn: Connection, node: Node, exc: BaseException) -> ConnectionUnavailableError:
    conn.broken = True
    return ConnectionUnavailableError(f"{node.name}: connection lost or in an unknown state: {type(exc).__name__}: {exc}")


async def _rollback(conn: Connection) -> None:
    try:
        await asyncio.shield(conn.rollback())
    except BaseException:
        conn.broken = True


async def run_many(
    binding: TableBinding, op: Op, items: Iterable[Any], *, batch_size: int, atomic: bool, raise_on_error: bool
) -> BatchResult:
    """Validate ``items``, plan and run them in batches (the repository's ``*_many``)."""
    planner = BatchPlanner(binding)
    not_a_collection(items, "keys" if op == "delete" else "rows", binding.table.name)
    items = list(items)
    if atomic:
        batches: list[Batch] | LiveBatches = planner.plan(op, items, batch_size, stream=True)
    else:
        batches = planner.plan_load(op, items, batch_size)
    result = await BatchRunner(binding).run(op, batches, atomic=atomic, rows=len(items))
    if result.failures and raise_on_error:
        raise BatchError(result)
    return result
