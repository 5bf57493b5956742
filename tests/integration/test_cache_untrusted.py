"""Redis contents and pub/sub messages as untrusted input, on a real Redis.

Whatever bytes sit under a cached row's keys, or arrive on the invalidation
channel, a read returns the database's row and nothing raises: a bad L2 entry
is a miss (deleted, counted, logged once, loaded again), a bad version is an
unknown one (the primary is read), a bad message is dropped and counted (never
a reconnect), and a signed bus drops what is not signed with its key. A
cached ``get_many`` of 100,000 keys sends no command of more than 1,000 keys,
and a chunk that fails leaves no fill behind.

Databases: SQLite files under ``tmp_path``; every test has its own Redis
namespace and channel on the shared Redis, and deletes only its keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.exceptions import ConnectionError as RedisConnectionError

from dal import DataLayer
from dal.cache.keys import encode_cache_key
from dal.cache.local import MISS
from dal.cache.tiered import TableCache
from tests.cache_support import (
    bulk_insert,
    cache_topology,
    delete_ns,
    ns_keys,
    unique_namespace,
    wait_until,
)
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration

USERS = "users"
ORDERS = "orders"
TABLES: dict[str, Any] = {
    USERS: {"shard_key": "id", "table_shards": 2, "cache": True},
    ORDERS: {"shard_key": "user_id", "table_shards": 2, "cache": True},
}


def metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        USERS, md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(16), nullable=False),
        sa.Column("age", sa.Integer),
    )  # fmt: skip
    sa.Table(
        ORDERS, md,
        sa.Column("user_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("order_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("note", sa.Text),
    )  # fmt: skip
    return md


def user(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"user-{i}", "age": 20 + i % 50}


def enc(*kv: Any) -> bytes:
    return encode_cache_key(kv)


class Env:
    def __init__(self, layer: DataLayer, r: Any, ns: str) -> None:
        self.layer, self.r, self.ns = layer, r, ns

    def tc(self, table: str = USERS) -> TableCache:
        tc = self.layer.cache_of(table)
        assert tc is not None
        return tc


@contextlib.asynccontextmanager
async def make_layer(
    tmp_path: Path, *, rows: int = 10, settings: dict[str, Any] | None = None, ns: str | None = None, create: bool = True
) -> AsyncIterator[Env]:
    ns = ns or unique_namespace()
    urls = [f"sqlite+aiosqlite:///{tmp_path}/db{i}.sqlite3" for i in range(2)]
    cfg = cache_topology(urls, TABLES, redis=REDIS_URL, namespace=ns, settings={"bloom": False, **(settings or {})})
    layer = DataLayer(cfg, metadata(), env={})
    r = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        if create:
            await layer.create_all()
            await bulk_insert(layer, USERS, [user(i) for i in range(1, rows + 1)])
        await layer.start()
        yield Env(layer, r, ns)
    finally:
        await layer.aclose()
        with contextlib.suppress(Exception):
            await delete_ns(r, ns)
        await r.aclose()


# =========================================================================== L2 entries

GARBAGE = [
    b"\xc1\xff\x00garbage",  # not msgpack
    b"\xa3\xff\xfe\xfd",  # a msgpack str that is not UTF-8
    b"\xc7\x03\x01\xff\xfe\xfd",  # the datetime tag around bytes that are not an ISO date
    msgpack.packb([1, "user-1", 21]),  # not a dict
    msgpack.packb(42),
    msgpack.packb("absent"),
    msgpack.packb({"id": 1, "name": "user-1"}),  # a column missing
    msgpack.packb({"id": 1, "name": "user-1", "age": 21, "admin": True}),  # a column too many
    msgpack.packb({"id": 2, "name": "user-2", "age": 22}),  # another key's row
    msgpack.packb({"id": "1", "name": "user-1", "age": 21}),  # the key as a str
    msgpack.packb({"id": 1, "name": "x" * 17, "age": 21}),  # longer than String(16)
    msgpack.packb({"id": 1, "name": None, "age": 21}),  # NULL in a NOT NULL column
    msgpack.packb({"id": 1, "name": "user-1", "age": 2**40}),  # out of Integer's range
    msgpack.packb({"id": 1, "name": "user-1", "age": True}),  # bool for int
    msgpack.packb({"id": 1, "name": "user-1", "age": [21]}),
    msgpack.packb({1: 1, "name": "user-1", "age": 21}),  # a key that is not a column name
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
async def test_bad_l2_entry_is_a_miss_on_get(tmp_path: Path, garbage: bytes) -> None:
    async with make_layer(tmp_path) as env:
        tc, repo = env.tc(), env.layer.repository(USERS)
        base = tc.base(enc(1))
        await env.r.set(base, garbage)
        assert await repo.get(1) == user(1)
        assert tc.corrupt_entries == 1 and tc.db_loads == 1
        assert tc.codec.loads(await env.r.get(base)) == user(1)  # filled again
        tc.l1.flush()
        assert await repo.get(1) == user(1)
        assert tc.corrupt_entries == 1 and tc.db_loads == 1  # a plain L2 hit now


@pytest.mark.parametrize("garbage", GARBAGE[:4] + GARBAGE[8:9], ids=range(5))
async def test_bad_l2_entry_is_a_miss_on_get_many(tmp_path: Path, garbage: bytes) -> None:
    async with make_layer(tmp_path) as env:
        tc, repo = env.tc(), env.layer.repository(USERS)
        await repo.get_many([3, 4])  # L2 holds 3 and 4
        tc.l1.flush()
        await env.r.set(tc.base(enc(1)), garbage)
        await env.r.set(tc.base(enc(3)), garbage)
        assert await repo.get_many([1, 2, 3, 4, 999]) == {i: user(i) for i in (1, 2, 3, 4)}
        assert tc.corrupt_entries == 2
        for k in (1, 3):
            assert tc.codec.loads(await env.r.get(tc.base(enc(k)))) == user(k)


async def test_bad_entry_of_a_composite_key_and_the_placeholder(tmp_path: Path) -> None:
    async with make_layer(tmp_path) as env:
        orders = env.layer.repository(ORDERS)
        await orders.insert({"user_id": 1, "order_id": 2, "note": "n"})
        tc = env.tc(ORDERS)
        # the row of (1, 3) stored under (1, 2); then (2, 1)'s under (1, 2)
        for forged in ({"user_id": 1, "order_id": 3, "note": "n"}, {"user_id": 2, "order_id": 1, "note": "n"}):
            await env.r.set(tc.base(enc(1, 2)), tc.codec.dumps(forged))
            tc.l1.flush()
            assert await orders.get((1, 2)) == {"user_id": 1, "order_id": 2, "note": "n"}
        assert tc.corrupt_entries == 2
        # the "absent" placeholder is not corrupt
        assert await orders.get((5, 5)) is None
        assert await env.r.get(tc.base(enc(5, 5))) == tc.codec.dumps(None)
        tc.l1.flush()
        loads = tc.db_loads
        assert await orders.get((5, 5)) is None
        assert tc.db_loads == loads and tc.corrupt_entries == 2


async def test_bad_entries_are_logged_once_per_table(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dal.cache")
    async with make_layer(tmp_path) as env:
        tc, repo = env.tc(), env.layer.repository(USERS)
        for k in range(1, 6):
            await env.r.set(tc.base(enc(k)), b"\xc1")
        for k in range(1, 4):
            assert await repo.get(k) == user(k)
        assert await repo.get_many([4, 5]) == {4: user(4), 5: user(5)}
        assert tc.corrupt_entries == 5
        logged = [r for r in caplog.records if "do not decode" in r.getMessage()]
        assert len(logged) == 1 and USERS in logged[0].getMessage()


async def test_bad_entry_seen_while_waiting_for_a_lease(tmp_path: Path) -> None:
    async with make_layer(tmp_path, settings={"lease_wait": 3.0}) as env:
        tc = env.tc()
        base = tc.base(enc(1))
        await env.r.set(base + ":lease", b"another-process", px=10_000)  # someone else is loading
        loads: list[bool] = []

        async def load(fresh: bool) -> dict[str, Any] | None:
            loads.append(fresh)
            return user(1)

        waiting = asyncio.create_task(tc.get(enc(1), load))
        await wait_until(lambda: tc.lease_waits == 1)
        await env.r.set(base, b"\xc1garbage")
        await wait_until(lambda: tc.corrupt_entries == 1)

        async def discarded() -> bool:
            return await env.r.exists(base) == 0  # type: ignore[no-any-return]

        await wait_until(discarded)
        await env.r.set(base, tc.codec.dumps(user(1)))  # the holder's fill
        assert await waiting == user(1)
        assert loads == []  # served by the holder's fill


async def test_bad_entry_seen_by_the_lease_winner(tmp_path: Path) -> None:
    async with make_layer(tmp_path) as env:
        tc = env.tc()
        base = tc.base(enc(1))
        await env.r.set(base, b"\xc1garbage")  # appeared between the miss and the lease

        async def load(fresh: bool) -> dict[str, Any] | None:
            return user(1)

        assert await tc._load(enc(1), b"", False, tc.l1.generation(), load) == user(1)
        assert tc.corrupt_entries == 1
        assert tc.codec.loads(await env.r.get(base)) == user(1)
        assert await env.r.get(base + ":lease") is None


@pytest.mark.parametrize("version", [b"\xff\xfe:1", "\u00b2:\u00b2".encode(), b"garbage", b"12", b"1:-5"])
async def test_bad_version_is_unknown_and_reads_the_primary(tmp_path: Path, version: bytes) -> None:
    async with make_layer(tmp_path, settings={"fresh_window": 0.0}) as env:
        tc = env.tc()
        base = tc.base(enc(1))
        await env.r.set(base + ":ver", version)
        loads: list[bool] = []

        async def load(fresh: bool) -> dict[str, Any] | None:
            loads.append(fresh)
            return user(1)

        assert await tc.get(enc(1), load) == user(1)
        assert loads == [True]  # the primary: when the key was written is unknown
        # the fill compared against the bytes as stored: L2 holds the row now
        assert tc.codec.loads(await env.r.get(base)) == user(1)
        # get_many: the same
        await env.r.delete(base)
        tc.l1.flush()
        primaries: list[bool] = []

        async def load_many(kvs: Any, primary: bool) -> dict[bytes, dict[str, Any]]:
            primaries.append(primary)
            return {enc(*kv): user(kv[0]) for kv in kvs}

        assert await tc.get_many({enc(1): (1,)}, load_many) == {enc(1): user(1)}
        assert primaries == [True]
        # a write still bumps it to a proper version
        assert await env.layer.repository(USERS).update(1, {"age": 1})
        ver = await env.r.get(base + ":ver")
        assert ver is not None and re.fullmatch(rb"[0-9]+:[0-9]+", ver)


# =========================================================================== get_many chunking


class FailingMget:
    """The real client, but MGET number ``fail_at`` (1-based) fails; records each MGET's size."""

    def __init__(self, client: Any, fail_at: int) -> None:
        self._client = client
        self._fail_at = fail_at
        self.mget_sizes: list[int] = []
        self.failed_keys: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def mget(self, keys: list[str]) -> Any:
        self.mget_sizes.append(len(keys))
        if len(self.mget_sizes) == self._fail_at:
            self.failed_keys = list(keys)
            raise RedisConnectionError("injected failure")
        return await self._client.mget(keys)


