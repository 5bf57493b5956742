"""The two-level cache against real databases and a real Redis, in one process.

Two DataLayer instances over the same databases and Redis namespace play two
processes (each has its own L1, Bloom filter, pub/sub origin). Every test uses
its own namespace and channel on the shared Redis and deletes only its keys;
tests that kill or stall Redis start their own ``redis-server``
(:class:`tests.cache_support.RedisServer`). Table names carry the pid so
concurrent test runs on the shared database servers do not collide.

Measured numbers (invalidation delays, false positives) are printed; run with
``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa

from dal import DataLayer
from dal.cache.bloom import BloomMembership
from dal.cache.keys import encode_cache_key
from dal.cache.tiered import TableCache
from dal.repository import Repository
from tests.cache_support import (
    Queries,
    RedisServer,
    bulk_insert,
    cache_topology,
    delete_ns,
    ns_keys,
    unique_namespace,
    wait_until,
)
from tests.conftest import REDIS_URL
from tests.replication import PgReplicaSet

pytestmark = pytest.mark.integration

USERS = f"cusers{os.getpid()}"
ORDERS = f"corders{os.getpid()}"
PLAIN = f"cplain{os.getpid()}"  # not cached


def metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        USERS, md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("email", sa.String(128)),
        sa.Column("age", sa.Integer),
        sa.Column("active", sa.Boolean, nullable=False, default=True),
    )  # fmt: skip
    sa.Table(
        ORDERS, md,
        sa.Column("user_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("order_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        sa.Column("note", sa.Text),
    )  # fmt: skip
    sa.Table(
        PLAIN, md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("v", sa.String(16)),
    )  # fmt: skip
    return md


TABLES: dict[str, Any] = {
    USERS: {"shard_key": "id", "table_shards": 4, "cache": True},
    ORDERS: {"shard_key": "user_id", "table_shards": 4, "cache": True},
    PLAIN: {"database": "db0"},
}


def user(i: int, name: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"id": i, "name": name or f"user-{i}", "email": f"u{i}@example.com", "age": 20 + i % 50,
            "active": i % 2 == 0, **kw}  # fmt: skip


def enc(key: Any) -> bytes:
    return encode_cache_key(key if isinstance(key, tuple) else (key,))


@dataclass
class Env:
    """Two layers ("processes") over the same databases and Redis namespace."""

    a: DataLayer
    b: DataLayer
    r: Any  # a plain redis client on the same server, to look at keys
    ns: str
    layers: list[DataLayer] = field(default_factory=list)

    @property
    def ua(self) -> Repository[dict[str, Any]]:
        return self.a.repository(USERS)

    @property
    def ub(self) -> Repository[dict[str, Any]]:
        return self.b.repository(USERS)

    @property
    def ta(self) -> TableCache:
        tc = self.a.cache_of(USERS)
        assert tc is not None
        return tc

    @property
    def tb(self) -> TableCache:
        tc = self.b.cache_of(USERS)
        assert tc is not None
        return tc

    async def l2(self, key: Any, tc: TableCache | None = None) -> Any:
        """The L2 entry of ``key``: ``"MISSING"``, ``None`` (placeholder) or the row."""
        tc = tc or self.ta
        raw = await self.r.get(tc.base(enc(key)))
        return "MISSING" if raw is None else tc.codec.loads(raw)

    async def version(self, key: Any, tc: TableCache | None = None) -> bytes | None:
        tc = tc or self.ta
        return await self.r.get(tc.base(enc(key)) + ":ver")  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def make_env(
    urls: list[str],
    *,
    redis: str = REDIS_URL,
    settings: dict[str, Any] | None = None,
    settings_b: dict[str, Any] | None = None,
    a_kwargs: dict[str, Any] | None = None,
    b_kwargs: dict[str, Any] | None = None,
    create: bool = True,
    prefill: dict[str, list[dict[str, Any]]] | None = None,
    topology: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> AsyncIterator[Env]:
    ns = unique_namespace()
    base = {"breaker_reset": 0.5, **(settings or {})}

    def cfg(extra: dict[str, Any] | None) -> dict[str, Any]:
        c = cache_topology(urls, TABLES, redis=redis, namespace=ns, settings={**base, **(extra or {})})
        return topology(c) if topology else c

    def plain() -> dict[str, Any]:
        """The same topology without the cache (to create, fill and drop tables)."""
        c = copy.deepcopy(cfg(None))  # (the table dicts are shared with TABLES)
        c.pop("cache")
        for t in c["tables"].values():
            t.pop("cache", None)
        return c

    if create:
        # Tables (and rows) first, as in production, so start() warms the Bloom filters.
        async with DataLayer(plain(), metadata(), env={}) as setup:
            await setup.drop_all()
            await setup.create_all()
            for table, rows in (prefill or {}).items():
                await bulk_insert(setup, table, rows)
    a = DataLayer(cfg(None), metadata(), env={}, **(a_kwargs or {}))
    b = DataLayer(cfg(settings_b), metadata(), env={}, **(b_kwargs or {}))
    r = aioredis.Redis.from_url(redis, socket_timeout=5)
    env = Env(a, b, r, ns, [a, b])
    try:
        await a.start()
        await b.start()
        yield env
    finally:
        with contextlib.suppress(Exception):
            await delete_ns(r, ns)
        for lay in env.layers:
            await lay.aclose()
        if create:
            async with DataLayer(plain(), metadata(), env={}) as cleanup:
                await cleanup.drop_all()
        await r.aclose()
        # the layers' last retries may have re-created a key or two
        with contextlib.suppress(Exception):
            r2 = aioredis.Redis.from_url(redis, socket_timeout=5)
            await delete_ns(r2, ns)
            await r2.aclose()


def only(backend: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("backend", [backend], indirect=True)


async def expected_rows(lay: DataLayer, table: str, keys: list[Any]) -> dict[Any, dict[str, Any]]:
    """Rows as the database returns them (cache bypassed)."""
    return await lay.repository(table).get_many(keys, primary=True)


# =========================================================================== read path


async def test_read_path_l1_l2_database(shard_urls: list[str], backend: str) -> None:
    async with make_env(shard_urls, settings={"bloom": False}) as env:
        a, b, ua, ub, ta, tb = env.a, env.b, env.ua, env.ub, env.ta, env.tb
        await bulk_insert(a, USERS, [user(i) for i in range(1, 41)])
        await bulk_insert(a, ORDERS, [{"user_id": i, "order_id": j, "amount": Decimal(f"{i}.{j:02d}"),
                                       "note": "ü" * j} for i in range(1, 6) for j in range(3)])  # fmt: skip
        want = await expected_rows(a, USERS, list(range(1, 41)))
        assert len(want) == 40

        with Queries(a) as qa, Queries(b) as qb:
            # miss -> database -> L2 fill -> L1
            assert await ua.get(1) == want[1]
            assert len(qa.selects) == 1
            assert await env.l2(1) == want[1]
            assert ta.cached(enc(1)) == want[1]
            # second get: L1 hit, no query
            qa.clear()
            hits = ta.l1.hits
            assert await ua.get(1) == want[1]
            assert len(qa) == 0 and ta.l1.hits == hits + 1
            # the other layer: from L2, no query, then its L1
            assert await ub.get(1) == want[1]
            assert len(qb) == 0
            assert tb.cached(enc(1)) == want[1]

            # composite key, Decimal and non-ASCII survive L2 exactly
            oa, ob = a.repository(ORDERS), b.repository(ORDERS)
            owant = await expected_rows(a, ORDERS, [(3, 2)])
            got = await oa.get((3, 2))
            assert got == owant[(3, 2)] and isinstance(got["amount"], Decimal)  # type: ignore[index]
            qb.clear()
            got_b = await ob.get((3, 2))
            assert got_b == owant[(3, 2)] and len(qb) == 0
            assert got_b["amount"] == Decimal("3.02")  # type: ignore[index]

            # get_many: A fills 2..11 into L2; B asks for all 40 + 5 missing
            await ua.get_many(range(2, 12))
            mgets = 0
            orig_mget = tb.runtime.remote.client.mget  # type: ignore[union-attr]

            async def counting_mget(keys: list[str]) -> Any:
                nonlocal mgets
                mgets += 1
                return await orig_mget(keys)

            tb.runtime.remote.client.mget = counting_mget  # type: ignore[union-attr]
            qb.clear()
            missing = [1001, 1002, 1003, 1004, 1005]
            got_many = await ub.get_many([*range(1, 41), *missing])
            assert got_many == want
            assert mgets == 1
            # one query per physical table for the keys neither in B's L1 nor in L2
            t = b.tables[USERS]
            assert t.sharder is not None
            rest = [*range(12, 41), *missing]
            tables = {t.physical[t.sharder.slot(k)].name for k in rest}
            assert qb.per_table() == dict.fromkeys(tables, 1), qb.per_table()
            # missing keys were cached as placeholders (the Bloom filter is off here)
            for k in missing:
                assert await env.l2(k) is None
            # everything is in B's L1 now: no MGET, no query
            qb.clear()
            assert await ub.get_many([*range(1, 41), *missing]) == want
            assert mgets == 1 and len(qb) == 0
            # and a third layer that never saw anything reads all 40 from L2 with no query
            async with DataLayer(
                cache_topology(shard_urls, TABLES, redis=REDIS_URL, namespace=env.ns, settings={"bloom": False}),
                metadata(), env={},
            ) as c:  # fmt: skip
                with Queries(c) as qc:
                    assert await c.repository(USERS).get_many(range(1, 41)) == want
                    assert await c.repository(USERS).get(1003) is None
                    assert len(qc) == 0


# =========================================================================== writes


async def _l1_sees(repo: Repository[dict[str, Any]], key: Any, want: Any) -> bool:
    return await repo.get(key) == want


@pytest.mark.parametrize("backend", ["postgresql", "mysql", "sqlite"], indirect=True)
async def test_writes_invalidate_this_layer_at_once_and_the_other_soon(
    shard_urls: list[str], backend: str
) -> None:
    async with make_env(shard_urls, settings={"bloom": False}) as env:
        ua, ub = env.ua, env.ub
        k = 7
        await ua.insert(user(k, "v1"))
        delays: dict[str, float] = {}

        async def check(op: str, write: Callable[[], Any], new: Any) -> None:
            old = await ua.get(k)
            assert await ub.get(k) == old  # both L1s hold the old value
            assert env.ta.cached(enc(k)) == old and env.tb.cached(enc(k)) == old
            # readers hammer A while the write runs: any read that starts after the
            # write returned must see the new value
            done = False
            bad: list[Any] = []

            async def reader() -> None:
                while True:
                    await asyncio.sleep(0)  # an L1 hit does not yield
                    started_after = done
                    got = await ua.get(k)
                    if started_after and got != new:
                        bad.append(got)
                    if started_after:
                        return

            readers = [asyncio.create_task(reader()) for _ in range(5)]
            await asyncio.sleep(0.001)
            await write()
            done = True
            t0 = time.monotonic()
            assert await ua.get(k) == new  # this layer: at once
            await asyncio.gather(*readers)
            assert bad == []
            await wait_until(lambda: _l1_sees(ub, k, new), timeout=2.0, interval=0.0005)
            delays[op] = (time.monotonic() - t0) * 1000
            assert await env.l2(k) in ("MISSING", new)

        await check("update", lambda: ua.update(k, {"name": "v2"}), {**user(k, "v2")})
        await check("upsert", lambda: ua.upsert(user(k, "v3", age=99)), {**user(k, "v3", age=99)})
        await check("delete", lambda: ua.delete(k), None)
        await check("insert", lambda: ua.insert(user(k, "v4")), user(k, "v4"))
        # a write through B is seen by A as well
        ver = await env.version(k)
        await ub.update(k, {"email": None})
        assert await ub.get(k) == {**user(k, "v4"), "email": None}
        t0 = time.monotonic()
        await wait_until(lambda: _l1_sees(ua, k, {**user(k, "v4"), "email": None}), timeout=2.0, interval=0.0005)
        delays["update via B"] = (time.monotonic() - t0) * 1000
        assert await env.version(k) != ver
        print(f"\n[{backend}] other layer sees the write after (ms): "
              + ", ".join(f"{op} {d:.2f}" for op, d in delays.items())
              + f"; last pub/sub delay {env.tb.runtime.bus.last_delay_ms:.2f} ms")  # type: ignore[union-attr]
        assert all(d < 1000 for d in delays.values()), delays


@only("postgresql")
async def test_transaction_invalidates_after_commit_and_not_on_rollback(shard_urls: list[str]) -> None:
    async with make_env(shard_urls, settings={"bloom": False}) as env:
        ua, ub = env.ua, env.ub
        k = 11
        await ua.insert(user(k, "v1"))
        v1 = await ua.get(k)
        assert await ub.get(k) == v1
        ver0 = await env.version(k)

        # commit: nothing is invalidated until the transaction commits
        async with ua.transaction(k) as tx:
            assert await tx.update(k, {"name": "v2"})
            assert await tx.get(k) == user(k, "v2")  # the transaction sees its write (bypasses cache)
            assert env.ta.cached(enc(k)) == v1  # not evicted yet
            assert await env.l2(k) == v1
            assert await env.version(k) == ver0
            assert await ua.get(k) == v1  # others still read the committed value
        assert await ua.get(k) == user(k, "v2")
        assert await env.l2(k) in ("MISSING", user(k, "v2"))
        assert await env.version(k) != ver0
        await wait_until(lambda: _l1_sees(ub, k, user(k, "v2")), timeout=2.0)

        # rollback: no invalidation at all
        v2 = user(k, "v2")
        assert await ub.get(k) == v2
        await ua.get(k)
        ver1 = await env.version(k)
        received = env.tb.runtime.bus.received  # type: ignore[union-attr]
        t = env.a.tables[USERS]
        assert t.sharder is not None
        other = next(x for x in range(2000, 3000) if t.sharder.place(x).database == t.sharder.place(k).database)
        with pytest.raises(RuntimeError, match="abort"):
            async with ua.transaction(k) as tx:
                await tx.update(k, {"name": "never"})
                await tx.insert(user(other, "never"))
                raise RuntimeError("abort")
        assert await env.version(k) == ver1
        assert await env.version(other) is None
        assert env.ta.cached(enc(k)) == v2
        assert await env.l2(k) == v2
        await asyncio.sleep(0.05)
        assert env.tb.runtime.bus.received == received  # type: ignore[union-attr]
        assert await ua.get(k) == v2 and await ub.get(k) == v2
        assert await ua.get(other) is None


# =========================================================================== negative caching


@only("postgresql")
async def test_negative_entry_is_removed_everywhere_by_an_insert(shard_urls: list[str]) -> None:
    """go-zero #1672: a cached "not found" must not outlive the insert of that key."""
    async with make_env(shard_urls, settings={"bloom": False, "negative_ttl": 5.0, "l2_ttl": 300.0}) as env:
        ua, ub = env.ua, env.ub
        k = 4242
        with Queries(env.a) as qa, Queries(env.b) as qb:
            assert await ub.get(k) is None
            assert len(qb.selects) == 1
            assert await env.l2(k) is None  # a placeholder
            pttl = await env.r.pttl(env.tb.base(enc(k)))
            assert 0 < pttl <= 5.5 * 1000, pttl  # negative TTL (with jitter), not the L2 TTL
            assert env.tb.cached(enc(k)) is None  # B: cached absent in L1
            assert await ua.get(k) is None  # A: from the placeholder, no query
            assert len(qa.selects) == 0
            assert env.ta.cached(enc(k)) is None
            received = env.tb.runtime.bus.received  # type: ignore[union-attr]
            await ua.insert(user(k))  # the insert comes from A
            assert await env.l2(k) == "MISSING"  # placeholder deleted
            assert await ua.get(k) == user(k)
            await wait_until(lambda: env.tb.runtime.bus.received > received, timeout=2.0)  # type: ignore[union-attr]
            assert await ub.get(k) == user(k)  # the next get in B
            # and the same through the other direction with get_many
            k2 = 4343
            assert await ua.get_many([k2]) == {}
            assert await env.l2(k2) is None
            received = env.ta.runtime.bus.received  # type: ignore[union-attr]
            await ub.insert(user(k2))
            await wait_until(lambda: env.ta.runtime.bus.received > received, timeout=2.0)  # type: ignore[union-attr]
            assert await ua.get_many([k2]) == {k2: user(k2)}
            assert await ub.get(k2) == user(k2)


