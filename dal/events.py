"""Typed events: what dal did, for listeners (metrics, tracing, logs, tests).

Every statement dal sends goes through one seam per node (``Node.session`` in
:mod:`dal.cluster`), which emits :class:`QueryFinished` for it; the pool emits
:class:`PoolWait`; the cache, the invalidation bus, the breakers, the nodes and
the batch writer emit the others. Listeners register on the
:class:`~dal.layer.DataLayer`::

    def on_event(e: Event) -> None: ...
    stop = layer.listen(on_event, "query", "node")   # kinds; none given: every kind
    ...
    stop()

Contract:

- A listener is a plain callable, called synchronously in the task that did the
  work, in registration order. It must be quick and must not await; one that
  raises is logged (once per listener) and ignored, never the caller's error.
- With no listener for a kind, emitting costs one attribute test: a mechanism
  checks ``hub.<kind>`` (an empty tuple) before it builds an event.
- Counts per L1 hit are not events: an L1 hit costs about as much as building
  an event would, so L1 hits and misses are plain integers
  (``TableCache.l1.hits``/``misses``) that a collector reads when it collects.
- Events are immutable and hold names and numbers only: never a value of a
  row, a key's values or SQL parameters.

The kinds and their events:

==============  ===============================================================
kind            events
==============  ===============================================================
``query``       :class:`QueryFinished`: one per call on a connection, with the
                number of statements the server ran for it
``pool``        :class:`PoolWait`: a checkout that had to wait, or failed
``cache``       :class:`CacheLookup` (L2 and Bloom decisions, loads),
                :class:`FlightShared`
``invalidation`` :class:`InvalidationPublished`, :class:`InvalidationReceived`,
                :class:`InvalidationFailed`
``node``        :class:`NodeStateChanged`
``breaker``     :class:`BreakerChanged`
``batch``       :class:`BatchFlushed`
==============  ===============================================================
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

from dal.errors import CommitUnknownError, ConnectionUnavailableError, DalError

log = logging.getLogger("dal.events")

Kind = Literal["query", "pool", "cache", "invalidation", "node", "breaker", "batch"]
KINDS: tuple[Kind, ...] = ("query", "pool", "cache", "invalidation", "node", "breaker", "batch")

Outcome = Literal["ok", "error", "timeout", "cancelled", "lost"]
"""How a piece of work ended: ``error`` the server (or dal) refused it and the connection is
fine; ``lost`` the connection failed; ``timeout`` a deadline passed; ``cancelled`` the caller
gave up."""


def outcome_of(exc: BaseException) -> Outcome:
    """How work that raised ``exc`` ended, in the words of :data:`Outcome`."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, TimeoutError):  # (dal's timeouts are TimeoutErrors too)
        return "timeout"
    if isinstance(exc, ConnectionUnavailableError | CommitUnknownError) or not isinstance(exc, DalError):
        return "lost"
    return "error"


@dataclass(frozen=True, slots=True)
class QueryFinished:
    """One call on a node's connection ended (a fetch, an execute, a COPY, BEGIN/COMMIT...).

    ``statements`` is how many statements the server ran for the call: 0 for a COMMIT
    of a transaction that sent nothing, 2 for the first statement of a transaction
    (its BEGIN goes with it), n for an ``execute_many`` the driver ran as n statements.
    ``purpose`` is the work the connection was taken for ("read", "write",
    "transaction", "batch", "in-doubt" (a COMMIT's outcome looked up), "scan" (the
    Bloom filter's key scan), "ddl" (``create_all``/``drop_all``)).
    """

    kind: ClassVar[Kind] = "query"
    node: str
    database: str
    role: str
    purpose: str
    operation: str
    statements: int
    seconds: float
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class PoolWait:
    """A checkout from a node's pool that did not find an idle connection at once:
    ``seconds`` waited (or spent connecting), and whether it got one."""

    kind: ClassVar[Kind] = "pool"
    node: str
    database: str
    seconds: float
    outcome: Outcome


CacheLevel = Literal["l2", "bloom", "db"]
CacheResult = Literal["hit", "miss", "negative", "error", "corrupt", "absent", "loaded", "lease_wait"]


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """A decision of the cache's read path past L1, for ``keys`` keys of ``table``.

    ``l2``: ``hit`` (a row), ``negative`` (a cached "no such row"), ``miss``, ``error``
    (Redis failed or its breaker is open: the read went on to the database),
    ``corrupt`` (an entry that failed validation: treated as a miss).
    ``bloom``: ``absent`` (the filter answered "no such row" without a query).
    ``db``: ``loaded`` (rows read from the database for a fill), ``lease_wait`` (another
    process was loading the key and this one waited for its fill).
    """

    kind: ClassVar[Kind] = "cache"
    table: str
    level: CacheLevel
    result: CacheResult
    keys: int = 1


@dataclass(frozen=True, slots=True)
class FlightShared:
    """A cache miss that joined a load already running in this process (singleflight)."""

    kind: ClassVar[Kind] = "cache"
    table: str


@dataclass(frozen=True, slots=True)
class InvalidationPublished:
    """Keys of ``table`` deleted from L2 and announced to the other processes."""

    kind: ClassVar[Kind] = "invalidation"
    table: str
    keys: int


@dataclass(frozen=True, slots=True)
class InvalidationReceived:
    """An invalidation message from another process applied to this one's L1.
    ``delay``: seconds from its publication (by the sender's wall clock, so clock skew
    between hosts shows in it: it can be negative; only a signed message vouches for
    it) to now; ``None`` when the message does not say. ``keys`` is 0 for a whole-table flush."""

    kind: ClassVar[Kind] = "invalidation"
    table: str
    keys: int
    delay: float | None


