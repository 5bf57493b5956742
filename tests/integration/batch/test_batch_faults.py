"""The primary dies in the middle of batched writes (PostgreSQL and MariaDB).

Thousands of concurrent BatchWriter callers and a stream of insert_many calls
run against a test-owned primary (two shard databases on it, 8 table shards);
the primary is SIGKILLed mid-way and restarted about a second later. Every
caller must get an answer, failures must be typed dal errors of the
ConnectionUnavailableError family, and afterwards the rows on the restarted
primary must be exactly the rows reported committed: none reported failed yet
present, none reported committed yet missing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from dal import ConnectionUnavailableError, DataLayer
from dal.backends.mysql import MySQLConnection
from dal.backends.postgres import PostgresConnection
from dal.batch import BatchResult, CommitUnknownError
from dal.batch.in_doubt import PrimaryLookups
from tests.batch_support import TABLES, Raw, ids_on
from tests.conftest import topology, users_orders_metadata
from tests.replication import MariaDBReplicaSet, PgReplicaSet

pytestmark = pytest.mark.replication

WRITER_ROWS = 5000
MANY_ROWS = 500  # per insert_many call
IN_DOUBT_TIMEOUT = 30.0


@pytest.fixture(params=["postgresql", "mysql"])
def killable(request: pytest.FixtureRequest) -> Iterator[tuple[PgReplicaSet | MariaDBReplicaSet, list[str]]]:
    """A replica set (its primary may be killed) with two fresh shard databases on the primary."""
    names = [f"dal_batch_kill_{os.getpid()}_{i}" for i in range(2)]
    rs: PgReplicaSet | MariaDBReplicaSet
    if request.param == "postgresql":
        rs = request.getfixturevalue("pg_replica_set")
        for n in names:
            rs.primary_sql(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
            rs.primary_sql(f"CREATE DATABASE {n}")
    else:
        rs = request.getfixturevalue("mariadb_replica_set")
        for n in names:
            rs.primary_sql(f"DROP DATABASE IF EXISTS {n}; CREATE DATABASE {n}", database=None)
    urls = [make_url(rs.primary_dsn).set(database=n).render_as_string(hide_password=False) for n in names]
    try:
        yield rs, urls
    finally:
        if not rs._primary or not rs._primary.running:  # the next tests need it
            rs.start_primary()
        for n in names:
            if isinstance(rs, PgReplicaSet):
                rs.primary_sql(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
            else:
                rs.primary_sql(f"DROP DATABASE IF EXISTS {n}", database=None)


def user(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"n{i}", "age": i % 100}


async def test_primary_killed_mid_batch(
    killable: tuple[PgReplicaSet | MariaDBReplicaSet, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    rs, urls = killable
    # Count the COMMITs cut off by the kill whose outcome had to be looked up.
    in_doubt: list[bool] = []
    check = PrimaryLookups.committed_after_all

    async def counted(self: PrimaryLookups, *args: Any) -> bool:
        found = await check(self, *args)
        in_doubt.append(found)
        return found

    monkeypatch.setattr(PrimaryLookups, "committed_after_all", counted)
    cfg = topology(urls, TABLES, in_doubt_timeout=IN_DOUBT_TIMEOUT)
    cfg["pool"].update(connect_timeout=3.0, acquire_timeout=20.0)
    layer = DataLayer(cfg, users_orders_metadata(), env={})
    await layer.start()
    await layer.create_all()
    users = layer.repository("users")
    w = users.writer(max_rows=50, max_delay=0.005)

    outcome: dict[int, BaseException | None] = {}  # writer callers: None = committed
    many: list[tuple[list[int], BatchResult]] = []
    killed_at = restarted_at = 0.0
    done_writing = asyncio.Event()

    async def caller(i: int) -> None:
        try:
            await w.insert(user(i))
        except BaseException as exc:
            outcome[i] = exc
        else:
            outcome[i] = None

    async def callers() -> None:
        tasks = []
        # 5,000 callers arriving over ~2.5 s, so the kill lands among them.
        for wave in range(100):
            for j in range(WRITER_ROWS // 100):
                tasks.append(asyncio.create_task(caller(1 + wave * (WRITER_ROWS // 100) + j)))
            await asyncio.sleep(0.025)
        await asyncio.gather(*tasks)
        done_writing.set()

    async def bulk() -> None:
        start = 1_000_000
        while not done_writing.is_set():
            ids = list(range(start, start + MANY_ROWS))
            start += MANY_ROWS
            many.append((ids, await users.insert_many([user(i) for i in ids], batch_size=50, raise_on_error=False)))
            await asyncio.sleep(0.01)

    async def chaos() -> None:
        nonlocal killed_at, restarted_at
        await asyncio.sleep(0.6)
        killed_at = time.monotonic()
        await asyncio.to_thread(rs.kill_primary)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(rs.start_primary)
        restarted_at = time.monotonic()

    t0 = time.monotonic()
    async with asyncio.timeout(120):
        await asyncio.gather(callers(), bulk(), chaos())
        await w.aclose()
    took = time.monotonic() - t0

    # Rows on the restarted primary, read with raw SQL (placement checked per row).
    raw = Raw(urls)
    try:
        present = await raw.keys("users")
    finally:
        await raw.aclose()
        await layer.aclose()
    assert all(n == 1 for n in present.values())

    # -- the writer's callers
    assert len(outcome) == WRITER_ROWS, "every caller got an answer"
    ok = {i for i, o in outcome.items() if o is None}
    errors = {i: o for i, o in outcome.items() if o is not None}
    wrong_type = {i: repr(o) for i, o in errors.items() if not isinstance(o, ConnectionUnavailableError)}
    assert not wrong_type, list(wrong_type.items())[:5]
    unknown = [i for i, o in errors.items() if isinstance(o, CommitUnknownError)]
    # The primary came back well within in_doubt_timeout: every cut-off COMMIT was resolved.
    assert not unknown, f"{len(unknown)} in doubt after a {restarted_at - killed_at:.1f}s outage: {errors[unknown[0]]!r}"
    writer_present = {i for i in present if i <= WRITER_ROWS}
    both = writer_present & set(errors)
    neither = ok - writer_present
    assert not both, f"{len(both)} rows reported failed but committed: {sorted(both)[:10]}"
    assert not neither, f"{len(neither)} rows reported committed but missing: {sorted(neither)[:10]}"
    assert writer_present == ok
    # The kill did land mid-way: some callers failed, and some committed before and after it.
    assert errors, "no writer caller saw the outage"
    assert len(ok) > WRITER_ROWS // 10

    # -- insert_many: what each result says committed is there, what it says failed is not
    bulk_present = {i for i in present if i > WRITER_ROWS}
    failed_calls = 0
    for ids, res in many:
        failed = {k for f in res.failures for k in f.keys}
        assert all(isinstance(f.error, ConnectionUnavailableError) for f in res.failures), [
            repr(f.error) for f in res.failures
        ]
        assert not any(isinstance(f.error, CommitUnknownError) for f in res.failures)
        committed = set(ids) - failed
        assert committed <= bulk_present, sorted(committed - bulk_present)[:10]
        assert not (failed & bulk_present), sorted(failed & bulk_present)[:10]
        assert res.committed == len(committed) and res.rows == len(ids)
        assert res.committed_batches + len(res.failures) == res.batches
        failed_calls += bool(res.failures)
    assert bulk_present == {i for ids, res in many for i in ids} - {k for _, r in many for f in r.failures for k in f.keys}
    assert failed_calls > 0, "no insert_many call saw the outage"
    print(
        f"{type(rs).__name__}: {took:.1f}s, outage {restarted_at - killed_at:.1f}s; writer {len(ok)} ok / "
        f"{len(errors)} failed in {w.batches} batches; insert_many {len(many)} calls, {failed_calls} with failures; "
        f"in-doubt COMMITs resolved: {in_doubt.count(True)} committed, {in_doubt.count(False)} not"
    )



@pytest.mark.slow
async def test_commit_cut_off_is_resolved_on_the_restarted_primary(
    killable: tuple[PgReplicaSet | MariaDBReplicaSet, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kill lands exactly on a COMMIT (injected at the driver adapter's commit()).

    - "after": the COMMIT took effect, then the server died before its answer
      arrived: the batch is looked up on the restarted primary and reported committed.
    - "before": the server died before the COMMIT reached it: reported failed.
    - the primary stays away longer than ``in_doubt_timeout``: CommitUnknownError
      for every row of the batch (the writer does not retry them), never a plain failure.
    - an upsert batch cut off on COMMIT cannot be looked up: CommitUnknownError.
    """
    rs, urls = killable
    conn_cls = PostgresConnection if isinstance(rs, PgReplicaSet) else MySQLConnection
    real_commit = conn_cls.commit
    inject: dict[str, Any] = {}
    restarts: list[asyncio.Task[None]] = []

    async def restart_after(delay: float) -> None:
        await asyncio.sleep(delay)
        await asyncio.to_thread(rs.start_primary)

    async def commit(self: Any) -> None:
        mode = inject.pop("mode", None)
        if mode is None:
            return await real_commit(self)
        if mode == "after":
            await real_commit(self)
        await asyncio.to_thread(rs.kill_primary)
        restarts.append(asyncio.create_task(restart_after(inject.pop("down"))))
        if mode == "before":
            await real_commit(self)  # on a dead server: raises
            raise AssertionError("COMMIT on a killed server succeeded")
        raise ConnectionUnavailableError("injected: connection lost before the answer to COMMIT arrived")

    monkeypatch.setattr(conn_cls, "commit", commit)

    def make(in_doubt_timeout: float) -> DataLayer:
        cfg = topology(urls, TABLES, in_doubt_timeout=in_doubt_timeout)
        cfg["pool"].update(connect_timeout=3.0)
        return DataLayer(cfg, users_orders_metadata(), env={})

    on_slot0 = ids_on(lambda s: s == 0, 120)
    raw = Raw(urls)

    async def outage_over() -> None:
        await restarts.pop()

    # (a fresh layer per outage: a killed server leaves dead connections in the pools)
    async with make(IN_DOUBT_TIMEOUT) as lay:
        await lay.create_all()
        # COMMIT took effect, answer lost: found on the restarted primary -> committed.
        inject.update(mode="after", down=1.0)
        res = await lay.repository("users").insert_many([user(i) for i in on_slot0[:30]])
        await outage_over()
    assert res.ok and res.committed == 30 and res.committed_batches == 1
    assert set(await raw.keys("users")) == set(on_slot0[:30])

    async with make(IN_DOUBT_TIMEOUT) as lay:
        # The server died before COMMIT: not there -> reported failed, nothing written.
        inject.update(mode="before", down=1.0)
        res = await lay.repository("users").insert_many([user(i) for i in on_slot0[30:60]], raise_on_error=False)
        await outage_over()
    assert len(res.failures) == 1 and res.committed == 0
    err = res.failures[0].error
    assert isinstance(err, ConnectionUnavailableError) and not isinstance(err, CommitUnknownError), repr(err)
    assert set(await raw.keys("users")) == set(on_slot0[:30])

    async with make(0.3) as lay:
        # Answer lost and the primary away longer than in_doubt_timeout (0.3 s): unknown.
        w = lay.repository("users").writer(max_rows=30, max_delay=1.0)
        inject.update(mode="after", down=1.5)
        outcomes = await asyncio.gather(*(w.insert(user(i)) for i in on_slot0[60:90]), return_exceptions=True)
        await w.aclose()
        await outage_over()
    assert all(isinstance(o, CommitUnknownError) for o in outcomes), outcomes
    assert w.batches == 1  # not split and retried: a retry would have hit its own rows
    assert set(await raw.keys("users")) == set(on_slot0[:30]) | set(on_slot0[60:90])

    async with make(IN_DOUBT_TIMEOUT) as lay:
        # An upsert batch cannot be looked up: unknown at once.
        inject.update(mode="after", down=0.5)
        res = await lay.repository("users").upsert_many([{"id": i, "name": "up"} for i in on_slot0[:10]], raise_on_error=False)
        await outage_over()
    assert [type(f.error) for f in res.failures] == [CommitUnknownError]
    assert res.committed == 0
    await raw.aclose()