# =========================================================================== bloom filter


@only("postgresql")
async def test_bloom_filter_keeps_missing_keys_away_from_the_database(shard_urls: list[str]) -> None:
    n = 10_000  # the filter at its capacity: the worst false-positive rate
    settings = {"bloom": True, "bloom_capacity": n, "bloom_error_rate": 0.001}
    async with make_env(shard_urls, settings=settings, prefill={USERS: [user(i) for i in range(n)]}) as env:
        ua, ub, ta, tb = env.ua, env.ub, env.ta, env.tb
        # start() warmed both filters from the database
        assert ta.bloom_ready and tb.bloom_ready and ta.bloom is not None
        assert ta.bloom.count == n and not ta.bloom.saturated
        missing = list(range(10_000_000, 10_010_000))
        with Queries(env.a) as qa:
            for i in range(0, len(missing), 250):
                res = await asyncio.gather(*(ua.get(k) for k in missing[i : i + 250]))
                assert res == [None] * 250
            db_hits = len(qa.selects)
        rate = db_hits / len(missing)
        keys = await ns_keys(env.r, env.ns)
        rows_in_l2 = [k for k in keys if not k.endswith((b":ver", b":lease"))]
        print(f"\nbloom: {db_hits} of {len(missing)} missing-key gets reached the database ({rate:.4%}); "
              f"{len(rows_in_l2)} placeholders in Redis; rejections {ta.bloom_rejections}")  # fmt: skip
        assert rate <= 0.002
        assert len(rows_in_l2) == db_hits  # placeholders only for the false positives
        assert ta.bloom_rejections == len(missing) - db_hits
        # never a false negative: every existing key is found
        present = list(range(0, n, 7))
        got = await ua.get_many(present)
        assert len(got) == len(present)

        # a key inserted through the other layer is found before this layer hears of it ...
        held: list[bytes] = []
        bus_a = env.a.cache.bus  # type: ignore[union-attr]
        assert bus_a is not None
        real_apply = bus_a._apply
        bus_a._apply = held.append  # type: ignore[method-assign]
        new1, new2 = 20_000_001, 20_000_002
        await ub.insert(user(new1))
        await ub.insert(user(new2))
        await wait_until(lambda: len(held) == 2, timeout=2.0)
        assert enc(new1) not in ta.bloom  # the filter has not heard of it
        assert await ua.get(new1) == user(new1)  # found: L2 has a version key for it
        assert await ua.get_many([new2]) == {new2: user(new2)}
        # ... and after
        bus_a._apply = real_apply  # type: ignore[method-assign]
        for m in held:
            real_apply(m)
        assert enc(new1) in ta.bloom and enc(new2) in ta.bloom
        assert await ua.get(new1) == user(new1)
        # once the version key is gone (version_ttl), the filter alone must know it
        new3 = 20_000_003
        received = bus_a.received
        await ub.insert(user(new3))
        await wait_until(lambda: bus_a.received > received, timeout=2.0)
        await env.r.delete(ta.base(enc(new3)) + ":ver")
        assert await ua.get(new3) == user(new3)
        assert tb.bloom is not None and enc(new3) in tb.bloom


