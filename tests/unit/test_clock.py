"""The injected clock and backoff: retries, reconnects and lease waits on fake time.

The fake clock's ``sleep`` advances its own time and only yields to the event
loop, so every wait below takes no real time.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from dal.cache.invalidation import InvalidationBus, RetryQueue
from dal.cache.local import MISS
from dal.cache.tiered import CacheRuntime, TableCache
from dal.clock import Backoff, Clock, SystemClock, as_clock
from dal.config import CachePolicy


class FakeClock:
    """Time that moves only when something sleeps on it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def approx(xs: list[float]) -> Any:
    return pytest.approx(xs, rel=1e-12)


# --------------------------------------------------------------------------- Clock


def test_fake_and_system_clocks_are_clocks() -> None:
    assert isinstance(FakeClock(), Clock)
    assert isinstance(SystemClock(), Clock)
    fake = FakeClock()
    assert as_clock(fake) is fake


def test_as_clock_builds_a_system_clock_from_time_sources() -> None:
    c = as_clock(lambda: 5.0, lambda: 7.0)
    assert (c.monotonic(), c.wall()) == (5.0, 7.0)
    default = as_clock()
    assert abs(default.wall() - time.time()) < 5 and abs(default.monotonic() - time.monotonic()) < 5
    with pytest.raises(TypeError):
        as_clock(FakeClock(), lambda: 1.0)


def test_system_clock_keeps_the_source_itself() -> None:
    # L1 reads the time on every lookup: no wrapper call in between.
    assert SystemClock().monotonic is time.monotonic
    assert SystemClock().wall is time.time


# --------------------------------------------------------------------------- Backoff


def test_backoff_doubles_to_its_maximum_and_resets() -> None:
    b = Backoff(0.05, 0.4)
    assert [b.next() for _ in range(6)] == approx([0.05, 0.1, 0.2, 0.4, 0.4, 0.4])
    b.reset()
    assert [b.next() for _ in range(2)] == approx([0.05, 0.1])
    b3 = Backoff(1.0, 10.0, multiplier=3.0)
    assert [b3.next() for _ in range(4)] == [1.0, 3.0, 9.0, 10.0]


def test_backoff_jitter_is_bounded_and_follows_the_rng() -> None:
    def run(seed: int) -> list[float]:
        b = Backoff(0.1, 0.8, jitter=0.25, rng=random.Random(seed))
        return [b.next() for _ in range(6)]

    a = run(3)
    assert a == run(3)
    assert a != run(4)
    for got, base in zip(a, [0.1, 0.2, 0.4, 0.8, 0.8, 0.8], strict=True):
        assert base * 0.75 <= got <= base * 1.25


def test_backoff_without_jitter_never_draws() -> None:
    rng = random.Random(1)
    state = rng.getstate()
    b = Backoff(0.1, 1.0, rng=rng)
    for _ in range(5):
        b.next()
    assert rng.getstate() == state


def test_fresh_starts_the_same_policy_over() -> None:
    b = Backoff(0.1, 1.0, multiplier=4.0)
    b.next()
    f = b.fresh()
    assert f.next() == 0.1 and f.next() == 0.4 and b.next() == 0.4


@pytest.mark.parametrize(
    "kw",
    [
        {"initial": 0.0, "maximum": 1.0},
        {"initial": 1.0, "maximum": 0.5},
        {"initial": 0.1, "maximum": 1.0, "multiplier": 0.5},
        {"initial": 0.1, "maximum": 1.0, "jitter": 1.0},
        {"initial": 0.1, "maximum": 1.0, "jitter": -0.1},
        {"initial": float("nan"), "maximum": 1.0},
    ],
)
def test_backoff_rejects_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kw)


# --------------------------------------------------------------------------- RetryQueue


