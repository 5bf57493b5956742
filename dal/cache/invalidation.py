"""Cross-process invalidation over Redis pub/sub (缓存一致性), and the retry queue.

After a write commits, the writer deletes the L2 keys and then publishes one
message per write (or batch; one per ``max_keys`` keys) on ``channel``, msgpack
``[origin, seq, table, keys, inserted, sent]``, preceded by its HMAC-SHA256
when a signing key is set. Every other process evicts those keys from its L1
and, for inserts, adds them to its Bloom filter. Messages from this process
are ignored (it already did both before returning).

Pub/sub delivers only to connected subscribers, so whenever the subscription
(re)connects, or a sequence number from a known origin skips ahead, the process
assumes it missed messages: it flushes its L1 and resyncs its Bloom filters
(``on_gap``), at most once per ``resync_interval`` (see :class:`InvalidationBus`
for that, and for what a received message must be). A message that arrives
late (a publish retried after a failure, its sequence number already passed) is applied as usual: the flush at the skip
already covered it, and it is no new gap. A process publishes its messages one
at a time, in sequence order, each bounded by ``timeout`` (the bus connection
itself has no read timeout, and a write must not wait on a hung Redis).

A delete or publish that fails goes to the :class:`RetryQueue` and is retried
with backoff until it succeeds; nothing is silently dropped, and every failure
is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from dal.clock import Backoff, Clock, as_clock
from dal.events import Events, InvalidationReceived

log = logging.getLogger("dal.cache")

Handler = Callable[[list[bytes], bool], None]

MAX_ORIGINS = 1024
"""Origins whose sequence numbers a subscriber tracks (the most recently heard)."""

_TAG = 32  # bytes of an HMAC-SHA256 signature, which precedes the signed message


RETRY_INITIAL, RETRY_MAXIMUM = 0.05, 2.0
"""The default waits (seconds) of :class:`RetryQueue` between attempts of a failing
operation: doubling from the first to the second (no jitter)."""

RECONNECT_INITIAL, RECONNECT_MAXIMUM = 0.05, 1.0
"""The default waits (seconds) of the subscriber between failed subscriptions: doubling
from the first to the second (no jitter)."""


class RetryQueue:
    """Background retries of cache operations that must not be lost.

    Operations run one at a time, in the order queued; a failing one is retried
    after each wait of ``backoff`` (taken over at its start: the queue keeps its
    own sequence) on ``clock``, and the sequence starts over after a success.
    ``initial``/``maximum`` are the short form of ``Backoff(initial, maximum)``.
    """

    def __init__(
        self,
        *,
        initial: float | None = None,
        maximum: float | None = None,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
    ) -> None:
        if backoff is not None and (initial is not None or maximum is not None):
            raise TypeError("give either backoff= or initial=/maximum=")
        if backoff is None:
            backoff = Backoff(
                RETRY_INITIAL if initial is None else initial, RETRY_MAXIMUM if maximum is None else maximum
            )
        self._queue: asyncio.Queue[Callable[[], Awaitable[bool]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._backoff = backoff.fresh()
        self._clock = as_clock(clock)
        self._running = 0  # taken off the queue, not yet done
        self.retried = 0
        self.failures = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def put(self, op: Callable[[], Awaitable[bool]]) -> None:
        """``op`` returns True once done; it is retried until then."""
        self.failures += 1
        self._queue.put_nowait(op)

    @property
    def pending(self) -> int:
        """Operations not done yet: queued, plus the one being retried."""
        return self._queue.qsize() + self._running

    async def _run(self) -> None:
        backoff = self._backoff
        while True:
            op = await self._queue.get()
            self._running = 1
            while True:
                self.retried += 1
                try:
                    done = await op()
                except Exception:  # an op must not kill the queue
                    log.exception("cache retry failed")
                    done = False
                if done:
                    backoff.reset()
                    self._running = 0
                    self._queue.task_done()
                    break
                await self._clock.sleep(backoff.next())

    async def drain(self, timeout: float) -> None:
        """Give queued operations up to ``timeout`` seconds to complete (at shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class InvalidationBus:
    """Publishes this process's invalidations and applies everyone else's.

    Received messages are untrusted input (anyone who can reach the Redis server
    can publish on the channel). A message that is not exactly a well-typed
    ``[origin, seq, table, keys, inserted, sent]`` (origin: bytes; seq: int >= 0;
    table: str; keys: a list of bytes; inserted: bool; sent: a finite number) is
    dropped and counted in :attr:`malformed`. One for a table no handler is
    registered for (cached by processes of another service on the same channel)
    is counted in :attr:`foreign`; its sequence number still counts, so the
    origin's next message is no gap. Nothing a message holds makes the
    subscriber reconnect.

    - Sequence numbers are tracked for the last :data:`MAX_ORIGINS` origins heard
      from (least recently heard forgotten first); an origin forgotten and heard
      again is a new origin, not a gap.
    - A message has at most ``max_keys`` keys: :meth:`send` splits bigger
      invalidations into several messages. A received message over the bound is
      dropped and counted in :attr:`oversized`; since its keys are not applied,
      and it may come from a peer configured with a higher bound, it is treated
      as a gap.
    - Resyncs (``on_gap``: flush every L1, rebuild every Bloom filter) run at most
      once per ``resync_interval`` seconds of ``clock``. A gap seen sooner is not
      skipped: one resync runs when the interval is over (:meth:`poll`) and covers
      every gap seen meanwhile; until then :attr:`resync_pending` is true, and
      Bloom filters are not trusted.
    - Time comes from ``clock``: a :class:`~dal.clock.Clock`, or a monotonic time
      source (with ``wall`` the wall-clock one) from which one is built. The
      subscriber waits ``reconnect`` (a :class:`~dal.clock.Backoff`, default
      :data:`RECONNECT_INITIAL` doubling to :data:`RECONNECT_MAXIMUM`) between failed subscriptions, starting over once
      subscribed.
    - With ``signing_key``, every message published is signed (HMAC-SHA256 over
      the channel name and the message) and a received one without a valid
      signature is dropped and counted in :attr:`bad_signature`. A replayed
      signed message only evicts keys again (and adds keys that were inserted),
      which is harmless.
    """

    def __init__(
        self,
        client: Any,
        channel: str,
        *,
        on_gap: Callable[[], None],
        timeout: float = 0.25,
        cluster: bool = False,
        clock: Clock | Callable[[], float] | None = None,
        wall: Callable[[], float] | None = None,
        resync_interval: float = 1.0,
        max_keys: int = 1000,
        signing_key: bytes | None = None,
        reconnect: Backoff | None = None,
        events: Events | None = None,
    ) -> None:
        self.client = client
        self._events = events if events is not None else Events()
        self.channel = channel
        self.cluster = cluster
        self.timeout = timeout
        self.clock = as_clock(clock, wall)
        self._reconnect = (
            Backoff(RECONNECT_INITIAL, RECONNECT_MAXIMUM) if reconnect is None else reconnect.fresh()
        )
        self.resync_interval = resync_interval
        self.max_keys = max_keys
        self._mac = None if signing_key is None else hmac.new(signing_key, channel.encode() + b"\n", hashlib.sha256)
        self._publishing = asyncio.Lock()
        self.origin = os.urandom(8)
        self._seq = 0
        self._handlers: dict[str, Handler] = {}
        self._on_gap = on_gap
        self._last_seq: OrderedDict[bytes, int] = OrderedDict()
        self._last_resync: float | None = None
        self._resync_pending = False
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._warned: set[str] = set()
        self.received = 0
        self.gaps = 0
        self.resyncs = 0
        self.reconnects = 0
        self.malformed = 0
        self.foreign = 0
        self.oversized = 0
        self.bad_signature = 0
        self.last_delay_ms: float | None = None

    def register(self, table: str, handler: Handler) -> None:
        self._handlers[table] = handler

    def _sign(self, body: bytes) -> bytes:
        if self._mac is None:
            return body
        mac = self._mac.copy()
        mac.update(body)
        return mac.digest() + body

    def messages(self, table: str, keys: list[bytes], inserted: bool) -> list[bytes]:
        """The payloads of one invalidation (numbered now): one per ``max_keys`` keys."""
        out = []
        for i in range(0, len(keys), self.max_keys):
            self._seq += 1
            body = msgpack.packb(
                [self.origin, self._seq, table, keys[i : i + self.max_keys], inserted, self.clock.wall()], use_bin_type=True
            )
            out.append(self._sign(body))
        return out

    async def publish(self, payload: bytes) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.publish(self.channel, payload)
        except Exception:  # RedisError, OSError, TimeoutError: the retry queue tries again
            return False
        return True

    async def send(self, table: str, keys: list[bytes], inserted: bool) -> list[bytes]:
        """Publish one invalidation, in sequence order; the payloads not sent (to retry, in order).

        After one publish fails, the rest are not tried (each would wait out the timeout)."""
        async with self._publishing:
            payloads = self.messages(table, keys, inserted)
            for i, payload in enumerate(payloads):
                if not await self.publish(payload):
                    return payloads[i:]
            return []

    # -- subscriber ------------------------------------------------------------------------
    async def start(self, *, wait: float = 1.0) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._subscribed.wait()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def _listen(self) -> None:
        first = True
        failing = False
        backoff = self._reconnect
        while True:
            pubsub = self.client.pubsub()
            try:
                if self.cluster:
                    # A cluster pubsub picks its node from the client's slot map, which
                    # only initialize() loads (this client runs no other command first).
                    await self.client.initialize()
                await pubsub.subscribe(self.channel)
                if not first:
                    self.reconnects += 1
                    self._gap()  # messages may have been missed while disconnected
                first = False
                failing = False
                self._subscribed.set()
                backoff.reset()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._poll_timeout())
                    if msg is not None and msg.get("type") == "message":
                        try:
                            self._apply(msg.get("data"))
                        except Exception:
                            # A fault in applying, not in the connection: what the
                            # message did is unknown, so resync; do not reconnect.
                            log.exception("applying an invalidation message failed")
                            self._gap()
                    self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost: reconnect with backoff
                if self._subscribed.is_set():
                    log.warning("invalidation subscription lost: %s", exc)
                elif not failing:
                    log.warning("cannot subscribe to invalidations: %r", exc)
                failing = True
                self._subscribed.clear()
                await self.clock.sleep(backoff.next())
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # -- resyncs ----------------------------------------------------------------------------
    @property
    def resync_pending(self) -> bool:
        """A gap was seen and its resync waits for the end of the interval."""
        return self._resync_pending

    def _gap(self) -> None:
        self.gaps += 1
        now = self.clock.monotonic()
        if self._last_resync is None or now - self._last_resync >= self.resync_interval:
            self._resync(now)
        else:
            self._resync_pending = True

    def poll(self) -> None:
        """Run the pending resync if its interval is over (the subscriber calls this
        after every message and wait)."""
        if self._resync_pending:
            now = self.clock.monotonic()
            if self._last_resync is None or now - self._last_resync >= self.resync_interval:
                self._resync(now)

    def _resync(self, now: float) -> None:
        self._resync_pending = False
        self._last_resync = now
        self.resyncs += 1
        self._on_gap()

    def _poll_timeout(self) -> float:
        """How long the subscriber may wait for a message: until a pending resync is due."""
        if not self._resync_pending or self._last_resync is None:
            return 1.0
        return min(1.0, max(0.0, self._last_resync + self.resync_interval - self.clock.monotonic()))

    # -- received messages -------------------------------------------------------------------
    def _drop(self, counter: str, what: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        if counter not in self._warned:  # once per kind: whoever sent one may send many
            self._warned.add(counter)
            log.warning("dropping %s on %s (counted in bus.%s; logged once)", what, self.channel, counter)

    def _apply(self, data: Any) -> None:
        if type(data) is not bytes:
            self._drop("malformed", "a malformed invalidation message")
            return
        if self._mac is not None:
            mac = self._mac.copy()
            mac.update(data[_TAG:])
            if len(data) < _TAG or not hmac.compare_digest(mac.digest(), data[:_TAG]):
                self._drop("bad_signature", "an invalidation message without a valid signature")
                return
            data = data[_TAG:]
        try:
            msg = msgpack.unpackb(data, raw=False)
        except Exception:  # any unpacking failure: bad msgpack, bad UTF-8, extra data, nesting
            msg = None
        if type(msg) is not list or len(msg) != 6:
            self._drop("malformed", "a malformed invalidation message")
            return
        origin, seq, table, keys, inserted, sent = msg
        if not (
            type(origin) is bytes and 0 < len(origin) <= 64
            and type(seq) is int and seq >= 0
            and type(table) is str
            and type(keys) is list
            and type(inserted) is bool
            and type(sent) in (int, float) and math.isfinite(sent)
            and all(type(k) is bytes for k in keys)
        ):  # fmt: skip
            self._drop("malformed", "a malformed invalidation message")
            return
        if origin == self.origin:
            return
        self.received += 1
        self.last_delay_ms = (self.clock.wall() - sent) * 1000
        last = self._last_seq.get(origin)
        if last is None:
            self._last_seq[origin] = seq
            if len(self._last_seq) > MAX_ORIGINS:
                self._last_seq.popitem(last=False)
        else:
            self._last_seq.move_to_end(origin)
            if seq > last:
                self._last_seq[origin] = seq
        if len(keys) > self.max_keys:
            self._drop("oversized", f"an invalidation message of more than {self.max_keys} keys")
            self._gap()  # its keys are not applied
            return
        if last is not None and seq > last + 1:
            self._gap()  # (and apply this one: the resync may be a while away)
        handler = self._handlers.get(table)
        if handler is None:
            # Well formed, for a table another process caches (processes of different
            # services may share a channel): nothing to do here, and nothing wrong.
            self.foreign += 1
            return
        handler(keys, inserted)
        if self._events.invalidation:
            self._events.emit(InvalidationReceived(table, len(keys), self.last_delay_ms / 1000))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