@only("postgresql")
async def test_bloom_snapshot_in_redis_is_kept_complete(shard_urls: list[str]) -> None:
    settings = {"bloom": True, "bloom_source": "redis", "bloom_capacity": 20_000, "bloom_error_rate": 0.001}
    async with make_env(shard_urls, settings=settings, prefill={USERS: [user(i) for i in range(2000)]}) as env:
        ua = env.ua
        # start() found no snapshot: it scanned the database and saved one
        assert env.ta.bloom_ready and env.ta.bloom is not None and env.ta.bloom.count == 2000
        bits_key, meta_key = env.ta._snapshot_keys
        assert await env.r.exists(bits_key, meta_key) == 2
        # inserted after the snapshot: the writer SETBITs them
        for k in (50_001, 50_002):
            await ua.insert(user(k))
        assert env.ta.bloom is not None
        snap = await env.r.get(bits_key)
        assert snap == env.ta.bloom.to_bytes()  # Redis holds exactly this process's filter

        cfg = cache_topology(shard_urls, TABLES, redis=REDIS_URL, namespace=env.ns, settings=settings)
        c = DataLayer(cfg, metadata(), env={})
        env.layers.append(c)
        with Queries(c) as qc:
            await c.start()  # warms from the snapshot: no scan of the users tables
            tc = c.cache_of(USERS)
            assert tc is not None and tc.bloom_ready and tc.bloom is not None
            assert not [t for t in qc.per_table() if t.startswith(USERS)], qc.per_table()
            assert all(enc(k) in tc.bloom for k in range(2000))
            assert enc(50_001) in tc.bloom and enc(50_002) in tc.bloom
            # so the new layer finds them even with their version keys gone
            for k in (50_001, 50_002):
                await env.r.delete(tc.base(enc(k)) + ":ver", tc.base(enc(k)))
            assert await c.repository(USERS).get(50_001) == user(50_001)
            # and keeps missing keys away from the database
            qc.clear()
            assert await c.repository(USERS).get(99_999_999) is None
            assert len(qc) == 0 and tc.bloom_rejections == 1


