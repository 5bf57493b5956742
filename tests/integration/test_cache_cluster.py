"""The cache on a real Redis Cluster: 3 masters owned by this module.

``[cache] cluster = true`` makes L2 a RedisCluster client: row, version and
lease keys of one row share a hash tag (one slot), rows spread over the slots
of all masters, the Lua fill/invalidate scripts run on the node owning the
row, invalidations travel by cluster-wide PUBLISH, and the Bloom filter
snapshot (both its keys in one slot) is saved and loaded through the cluster.
Two DataLayers (two caches with their own L1s and subscriptions) play two
application servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from dal import DataLayer
from dal.cache.keys import encode_cache_key
from tests.cache_workers import (
    config,
    create_rows,
    decode_l2,
    drop_tables,
    l2_key,
    metadata,
    read_rows,
    seed_row,
)
from tests.replication import PgReplicaSet, _port_is_free, free_port

pytestmark = [pytest.mark.integration, pytest.mark.replication]

SHARDS = 2


class RedisCluster3:
    """Three ``redis-server --cluster-enabled yes`` masters (no replicas), slots spread by redis-cli."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dal-rcluster-"))
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def _port() -> int:
        # The cluster bus listens on port + 10000: it must be free too.
        for _ in range(100):
            p = free_port()
            if p + 10000 < 65536 and _port_is_free(p + 10000):
                return p
        raise RuntimeError("no free port pair for a cluster node")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        for _ in range(3):
            port = self._port()
            d = self.dir / str(port)
            d.mkdir()
            log = open(d / "redis.log", "wb")  # noqa: SIM115 - owned by the child
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "5000",
                 "--save", "", "--appendonly", "no", "--dir", str(d)],
                stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
            log.close()
            self.ports.append(port)
        for port, proc in zip(self.ports, self.procs, strict=True):
            self._wait(lambda c: bool(c.ping()), port, proc, "start")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for port, proc in zip(self.ports, self.procs, strict=True):
            self._wait(lambda c: b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO"), port, proc, "join")

    def _wait(self, ok: Callable[[redis.Redis], bool], port: int, proc: subprocess.Popen[bytes], what: str) -> None:
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 30
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    if ok(client):
                        return
                if time.monotonic() > deadline or proc.poll() is not None:
                    log = (self.dir / str(port) / "redis.log").read_text(errors="replace")
                    raise RuntimeError(f"cluster node {port} did not {what}:\n{log[-2000:]}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster3]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed for the Redis Cluster tests", pytrace=False)
    rc = RedisCluster3()
    try:
        rc.start()
        yield rc
    finally:
        rc.stop()


@pytest.fixture
async def cl(redis_cluster: RedisCluster3) -> AsyncIterator[aioredis.RedisCluster]:
    client = aioredis.RedisCluster.from_url(redis_cluster.url)
    yield client
    await client.aclose()


@pytest.fixture
async def table(pg_replica_set: PgReplicaSet) -> AsyncIterator[tuple[str, str]]:
    """A fresh table with rows 1..50 and its namespace."""
    ns = f"cl{uuid.uuid4().hex[:10]}"
    name = f"cl_{ns}"
    await create_rows(pg_replica_set.primary_dsn, name, SHARDS, range(1, 51))
    yield name, ns
    await drop_tables(pg_replica_set.primary_dsn, name, SHARDS)


def cluster_config(pg: PgReplicaSet, rc: RedisCluster3, name: str, ns: str, **policy: Any) -> dict[str, Any]:
    policy = {"l1_ttl": 30.0, "l2_ttl": 30.0, **policy}
    return config(name, primary=pg.primary_dsn, redis=rc.url, namespace=ns, cluster=True, shards=SHARDS, **policy)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.01)
    return False


async def keys_per_node(rc: RedisCluster3, ns: str) -> list[int]:
    counts = []
    for port in rc.ports:
        node = aioredis.Redis(port=port)
        try:
            counts.append(len([k async for k in node.scan_iter(match=f"{ns}:*", count=1000)]))
        finally:
            await node.aclose()
    return counts


async def test_cluster_reads_writes_spread_and_invalidation(
    pg_replica_set: PgReplicaSet, redis_cluster: RedisCluster3, cl: aioredis.RedisCluster, table: tuple[str, str]
) -> None:
    name, ns = table
    cfg = cluster_config(pg_replica_set, redis_cluster, name, ns)
    async with DataLayer(cfg, metadata(name), env={}) as a, DataLayer(cfg, metadata(name), env={}) as b:
        ra, rb = a.repository(name), b.repository(name)
        assert await ra.get(1) == seed_row(1)
        many = await rb.get_many(range(1, 51))
        assert many == {k: seed_row(k) for k in range(1, 51)}
        assert await ra.get_many([2, 3, 999]) == {2: seed_row(2), 3: seed_row(3)}

        # L2 rows are spread over slots on every master, and decode to the rows.
        slots = {await cl.execute_command("CLUSTER KEYSLOT", l2_key(ns, name, k)) for k in range(1, 51)}
        per_node = await keys_per_node(redis_cluster, ns)
        assert len(slots) >= 40
        assert sum(1 for c in per_node if c > 0) == 3, per_node
        assert sum(per_node) == 50
        for k in (1, 17, 50):
            assert decode_l2(await cl.get(l2_key(ns, name, k))) == seed_row(k)

        # insert through A: B (whose Bloom filter was warmed before) finds it.
        await ra.insert({"id": 100, "val": 100, "note": "new"})
        assert (await rb.get(100))["val"] == 100  # type: ignore[index]
        assert (await ra.get(100))["val"] == 100  # type: ignore[index]

        # update through A: B held the row in L1 (30 s TTL); only the invalidation evicts it.
        received = b.cache.bus.received  # type: ignore[union-attr]
        await ra.update(7, {"val": 777})
        assert (await ra.get(7))["val"] == 777  # type: ignore[index]
        assert await eventually(lambda: _val(rb, 7, 777))
        assert b.cache.bus.received > received  # type: ignore[union-attr]

        # delete through B: A held 9 in L1.
        assert (await ra.get(9)) is not None
        assert await rb.delete(9)
        assert await rb.get(9) is None
        assert await eventually(lambda: _absent(ra, 9))
        assert await ra.get_many([9, 10]) == {10: seed_row(10)}

        db = await read_rows(pg_replica_set.primary_dsn, name, SHARDS)
        for repo in (ra, rb):
            for k in [*range(1, 51), 100]:
                assert await repo.get(k) == db.get(k)
        assert a.cache.remote.errors == 0 and b.cache.remote.errors == 0  # type: ignore[union-attr]
    await _delete_namespace(redis_cluster, ns)


