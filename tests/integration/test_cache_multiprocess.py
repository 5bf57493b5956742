"""The two-level cache across OS processes, on real PostgreSQL and real Redis.

Every test starts worker processes (``tests/cache_workers.py``, spawn start
method), each with its own DataLayer, so L1s, singleflights, leases and the
invalidation bus are exercised the way separate application servers use them.
The database is the session's PostgreSQL replica set (primary + streaming
standby, replay paused/resumed by the parent to create replica lag). Redis is
the shared test server (each test uses its own namespace and channel and
deletes only its own keys), except for the kill test, which owns its
``redis-server``.

Measured numbers are printed (``pytest -s`` shows them) and asserted with
margins that leave room for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from tests.cache_workers import (
    Worker,
    config,
    create_rows,
    decode_l2,
    drop_tables,
    l2_key,
    physical_tables,
    read_rows,
    recv_all,
    seed_row,
    workers,
)
from tests.conftest import REDIS_URL
from tests.replication import PgReplicaSet, free_port

pytestmark = [pytest.mark.integration, pytest.mark.replication]

# --------------------------------------------------------------------------- helpers


def report(name: str, **numbers: Any) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def delete_namespace(r: redis.Redis, ns: str) -> int:
    """Delete this test's keys (rows, versions, leases, Bloom snapshot) and nothing else."""
    n = 0
    for pattern in (f"{ns}:*", "{" + ns + ":*"):
        batch = list(r.scan_iter(match=pattern, count=1000))
        for i in range(0, len(batch), 500):
            n += r.delete(*batch[i : i + 500])
    return n


def count_namespace(r: redis.Redis, ns: str) -> int:
    return sum(1 for _ in r.scan_iter(match=f"{ns}:*", count=1000))


@pytest.fixture
def ns() -> Iterator[str]:
    """A namespace (and channel prefix) of this test on the shared Redis; its keys go at the end."""
    name = f"mp{uuid.uuid4().hex[:10]}"
    yield name
    r = redis.Redis.from_url(REDIS_URL)
    try:
        delete_namespace(r, name)
    finally:
        r.close()


@pytest.fixture
def pg(pg_replica_set: PgReplicaSet) -> Iterator[PgReplicaSet]:
    """The replica set, with replay resumed again whatever the test did."""
    try:
        yield pg_replica_set
    finally:
        with contextlib.suppress(Exception):
            pg_replica_set.resume_replay()


def create_table(dsn: str, table: str, shards: int, rows: list[int] | range) -> None:
    asyncio.run(create_rows(dsn, table, shards, rows))


def db_rows(dsn: str, table: str, shards: int) -> dict[int, dict[str, Any]]:
    return asyncio.run(read_rows(dsn, table, shards))


def drop_table(dsn: str, table: str, shards: int) -> None:
    asyncio.run(drop_tables(dsn, table, shards))


def stale_reads(ws: list[Worker], keys: list[int], db: dict[int, dict[str, Any]]) -> list[str]:
    """Ask every worker to read ``keys`` (get and get_many); every answer that differs from ``db``."""
    for w in ws:
        w.send({"cmd": "check", "keys": keys})
    out = []
    for i, res in enumerate(recv_all(ws)):
        for how in ("get", "get_many"):
            for k, row in res[how].items():
                if row != db.get(k):
                    out.append(f"process {i} {how}({k}) = {row}, database has {db.get(k)}")
    return out


def stale_l2(r: redis.Redis, ns: str, table: str, keys: list[int], db: dict[int, dict[str, Any]]) -> tuple[list[str], int]:
    """L2 entries (decoded) that differ from ``db``; and how many entries there were."""
    out = []
    present = 0
    raws = r.mget([l2_key(ns, table, k) for k in keys])
    for k, raw in zip(keys, raws, strict=True):
        if raw is None:
            continue
        present += 1
        row = decode_l2(raw)
        if row != db.get(k):
            out.append(f"L2[{k}] = {row}, database has {db.get(k)}")
    return out, present


def reset_pg_stat_statements(pg: PgReplicaSet) -> None:
    pg.primary_sql("SELECT pg_stat_statements_reset()")