@pytest.mark.slow
async def test_get_many_of_100000_keys_is_chunked_and_a_failed_chunk_leaves_no_fill(tmp_path: Path) -> None:
    n, present = 100_000, 2000
    async with make_layer(tmp_path, rows=present) as env:
        tc, repo = env.tc(), env.layer.repository(USERS)
        remote = tc.runtime.remote
        assert remote is not None
        wrapper = FailingMget(remote.client, fail_at=3)
        remote.client = wrapper
        got = await repo.get_many(range(1, n + 1))
        assert got == {i: user(i) for i in range(1, present + 1)}
        assert max(wrapper.mget_sizes) <= 1000
        assert len(wrapper.mget_sizes) == 2 * n // 1000
        assert remote.breaker.trips == 0 and remote.breaker.state == "closed"
        assert remote.errors == 1
        # nothing was filled for the keys of the failed chunk: no row, no placeholder
        failed = [k for k in wrapper.failed_keys if not k.endswith(":ver")]
        assert len(failed) == 500
        assert await env.r.exists(*failed) == 0
        # the other chunks were filled: rows and "absent" placeholders
        keys = {k.decode() for k in await ns_keys(env.r, env.ns)}
        rows = {k for k in keys if not k.endswith((":ver", ":lease"))}
        assert len(rows) == n - 500
        assert not rows & set(failed)