class Flaky:
    """Fails ``fails`` times, then succeeds."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.attempts = 0

    async def __call__(self) -> bool:
        self.attempts += 1
        return self.attempts > self.fails


async def drained(q: RetryQueue) -> None:
    await q.drain(5.0)
    assert q.pending == 0


async def test_retry_queue_waits_the_backoff_sequence_on_its_clock() -> None:
    clock = FakeClock()
    q = RetryQueue(backoff=Backoff(0.05, 0.4), clock=clock)
    q.start()
    try:
        t0 = time.monotonic()
        first = Flaky(5)
        q.put(first)
        await drained(q)
        assert first.attempts == 6
        assert clock.sleeps == approx([0.05, 0.1, 0.2, 0.4, 0.4])
        assert clock.now == pytest.approx(1000.0 + 1.15)
        # after a success the sequence starts over
        clock.sleeps.clear()
        q.put(Flaky(2))
        await drained(q)
        assert clock.sleeps == approx([0.05, 0.1])
        assert time.monotonic() - t0 < 1.0  # fake time only
    finally:
        await q.aclose()


async def test_retry_queue_default_waits_are_unchanged() -> None:
    clock = FakeClock()
    q = RetryQueue(clock=clock)
    q.start()
    try:
        q.put(Flaky(9))
        await drained(q)
        assert clock.sleeps == approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])
    finally:
        await q.aclose()


async def test_retry_queue_keeps_the_initial_maximum_shorthand() -> None:
    clock = FakeClock()
    q = RetryQueue(initial=0.01, maximum=0.03, clock=clock)
    q.start()
    try:
        q.put(Flaky(3))
        await drained(q)
        assert clock.sleeps == approx([0.01, 0.02, 0.03])
    finally:
        await q.aclose()
    with pytest.raises(TypeError):
        RetryQueue(initial=0.1, backoff=Backoff(0.1, 1.0))


# --------------------------------------------------------------------------- the subscriber


class FailingPubSub:
    def __init__(self, owner: FakeRedis) -> None:
        self.owner = owner

    async def subscribe(self, channel: str) -> None:
        self.owner.attempts += 1
        if self.owner.attempts not in self.owner.succeed_on:
            raise ConnectionError("refused")

    async def get_message(self, **kw: Any) -> Any:
        raise ConnectionError("lost")  # subscribed, then the connection drops at once

    async def aclose(self) -> None:
        pass


class FakeRedis:
    def __init__(self, succeed_on: set[int]) -> None:
        self.attempts = 0
        self.succeed_on = succeed_on

    def pubsub(self) -> FailingPubSub:
        return FailingPubSub(self)


async def test_subscriber_reconnects_with_backoff_and_starts_over_once_subscribed() -> None:
    clock = FakeClock()
    client = FakeRedis(succeed_on={4})
    bus = InvalidationBus(
        client, "chan", on_gap=lambda: None, clock=clock, reconnect=Backoff(0.05, 0.4)
    )
    task = asyncio.create_task(bus._listen())
    try:
        for _ in range(10_000):
            if len(clock.sleeps) >= 8:
                break
            await asyncio.sleep(0)
        # three refusals, then subscribed (and lost): the sequence starts over
        assert clock.sleeps[:8] == approx([0.05, 0.1, 0.2, 0.05, 0.1, 0.2, 0.4, 0.4])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_subscriber_default_waits_are_unchanged() -> None:
    clock = FakeClock()
    bus = InvalidationBus(FakeRedis(succeed_on=set()), "chan", on_gap=lambda: None, clock=clock)
    task = asyncio.create_task(bus._listen())
    try:
        for _ in range(10_000):
            if len(clock.sleeps) >= 7:
                break
            await asyncio.sleep(0)
        assert clock.sleeps[:7] == approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --------------------------------------------------------------------------- lease waits


class L2:
    """The row an L2 read returns: nothing until the ``after``-th read."""

    def __init__(self, row: bytes | None = None, after: int | None = None) -> None:
        self.reads = 0
        self.row = row
        self.after = after

    async def get_row(self, base: str) -> bytes | None:
        self.reads += 1
        return self.row if self.after is not None and self.reads >= self.after else None


def table_cache(clock: FakeClock, lease_wait: float) -> TableCache:
    runtime = CacheRuntime(redis_url=None, clock=clock)
    policy = CachePolicy(lease_wait=lease_wait, bloom=False, serializer="json")
    return TableCache("users", policy, runtime, deep_copy=False, scan_keys=None)


async def test_await_fill_gives_up_at_lease_wait_of_the_clock() -> None:
    clock = FakeClock()
    tc = table_cache(clock, lease_wait=5.0)
    l2 = L2()
    t0 = time.monotonic()
    got = await tc._await_fill(l2, b"1", tc.base(b"1"))  # type: ignore[arg-type]
    assert got is MISS
    assert time.monotonic() - t0 < 1.0  # 5 s of fake time, no real waiting
    # polls at 2 ms doubling to 20 ms, one L2 read after each wait, until 5 s have passed
    assert clock.sleeps[:5] == approx([0.002, 0.004, 0.008, 0.016, 0.02])
    assert set(clock.sleeps[4:]) == {0.02}
    assert l2.reads == len(clock.sleeps)
    assert sum(clock.sleeps) >= 5.0 > sum(clock.sleeps[:-1])
    assert clock.now == pytest.approx(1000.0 + sum(clock.sleeps))


async def test_await_fill_returns_the_holders_fill() -> None:
    clock = FakeClock()
    tc = table_cache(clock, lease_wait=5.0)
    l2 = L2(row=tc.codec.dumps({"id": 1}), after=3)
    got = await tc._await_fill(l2, b"1", tc.base(b"1"))  # type: ignore[arg-type]
    assert got == {"id": 1}
    assert clock.sleeps == approx([0.002, 0.004, 0.008])


async def test_await_fill_with_no_lease_wait_does_not_wait() -> None:
    clock = FakeClock()
    tc = table_cache(clock, lease_wait=0.0)
    l2 = L2()
    assert await tc._await_fill(l2, b"1", tc.base(b"1")) is MISS  # type: ignore[arg-type]
    assert clock.sleeps == [] and l2.reads == 0


def test_the_runtime_clock_drives_l1_expiry() -> None:
    clock = FakeClock()
    tc = table_cache(clock, lease_wait=1.0)
    tc.l1.put(b"1", {"id": 1}, 2.0, tc.l1.generation())
    assert tc.cached(b"1") == {"id": 1}
    clock.now += 2.5
    assert tc.cached(b"1") is MISS
