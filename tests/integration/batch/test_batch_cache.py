"""Batched writes to a cached table: no stale L1/L2 afterwards, one invalidation
message per batch.

Layer A writes; layer B (another "process": its own L1, Bloom filter and
subscription) has the keys cached beforehand and must see the new values; a
layer started afterwards (empty L1) must see them at once, which proves L2
held nothing stale. Messages are counted on the channel by a raw Redis
subscriber of the test's own, and cross-checked with A's bus sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis

from dal import DataLayer
from tests.batch_support import SHARDS, batch_urls, db_of_slot, expected_batches, slot_of
from tests.conftest import REDIS_URL, users_orders_metadata

TABLES = {"users": {"shard_key": "id", "table_shards": SHARDS, "cache": True}}


def cached_topology(urls: list[str], namespace: str) -> dict[str, Any]:
    return {
        "databases": {f"db{i}": {"primary": u} for i, u in enumerate(urls)},
        "tables": TABLES,
        "pool": {"min_size": 0, "max_size": 8},
        "cache": {"redis": REDIS_URL, "namespace": namespace, "channel": f"dal:test:{namespace}"},
    }


def new_layer(urls: list[str], namespace: str) -> DataLayer:
    return DataLayer(cached_topology(urls, namespace), users_orders_metadata(), env={})


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


class Channel:
    """A raw subscriber counting the messages on one channel."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.client = aioredis.from_url(REDIS_URL)
        self.messages: list[list[Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pubsub = self.client.pubsub()
        await pubsub.subscribe(self.channel)
        ready = asyncio.Event()

        async def listen() -> None:
            try:
                ready.set()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg["type"] == "message":
                        self.messages.append(msgpack.unpackb(msg["data"], raw=False))
            finally:
                await pubsub.aclose()

        self._task = asyncio.create_task(listen())
        await ready.wait()

    async def take(self, n: int) -> list[list[Any]]:
        """Wait for ``n`` messages, make sure no more arrive, and return them."""

        async def arrived() -> bool:
            return len(self.messages) >= n

        await wait_for(arrived)
        await asyncio.sleep(0.2)
        got, self.messages = self.messages, []
        assert len(got) == n, f"{len(got)} messages, expected {n}"
        return got

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()


@pytest.fixture
async def cenv(backend: str, tmp_path: Path) -> AsyncIterator[tuple[DataLayer, DataLayer, Channel, Callable[[], DataLayer]]]:
    urls = batch_urls(backend, tmp_path)
    ns = "tb" + uuid.uuid4().hex[:12]
    a, b = new_layer(urls, ns), new_layer(urls, ns)
    await a.start()
    await a.drop_all()
    await a.create_all()
    await a.aclose()
    a = new_layer(urls, ns)
    await a.start()
    await b.start()
    ch = Channel(f"dal:test:{ns}")
    await ch.start()
    extra: list[DataLayer] = []

    def fresh() -> DataLayer:
        lay = new_layer(urls, ns)
        extra.append(lay)
        return lay

    try:
        for lay in (a, b):
            assert lay.cache is not None and lay.cache.bus_live
        yield a, b, ch, fresh
    finally:
        await ch.aclose()
        for lay in extra:
            await lay.aclose()
        await b.aclose()
        await a.drop_all()
        await a.aclose()
        client = aioredis.from_url(REDIS_URL)
        for pattern in (f"{ns}:*", "{" + ns + ":*"):
            keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
            for i in range(0, len(keys), 1000):
                await client.delete(*keys[i : i + 1000])
        await client.aclose()


def seq(layer: DataLayer) -> int:
    assert layer.cache is not None and layer.cache.bus is not None
    return layer.cache.bus._seq


async def test_batches_invalidate_other_layers_one_message_per_batch(
    cenv: tuple[DataLayer, DataLayer, Channel, Callable[[], DataLayer]],
) -> None:
    a, b, ch, fresh = cenv
    ua, ub = a.repository("users"), b.repository("users")
    ids = list(range(1, 1001))
    sample = ids[::37]

    # B caches "absent" for keys about to be inserted.
    assert [await ub.get(i) for i in sample] == [None] * len(sample)

    async def b_sees(expect: Callable[[int], Any]) -> bool:
        for i in sample:
            row = await ub.get(i)
            if (None if row is None else (row["name"], row["age"])) != expect(i):
                return False
        rows = await ub.get_many(ids)
        return all((None if k not in rows else (rows[k]["name"], rows[k]["age"])) == expect(k) for k in ids)

    async def fresh_sees(expect: Callable[[int], Any]) -> None:
        async with fresh() as c:
            rows = await c.repository("users").get_many(ids)
            got = {k: (rows[k]["name"], rows[k]["age"]) for k in rows}
            assert got == {k: expect(k) for k in ids if expect(k) is not None}

    # -- insert_many: one message per batch, inserted=True, keys of that batch only
    s0 = seq(a)
    res = await ua.insert_many([{"id": i, "name": f"n{i}", "age": 1} for i in ids], batch_size=100)
    n = expected_batches(ids, 100)
    assert res.ok and res.batches == n
    msgs = await ch.take(n)
    assert seq(a) - s0 == n
    assert all(m[2] == "users" and m[4] is True for m in msgs)
    assert sorted(len(m[3]) for m in msgs) == sorted(len(c) for c in chunk_sizes(ids, 100))
    assert sum(len(m[3]) for m in msgs) == 1000
    await fresh_sees(lambda i: (f"n{i}", 1))
    await wait_for(lambda: b_sees(lambda i: (f"n{i}", 1)))

    # -- update_many: B has the rows cached now (L1 and L2)
    s0 = seq(a)
    res = await ua.update_many([{"id": i, "name": f"u{i}", "age": 2} for i in ids], batch_size=250)
    n = expected_batches(ids, 250)
    assert res.ok and res.affected == 1000
    msgs = await ch.take(n)
    assert seq(a) - s0 == n and all(m[4] is False for m in msgs)
    await fresh_sees(lambda i: (f"u{i}", 2))
    await wait_for(lambda: b_sees(lambda i: (f"u{i}", 2)))

    # -- upsert_many
    s0 = seq(a)
    res = await ua.upsert_many([{"id": i, "name": f"p{i}"} for i in ids[:500]], batch_size=1000)
    n = expected_batches(ids[:500], 1000)
    assert res.ok
    await ch.take(n)
    assert seq(a) - s0 == n

    def after_upsert(i: int) -> Any:
        return (f"p{i}", 2) if i <= 500 else (f"u{i}", 2)

    await fresh_sees(after_upsert)
    await wait_for(lambda: b_sees(after_upsert))

    # -- delete_many
    gone = set(ids[::2])
    s0 = seq(a)
    res = await ua.delete_many(sorted(gone), batch_size=50)
    n = expected_batches(sorted(gone), 50)
    assert res.ok and res.affected == len(gone)
    await ch.take(n)
    assert seq(a) - s0 == n

    def after_delete(i: int) -> Any:
        return None if i in gone else after_upsert(i)

    await fresh_sees(after_delete)
    await wait_for(lambda: b_sees(after_delete))

    # -- atomic: one transaction, one message
    on_db0 = [i for i in ids if i not in gone and db_of_slot(slot_of(i)) == "db0"]
    s0 = seq(a)
    res = await ua.update_many([{"id": i, "age": 3} for i in on_db0], batch_size=10, atomic=True)
    assert res.ok and res.batches > 1
    (msg,) = await ch.take(1)
    assert len(msg[3]) == len(on_db0)
    assert seq(a) - s0 == 1

    def after_atomic(i: int) -> Any:
        v = after_delete(i)
        return v if v is None or i not in on_db0 else (v[0], 3)

    await fresh_sees(after_atomic)
    await wait_for(lambda: b_sees(after_atomic))


def chunk_sizes(ids: list[int], batch_size: int) -> list[list[int]]:
    per: dict[int, list[int]] = {}
    for i in ids:
        per.setdefault(slot_of(i), []).append(i)
    return [ks[j : j + batch_size] for ks in per.values() for j in range(0, len(ks), batch_size)]


async def test_writer_batches_invalidate_once_per_batch(
    cenv: tuple[DataLayer, DataLayer, Channel, Callable[[], DataLayer]],
) -> None:
    a, b, ch, _ = cenv
    ua, ub = a.repository("users"), b.repository("users")
    ids = list(range(1, 201))
    assert [await ub.get(i) for i in ids[:20]] == [None] * 20
    s0 = seq(a)
    w = ua.writer(max_rows=1000, max_delay=0.05)
    await asyncio.gather(*(w.insert({"id": i, "name": f"w{i}"}) for i in ids))
    await w.aclose()
    # One batch per physical table (all 200 rows came within max_delay).
    assert w.batches == len({slot_of(i) for i in ids})
    await ch.take(w.batches)
    assert seq(a) - s0 == w.batches

    async def seen() -> bool:
        return [(await ub.get(i) or {}).get("name") for i in ids[:20]] == [f"w{i}" for i in ids[:20]]

    await wait_for(seen)


async def test_a_large_invalidation_fits_the_redis_call_timeout(
    cenv: tuple[DataLayer, DataLayer, Channel, Callable[[], DataLayer]],
) -> None:
    """The keys of one large batch (20,000) are invalidated in Redis calls of a bounded size,
    each within the call timeout: no Redis error, no breaker trip, nothing left to retry,
    and every key's version bumped. (As one pipeline of 20,000 scripts, the call outlived
    its timeout and the whole invalidation went to the retry queue.)"""
    from dal.cache.keys import encode_cache_key

    a, _, _, _ = cenv
    cache = a.cache_of("users")
    assert a.cache is not None and a.cache.remote is not None and cache is not None
    remote = a.cache.remote
    remote.timeout = 0.1  # the whole call is bounded: a big one must be split to fit
    errors, trips = remote.errors, remote.breaker.trips
    encs = [encode_cache_key((i,)) for i in range(1, 20_001)]
    await cache.invalidate(encs, inserted=False)
    assert (remote.errors, remote.breaker.trips) == (errors, trips)
    assert a.cache.retry.pending == 0
    client = aioredis.from_url(REDIS_URL)
    try:
        versions = await client.mget([cache.base(e) + ":ver" for e in (encs[0], encs[9_999], encs[-1])])
    finally:
        await client.aclose()
    assert all(v is not None for v in versions)