# =========================================================================== pub/sub


@contextlib.asynccontextmanager
async def two_layers(tmp_path: Path, settings: dict[str, Any] | None = None) -> AsyncIterator[tuple[Env, Env]]:
    ns = unique_namespace()
    async with make_layer(tmp_path, settings=settings, ns=ns) as a, make_layer(
        tmp_path, settings=settings, ns=ns, create=False
    ) as b:
        yield a, b


def bus_of(env: Env) -> Any:
    bus = env.layer.cache.bus  # type: ignore[union-attr]
    assert bus is not None
    return bus


async def test_malformed_messages_on_the_channel_are_dropped_not_a_reconnect(tmp_path: Path) -> None:
    async with two_layers(tmp_path) as (a, b):
        repo_a, bus = a.layer.repository(USERS), bus_of(a)
        assert await repo_a.get(1) == user(1)  # in A's L1
        origin = os.urandom(8)
        bad = [
            msgpack.packb([origin, "1", USERS, [b"1"], False, 1.0], use_bin_type=True),  # right arity, wrong types
            msgpack.packb([origin, 1, USERS, ["1"], False, 1.0], use_bin_type=True),
            msgpack.packb([origin, 1, USERS, [b"1"], False, float("nan")], use_bin_type=True),
            msgpack.packb([origin, 1, "no_such_table", [b"1"], False, 1.0], use_bin_type=True),
            b"\xc1",
        ]
        for m in bad:
            await a.r.publish(bus.channel, m)
        await wait_until(lambda: bus.malformed == len(bad) - 1 and bus.foreign == 1)  # (the unknown table)
        assert bus.reconnects == 0 and bus.gaps == 0 and bus.resyncs == 0
        assert a.tc().cached(enc(1)) == user(1)  # L1 not flushed
        # the bus still works: B's write evicts A's L1
        assert await b.layer.repository(USERS).update(1, {"age": 99})
        await wait_until(lambda: a.tc().cached(enc(1)) is MISS)
        assert await repo_a.get(1) == {**user(1), "age": 99}


async def test_signed_bus_drops_unsigned_messages(tmp_path: Path) -> None:
    async with two_layers(tmp_path, settings={"signing_key": "s3cret"}) as (a, b):
        repo_a, bus = a.layer.repository(USERS), bus_of(a)
        assert "s3cret" not in repr(a.layer.config)
        assert await repo_a.get(1) == user(1)
        forged = msgpack.packb([os.urandom(8), 1, USERS, [enc(1)], False, 1.0], use_bin_type=True)
        await a.r.publish(bus.channel, forged)
        await a.r.publish(bus.channel, b"\x00" * 32 + forged)
        await wait_until(lambda: bus.bad_signature == 2)
        assert a.tc().cached(enc(1)) == user(1)  # not evicted by the forgery
        assert bus.malformed == 0 and bus.reconnects == 0
        # signed messages of the other layer are applied
        assert await b.layer.repository(USERS).update(1, {"age": 77})
        await wait_until(lambda: a.tc().cached(enc(1)) is MISS)
        assert await repo_a.get(1) == {**user(1), "age": 77}
        assert bus.bad_signature == 2