def pgss_calls(pg: PgReplicaSet, phys: str) -> tuple[int, int]:
    """(calls of key lookups, calls of key scans) on physical table ``phys`` since the reset."""
    out = pg.primary_sql(
        "SELECT coalesce(sum(calls) FILTER (WHERE query NOT ILIKE '%limit%'), 0),"
        " coalesce(sum(calls) FILTER (WHERE query ILIKE '%limit%'), 0)"
        f" FROM pg_stat_statements WHERE query ILIKE 'select%' AND query LIKE '%{phys}%'"
    )
    a, b = out.split("|")
    return int(a), int(b)


def query_delta(res: dict[str, Any], node: str = "db0.primary") -> int:
    return int(res["after"]["queries"][node] - res["before"]["queries"][node])


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# --------------------------------------------------------------------------- 1. race harness


@pytest.mark.slow
def test_race_writers_readers_with_replica_lag(pg: PgReplicaSet, ns: str) -> None:
    """3 processes x 4 tasks of updates (+ read-back), gets and get_manys on 5 hot keys, with
    replay on the replica paused and resumed several times. Then, after the replica caught
    up and one TTL of quiet, every process and Redis agree with the primary."""
    table, shards, hot, warm = f"race_{ns}", 2, [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    keys = hot + warm
    # fresh_window (loads of keys written this recently go to the primary) covers the
    # longest pause of the replica's replay (< 1 s) with room to spare.
    policy = {"l1_ttl": 1.0, "l2_ttl": 3.0, "negative_ttl": 3.0, "jitter": 0.1, "fresh_window": 3.0}
    cfg = config(table, primary=pg.primary_dsn, replicas=[pg.standby_dsn], redis=REDIS_URL, namespace=ns,
                 shards=shards, **policy)
    create_table(pg.primary_dsn, table, shards, keys)
    pg.wait_for_standby_catchup(30)
    rng = random.Random(7)
    r = redis.Redis.from_url(REDIS_URL)
    try:
        specs = [{"config": cfg, "table": table, "keys": hot, "warm": warm, "index": i, "seed": i, "tasks": 4,
                  "ops": 3400, "min_seconds": 6.0} for i in range(3)]  # fmt: skip
        with workers("race", specs) as started:
            ws = [w for w, _ in started]
            for w in ws:
                w.send({"cmd": "go"})
            t0 = time.monotonic()
            pauses = lagged = 0
            results: list[Any] = [None] * len(ws)
            try:
                while any(res is None for res in results):
                    assert time.monotonic() - t0 < 45, "the workers did not finish in time"
                    time.sleep(rng.uniform(0.3, 0.7))
                    pg.pause_replay()
                    pauses += 1
                    time.sleep(rng.uniform(0.4, 0.9))
                    # The writers keep writing: the standby must be behind now.
                    target = pg.primary_sql("SELECT pg_current_wal_lsn()")
                    if pg.standby_sql(f"SELECT pg_last_wal_replay_lsn() < '{target}'::pg_lsn") == "t":
                        lagged += 1
                    pg.resume_replay()
                    for i, w in enumerate(ws):
                        results[i] = results[i] or w.poll()
            finally:
                pg.resume_replay()
            ops = sum(res["stats"]["ops"] for res in results)

            pg.wait_for_standby_catchup(30)
            db = db_rows(pg.primary_dsn, table, shards)
            stale_before_quiet = stale_reads(ws, keys, db)
            time.sleep(policy["l2_ttl"] * (1 + policy["jitter"]) + 0.5)
            db = db_rows(pg.primary_dsn, table, shards)
            stale = stale_reads(ws, keys, db)
            l2_stale, l2_present = stale_l2(r, ns, table, keys, db)
    finally:
        r.close()
        drop_table(pg.primary_dsn, table, shards)

    violations = [v for res in results for v in res["violations"]]
    report(
        "race", ops=ops, per_process=[res["stats"] for res in results],
        seconds=round(max(res["seconds"] for res in results), 1), pauses=pauses, lagged_pauses=lagged,
        read_your_writes_violations=len(violations), stale_after_quiet=len(stale),
        stale_before_quiet=len(stale_before_quiet), l2_stale=len(l2_stale), l2_entries=l2_present,
        bus_gaps=[res["counters"]["bus_gaps"] for res in results],
        retry_failures=[res["counters"]["retry_failures"] for res in results],
        queries=[res["counters"]["queries"] for res in results],
        rejected_fills=[res["counters"]["rejected_fills"] for res in results],
        l1_rejected=[res["counters"]["l1_rejected_fills"] for res in results],
        db_loads=[res["counters"]["db_loads"] for res in results],
    )
    assert [res["errors"] for res in results] == [[]] * 3
    assert [res["missing"] for res in results] == [[]] * 3
    assert ops >= 10_000
    assert pauses >= 3 and lagged >= 1, "the run must include replica lag"
    assert sum(res["counters"]["queries"]["db0.replica0"] for res in results) > 0, "loads must hit the replica"
    assert violations == []
    assert stale == []
    assert l2_stale == []


# --------------------------------------------------------------------------- 2. stampede


def _hold_table_lock(dsn: str, phys: str, locked: threading.Event, until: float) -> None:
    """Hold ACCESS EXCLUSIVE on ``phys`` (every SELECT waits) until wall time ``until``."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {phys} IN ACCESS EXCLUSIVE MODE")
                locked.set()
                await asyncio.sleep(max(0.0, until - time.time()))
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.mark.parametrize("slow_db", [False, True], ids=["fast-db", "slow-db"])
def test_stampede_one_cold_key_one_query(pg: PgReplicaSet, ns: str, slow_db: bool) -> None:
    """1,000 concurrent gets of one cold key in each of 4 processes, released together:
    exactly one database query for that key in total. With ``slow-db`` the table is locked
    for 0.6 s from the release instant, so the lease holder's load blocks and the other
    processes must wait on its Redis lease (lease_wait 3 s) instead of loading."""
    table, shards, key = f"stamp_{ns}", 1, 42
    policy = {"lease_wait": 3.0, "lease_ttl": 5.0} if slow_db else {}
    # Redis timeout 2 s (default 0.25 s): 4 processes x 1,000 tasks released at once on a
    # 2-core machine can stall an event loop past 0.25 s, and a process whose Redis call
    # times out rightly loads from the database itself, which is not what this measures.
    cfg = config(
        table, primary=pg.primary_dsn, redis=REDIS_URL, namespace=ns, shards=shards, pool_max=4,
        cache={"timeout": 2.0}, **policy,
    )
    create_table(pg.primary_dsn, table, shards, range(1, 101))
    phys = physical_tables(table, shards)[0]
    specs = [{"config": cfg, "table": table, "key": key, "n": 1000, "expect": seed_row(key)} for _ in range(4)]
    locker: threading.Thread | None = None
    try:
        with workers("stampede", specs) as started:
            ws = [w for w, _ in started]
            reset_pg_stat_statements(pg)
            at = time.time() + 1.0
            if slow_db:
                locked = threading.Event()
                locker = threading.Thread(target=_hold_table_lock, args=(pg.primary_dsn, phys, locked, at + 0.6))
                locker.start()
                assert locked.wait(10)
            for w in ws:
                w.send({"cmd": "go", "at": at})
            results = recv_all(ws)
            for w in ws:
                w.send({"cmd": "done"})
            lookups, scans = pgss_calls(pg, phys)
    finally:
        if locker is not None:
            locker.join(15)
        drop_table(pg.primary_dsn, table, shards)

    node_queries = sum(query_delta(res) for res in results)
    db_loads = sum(res["after"]["db_loads"] - res["before"]["db_loads"] for res in results)
    lease_waits = [res["after"]["lease_waits"] - res["before"]["lease_waits"] for res in results]
    report(
        "stampede" + ("-slow-db" if slow_db else ""), gets=4000, pg_stat_statements_calls=lookups, scans=scans,
        node_queries=node_queries, db_loads=db_loads, lease_waits=lease_waits,
        flight_shared=[res["after"]["flight_shared"] - res["before"]["flight_shared"] for res in results],
        redis_errors=[res["after"]["redis_errors"] for res in results],
        seconds=[round(res["seconds"], 3) for res in results],
    )
    assert [res["error_count"] for res in results] == [0] * 4
    assert [res["wrong"] for res in results] == [0] * 4
    assert lookups == 1
    assert node_queries == 1
    assert db_loads == 1
    if slow_db:
        assert sorted(lease_waits) == [0, 1, 1, 1]  # one holder; each other process waited once


# --------------------------------------------------------------------------- 3. penetration


@pytest.mark.slow
def test_penetration_absent_keys_stopped_by_bloom(pg: PgReplicaSet, ns: str) -> None:
    """100,000 gets of keys that do not exist (2 processes) with 20,000 rows and a warmed
    Bloom filter: at most 0.2% reach the database and Redis holds no flood of placeholders."""
    table, shards = f"pen_{ns}", 1
    # A get whose L2 read fails goes to the database (the filter alone cannot rule out a key
    # inserted elsewhere a moment ago): on a loaded 2-core machine 0.25 s read timeouts
    # happen, so this test gives Redis 1 s; it measures the filter, not the machine.
    cfg = config(table, primary=pg.primary_dsn, redis=REDIS_URL, namespace=ns, shards=shards,
                 cache={"timeout": 1.0}, bloom_capacity=100_000, bloom_error_rate=0.001)
    create_table(pg.primary_dsn, table, shards, range(1, 20_001))
    absent, present = 100_000, 500
    specs = [
        {"config": cfg, "table": table, "concurrency": 64,
         "absent": [1_000_000 + i * absent // 2, 1_000_000 + (i + 1) * absent // 2],
         "present": [1 + i * present // 2, 1 + (i + 1) * present // 2],
         "debug": bool(os.environ.get("DAL_CACHE_DEBUG"))}
        for i in range(2)
    ]  # fmt: skip
    r = redis.Redis.from_url(REDIS_URL)
    try:
        with workers("penetration", specs) as started:
            assert all(ready["bloom_ready"] for _, ready in started)
            ws = [w for w, _ in started]
            for w in ws:
                w.send({"cmd": "go"})
            results = recv_all(ws, timeout=120)
            redis_keys = count_namespace(r, ns)
            for w in ws:
                w.send({"cmd": "done"})
    finally:
        r.close()
        drop_table(pg.primary_dsn, table, shards)

    queries = sum(query_delta(res) for res in results)
    loads = sum(res["after"]["db_loads"] - res["before"]["db_loads"] for res in results)
    rejections = sum(res["after"]["bloom_rejections"] - res["before"]["bloom_rejections"] for res in results)
    # Each present key costs one query (its load); the rest are false positives of the filter.
    absent_queries = queries - present
    report(
        "penetration", absent_gets=absent, present_gets=present, db_queries=queries,
        absent_reaching_db=absent_queries, percent=round(100 * absent_queries / absent, 4),
        bloom_rejections=rejections, db_loads=loads, redis_keys=redis_keys,
        redis_errors=[res["after"]["redis_errors"] - res["before"]["redis_errors"] for res in results],
        bus_gaps=[res["after"]["bus_gaps"] for res in results],
        breaker_trips=[res["after"]["breaker_trips"] for res in results],
        seconds=[round(res["seconds"], 1) for res in results],
    )
    assert [res["error_count"] for res in results] == [0, 0]
    assert [res["found_absent"] for res in results] == [0, 0]
    assert [res["missing_present"] for res in results] == [0, 0]
    assert absent_queries <= absent * 0.002
    assert rejections >= absent - absent * 0.002
    assert redis_keys <= absent * 0.002 + present


# --------------------------------------------------------------------------- 4. avalanche


def test_avalanche_expiry_spread_over_jitter_window(pg: PgReplicaSet, ns: str) -> None:
    """10,000 entries filled at once (2 processes, one get_many each) expire spread over the
    jitter window: PTTLs right after the fill span >= 80% of 2 * jitter * l2_ttl."""
    table, shards, n = f"aval_{ns}", 2, 10_000
    l2_ttl, jitter = 60.0, 0.1
    cfg = config(table, primary=pg.primary_dsn, redis=REDIS_URL, namespace=ns, shards=shards,
                 l2_ttl=l2_ttl, jitter=jitter, bloom=False)
    create_table(pg.primary_dsn, table, shards, range(1, n + 1))
    specs = [{"config": cfg, "table": table, "ids": [1 + i * n // 2, 1 + (i + 1) * n // 2]} for i in range(2)]
    r = redis.Redis.from_url(REDIS_URL)
    try:
        with workers("fill", specs) as started:
            ws = [w for w, _ in started]
            at = time.time() + 0.5
            for w in ws:
                w.send({"cmd": "go", "at": at})
            results = recv_all(ws)
            keys = [l2_key(ns, table, k) for k in range(1, n + 1)]
            expiry: list[float] = []
            for i in range(0, n, 1000):
                pipe = r.pipeline(transaction=False)
                for key in keys[i : i + 1000]:
                    pipe.pttl(key)
                now = time.time()
                expiry += [now + ms / 1000 for ms in pipe.execute() if ms > 0]
            for w in ws:
                w.send({"cmd": "done"})
    finally:
        r.close()
        drop_table(pg.primary_dsn, table, shards)

    window = 2 * jitter * l2_ttl
    spread = max(expiry) - min(expiry)
    buckets = [0] * 10
    lo = min(expiry)
    for e in expiry:
        buckets[min(9, int((e - lo) / (window / 10)))] += 1
    report(
        "avalanche", entries=len(expiry), spread_s=round(spread, 2), window_s=window,
        spread_pct=round(100 * spread / window, 1), buckets=buckets,
        fill_seconds=[round(res["seconds"], 2) for res in results],
        redis_errors=[res["counters"]["redis_errors"] for res in results],
    )
    assert [res["rows"] for res in results] == [n // 2, n // 2]
    assert len(expiry) == n, "every entry must be in L2 with a TTL"
    assert spread >= 0.8 * window
    assert max(buckets) <= 0.25 * n  # no tenth of the window holds a quarter of the entries


# --------------------------------------------------------------------------- 5. invalidation latency


def test_cross_process_invalidation_latency(pg: PgReplicaSet, ns: str) -> None:
    """Process A updates a key, process B polls get() until it sees the new value: the time
    from A's write returning to B's first new value, over 300 rounds. Within A, a read that
    starts after the write returned never sees the old value."""
    import multiprocessing

    table, shards, key, rounds = f"lat_{ns}", 1, 7, 300
    # Long L1/L2 TTLs: only an invalidation can make B see a new value.
    cfg = config(table, primary=pg.primary_dsn, redis=REDIS_URL, namespace=ns, shards=shards,
                 l1_ttl=60.0, l2_ttl=60.0)
    create_table(pg.primary_dsn, table, shards, [key])
    a_end, b_end = multiprocessing.get_context("spawn").Pipe()
    spec = {"config": cfg, "table": table, "key": key, "rounds": rounds, "pause": 0.005, "local_readers": 2}
    writer = reader = None
    try:
        reader = Worker("latency_reader", spec, peer=b_end)
        writer = Worker("latency_writer", spec, peer=a_end)
        reader.recv()
        writer.recv()
        reader.send({"cmd": "go"})
        writer.send({"cmd": "go"})
        got: list[Any] = [None, None]
        deadline = time.monotonic() + 60
        while None in got:  # either may fail first
            assert time.monotonic() < deadline, "no result from the latency workers"
            got = [got[0] or writer.poll(), got[1] or reader.poll()]
            time.sleep(0.02)
        w_res, r_res = got
        writer.send({"cmd": "done"})
        reader.send({"cmd": "done"})
    finally:
        for w in (writer, reader):
            if w is not None:
                w.stop()
        a_end.close()
        b_end.close()
        drop_table(pg.primary_dsn, table, shards)

    lat_ms = [(s - w) * 1000 for w, s in zip(w_res["written"], r_res["seen"], strict=True)]
    p50, p99 = statistics.median(lat_ms), percentile(lat_ms, 0.99)
    report(
        "invalidation", rounds=len(lat_ms), p50_ms=round(p50, 3), p99_ms=round(p99, 3),
        max_ms=round(max(lat_ms), 3), min_ms=round(min(lat_ms), 3),
        reader_bus_last_delay_ms=r_res["counters"]["bus_last_delay_ms"], reader_polls=r_res["polls"], writer_local_reads=w_res["local_reads"],
        writer_stale=w_res["stale_count"], reader_received=r_res["counters"]["bus_received"],
        reader_gaps=r_res["counters"]["bus_gaps"],
    )
    assert len(lat_ms) == rounds
    assert w_res["stale"] == []
    assert p99 < 100.0


# --------------------------------------------------------------------------- 6. Redis killed


class RedisServer:
    """A test-owned ``redis-server`` (no persistence) on a fixed port; restartable."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="dal-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on {self.port} did not start: {(self.dir / 'redis.log').read_text()}")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.slow
def test_redis_killed_and_restarted_under_load(pg: PgReplicaSet, ns: str) -> None:
    """2 processes doing gets/get_manys/updates/inserts/deletes; redis-server is SIGKILLed
    mid-run and restarted on the same port 1.5 s later. No call fails, and after recovery
    plus one TTL of quiet every process reads what the database holds."""
    table, shards, keys = f"kill_{ns}", 2, list(range(1, 21))
    policy = {"l1_ttl": 1.0, "l2_ttl": 3.0, "negative_ttl": 3.0, "jitter": 0.1}
    server = RedisServer(free_port())
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    cfg = config(table, primary=pg.primary_dsn, redis=url, namespace=ns, shards=shards, **policy)
    create_table(pg.primary_dsn, table, shards, keys)
    specs = [{"config": cfg, "table": table, "keys": keys, "index": i, "seed": 10 + i, "tasks": 4,
              "insert_from": 100_000 * (i + 1), "debug": bool(os.environ.get("DAL_CACHE_DEBUG"))}
             for i in range(2)]  # fmt: skip
    try:
        with workers("mixed", specs) as started:
            ws = [w for w, _ in started]
            for w in ws:
                w.send({"cmd": "go"})
            time.sleep(2.0)
            killed_at = time.monotonic()
            server.kill()
            time.sleep(1.5)
            server.start()
            down = time.monotonic() - killed_at
            time.sleep(3.0)  # load continues on the restarted server
            for w in ws:
                w.send({"cmd": "stop"})
            results = recv_all(ws)
            touched = sorted({*keys, *(k for res in results for k in res["inserted"] + res["deleted"])})
            # Recovery: every process's breaker closed and subscription live again.
            deadline = time.monotonic() + 15
            while True:
                for w in ws:
                    w.send({"cmd": "counters"})
                counters = recv_all(ws)
                if all(c["breaker_state"] == "closed" and c["bus_subscribed"] and c["retry_pending"] == 0 for c in counters):
                    break
                assert time.monotonic() < deadline, f"no recovery: {counters}"
                time.sleep(0.2)
            time.sleep(max(policy["l2_ttl"], policy["negative_ttl"]) * (1 + policy["jitter"]) + 0.5)
            db = db_rows(pg.primary_dsn, table, shards)
            stale = stale_reads(ws, touched, db)
    finally:
        server.stop()
        drop_table(pg.primary_dsn, table, shards)

    report(
        "redis-kill", ops=sum(res["stats"]["ops"] for res in results),
        per_process=[res["stats"] for res in results], redis_down_s=round(down, 2),
        failed_calls=sum(res["error_count"] for res in results),
        slowest_call_s=[round(res["slowest"], 3) for res in results],
        redis_errors=[res["counters"]["redis_errors"] for res in results],
        breaker_trips=[res["counters"]["breaker_trips"] for res in results],
        bus_reconnects=[c["bus_reconnects"] for c in counters], bus_gaps=[c["bus_gaps"] for c in counters],
        read_your_writes_violations=sum(res["violation_count"] for res in results),
        violations=[v for res in results for v in res["violations"]],
        keys_checked=len(touched), stale=len(stale),
    )
    assert [res["errors"] for res in results] == [[], []]
    assert all(res["stats"]["ops"] > 100 for res in results)
    assert stale == []
    # A writer reads its own writes even while Redis is away (keys whose L2 delete is
    # pending are read from the primary).
    assert [res["violations"] for res in results] == [[], []]
