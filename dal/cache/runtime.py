"""What every table cache of a process shares: the Redis client and its breaker, L2
(:class:`~dal.cache.remote.RemoteCache`), the invalidation bus, the retry queue,
the clock, the TTL jitter's randomness and the events hub; and the reactions that
concern every table at once (a gap in the invalidations, Redis coming back).
The read and write paths of one table are :mod:`dal.cache.tiered`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dal.cache.invalidation import InvalidationBus, RetryQueue
from dal.cache.remote import RemoteCache
from dal.clock import Clock, as_clock
from dal.events import Events

if TYPE_CHECKING:
    from dal.cache.tiered import TableCache

T = TypeVar("T")


class CacheRuntime:
    """What every table cache of a process shares: Redis, the breaker, the bus, the retry queue."""

    def __init__(
        self,
        *,
        redis_url: str | None,
        cluster: bool = False,
        timeout: float = 0.25,
        breaker_failures: int = 3,
        breaker_reset: float = 1.0,
        channel: str = "dal:invalidate",
        clock: Clock | Callable[[], float] | None = None,
        wall: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        resync_interval: float = 1.0,
        max_keys_per_message: int = 1000,
        signing_key: str | None = None,
        events: Events | None = None,
    ) -> None:
        """``events``: the hub the caches' decisions are reported to (:mod:`dal.events`).
        ``clock``: every time read and sleep of the cache (L1 expiry, the breaker,
        lease waits, retries, resyncs, version and message times) goes through it; a
        :class:`~dal.clock.Clock`, or a monotonic time source that, with the wall-clock
        source ``wall``, makes a :class:`~dal.clock.SystemClock` (the default: the
        system's). ``rng``: TTL jitter.

        ``resync_interval``, ``max_keys_per_message``, ``signing_key``: see
        :class:`~dal.cache.invalidation.InvalidationBus` (``resync_interval``,
        ``max_keys``, ``signing_key``)."""
        from dal.breaker import Breaker

        self.clock: Clock = as_clock(clock, wall)
        self.rng = rng or random.Random()
        self.events = events if events is not None else Events()
        self.tables: dict[str, TableCache] = {}
        self.retry = RetryQueue(clock=self.clock)
        self._background: set[asyncio.Task[Any]] = set()
        self.remote: RemoteCache | None = None
        self.bus: InvalidationBus | None = None
        self._client: Any = None
        if redis_url is not None:
            if cluster:
                from redis.asyncio.cluster import RedisCluster

                self._client = RedisCluster.from_url(
                    redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
                )
            else:
                from redis.asyncio import Redis

                # No socket_timeout (redis-py's default is 5 s): RemoteCache bounds each call
                # itself (see there).
                self._client = Redis.from_url(redis_url, socket_timeout=None, socket_connect_timeout=timeout)
            breaker = Breaker(
                "redis", failures=breaker_failures, reset=breaker_reset, clock=self.clock.monotonic,
                on_close=self.redis_returned, events=self.events,
            )  # fmt: skip
            self.remote = RemoteCache(self._client, breaker, cluster=cluster, timeout=timeout)
            self.bus = InvalidationBus(
                self._bus_client(redis_url, cluster, timeout), channel, on_gap=self.on_gap, timeout=timeout,
                cluster=cluster, clock=self.clock, resync_interval=resync_interval,
                max_keys=max_keys_per_message, signing_key=None if signing_key is None else signing_key.encode(),
                events=self.events,
            )  # fmt: skip

    @staticmethod
    def _bus_client(url: str, cluster: bool, timeout: float) -> Any:
        # Pub/sub needs its own connection without a read timeout (it idles between messages).
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            return RedisCluster.from_url(url, socket_connect_timeout=timeout)
        from redis.asyncio import Redis

        return Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=None)

    def wall_ms(self) -> int:
        return int(self.clock.wall() * 1000)

    @property
    def bus_live(self) -> bool:
        """No invalidation may have been missed: subscribed, and no resync pending."""
        return self.bus is None or (self.bus.subscribed and not self.bus.resync_pending)

    def add(self, cache: TableCache) -> None:
        self.tables[cache.table] = cache
        if self.bus is not None:
            self.bus.register(cache.table, cache.on_message)

    def on_gap(self) -> None:
        """Invalidations may have been missed: flush every L1, distrust every Bloom filter."""
        for t in self.tables.values():
            t.l1.flush()
            t.resync_bloom()

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run ``work`` in a background task, kept referenced until done (and waited for by
        :meth:`aclose`)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def shielded(self, work: Awaitable[T]) -> T:
        """Await ``work`` in its own task, which finishes even if the caller is cancelled
        (the task is kept referenced until done, and awaited by :meth:`aclose`)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return await asyncio.shield(task)

    def redis_returned(self) -> None:
        """The breaker closed again: L1 may hold what Redis-borne invalidations would have evicted."""
        for t in self.tables.values():
            t.l1.flush()

    async def start(self) -> None:
        self.retry.start()
        if self.bus is not None:
            await self.bus.start()
        # A filter that cannot be warmed (table missing, database down) stays
        # distrusted: reads go to the database until a later rebuild succeeds.
        await asyncio.gather(*(t.rebuild() for t in self.tables.values()))

    async def aclose(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=1.0)
        await self.retry.drain(1.0)
        await self.retry.aclose()
        for t in self.tables.values():
            await t.aclose()
        if self.bus is not None:
            await self.bus.aclose()
            await self.bus.client.aclose()
        if self._client is not None:
            await self._client.aclose()