async def test_in_doubt_commit_is_resolved_while_callers_hold_the_pool(
    killable: tuple[PgReplicaSet | MariaDBReplicaSet, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookup of a cut-off COMMIT does not wait for the pool.

    One connection per database (``max_size=1``), and a second insert_many of the same
    database queued for it: the batch whose COMMIT answer is lost still holds the only
    pooled connection, so a lookup through the pool would wait behind the queued call
    until in_doubt_timeout and report the outcome unknown. It looks on a connection of
    its own: committed, and then the queued call runs.
    """
    rs, urls = killable
    conn_cls = PostgresConnection if isinstance(rs, PgReplicaSet) else MySQLConnection
    real_commit = conn_cls.commit
    injected: list[bool] = []
    restart: list[asyncio.Task[None]] = []

    async def restart_after(delay: float) -> None:
        await asyncio.sleep(delay)
        await asyncio.to_thread(rs.start_primary)

    async def commit(self: Any) -> None:
        if injected:
            return await real_commit(self)
        injected.append(True)
        await real_commit(self)  # took effect; the answer is "lost" with the server
        await asyncio.to_thread(rs.kill_primary)
        restart.append(asyncio.create_task(restart_after(0.5)))
        raise ConnectionUnavailableError("injected: connection lost before the answer to COMMIT arrived")

    cfg = topology(urls, TABLES, in_doubt_timeout=IN_DOUBT_TIMEOUT)
    cfg["pool"].update(max_size=1, acquire_timeout=IN_DOUBT_TIMEOUT, connect_timeout=3.0)
    on_slot0 = ids_on(lambda s: s == 0, 40)
    raw = Raw(urls)
    try:
        async with DataLayer(cfg, users_orders_metadata(), env={}) as lay:
            await lay.create_all()
            monkeypatch.setattr(conn_cls, "commit", commit)
            users = lay.repository("users")
            first = asyncio.create_task(users.insert_many([user(i) for i in on_slot0[:20]], raise_on_error=False))
            await asyncio.sleep(0)  # the first call takes the pool's connection
            second = asyncio.create_task(users.insert_many([user(i) for i in on_slot0[20:]], raise_on_error=False))
            t0 = time.monotonic()
            res1 = await first
            waited = time.monotonic() - t0
            res2 = await second
            await restart.pop()
        assert injected == [True]
        assert res1.ok and res1.committed == 20, (res1.failures, waited)
        # The queued call got the pool once the first returned (its connection is
        # discarded as broken; the pool opens a new one on the restarted primary).
        assert res2.ok and res2.committed == 20, res2.failures
        assert set(await raw.keys("users")) == set(on_slot0)
    finally:
        await raw.aclose()