@only("postgresql")
@pytest.mark.parametrize("forgery", ["truncated", "zeroed-short", "bad-meta"])
async def test_bloom_snapshot_that_does_not_fit_is_ignored(shard_urls: list[str], forgery: str) -> None:
    """Redis contents are untrusted: a snapshot whose bits are not the filter's size (a
    short one would read as zeros: "absent" for rows that exist) or whose metadata does
    not parse is ignored, and the filter is built from the database instead."""
    settings = {"bloom": True, "bloom_source": "redis", "bloom_capacity": 20_000, "bloom_error_rate": 0.001}
    async with make_env(shard_urls, settings=settings, prefill={USERS: [user(i) for i in range(200)]}) as env:
        bits_key, meta_key = env.ta._snapshot_keys
        if forgery == "truncated":
            await env.r.set(bits_key, (await env.r.get(bits_key))[:10])
        elif forgery == "zeroed-short":
            await env.r.set(bits_key, b"\x00")
        else:
            await env.r.hset(meta_key, "count", "\xff\xfe")
        cfg = cache_topology(shard_urls, TABLES, redis=REDIS_URL, namespace=env.ns, settings=settings)
        c = DataLayer(cfg, metadata(), env={})
        env.layers.append(c)
        with Queries(c) as qc:
            await c.start()
            tc = c.cache_of(USERS)
            assert tc is not None and tc.bloom_ready and tc.corrupt_entries == 1
            assert [t for t in qc.per_table() if t.startswith(USERS)], "the filter was not built from the database"
        for k in range(0, 200, 7):  # no L2 entry, no version key: only the filter stands in the way
            await env.r.delete(tc.base(enc(k)) + ":ver", tc.base(enc(k)))
            assert await c.repository(USERS).get(k) == user(k)


def test_bloom_snapshot_in_redis_refused_with_a_signing_key() -> None:
    """A signing key says others can write to the Redis; a snapshot there cannot be trusted."""
    from dal import Config, ConfigError

    with pytest.raises(ConfigError) as ei:
        Config.from_dict(
            {
                "databases": {"db0": {"primary": "sqlite+aiosqlite:///:memory:"}},
                "tables": {USERS: {"shard_key": "id", "cache": {"bloom_source": "redis"}}},
                "cache": {"redis": REDIS_URL, "signing_key": "k" * 32},
            },
            env={},
        )
    assert ei.value.field == f"tables.{USERS}.cache.bloom_source"


