"""The harness of ``dal bench``: paired, interleaved rounds, their timing and statistics.

It owns how a scenario is measured, never what: a scenario hands it a
:class:`Comparison`, :class:`Burst` or :class:`Bulk` (dal's contender and its
baselines, built by :mod:`dal.bench.scenarios`) and gets :class:`Result`
objects back; turning them into JSON and tables is :mod:`dal.bench.report`'s.

What is measured
----------------
A *contender* is one way of doing the same operation (dal's ``repo.get`` or a
baseline such as ``asyncpg``'s ``pool.fetchrow``), given as a coroutine
function of one key. It is driven by ``concurrency`` asyncio tasks, each
running operations back to back on keys taken from one shared, pre-generated
key list (task ``w`` uses keys ``w, w + c, w + 2c, ...``), so every contender
sees the same keys in the same order.

* Each operation is timed with :func:`time.perf_counter_ns` around the
  ``await``: that is its latency (at ``concurrency > 1`` it includes waiting
  for a pooled connection, as a caller would).
* A round runs a contender for ``round_seconds`` of wall time: operations
  start until the deadline, and the round's wall time runs until the last one
  has finished. Throughput of a round = operations / wall time.
* The process's CPU time (user + system) is recorded per round too: the
  client-side cost per operation, which other load on the machine disturbs
  less than wall time (it excludes time spent waiting for the server).
* Before the first round every contender runs ``warmup_ops`` operations that
  are not recorded (connections opened, statements prepared, caches warm).
* Rounds alternate the contenders A B C, C B A, A B C, ... so slow drift of
  the machine (other processes, CPU frequency, the server's own work) hits
  dal and its baselines alike.

A contender may be a plain function instead (``sync=True``, e.g. a bare
``TLRUCache`` lookup): it runs in the same loop, called without ``await``.
For such sub-microsecond operations the loop itself (two clock reads, the
key, the latency list) is a sizeable part of each measured time, so a
comparison may ask for ``loop_overhead``: a do-nothing contender (the C
builtin ``id`` called in the same loop) is timed in the same alternating
rounds, and :func:`net_ratio` subtracts its time per op from both sides.

A :class:`Burst` measures something else: ``size`` operations started at
once (``asyncio.gather``) on one key made cold by an untimed ``prepare``
before each burst; it counts the database statements each burst caused.
Latencies in a burst run from the burst's start to each operation's end.

A :class:`Bulk` measures whole data loads (``insert_many`` of 100,000 rows
against one COPY of them): each contender's ``load`` writes ``rows`` rows
after an untimed ``prepare`` (tables truncated); one warm-up load each, then
alternating rounds of one load per contender. Its operations are rows: the
ratio is dal's time per row / the baseline's, and a baseline may write only a
sample (row-by-row INSERTs of 2,000 rows) and still be compared per row.

Results: ``ops_per_s`` is the median of the rounds' throughputs; ``p50`` and
``p99`` come from the latencies of all rounds together; the ratio of dal to a
baseline is the median over rounds of (dal's wall time per operation / the
baseline's wall time per operation in the same round), so each ratio
compares two runs made seconds apart.
"""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Op = Callable[[Any], Awaitable[object]]
"""One operation on one key (the key comes from the scenario's key list)."""
SyncOp = Callable[[Any], object]
"""A plain (not async) operation on one key: a contender with ``sync=True``."""

T = TypeVar("T")

LOOP_OVERHEAD = "(loop overhead)"
"""Name of the do-nothing contender of comparisons with ``loop_overhead``."""


@dataclass(frozen=True, slots=True)
class Timing:
    """How long to measure: ``rounds`` x ``round_seconds`` per contender, after a warm-up."""

    rounds: int = 10
    round_seconds: float = 0.25
    warmup_ops: int = 500

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if self.round_seconds <= 0:
            raise ValueError("round_seconds must be > 0")
        if self.warmup_ops < 0:
            raise ValueError("warmup_ops must be >= 0")


@dataclass(frozen=True, slots=True)
class Contender:
    """One implementation of the measured operation (dal or a baseline).

    ``op`` is a coroutine function of the key, or with ``sync=True`` a plain
    function (run at concurrency 1 only). ``info`` goes into its JSON entry.
    """

    name: str
    op: Op | SyncOp
    sync: bool = False
    info: Mapping[str, Any] = field(default_factory=dict)