async def _val(repo: Any, key: int, val: int) -> bool:
    row = await repo.get(key)
    return row is not None and row["val"] == val


async def _absent(repo: Any, key: int) -> bool:
    return await repo.get(key) is None


async def test_cluster_lease_and_stale_fill_rejected(
    pg_replica_set: PgReplicaSet, redis_cluster: RedisCluster3, cl: aioredis.RedisCluster, table: tuple[str, str]
) -> None:
    """A's load of key 5 reads the old row, then waits; meanwhile B (blocked by A's lease for
    lease_wait) loads and fills, and then updates the key. A's fill (CAS on the version it saw)
    is rejected, so L2 never holds the old row after the update."""
    name, ns = table
    cfg = cluster_config(pg_replica_set, redis_cluster, name, ns, lease_wait=0.2)
    base = l2_key(ns, name, 5)
    async with DataLayer(cfg, metadata(name), env={}) as a, DataLayer(cfg, metadata(name), env={}) as b:
        ra, rb = a.repository(name), b.repository(name)
        loaded, release = asyncio.Event(), asyncio.Event()
        load_row = ra._load_row

        async def slow_load(key: Any, primary: bool) -> dict[str, Any] | None:
            row = await load_row(key, primary)
            loaded.set()
            await release.wait()
            return row

        ra._load_row = slow_load  # type: ignore[method-assign]
        task = asyncio.create_task(ra.get(5))
        await asyncio.wait_for(loaded.wait(), 5)
        assert await cl.get(base + ":lease") is not None  # A holds the lease while it loads

        tb = b.cache.tables[name]  # type: ignore[union-attr]
        waits = tb.lease_waits
        assert await rb.get(5) == seed_row(5)  # waited for A's fill, then loaded itself
        assert tb.lease_waits == waits + 1
        await rb.update(5, {"val": 555})
        assert await cl.get(base) is None  # the update deleted B's fill

        rejected = a.cache.remote.rejected_fills  # type: ignore[union-attr]
        release.set()
        assert await task == seed_row(5)  # it started before the update
        ra._load_row = load_row  # type: ignore[method-assign]
        assert a.cache.remote.rejected_fills == rejected + 1  # type: ignore[union-attr]
        raw = await cl.get(base)
        assert raw is None or decode_l2(raw)["val"] == 555  # type: ignore[index]
        assert await cl.get(base + ":lease") is None  # released
        assert await eventually(lambda: _val(ra, 5, 555))
        assert (await rb.get(5))["val"] == 555  # type: ignore[index]
        raw = await cl.get(base)
        assert raw is not None and decode_l2(raw)["val"] == 555  # type: ignore[index]
    await _delete_namespace(redis_cluster, ns)


async def test_cluster_bloom_snapshot(
    pg_replica_set: PgReplicaSet, redis_cluster: RedisCluster3, cl: aioredis.RedisCluster, table: tuple[str, str]
) -> None:
    """The first layer warms its filter from the database and saves the snapshot; a key
    inserted later is added to the snapshot; a layer started afterwards loads the snapshot
    (no key scan on the database) and knows both."""
    name, ns = table
    cfg = cluster_config(pg_replica_set, redis_cluster, name, ns, bloom_source="redis",
                         bloom_capacity=10_000, bloom_error_rate=0.001)
    tag = "{" + f"{ns}:1:{name}:bloom" + "}"
    async with DataLayer(cfg, metadata(name), env={}) as a:
        assert a.cluster.primary("db0").queries > 0  # warmed from the database
        assert await cl.exists(tag + ":bits") and await cl.hgetall(tag + ":meta")
        ra = a.repository(name)
        await ra.insert({"id": 1000, "val": 1000})
        async with DataLayer(cfg, metadata(name), env={}) as b:
            tb = b.cache.tables[name]  # type: ignore[union-attr]
            assert tb.bloom_ready and tb.bloom is not None
            assert b.cluster.primary("db0").queries == 0  # loaded from Redis, not scanned
            for k in [*range(1, 51), 1000]:
                assert encode_cache_key((k,)) in tb.bloom
            rb = b.repository(name)
            assert await rb.get(123_456) is None
            assert tb.bloom_rejections == 1
            assert b.cluster.primary("db0").queries == 0
            assert (await rb.get(1000))["val"] == 1000  # type: ignore[index]
            assert await rb.get(50) == seed_row(50)
    await _delete_namespace(redis_cluster, ns)


async def _delete_namespace(rc: RedisCluster3, ns: str) -> None:
    for port in rc.ports:
        node = aioredis.Redis(port=port)
        try:
            for pattern in (f"{ns}:*", "{" + ns + ":*"):
                keys = [k async for k in node.scan_iter(match=pattern, count=1000)]
                for k in keys:  # one by one: keys of one node may sit in different slots
                    await node.delete(k)
        finally:
            await node.aclose()