@only("postgresql")
async def test_bloom_snapshot_save_keeps_bits_set_during_the_scan(shard_urls: list[str]) -> None:
    """A process that scans the database and then saves the snapshot must not wipe the
    bits another process SETBIT for a key inserted during the scan (its own filter may
    not have heard of that key yet: the message can arrive after the save)."""
    settings = {"bloom": True, "bloom_source": "redis", "bloom_capacity": 20_000, "bloom_error_rate": 0.001}
    async with make_env(shard_urls, settings=settings, prefill={USERS: [user(i) for i in range(100)]}) as env:
        ta = env.ta
        bits_key, meta_key = ta._snapshot_keys
        await env.r.delete(bits_key, meta_key)  # as on a first start: no snapshot yet
        gate, scanned = asyncio.Event(), asyncio.Event()
        real_scan = ta._scan_keys
        assert real_scan is not None

        async def slow_scan() -> AsyncIterator[tuple[Any, ...]]:
            async for kv in real_scan():
                yield kv
            scanned.set()
            await gate.wait()

        ta._scan_keys = slow_scan
        bus_a = env.a.cache.bus  # type: ignore[union-attr]
        assert bus_a is not None
        held: list[bytes] = []
        bus_a._apply = held.append  # type: ignore[method-assign]
        warming = asyncio.create_task(ta.warm_bloom())
        await scanned.wait()
        k = 60_000
        await env.ub.insert(user(k))  # B: SETBIT into the shared bits, then publish
        await wait_until(lambda: len(held) == 1, timeout=2.0)
        gate.set()
        await warming  # A saves its snapshot; its filter has not heard of k
        assert ta.bloom is not None and enc(k) not in ta.bloom
        data = await env.r.get(bits_key)
        meta = {kk.decode(): v.decode() for kk, v in (await env.r.hgetall(meta_key)).items()}
        snap = BloomMembership.from_bytes(data, 20_000, 0.001, int(meta["count"]), 0)
        assert all(enc(i) in snap for i in range(100))
        assert enc(k) in snap, "the snapshot lost a key inserted during the scan"
        # a process starting now knows k from the snapshot alone
        cfg = cache_topology(shard_urls, TABLES, redis=REDIS_URL, namespace=env.ns, settings=settings)
        c = DataLayer(cfg, metadata(), env={})
        env.layers.append(c)
        await c.start()
        tc = c.cache_of(USERS)
        assert tc is not None and tc.bloom is not None and tc.bloom_ready
        assert enc(k) in tc.bloom


# =========================================================================== stale fills


class PausedLoad:
    """Wrap Repository._load_row so the first load of ``layer`` stops after reading the
    database, until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, layer: DataLayer) -> None:
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()
        self.armed = True
        real = Repository._load_row
        pauser = self

        async def load_row(self: Repository[Any], key: Any, primary: bool) -> Any:
            row = await real(self, key, primary)
            if self.binding.cluster is layer.cluster and pauser.armed:
                pauser.armed = False
                pauser.read_done.set()
                await pauser.release.wait()
            return row

        monkeypatch.setattr(Repository, "_load_row", load_row)


@only("postgresql")
async def test_stale_fill_is_rejected_in_l2_and_in_the_readers_l1(
    shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_env(shard_urls, settings={"bloom": False}) as env:
        ua, ub = env.ua, env.ub
        k = 31
        await bulk_insert(env.a, USERS, [user(k, "old")])
        paused = PausedLoad(monkeypatch, env.a)
        rejected_l2 = env.ta.runtime.remote.rejected_fills  # type: ignore[union-attr]
        rejected_l1 = env.ta.l1.rejected_fills
        received = env.ta.runtime.bus.received  # type: ignore[union-attr]
        reader = asyncio.create_task(ua.get(k))
        await paused.read_done.wait()  # A has read "old" from the database
        await ub.update(k, {"name": "new"})  # B commits, bumps the version, deletes
        await wait_until(lambda: env.ta.runtime.bus.received > received, timeout=2.0)  # type: ignore[union-attr]
        paused.release.set()  # A now tries to fill "old"
        assert await reader == user(k, "old")  # the read began before the write: fine
        assert await env.l2(k) != user(k, "old")
        assert env.ta.runtime.remote.rejected_fills == rejected_l2 + 1  # type: ignore[union-attr]
        assert env.ta.l1.rejected_fills == rejected_l1 + 1
        assert await ua.get(k) == user(k, "new")
        assert await ub.get(k) == user(k, "new")
        assert await env.l2(k) == user(k, "new")


@only("postgresql")
async def test_stale_fill_is_rejected_when_the_message_comes_late(
    shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same race, but A fills before B's invalidation message arrives: L2 still rejects it,
    and the message then evicts A's L1."""
    async with make_env(shard_urls, settings={"bloom": False}) as env:
        ua, ub = env.ua, env.ub
        k = 32
        await bulk_insert(env.a, USERS, [user(k, "old")])
        paused = PausedLoad(monkeypatch, env.a)
        bus_a = env.a.cache.bus  # type: ignore[union-attr]
        assert bus_a is not None
        held: list[bytes] = []
        real_apply = bus_a._apply
        bus_a._apply = held.append  # type: ignore[method-assign]
        reader = asyncio.create_task(ua.get(k))
        await paused.read_done.wait()
        await ub.update(k, {"name": "new"})
        await wait_until(lambda: len(held) == 1, timeout=2.0)
        paused.release.set()
        assert await reader == user(k, "old")
        assert await env.l2(k) != user(k, "old")  # the CAS rejected the fill
        bus_a._apply = real_apply  # type: ignore[method-assign]
        real_apply(held[0])  # the message arrives
        assert await ua.get(k) == user(k, "new")
        assert await ub.get(k) == user(k, "new")
        assert await env.l2(k) == user(k, "new")


