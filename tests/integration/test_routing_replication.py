"""Routing on real replication: which node served each read and write.

The proof does not rest on dal's own bookkeeping alone: with replay paused on
the replica, a row written through dal exists only on the primary, so a read
that finds it was served by the primary and one that misses it by the replica.
Per-node statement counters then confirm the balancing policies over real
connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from dal import ConnectionUnavailableError, DataLayer, ReadOnlyError
from tests.replication import MariaDBReplicaSet, PgReplicaSet


@dataclass
class Replicated:
    kind: str
    primary: str
    replica: str
    pause: Callable[[], None]
    resume: Callable[[], None]
    catchup: Callable[[], None]
    primary_sql: Callable[[str], str]


@pytest.fixture(params=["postgresql", "mysql"])
def replicated(request: pytest.FixtureRequest) -> Iterator[Replicated]:
    if request.param == "postgresql":
        pg: PgReplicaSet = request.getfixturevalue("pg_replica_set")
        r = Replicated("postgresql", pg.primary_dsn, pg.standby_dsn, pg.pause_replay, pg.resume_replay,
                       lambda: pg.wait_for_standby_catchup(30), pg.primary_sql)
    else:
        my: MariaDBReplicaSet = request.getfixturevalue("mariadb_replica_set")
        r = Replicated("mysql", my.primary_dsn, my.replica_dsn, my.pause_replication, my.resume_replication,
                       lambda: my.wait_for_replica_catchup(30), my.primary_sql)
    try:
        yield r
    finally:
        r.resume()


def metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "accounts", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("owner", sa.String(64), nullable=False),
    )
    return md


def config(r: Replicated, replicas: list[Any] | None = None, balancing: str = "round_robin") -> dict[str, Any]:
    return {
        "dal": {"balancing": balancing},
        "pool": {"min_size": 0, "max_size": 4},
        "databases": {"db0": {"primary": r.primary, "replicas": replicas if replicas is not None else [r.replica]}},
        "tables": {"accounts": {"shard_key": "id", "table_shards": 2}},
    }


@pytest.fixture
async def layer(replicated: Replicated) -> AsyncIterator[DataLayer]:
    async with DataLayer(config(replicated), metadata(), env={}) as lay:
        await lay.drop_all()
        await lay.create_all()
        await asyncio.to_thread(replicated.catchup)
        yield lay
        await lay.drop_all()


async def test_reads_go_to_the_replica_and_writes_to_the_primary(layer: DataLayer, replicated: Replicated) -> None:
    repo = layer.repository("accounts")
    await repo.insert({"id": 1, "owner": "before"})
    await asyncio.to_thread(replicated.catchup)
    assert await repo.get(1) == {"id": 1, "owner": "before"}

    await asyncio.to_thread(replicated.pause)
    await repo.insert({"id": 2, "owner": "while paused"})
    await repo.update(1, {"owner": "updated while paused"})

    # The replica has not replayed these writes: a replica read proves where it ran.
    assert await repo.get(2) is None
    assert (await repo.get(1))["owner"] == "before"
    assert await repo.count() == 1
    # Forced primary reads see them, per call and per scope (sync and async forms).
    assert await repo.get(2, primary=True) == {"id": 2, "owner": "while paused"}
    async with layer.read_primary():
        assert (await repo.get(1))["owner"] == "updated while paused"
        assert await repo.count() == 2
        assert set(await repo.get_many([1, 2])) == {1, 2}
    with layer.read_primary():
        assert len(await repo.find()) == 2
    # The scope ended: back to the replica.
    assert await repo.get(2) is None
    # Inside a transaction every read is on the primary.
    async with repo.transaction(2) as tx:
        assert await tx.get(2) == {"id": 2, "owner": "while paused"}

    await asyncio.to_thread(replicated.resume)
    await asyncio.to_thread(replicated.catchup)
    assert await repo.get(2) == {"id": 2, "owner": "while paused"}


async def test_node_counters_match_roles(layer: DataLayer) -> None:
    repo = layer.repository("accounts")
    primary = layer.cluster.primary("db0")
    replica = layer.cluster.replicas("db0")[0]
    p0, r0 = primary.queries, replica.queries
    for i in range(10):
        await repo.insert({"id": 100 + i, "owner": "x"})
    assert (primary.queries - p0, replica.queries - r0) == (10, 0)
    for i in range(10):
        await repo.get(100 + i)
    assert (primary.queries - p0, replica.queries - r0) == (10, 10)


async def test_replica_marked_down_reads_fall_back_to_primary(layer: DataLayer, replicated: Replicated) -> None:
    repo = layer.repository("accounts")
    replica = layer.cluster.replicas("db0")[0]
    await asyncio.to_thread(replicated.pause)
    await repo.insert({"id": 7, "owner": "fresh"})
    assert await repo.get(7) is None  # the paused replica
    layer.cluster.mark_down(replica.name, "test: replica out of rotation")
    before = replica.queries
    assert await repo.get(7) == {"id": 7, "owner": "fresh"}  # served by the primary
    assert replica.queries == before
    layer.cluster.mark_up(replica.name)
    assert await repo.get(7) is None


async def test_primary_marked_down_fails_writes_fast(layer: DataLayer) -> None:
    repo = layer.repository("accounts")
    layer.cluster.mark_down(layer.cluster.primary("db0").name, "test: primary out of rotation")
    with pytest.raises(ConnectionUnavailableError, match="down"):
        await repo.insert({"id": 9, "owner": "nope"})
    assert await repo.get(9) is None  # reads still served by the replica
    layer.cluster.mark_up(layer.cluster.primary("db0").name)
    await repo.insert({"id": 9, "owner": "now"})


async def test_writes_to_a_replica_are_refused(replicated: Replicated, layer: DataLayer) -> None:
    # Misconfigured: the replica given as a primary. The server refuses the write.
    cfg = config(replicated, replicas=[])
    replica = replicated.replica
    if replicated.kind == "mysql":
        # root has SUPER and bypasses read_only on MariaDB: write as an application user.
        replicated.primary_sql(
            "CREATE USER IF NOT EXISTS 'app'@'127.0.0.1'; GRANT ALL ON test.* TO 'app'@'127.0.0.1'"
        )
        await asyncio.to_thread(replicated.catchup)
        replica = replica.replace("root@", "app@")
    cfg["databases"]["db0"]["primary"] = replica
    async with DataLayer(cfg, metadata(), env={}) as wrong:
        with pytest.raises(ReadOnlyError):
            await wrong.repository("accounts").insert({"id": 11, "owner": "x"})


@pytest.mark.parametrize("policy", ["round_robin", "weighted", "least_connections", "random"])
async def test_balancing_policies_over_real_replicas(replicated: Replicated, layer: DataLayer, policy: str) -> None:
    # Two replica nodes (the same server under two names) with weights 3 and 1.
    replicas = [
        {"dsn": replicated.replica, "weight": 3, "name": "db0.heavy"},
        {"dsn": replicated.replica, "weight": 1, "name": "db0.light"},
    ]
    async with DataLayer(config(replicated, replicas, policy), metadata(), env={}) as lay:
        repo = lay.repository("accounts")
        await repo.insert({"id": 1, "owner": "x"})
        for _ in range(400):
            await repo.get(1)
        heavy, light = lay.cluster.nodes["db0.heavy"].queries, lay.cluster.nodes["db0.light"].queries
        assert heavy + light == 400
        assert lay.cluster.primary("db0").queries == 1
        if policy == "weighted":
            assert (heavy, light) == (300, 100)
        elif policy in ("round_robin", "least_connections"):
            assert (heavy, light) == (200, 200)  # sequential: nothing in flight, so rotate
        else:
            assert 240 <= heavy <= 360  # random, weighted 3:1