@dataclass(frozen=True, slots=True)
class InvalidationFailed:
    """Deleting or announcing keys of ``table`` failed (``stage``: "delete" or "publish");
    ``retrying`` says whether dal goes on trying (it does until the retry budget is spent,
    then flushes on reconnect)."""

    kind: ClassVar[Kind] = "invalidation"
    table: str
    keys: int
    stage: str
    error: str
    retrying: bool


@dataclass(frozen=True, slots=True)
class NodeStateChanged:
    """A node went out of rotation (``available`` False, with the reason) or came back."""

    kind: ClassVar[Kind] = "node"
    node: str
    database: str
    available: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class BreakerChanged:
    """A circuit breaker changed state ("closed", "open"; "half-open" is reported as the
    trial call that ends it)."""

    kind: ClassVar[Kind] = "breaker"
    name: str
    state: str
    previous: str


@dataclass(frozen=True, slots=True)
class BatchFlushed:
    """A :class:`~dal.batch.BatchWriter` sent a batch of ``rows`` rows of ``table`` to one
    physical table. ``reason``: "size" (``max_rows`` reached), "delay" (``max_delay``
    passed), "flush" (``flush()``/``aclose()`` asked). ``outcome``: how it ended."""

    kind: ClassVar[Kind] = "batch"
    table: str
    database: str
    rows: int
    reason: str
    outcome: Outcome


Event = (
    QueryFinished
    | PoolWait
    | CacheLookup
    | FlightShared
    | InvalidationPublished
    | InvalidationReceived
    | InvalidationFailed
    | NodeStateChanged
    | BreakerChanged
    | BatchFlushed
)
Listener = Callable[[Event], None]


class Events:
    """The listeners of one data layer, by kind.

    Each kind is an attribute holding a tuple of listeners (empty when none), so a
    mechanism's test before building an event is one attribute read:
    ``if hub.query: hub.emit(QueryFinished(...))``.
    """

    __slots__ = ("_failed", *KINDS)

    query: tuple[Listener, ...]
    pool: tuple[Listener, ...]
    cache: tuple[Listener, ...]
    invalidation: tuple[Listener, ...]
    node: tuple[Listener, ...]
    breaker: tuple[Listener, ...]
    batch: tuple[Listener, ...]

    def __init__(self) -> None:
        for kind in KINDS:
            setattr(self, kind, ())
        self._failed: set[int] = set()

    def listen(self, listener: Listener, *kinds: str) -> Callable[[], None]:
        """Call ``listener(event)`` for every event of ``kinds`` (all kinds when none are
        given). Returns a function that removes it again (idempotent)."""
        if not callable(listener):
            raise TypeError(f"an event listener must be callable, got {type(listener).__name__}")
        wanted = _kinds(kinds)
        for kind in wanted:
            setattr(self, kind, (*getattr(self, kind), listener))

        def stop() -> None:
            for kind in wanted:
                setattr(self, kind, tuple(f for f in getattr(self, kind) if f is not listener))

        return stop

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the listeners of its kind. A listener's exception is logged
        (once per listener) and swallowed: observing must not change the outcome."""
        for listener in getattr(self, event.kind):
            try:
                listener(event)
            except Exception:
                if id(listener) not in self._failed:
                    self._failed.add(id(listener))
                    log.exception("event listener %r failed on %s (further failures not logged)",
                                  listener, type(event).__name__)


def _kinds(kinds: Iterable[str]) -> tuple[Kind, ...]:
    out: list[Kind] = []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}; kinds: {', '.join(KINDS)}")
        out.append(kind)
    return tuple(out) or KINDS


class Counters:
    """A listener that counts events: the counters the bench and ``dal`` report.

    ``counts`` maps a name to a number: ``queries``, ``statements``, ``query_errors``
    (any outcome but ok), ``pool_waits``, ``l2_<result>``, ``bloom_absent``,
    ``db_loaded``, ``lease_waits``, ``singleflight_shared``, ``invalidations_published``,
    ``invalidations_received``, ``invalidations_failed``, ``breaker_opened``,
    ``nodes_down``, ``batches_flushed``, ``rows_flushed``.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)

    def _add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def __call__(self, e: Event) -> None:
        match e:
            case QueryFinished():
                self._add("queries")
                self._add("statements", e.statements)
                if e.outcome != "ok":
                    self._add("query_errors")
            case PoolWait():
                self._add("pool_waits")
            case CacheLookup(level="l2"):
                self._add(f"l2_{e.result}", e.keys)
            case CacheLookup(level="bloom"):
                self._add("bloom_absent", e.keys)
            case CacheLookup(result="lease_wait"):
                self._add("lease_waits", e.keys)
            case CacheLookup():
                self._add("db_loaded", e.keys)
            case FlightShared():
                self._add("singleflight_shared")
            case InvalidationPublished():
                self._add("invalidations_published")
            case InvalidationReceived():
                self._add("invalidations_received")
            case InvalidationFailed():
                self._add("invalidations_failed")
            case BreakerChanged(state="open"):
                self._add("breaker_opened")
            case NodeStateChanged(available=False):
                self._add("nodes_down")
            case BatchFlushed():
                self._add("batches_flushed")
                self._add("rows_flushed", e.rows)
            case _:
                pass