@only("postgresql")
async def test_stale_fill_is_rejected_within_one_layer(
    shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_env(shard_urls, settings={"bloom": False}) as env:
        ua = env.ua
        k = 33
        await bulk_insert(env.a, USERS, [user(k, "old")])
        paused = PausedLoad(monkeypatch, env.a)
        rejected = env.ta.l1.rejected_fills
        reader = asyncio.create_task(ua.get(k))
        await paused.read_done.wait()
        await ua.update(k, {"name": "new"})  # same layer: evicts, forgets the in-flight load
        # a get now does not join the stale in-flight load
        assert await ua.get(k) == user(k, "new")
        paused.release.set()
        assert await reader == user(k, "old")
        assert env.ta.l1.rejected_fills >= rejected + 1
        assert await ua.get(k) == user(k, "new")
        assert await env.l2(k) == user(k, "new")
        assert await env.ub.get(k) == user(k, "new")


@only("postgresql")
async def test_read_between_local_eviction_and_l2_delete_cannot_pin_the_old_row(
    shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read in the writing layer that runs after the write evicted L1 but before the L2
    delete reaches Redis finds the old row in L2; it must not survive in L1 after the
    write returns."""
    async with make_env(shard_urls, settings={"bloom": False}) as env:
        ua, ub = env.ua, env.ub
        k = 34
        await bulk_insert(env.a, USERS, [user(k, "old")])
        assert await ub.get(k) == user(k, "old")  # L2 holds "old"; A's L1 is empty
        remote = env.ta.runtime.remote
        assert remote is not None
        gate, reached = asyncio.Event(), asyncio.Event()
        real_invalidate = remote.invalidate

        async def slow_invalidate(*args: Any, **kw: Any) -> bool:
            reached.set()
            await gate.wait()
            return await real_invalidate(*args, **kw)

        monkeypatch.setattr(remote, "invalidate", slow_invalidate)
        writer = asyncio.create_task(ua.update(k, {"name": "new"}))
        await reached.wait()  # committed, L1 evicted, L2 not yet
        assert await ua.get(k) == user(k, "old")  # legitimately concurrent with the write
        gate.set()
        assert await writer
        assert await ua.get(k) == user(k, "new")  # after the write returned: never the old row


@only("postgresql")
async def test_writer_cancelled_after_commit_still_invalidates_everywhere(
    shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller cancelled (a request timeout) after the commit, while the invalidation is
    under way, must not leave L2 or the other layer's L1 with the old row; nor, in a
    transaction, skip the invalidation of its later writes."""
    async with make_env(shard_urls, settings={"bloom": False}) as env:
        ua, ub = env.ua, env.ub
        t = env.a.tables[USERS]
        assert t.sharder is not None
        db = t.sharder.place(1).database
        k1, k2, k3 = [x for x in range(1, 100) if t.sharder.place(x).database == db][:3]
        await bulk_insert(env.a, USERS, [user(k1, "old"), user(k2, "old"), user(k3, "old")])
        for k in (k1, k2, k3):
            assert await ua.get(k) == user(k, "old")
            assert await ub.get(k) == user(k, "old")
        remote = env.ta.runtime.remote
        assert remote is not None
        gate, reached = asyncio.Event(), asyncio.Event()
        real_invalidate = remote.invalidate

        async def slow_invalidate(*args: Any, **kw: Any) -> bool:
            reached.set()
            await gate.wait()
            return await real_invalidate(*args, **kw)

        monkeypatch.setattr(remote, "invalidate", slow_invalidate)

        # a single write
        writer = asyncio.create_task(ua.update(k1, {"name": "new"}))
        await reached.wait()
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        gate.set()
        await wait_until(lambda: _l1_sees(ub, k1, user(k1, "new")), timeout=3.0)
        assert await env.l2(k1) in ("MISSING", user(k1, "new"))
        assert await ua.get(k1) == user(k1, "new")

        # a transaction of two writes, cancelled during the first invalidation
        gate.clear()
        reached.clear()

        async def tx() -> None:
            async with ua.transaction(k2) as r:
                await r.update(k2, {"name": "new"})
                await r.update(k3, {"name": "new"})

        writer = asyncio.create_task(tx())
        await reached.wait()  # committed; invalidating k2
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        gate.set()
        for k in (k2, k3):
            await wait_until(lambda k=k: _l1_sees(ub, k, user(k, "new")), timeout=3.0)  # type: ignore[misc]
            assert await ua.get(k) == user(k, "new")
            assert await env.l2(k) in ("MISSING", user(k, "new"))


# =========================================================================== replicas


def _replica_topology(rs: PgReplicaSet) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def topo(cfg: dict[str, Any]) -> dict[str, Any]:
        cfg["databases"] = {"db0": {"primary": rs.primary_dsn, "replicas": [rs.standby_dsn]}}
        cfg["tables"] = {USERS: {"shard_key": "id", "table_shards": 2, "cache": True},
                         ORDERS: {"shard_key": "user_id", "table_shards": 1},
                         PLAIN: {"database": "db0"}}  # fmt: skip
        return cfg

    return topo


class Wall:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_fill_after_a_write_reads_the_primary_while_the_replica_lags(
    pg_replica_set: PgReplicaSet,
) -> None:
    rs = pg_replica_set
    wall_b = Wall()
    async with make_env(
        [], settings={"bloom": False, "fresh_window": 1.0}, topology=_replica_topology(rs),
        b_kwargs={"wall": wall_b},
    ) as env:  # fmt: skip
        ua, ub = env.ua, env.ub
        k = 5
        await ua.insert(user(k, "v1"))
        rs.wait_for_standby_catchup()
        assert await ub.get(k) == user(k, "v1")
        rs.pause_replay()
        try:
            received = env.tb.runtime.bus.received  # type: ignore[union-attr]
            await ua.update(k, {"name": "v2"})
            await wait_until(lambda: env.tb.runtime.bus.received > received, timeout=2.0)  # type: ignore[union-attr]
            standby = rs.standby_sql(f"SELECT name FROM {USERS}_{env.b.tables[USERS].sharder.slot(k)} WHERE id = {k}")  # type: ignore[union-attr]
            assert standby == "v1"  # the replica has not replayed the write
            with Queries(env.b) as qb:
                assert await ub.get(k) == user(k, "v2")  # within fresh_window: the primary
                assert qb.roles() == {"primary": 1}
            # once fresh_window has passed, fills may read the replica again
            wall_b.offset = 1.5
            env.tb.l1.invalidate([enc(k)])
            await env.r.delete(env.tb.base(enc(k)))
            with Queries(env.b) as qb:
                got = await ub.get(k)
                assert qb.roles() == {"replica": 1}
                assert got == user(k, "v1")  # what the lagging replica has
        finally:
            rs.resume_replay()
            rs.wait_for_standby_catchup()


async def test_own_write_is_not_read_back_from_a_lagging_replica_when_redis_is_down(
    pg_replica_set: PgReplicaSet,
) -> None:
    """Without Redis there is no version key; the writing layer must still not pin the
    replica's old row in its L1 for l1_ttl after its own write."""
    rs = pg_replica_set
    with RedisServer() as dead:
        url = dead.url
        dead.kill()
        async with make_env(
            [], redis=url, settings={"bloom": False, "fresh_window": 2.0, "timeout": 0.1},
            topology=_replica_topology(rs),
        ) as env:  # fmt: skip
            ua = env.ua
            k = 6
            await ua.insert(user(k, "v1"))
            rs.wait_for_standby_catchup()
            assert await ua.get(k) == user(k, "v1")
            rs.pause_replay()
            try:
                await ua.update(k, {"name": "v2"})
                with Queries(env.a) as qa:
                    assert await ua.get(k) == user(k, "v2")
                    assert qa.roles() == {"primary": 1}
                assert await ua.get(k) == user(k, "v2")  # (and L1 holds v2, not the replica's v1)
                assert env.ta.cached(enc(k)) == user(k, "v2")
            finally:
                rs.resume_replay()
                rs.wait_for_standby_catchup()


# =========================================================================== Redis failures


@only("postgresql")
async def test_redis_killed_and_restarted(shard_urls: list[str]) -> None:
    with RedisServer() as server:
        settings = {"bloom": False, "timeout": 0.25, "breaker_failures": 3, "breaker_reset": 0.3}
        async with make_env(shard_urls, redis=server.url, settings=settings) as env:
            ua, ub, ta = env.ua, env.ub, env.ta
            await bulk_insert(env.a, USERS, [user(i) for i in range(300)])
            assert await ua.get(1) == user(1) and await ub.get(1) == user(1)
            closes: list[float] = []
            breaker = ta.runtime.remote.breaker  # type: ignore[union-attr]
            real_on_close = breaker._on_close

            def on_close() -> None:
                closes.append(time.monotonic())
                assert real_on_close is not None
                real_on_close()

            breaker._on_close = on_close

            server.kill()
            # reads keep working, from L1 and the database
            assert await ua.get(1) == user(1)
            t0 = time.monotonic()
            got = [await ua.get(i) for i in range(100, 200)]
            elapsed = time.monotonic() - t0
            assert got == [user(i) for i in range(100, 200)]
            assert await ua.get_many(range(200, 210)) == {i: user(i) for i in range(200, 210)}
            remote = ta.runtime.remote
            assert remote is not None
            assert remote.errors >= 3
            assert breaker.trips >= 1
            print(f"\nredis down: 100 gets took {elapsed * 1000:.0f} ms; errors {remote.errors}, "
                  f"breaker trips {breaker.trips}")  # fmt: skip
            assert elapsed < 100 * 0.25 / 4
            # writes keep working and are queued for retry; with the breaker open
            # they do not even try to publish (no publish timeout to wait out)
            breaker.reset = 60.0  # hold it open for these writes
            bus = ta.runtime.bus
            assert bus is not None
            sends: list[str] = []
            real_send = bus.send

            async def counting_send(table: str, keys: list[bytes], inserted: bool) -> list[bytes]:
                sends.append(table)
                return await real_send(table, keys, inserted)

            bus.send = counting_send  # type: ignore[method-assign]
            assert breaker.state == "open"
            assert await ua.update(1, {"name": "during-outage"})
            assert await ua.get(1) == user(1, "during-outage")
            assert ta.runtime.retry.pending >= 2  # the L2 delete and the message
            await ua.insert(user(1000))
            assert await ua.get(1000) == user(1000)
            assert sends == []
            bus.send = real_send  # type: ignore[method-assign]
            breaker.reset = 0.3

            server.restart()
            drain = await wait_until(lambda: ta.runtime.retry.pending == 0, timeout=10.0, interval=0.01)
            assert breaker.state == "closed"
            assert len(closes) >= 1  # redis_returned ran: L1 flushed
            # reads return current values in both layers
            assert await ua.get(1) == user(1, "during-outage")
            seen = await wait_until(lambda: _l1_sees(ub, 1, user(1, "during-outage")), timeout=5.0, interval=0.01)
            print(f"redis back: retry queue drained in {drain * 1000:.0f} ms; "
                  f"layer B current after another {seen * 1000:.0f} ms")  # fmt: skip
            assert await ub.get(1000) == user(1000)
            # and the cache works again
            assert await ua.get(250) == user(250)
            assert await env.l2(250) == user(250)


@only("postgresql")
async def test_redis_black_hole_does_not_stall_reads_or_writes(shard_urls: list[str]) -> None:
    """SIGSTOPped Redis: connections hang instead of failing. The breaker must spare the
    callers the timeout, and writes must not hang on the invalidation message."""
    with RedisServer() as server:
        settings = {"bloom": False, "timeout": 0.2, "breaker_failures": 3, "breaker_reset": 1.0}
        async with make_env(shard_urls, redis=server.url, settings=settings) as env:
            ua, ta = env.ua, env.ta
            await bulk_insert(env.a, USERS, [user(i) for i in range(200)])
            assert await ua.get(1) == user(1)
            server.pause()
            try:
                t0 = time.monotonic()
                got = [await ua.get(i) for i in range(100, 200)]
                elapsed = time.monotonic() - t0
                assert got == [user(i) for i in range(100, 200)]
                print(f"\nredis black hole: 100 gets took {elapsed * 1000:.0f} ms "
                      f"(100 x timeout = {100 * 0.2 * 1000:.0f} ms)")  # fmt: skip
                assert elapsed < 100 * 0.2 / 4
                t0 = time.monotonic()
                async with asyncio.timeout(5):
                    assert await ua.update(1, {"name": "x"})
                    await ua.insert(user(5000))
                write_s = time.monotonic() - t0
                print(f"redis black hole: 2 writes took {write_s * 1000:.0f} ms")
                assert await ua.get(1) == user(1, "x")
                assert ta.runtime.retry.pending >= 1
            finally:
                server.resume()
            await wait_until(lambda: ta.runtime.retry.pending == 0, timeout=10.0, interval=0.01)
            assert await ua.get(1) == user(1, "x")


@only("postgresql")
async def test_writer_does_not_read_its_stale_l2_row_when_redis_returns(
    shard_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stalls (keeping its data) while A writes: A's L2 delete waits in the retry
    queue. When Redis answers again, L2 still holds the old row until that retry runs;
    A must not read it back (its breaker closing flushes L1, so the next read would)."""
    with RedisServer() as server:
        settings = {"bloom": False, "timeout": 0.2, "breaker_failures": 1, "breaker_reset": 0.2}
        async with make_env(shard_urls, redis=server.url, settings=settings) as env:
            ua, ub, ta = env.ua, env.ub, env.ta
            k = 77
            await bulk_insert(env.a, USERS, [user(k, "v1")])
            assert await ub.get(k) == user(k, "v1")  # L2 holds v1
            assert await ua.get(k) == user(k, "v1")  # and A's L1
            remote = ta.runtime.remote
            assert remote is not None
            server.pause()
            try:
                assert await ua.update(k, {"name": "v2"})
                # hold the retried L2 delete until the end of the test
                gate = asyncio.Event()
                real_invalidate = remote.invalidate

                async def held_invalidate(*args: Any, **kw: Any) -> bool:
                    await gate.wait()
                    return await real_invalidate(*args, **kw)

                monkeypatch.setattr(remote, "invalidate", held_invalidate)
                assert await ua.get(k) == user(k, "v2")
            finally:
                server.resume()
            # Redis answers again, with the old row still in it; reads of other keys
            # close the breaker (which flushes A's L1)
            probes = iter(range(10_000, 20_000))

            async def closed() -> bool:
                assert await ua.get(k) == user(k, "v2")
                await ua.get(next(probes))  # a key not in L1: a Redis read
                return remote.breaker.state == "closed"

            await wait_until(closed, timeout=5.0, interval=0.01)
            assert await env.l2(k) == user(k, "v1")  # the delete really has not happened
            for _ in range(3):
                ta.l1.flush()
                assert await ua.get(k) == user(k, "v2")
            assert await ua.get_many([k]) == {k: user(k, "v2")}
            assert await env.l2(k) == user(k, "v1")  # and A did not fill L2 meanwhile
            gate.set()
            await wait_until(lambda: ta.runtime.retry.pending == 0, timeout=10.0, interval=0.01)
            assert await env.l2(k) in ("MISSING", user(k, "v2"))
            assert await ua.get(k) == user(k, "v2")
            assert await env.l2(k) == user(k, "v2")  # L2 is used for the key again
            await wait_until(lambda: _l1_sees(ub, k, user(k, "v2")), timeout=5.0, interval=0.01)


@only("sqlite")
async def test_redis_auth(shard_urls: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with RedisServer(password="s3cret-AUTH-pw") as server:
        assert "s3cret-AUTH-pw" in server.url
        async with make_env(shard_urls, redis=server.url) as env:
            await env.ua.insert(user(1))
            assert await env.ua.get(1) == user(1)
            assert await env.l2(1) == user(1)
            assert await env.ub.get(1) == user(1)
            assert env.ta.runtime.remote.errors == 0  # type: ignore[union-attr]
            text = repr(env.a.config) + str(env.a.config.cache) + repr(env.ta.runtime._client)
            assert "s3cret-AUTH-pw" not in text
        # a wrong password: the cache is unavailable, everything else works, nothing leaks
        wrong = server.url.replace("s3cret-AUTH-pw", "wr0ng-PASS-word")
        async with make_env(shard_urls, redis=wrong, settings={"timeout": 0.2}) as env:
            await env.ua.insert(user(2))
            assert await env.ua.get(2) == user(2)
            assert await env.ub.get(2) == user(2)
            assert env.ta.runtime.remote.errors >= 1  # type: ignore[union-attr]
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "s3cret-AUTH-pw" not in logged and "wr0ng-PASS-word" not in logged
    assert "redis call failed" in caplog.text  # the failures were logged, masked


@only("sqlite")
async def test_redis_tls(shard_urls: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    try:
        server = RedisServer(password="tls-PW-123", tls=True).start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"redis-server without TLS support: {exc}")
        raise
    try:
        assert server.url.startswith("rediss://")
        async with make_env(shard_urls, redis=server.url) as env:
            await env.ua.insert(user(1))
            assert await env.ua.get(1) == user(1)
            assert await env.ub.get(1) == user(1)
            assert env.ta.runtime.remote.errors == 0  # type: ignore[union-attr]
            raw = await env.r.get(env.ta.base(enc(1)))
            assert raw is not None
        # plain redis:// against the TLS port fails cleanly (counted, not raised)
        plain = f"redis://:tls-PW-123@127.0.0.1:{server.port}/0"
        async with make_env(shard_urls, redis=plain, settings={"timeout": 0.2}, create=True) as env:
            await env.ua.insert(user(2))
            assert await env.ua.get(2) == user(2)
            assert env.ta.runtime.remote.errors >= 1  # type: ignore[union-attr]
    finally:
        server.stop()
    assert "tls-PW-123" not in caplog.text


# =========================================================================== schema version, avalanche


@only("sqlite")
async def test_schema_version_bump_orphans_old_entries(shard_urls: list[str]) -> None:
    async with make_env(shard_urls, settings={"bloom": False, "schema_version": 1},
                        settings_b={"schema_version": 2}) as env:  # fmt: skip
        await bulk_insert(env.a, USERS, [user(1)])
        assert await env.ua.get(1) == user(1)
        assert await env.l2(1, env.ta) == user(1)
        assert env.ta.prefix.endswith(f":1:{USERS}:") and env.tb.prefix.endswith(f":2:{USERS}:")
        # v2 does not read v1's entry: it loads from the database and fills its own
        with Queries(env.b) as qb:
            assert await env.ub.get(1) == user(1)
            assert len(qb.selects) == 1
        assert await env.l2(1, env.tb) == user(1)
        # an old entry with a different shape is never decoded by v2
        await env.r.set(env.ta.base(enc(2)), env.ta.codec.dumps({"id": 2, "old_column": True}))
        await bulk_insert(env.a, USERS, [user(2)])
        assert await env.ub.get(2) == user(2)


@only("postgresql")
async def test_ttls_of_mass_fills_are_spread(shard_urls: list[str]) -> None:
    """Avalanche: 10,000 rows filled at once must not expire at once."""
    async with make_env(shard_urls, settings={"bloom": False, "l2_ttl": 100.0, "jitter": 0.1}) as env:
        n = 10_000
        await bulk_insert(env.a, USERS, [user(i) for i in range(n)])
        got = await env.ua.get_many(range(n))
        assert len(got) == n
        remote = env.ta.runtime.remote
        assert remote is not None and remote.errors == 0
        pipe = env.r.pipeline(transaction=False)
        for i in range(n):
            pipe.pttl(env.ta.base(enc(i)))
        ttls = await pipe.execute()
        assert all(t > 0 for t in ttls), sorted(ttls)[:5]
        lo, hi = min(ttls), max(ttls)
        print(f"\navalanche: {n} L2 PTTLs span {lo / 1000:.2f}..{hi / 1000:.2f} s ({(hi - lo) / 1000:.2f} s)")
        assert lo >= 85_000 and hi <= 110_000
        assert hi - lo >= 18_000
        # and spread, not clustered: every 2-second slice of the window is used
        assert {(t + 999) // 2000 for t in ttls} >= set(range(46, 55))
