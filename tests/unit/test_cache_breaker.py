"""The breaker on an injected clock, and RemoteCache's use of it (with a fake Redis client)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from dal.breaker import Breaker
from dal.cache.remote import UNAVAILABLE, RemoteCache


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def tick(self, dt: float) -> None:
        self.t += dt


def make(failures: int = 3, reset: float = 5.0) -> tuple[Breaker, FakeClock, list[int]]:
    clock = FakeClock()
    closed: list[int] = []
    b = Breaker("redis", failures=failures, reset=reset, clock=clock, on_close=lambda: closed.append(1))
    return b, clock, closed


def test_opens_after_n_consecutive_failures() -> None:
    b, _, closed = make(failures=3)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed"
    b.success()  # resets the consecutive count
    for _ in range(2):
        b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open"
    assert b.trips == 1
    assert not b.allow()
    assert not b.allow()
    assert closed == []


def test_half_open_trial_after_reset_then_close_on_success() -> None:
    b, clock, closed = make(failures=2, reset=5.0)
    b.failure()
    b.failure()
    clock.tick(4.999)
    assert b.state == "open" and not b.allow()
    clock.tick(0.002)
    assert b.state == "half-open"
    assert b.allow()  # the one trial
    assert not b.allow()  # others still skip while the trial runs
    assert not b.allow()
    b.success()
    assert b.state == "closed"
    assert closed == [1]
    assert b.allow() and b.allow()
    # more successes do not call on_close again
    b.success()
    b.success()
    assert closed == [1]


def test_trial_failure_reopens_for_a_full_reset_period() -> None:
    b, clock, closed = make(failures=1, reset=2.0)
    b.failure()
    assert b.trips == 1
    clock.tick(2.0)
    assert b.allow()
    b.failure()  # trial failed
    assert b.state == "open"
    assert not b.allow()
    clock.tick(1.9)
    assert not b.allow()
    clock.tick(0.1)
    assert b.allow()  # next trial
    b.success()
    assert b.state == "closed"
    assert closed == [1]
    assert b.trips == 1  # a failed trial is not a new trip


def test_on_close_runs_once_per_outage() -> None:
    b, clock, closed = make(failures=1, reset=1.0)
    for outage in range(3):
        b.failure()
        clock.tick(1.0)
        assert b.allow()
        b.success()
        assert closed == [1] * (outage + 1)
    assert b.trips == 3


def test_never_opened_breaker_never_calls_on_close() -> None:
    b, _, closed = make()
    for _ in range(10):
        b.success()
    b.failure()
    b.success()
    assert closed == []


# --------------------------------------------------------------------------- RemoteCache


class FakeRedis:
    """Just enough of redis.asyncio.Redis for RemoteCache: each call runs ``behaviour``."""

    def __init__(self) -> None:
        self.behaviour: Callable[[], Awaitable[Any]] = self._ok
        self.calls = 0

    async def _ok(self) -> Any:
        return [None, None]

    def register_script(self, _src: str) -> Callable[..., Awaitable[Any]]:
        async def run(**_kw: Any) -> Any:
            return await self._call()

        return run

    async def _call(self) -> Any:
        self.calls += 1
        return await self.behaviour()

    async def mget(self, _keys: list[str]) -> Any:
        return await self._call()

    async def get(self, _key: str) -> Any:
        return await self._call()

    async def ping(self) -> Any:
        return await self._call()


async def _refused() -> Any:
    raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")


async def test_remote_calls_skip_redis_while_open_and_count_errors() -> None:
    clock = FakeClock()
    breaker = Breaker("redis", failures=3, reset=1.0, clock=clock)
    client = FakeRedis()
    remote = RemoteCache(client, breaker)
    client.behaviour = _refused
    for _ in range(3):
        assert await remote.read(["a"]) is UNAVAILABLE
    assert remote.errors == 3
    assert breaker.state == "open"
    assert not remote.available
    for _ in range(100):
        assert await remote.read(["a"]) is UNAVAILABLE
    assert client.calls == 3  # skipped at once: no call reached the client
    assert remote.errors == 3
    client.behaviour = client._ok
    clock.tick(1.0)
    assert await remote.read(["a"]) == [(None, None)]
    assert breaker.state == "closed" and remote.available


async def test_cancelled_trial_does_not_wedge_the_breaker() -> None:
    """A half-open trial whose caller is cancelled (a request timeout) must not leave the
    breaker waiting forever for that trial's outcome."""
    clock = FakeClock()
    breaker = Breaker("redis", failures=1, reset=1.0, clock=clock)
    client = FakeRedis()
    remote = RemoteCache(client, breaker)
    client.behaviour = _refused
    assert await remote.read(["a"]) is UNAVAILABLE
    assert breaker.state == "open"
    clock.tick(1.0)
    hang = asyncio.Event()

    async def hanging() -> Any:
        await hang.wait()
        return [None, None]

    client.behaviour = hanging
    trial = asyncio.create_task(remote.read(["a"]))
    for _ in range(3):
        await asyncio.sleep(0)
    assert client.calls == 2  # the trial is in flight
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    # Redis is healthy again; the next call must be let through as a new trial
    client.behaviour = client._ok
    assert await remote.read(["a"]) == [(None, None)]
    assert breaker.state == "closed"


async def test_unexpected_exception_in_a_trial_does_not_wedge_the_breaker() -> None:
    clock = FakeClock()
    breaker = Breaker("redis", failures=1, reset=1.0, clock=clock)
    client = FakeRedis()
    remote = RemoteCache(client, breaker)
    client.behaviour = _refused
    await remote.read(["a"])
    clock.tick(1.0)

    async def weird() -> Any:
        raise RuntimeError("bug in a client library")

    client.behaviour = weird
    with pytest.raises(RuntimeError):
        await remote.read(["a"])
    client.behaviour = client._ok
    assert await remote.read(["a"]) == [(None, None)]
    assert breaker.state == "closed"


def test_abandoned_trial_lets_the_next_call_try() -> None:
    b, clock, closed = make(failures=1, reset=1.0)
    b.failure()
    clock.tick(1.0)
    assert b.allow()  # the trial ...
    assert not b.allow()
    b.abandon()  # ... was cancelled: no verdict
    assert b.state == "half-open"
    assert b.allow()  # a new trial
    b.success()
    assert closed == [1]
    b.abandon()  # harmless when closed
    assert b.state == "closed" and b.allow()