C = TypeVar("C")


@dataclass(frozen=True, slots=True, kw_only=True)
class Lineup(Generic[C]):
    """dal's contender and its baselines, measured on the same data: what every scenario has.

    ``targets`` maps a baseline name (or a counter, ``db_queries`` for a
    burst) to the largest acceptable ratio (dal's time / the baseline's) or
    value; informational only, the bench never fails on them. ``counters``
    (optional) returns counters of dal's side; their changes over the
    scenario (warm-up included) go into dal's JSON entry, e.g. cache hits and
    misses that show the scenario measured what it says it measures.
    """

    name: str
    dal: C
    baselines: tuple[C, ...]
    targets: Mapping[str, float] = field(default_factory=dict)
    description: str = ""
    counters: Callable[[], Mapping[str, int]] | None = None

    @property
    def contenders(self) -> tuple[C, ...]:
        """dal first, then the baselines: the order of the results."""
        return (self.dal, *self.baselines)


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison(Lineup[Contender]):
    """Operations on keys, dal against its baselines, on the same keys at one concurrency.

    ``loop_overhead`` also times the bare measuring loop (see the module
    docs) so that ratios net of it can be reported.
    """

    concurrency: int
    keys: Sequence[Any]
    loop_overhead: bool = False


@dataclass(frozen=True, slots=True)
class Run:
    """One timed run of one contender: operations, wall time, this process's CPU time, latencies."""

    ops: int
    wall_ns: int
    cpu_ns: int
    latencies_ns: list[int]

    @property
    def ns_per_op(self) -> float:
        return self.wall_ns / self.ops if self.ops else math.inf

    @property
    def ops_per_s(self) -> float:
        return self.ops * 1e9 / self.wall_ns if self.wall_ns else 0.0


