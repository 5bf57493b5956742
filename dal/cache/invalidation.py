"""Cross-process invalidation over Redis pub/sub (缓存一致性), and the retry queue.

After a write commits, the writer deletes the L2 keys and then publishes one
message per write (or batch) on ``channel``: ``[origin, seq, table, keys,
inserted]``. Every other process evicts those keys from its L1 and, for
inserts, adds them to its Bloom filter. Messages from this process are
ignored (it already did both before returning).

Pub/sub delivers only to connected subscribers, so whenever the subscription
(re)connects, or a sequence number from a known origin skips ahead, the process
assumes it missed messages: it flushes its L1 and resyncs its Bloom filters
(``on_gap``). A message that arrives late (a publish retried after a failure,
its sequence number already passed) is applied as usual: the flush at the skip
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
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

log = logging.getLogger("dal.cache")

Handler = Callable[[list[bytes], bool], None]


class RetryQueue:
    """Background retries of cache operations that must not be lost."""

    def __init__(self, *, initial: float = 0.05, maximum: float = 2.0) -> None:
        self._queue: asyncio.Queue[Callable[[], Awaitable[bool]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._initial = initial
        self._maximum = maximum
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
        delay = self._initial
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
                    delay = self._initial
                    self._running = 0
                    self._queue.task_done()
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._maximum)

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
    """Publishes this process's invalidations and applies everyone else's."""

    def __init__(
        self, client: Any, channel: str, *, on_gap: Callable[[], None], timeout: float = 0.25, cluster: bool = False
    ) -> None:
        self.client = client
        self.channel = channel
        self.cluster = cluster
        self.timeout = timeout
        self._publishing = asyncio.Lock()
        self.origin = os.urandom(8)
        self._seq = 0
        self._handlers: dict[str, Handler] = {}
        self._on_gap = on_gap
        self._last_seq: dict[bytes, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.received = 0
        self.gaps = 0
        self.reconnects = 0
        self.last_delay_ms: float | None = None

    def register(self, table: str, handler: Handler) -> None:
        self._handlers[table] = handler

    def message(self, table: str, keys: list[bytes], inserted: bool) -> bytes:
        self._seq += 1
        return msgpack.packb([self.origin, self._seq, table, keys, inserted, time.time()], use_bin_type=True)  # type: ignore[no-any-return]

    async def publish(self, payload: bytes) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.publish(self.channel, payload)
        except Exception:  # RedisError, OSError, TimeoutError: the retry queue tries again
            return False
        return True

    async def send(self, table: str, keys: list[bytes], inserted: bool) -> bytes | None:
        """Publish one invalidation, in sequence order; the payload when it failed (to retry)."""
        async with self._publishing:
            payload = self.message(table, keys, inserted)
            return None if await self.publish(payload) else payload

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
        delay = 0.05
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
                    self.gaps += 1
                    self._on_gap()  # messages may have been missed while disconnected
                first = False
                failing = False
                self._subscribed.set()
                delay = 0.05
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._apply(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost: reconnect with backoff
                if self._subscribed.is_set():
                    log.warning("invalidation subscription lost: %s", exc)
                elif not failing:
                    log.warning("cannot subscribe to invalidations: %r", exc)
                failing = True
                self._subscribed.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _apply(self, data: bytes) -> None:
        try:
            origin, seq, table, keys, inserted, sent = msgpack.unpackb(data, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            log.warning("ignoring a malformed invalidation message")
            return
        if origin == self.origin:
            return
        self.received += 1
        self.last_delay_ms = (time.time() - sent) * 1000
        last = self._last_seq.get(origin)
        if last is None or seq > last:
            self._last_seq[origin] = seq
        if last is not None and seq > last + 1:
            self.gaps += 1
            self._on_gap()
            return
        handler = self._handlers.get(table)
        if handler is not None:
            handler(list(keys), bool(inserted))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