@dataclass(frozen=True, slots=True)
class Result:
    """The rounds of one contender, summarized."""

    name: str
    concurrency: int
    runs: tuple[Run, ...]

    @property
    def ops(self) -> int:
        return sum(r.ops for r in self.runs)

    @property
    def ops_per_s(self) -> float:
        return statistics.median(r.ops_per_s for r in self.runs)

    @property
    def cpu_us_per_op(self) -> float:
        """This process's CPU time (user + system: the client side) per operation."""
        ops = self.ops
        return sum(r.cpu_ns for r in self.runs) / ops / 1000.0 if ops else math.nan

    def percentile_us(self, q: float) -> float:
        lat = sorted(x for r in self.runs for x in r.latencies_ns)
        return percentile(lat, q) / 1000.0


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def paired_ratio(dal: Result, baseline: Result) -> tuple[float, float, float]:
    """Median, min and max over rounds of dal's time per op / the baseline's."""
    ratios = [d.ns_per_op / b.ns_per_op for d, b in zip(dal.runs, baseline.runs, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def paired_net_ratio(dal: Result, baseline: Result, overhead: Result) -> tuple[float, float, float]:
    """Like :func:`paired_ratio`, with the loop's own time per op (same round) taken off both sides."""
    ratios = []
    for d, b, o in zip(dal.runs, baseline.runs, overhead.runs, strict=True):
        base = b.ns_per_op - o.ns_per_op
        ratios.append((d.ns_per_op - o.ns_per_op) / base if base > 0 else math.inf)
    return statistics.median(ratios), min(ratios), max(ratios)


def _loop_sync(op: SyncOp, keys: Sequence[Any], limit: float, deadline: float, lat: list[int]) -> None:
    # Kept statement for statement like _loop_async, minus the await, rather than shared with it:
    # one loop for both would add a branch or a call to every timed op, and for a sub-microsecond
    # plain op that is much of what is timed. The same statements keep the loop overhead
    # (measured with a plain op, see net ratios) the same on both sides.
    perf = time.perf_counter_ns
    record = lat.append
    n = len(keys)
    i = 0
    while True:
        t0 = perf()
        if i >= limit or t0 >= deadline:
            return
        op(keys[i % n])
        record(perf() - t0)
        i += 1


async def _loop_async(op: Op, keys: Sequence[Any], limit: float, deadline: float, lat: list[int]) -> None:
    perf = time.perf_counter_ns
    record = lat.append
    n = len(keys)
    i = 0
    while True:
        t0 = perf()
        if i >= limit or t0 >= deadline:
            return
        await op(keys[i % n])
        record(perf() - t0)
        i += 1


async def drive(
    op: Op | SyncOp,
    keys: Sequence[Any],
    concurrency: int,
    *,
    seconds: float | None = None,
    max_ops: int | None = None,
    sync: bool = False,
) -> Run:
    """Run ``op`` from ``concurrency`` tasks until ``seconds`` pass or ``max_ops`` have started.

    Latencies are recorded for every operation; the first failure stops the
    run and is raised. ``sync``: ``op`` is a plain function, called (not
    awaited) in the same loop as a single task's coroutine function.
    """
    if not keys:
        raise ValueError("no keys to run on")
    if sync and concurrency != 1:
        raise ValueError("a plain (sync) operation runs at concurrency 1 only")
    perf = time.perf_counter_ns
    lat: list[int] = []
    record = lat.append
    n = len(keys)
    limit = max_ops if max_ops is not None else math.inf
    started = 0
    cpu0 = time.process_time_ns()
    start = perf()
    deadline = start + int(seconds * 1e9) if seconds is not None else None

    async def worker(first: int) -> None:
        nonlocal started
        i = first
        while True:
            t0 = perf()
            if started >= limit or (deadline is not None and t0 >= deadline):
                return
            started += 1
            await op(keys[i % n])  # type: ignore[misc]
            record(perf() - t0)
            i += concurrency

    until = math.inf if deadline is None else deadline
    if sync:
        _loop_sync(op, keys, limit, until, lat)
    elif concurrency == 1:
        await _loop_async(op, keys, limit, until, lat)  # type: ignore[arg-type]
    else:
        async with asyncio.TaskGroup() as tg:
            for w in range(concurrency):
                tg.create_task(worker(w))
    wall = perf() - start
    return Run(len(lat), wall, time.process_time_ns() - cpu0, lat)


Progress = Callable[[str], None]


def alternating(contenders: tuple[T, ...], rounds: int) -> Iterator[tuple[int, tuple[T, ...]]]:
    """(round, contenders in that round's order): A B C, C B A, A B C, ...

    Alternating the order makes slow drift of the machine hit every contender alike.
    """
    backwards = tuple(reversed(contenders))
    for rnd in range(rounds):
        yield rnd, contenders if rnd % 2 == 0 else backwards


def _overhead_contender() -> Contender:
    return Contender(LOOP_OVERHEAD, id, sync=True)


async def compare(comparison: Comparison, timing: Timing, progress: Progress | None = None) -> list[Result]:
    """Measure dal and its baselines in alternating rounds; results in contender order.

    With ``loop_overhead`` the do-nothing contender's result comes last.
    """
    c = comparison.concurrency
    contenders = comparison.contenders
    if comparison.loop_overhead:
        contenders = (*contenders, _overhead_contender())
    for cont in contenders:
        if progress:
            progress(f"warming up {cont.name} ({timing.warmup_ops} ops)")
        await drive(cont.op, comparison.keys, c, max_ops=max(timing.warmup_ops, c), sync=cont.sync)
    runs: dict[str, list[Run]] = {cont.name: [] for cont in contenders}
    for rnd, order in alternating(contenders, timing.rounds):
        for cont in order:
            gc.collect()
            run = await drive(cont.op, comparison.keys, c, seconds=timing.round_seconds, sync=cont.sync)
            runs[cont.name].append(run)
        if progress:
            shown = ", ".join(f"{name} {rs[-1].ops_per_s:,.0f}/s" for name, rs in runs.items())
            progress(f"round {rnd + 1}/{timing.rounds}: {shown}")
    return [Result(cont.name, c, tuple(runs[cont.name])) for cont in contenders]


# -- bursts -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BurstContender:
    """One way to answer a burst of concurrent reads of one key.

    ``prepare`` (untimed, before every burst) makes the key cold; ``queries``
    returns the number of database statements run so far (a counter).
    """

    name: str
    op: Callable[[], Awaitable[object]]
    prepare: Callable[[], Awaitable[None]]
    queries: Callable[[], int]


@dataclass(frozen=True, slots=True, kw_only=True)
class Burst(Lineup[BurstContender]):
    """``size`` concurrent reads of one cold key, dal against its baselines.

    Its targets are counters: ``db_queries``, the statements of the worst burst.
    """

    size: int


@dataclass(frozen=True, slots=True)
class BurstResult:
    """A contender's bursts: timings (one :class:`Run` per burst) and statements per burst."""

    result: Result
    queries: tuple[int, ...]


async def burst_once(cont: BurstContender, size: int) -> tuple[Run, int]:
    """Prepare, then start ``size`` operations at once; (timing, database statements)."""
    await cont.prepare()
    perf = time.perf_counter_ns
    lat: list[int] = []
    record = lat.append
    op = cont.op

    async def one(t0: int) -> None:
        await op()
        record(perf() - t0)

    q0 = cont.queries()
    cpu0 = time.process_time_ns()
    start = perf()
    await asyncio.gather(*(one(start) for _ in range(size)))
    wall = perf() - start
    cpu = time.process_time_ns() - cpu0
    return Run(len(lat), wall, cpu, lat), cont.queries() - q0


async def run_bursts(burst: Burst, timing: Timing, progress: Progress | None = None) -> list[BurstResult]:
    """One warm-up burst per contender, then ``timing.rounds`` alternating bursts each."""
    contenders = burst.contenders
    for cont in contenders:
        if progress:
            progress(f"warming up {cont.name} (1 burst of {burst.size})")
        await burst_once(cont, burst.size)
    runs: dict[str, list[Run]] = {cont.name: [] for cont in contenders}
    queries: dict[str, list[int]] = {cont.name: [] for cont in contenders}
    for rnd, order in alternating(contenders, timing.rounds):
        for cont in order:
            gc.collect()
            run, q = await burst_once(cont, burst.size)
            runs[cont.name].append(run)
            queries[cont.name].append(q)
        if progress:
            shown = ", ".join(
                f"{name} {rs[-1].wall_ns / 1e6:.1f} ms, {queries[name][-1]} queries" for name, rs in runs.items()
            )
            progress(f"burst {rnd + 1}/{timing.rounds}: {shown}")
    return [
        BurstResult(Result(cont.name, burst.size, tuple(runs[cont.name])), tuple(queries[cont.name]))
        for cont in contenders
    ]


# -- bulk loads ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BulkContender:
    """One way to write a data set: ``prepare`` (untimed: empty the tables), then ``load``.

    ``load`` writes ``rows`` rows and returns the latencies (ns) of the calls
    it made (one for a single ``insert_many`` or COPY, one per row for row-by-row
    INSERTs). ``info`` goes into the contender's JSON entry (batch size, ...).
    """

    name: str
    load: Callable[[], Awaitable[Sequence[int]]]
    prepare: Callable[[], Awaitable[None]]
    rows: int
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bulk(Lineup[BulkContender]):
    """A bulk write, dal against its baselines, compared per row written.

    ``check`` (optional, untimed) runs after each contender's warm-up load
    and raises unless the load wrote what it should have.
    """

    check: Callable[[str], Awaitable[None]] | None = None
    concurrency: int = 1


async def load_once(cont: BulkContender) -> Run:
    """Prepare (untimed), then one timed load: a :class:`Run` whose operations are rows."""
    await cont.prepare()
    gc.collect()
    perf = time.perf_counter_ns
    cpu0 = time.process_time_ns()
    start = perf()
    lat = list(await cont.load())
    wall = perf() - start
    return Run(cont.rows, wall, time.process_time_ns() - cpu0, lat)


async def run_bulk(bulk: Bulk, timing: Timing, progress: Progress | None = None) -> list[Result]:
    """One warm-up load per contender (then ``check``), then ``timing.rounds`` alternating loads each."""
    contenders = bulk.contenders
    for cont in contenders:
        if progress:
            progress(f"warming up {cont.name} (1 load of {cont.rows:,} rows)")
        await load_once(cont)
        if bulk.check is not None:
            await bulk.check(cont.name)
    runs: dict[str, list[Run]] = {cont.name: [] for cont in contenders}
    for rnd, order in alternating(contenders, timing.rounds):
        for cont in order:
            runs[cont.name].append(await load_once(cont))
        if progress:
            shown = ", ".join(
                f"{name} {rs[-1].wall_ns / rs[-1].ops / 1000:.2f} µs/row" for name, rs in runs.items()
            )
            progress(f"round {rnd + 1}/{timing.rounds}: {shown}")
    return [Result(cont.name, bulk.concurrency, tuple(runs[cont.name])) for cont in contenders]
