"""Cancelled and timed-out statements are stopped on the server, and a write in doubt
never leaves the cache older than the database.

On the real servers (PostgreSQL, MariaDB, SQLite files), with the L2 cache in
the shared Redis (a namespace per test). A lock held by a raw connection of the
test (bypassing dal) makes a statement wait; the caller is cancelled
(``asyncio.wait_for``) or ``query_timeout`` passes; the lock is released; the
test then checks what the server did and what the cache serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pymysql
import pytest
import redis.asyncio as aioredis

from dal import (
    CommitUnknownError,
    ConnectionUnavailableError,
    DalError,
    DataLayer,
    QueryTimeoutError,
)
from dal.repository import Repository
from tests.batch_support import BATCH_DBS, slot_of
from tests.cache_support import cache_topology, delete_ns, unique_namespace, wait_until
from tests.conftest import REDIS_URL, users_orders_metadata

pytestmark = pytest.mark.integration

SHARDS = 8
TABLES: dict[str, Any] = {"users": {"shard_key": "id", "table_shards": SHARDS, "cache": True}}


def physical(key: int) -> tuple[str, str]:
    """(database, physical table) of users key ``key`` (CRC32, computed here)."""
    slot = slot_of(key)
    return ("db0" if slot < SHARDS // 2 else "db1"), f"users_{slot}"


class Locker:
    """A raw connection of the test's own (no dal code) that holds locks on a shard database."""

    def __init__(self, backend: str, url: str) -> None:
        self.backend = backend
        self.url = url
        self.conn: Any = None

    async def __aenter__(self) -> Locker:
        if self.backend == "postgresql":
            self.conn = await asyncpg.connect(self.url.replace("postgresql+asyncpg", "postgresql"))
        elif self.backend == "mysql":
            from sqlalchemy.engine import make_url

            u = make_url(self.url)
            self.conn = pymysql.connect(
                host=u.host, port=u.port or 3306, user=u.username, password=u.password or "",
                database=u.database, autocommit=True,
            )  # fmt: skip
        else:
            path = self.url.split(":///", 1)[1]
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        return self

    async def execute(self, sql: str) -> None:
        if self.backend == "postgresql":
            await self.conn.execute(sql)
        elif self.backend == "mysql":
            with self.conn.cursor() as cur:
                await asyncio.to_thread(cur.execute, sql)
        else:
            await asyncio.to_thread(self.conn.execute, sql)

    async def lock_row(self, table: str, key: int) -> None:
        """Hold a write lock on row ``key`` of ``table`` (the whole database on SQLite)."""
        if self.backend == "sqlite":
            await self.execute("BEGIN IMMEDIATE")
        else:
            await self.execute("BEGIN")
            await self.execute(f"SELECT * FROM {table} WHERE id = {int(key)} FOR UPDATE")

    async def lock_table(self, table: str) -> None:
        """Block reads of ``table`` too."""
        if self.backend == "postgresql":
            await self.execute("BEGIN")
            await self.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        elif self.backend == "mysql":
            await self.execute(f"LOCK TABLES {table} WRITE")
        else:
            raise AssertionError("SQLite in WAL mode: a writer never blocks readers")

    async def release(self) -> None:
        if self.backend == "mysql":
            await self.execute("UNLOCK TABLES")
        with contextlib.suppress(Exception):
            await self.execute("COMMIT")

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.release()
        if self.backend == "postgresql":
            await self.conn.close()
        else:
            self.conn.close()


def make(urls: list[str], ns: str, **pool: Any) -> DataLayer:
    cfg = cache_topology(urls, TABLES, redis=REDIS_URL, namespace=ns)
    cfg["pool"].update(pool)
    return DataLayer(cfg, users_orders_metadata(), env={})


KEY = 7


async def fresh_users(layer: DataLayer) -> Repository[Any]:
    """Fresh physical tables holding row KEY named "old", read once (so cached in L1 and L2)."""
    await layer.drop_all()
    await layer.create_all()
    repo = layer.repository("users")
    await repo.insert({"id": KEY, "name": "old"})
    assert (await repo.get(KEY))["name"] == "old"
    return repo


@pytest.fixture
async def ns() -> AsyncIterator[str]:
    name = unique_namespace()
    yield name
    client = aioredis.from_url(REDIS_URL)
    await delete_ns(client, name)
    await client.aclose()


async def stored_name(raw: Any, key: int) -> str | None:
    db, table = physical(key)
    rows = await raw.fetch(db, f"SELECT name FROM {table} WHERE id = {int(key)}")
    return rows[0][0] if rows else None


async def lock_waiters(backend: str, raw: Any) -> int:
    """Sessions on the test's shard databases waiting for a lock now."""
    if backend == "postgresql":
        sql = f"SELECT count(*) FROM pg_stat_activity WHERE datname IN {BATCH_DBS!r} AND wait_event_type = 'Lock'"
    else:
        sql = (
            f"SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB IN {BATCH_DBS!r} "
            "AND COMMAND = 'Query' AND STATE LIKE '%lock%'"
        )
    return int((await raw.fetch("db0", sql))[0][0])


async def running_statements(backend: str, raw: Any) -> list[tuple[Any, ...]]:
    """Statements other sessions are running on the server now (none for SQLite)."""
    if backend == "postgresql":
        return await raw.fetch(
            "db0",
            f"SELECT pid, state, query FROM pg_stat_activity WHERE datname IN {BATCH_DBS!r} "
            "AND pid <> pg_backend_pid() AND state NOT IN ('idle')",
        )
    if backend == "mysql":
        return await raw.fetch(
            "db0",
            f"SELECT ID, COMMAND, INFO FROM information_schema.PROCESSLIST WHERE DB IN {BATCH_DBS!r} "
            "AND ID <> CONNECTION_ID() AND COMMAND NOT IN ('Sleep')",
        )
    return []


@pytest.mark.parametrize("backend", ["postgresql", "mysql", "sqlite"])
async def test_cancelled_write_waiting_on_a_lock_never_lands(backend: str, urls: list[str], raw: Any, ns: str) -> None:
    """wait_for(update) gives up while the row is locked elsewhere: the UPDATE is cancelled
    on the server, so releasing the lock does not let it commit, and the cache serves what
    the database holds."""
    async with make(urls, ns) as layer:
        repo = await fresh_users(layer)
        key = KEY
        db, table = physical(key)
        async with Locker(backend, urls[int(db[-1])]) as locker:
            await locker.lock_row(table, key)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(repo.update(key, {"name": "new"}), 0.5)
            await locker.release()
        await asyncio.sleep(0.5)  # long enough for an UPDATE that was not cancelled to commit
        assert await stored_name(raw, key) == "old"
        assert (await repo.get(key))["name"] == "old"
        assert await running_statements(backend, raw) == []
        # The node's connections still work.
        assert await repo.update(key, {"name": "newer"})
        assert (await repo.get(key))["name"] == "newer"
        await layer.drop_all()


@pytest.mark.parametrize("backend", ["postgresql", "mysql", "sqlite"])
async def test_query_timeout_cancels_on_the_server_and_says_so(backend: str, urls: list[str], raw: Any, ns: str) -> None:
    """query_timeout on a write blocked by a lock: QueryTimeoutError (a TimeoutError, not a
    ConnectionUnavailableError), naming the node and saying the write may have landed; the
    statement is gone from the server. A read blocked the same way times out as a read."""
    async with make(urls, ns, query_timeout=0.5) as layer:
        repo = await fresh_users(layer)
        key = KEY
        db, table = physical(key)
        async with Locker(backend, urls[int(db[-1])]) as locker:
            await locker.lock_row(table, key)
            with pytest.raises(QueryTimeoutError) as ei:
                await repo.update(key, {"name": "new"})
            await locker.release()
        err = ei.value
        assert isinstance(err, TimeoutError) and isinstance(err, DalError)
        assert not isinstance(err, ConnectionUnavailableError)
        assert err.node == f"{db}.primary"
        # PostgreSQL's timeout is asyncpg's (the client's): the UPDATE may have committed just
        # before the cancel. MariaDB's max_statement_time and SQLite's busy timeout are the
        # server's: it refused the statement, nothing landed.
        assert err.may_have_landed is (backend == "postgresql")
        assert str(err).startswith(f"{db}.primary: ")
        await asyncio.sleep(0.3)
        assert await stored_name(raw, key) == "old"
        assert (await repo.get(key))["name"] == "old"
        assert await running_statements(backend, raw) == []

        if backend == "sqlite":  # WAL: readers never wait for a writer
            await layer.drop_all()
            return
        async with Locker(backend, urls[int(db[-1])]) as locker:
            await locker.lock_table(table)
            with pytest.raises(QueryTimeoutError) as ei:
                await repo.get(key, primary=True)
            # The read is stopped on the server (in the background: a read cannot land)
            # while the lock is still held: it does not wait there for the lock.
            async def no_lock_waiter() -> bool:
                return await lock_waiters(backend, raw) == 0

            await wait_until(no_lock_waiter, timeout=5.0, interval=0.02)
            await locker.release()
        assert ei.value.may_have_landed is False and ei.value.node == f"{db}.primary"
        assert (await repo.get(key, primary=True))["name"] == "old"
        await layer.drop_all()


@pytest.mark.parametrize("backend", ["postgresql", "mysql", "sqlite"])
async def test_write_cut_off_after_it_landed_invalidates_the_cache(
    backend: str, urls: list[str], raw: Any, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The UPDATE commits on the server, but the caller is cancelled before the answer is
    read (the answer is held back here): the write is in doubt, so its cache keys are
    invalidated before the cancellation reaches the caller, and every read after it sees
    the new row."""
    async with make(urls, ns) as layer:
        repo = await fresh_users(layer)
        key = KEY
        cls = type(await _any_connection(layer, key))
        real = cls.execute
        answered = asyncio.Event()

        async def slow_answer(self: Any, sql: str, params: Any) -> int:
            n = await real(self, sql, params)
            if sql.lstrip().upper().startswith("UPDATE"):
                answered.set()
                await asyncio.sleep(30)  # the answer is "in the network" when the caller gives up
            return n

        monkeypatch.setattr(cls, "execute", slow_answer)
        task = asyncio.ensure_future(repo.update(key, {"name": "new"}))
        await answered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.setattr(cls, "execute", real)
        assert await stored_name(raw, key) == "new"
        assert (await repo.get(key))["name"] == "new"  # not the cached "old"
        # A second process (fresh layer, empty L1) sees it through L2 too.
        async with make(urls, ns) as other:
            assert (await other.repository("users").get(key))["name"] == "new"
        await layer.drop_all()


async def _any_connection(layer: DataLayer, key: int) -> Any:
    node = layer.cluster.primary(physical(key)[0])
    conn = await node.pool.acquire()
    node.pool.release(conn)
    return conn


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_pg_statement_that_outlives_its_cancel_is_waited_for(backend: str, urls: list[str], raw: Any, ns: str) -> None:
    """PostgreSQL: a trigger that ignores the cancel (it catches query_canceled) makes the
    UPDATE commit although the caller gave up. dal waits for the server's answer before the
    cancellation propagates, then invalidates: the cache never serves the old row."""
    async with make(urls, ns) as layer:
        repo = await fresh_users(layer)
        key = KEY
        db, table = physical(key)
        await raw.execute(
            db,
            "CREATE OR REPLACE FUNCTION dal_stubborn() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN BEGIN PERFORM pg_sleep(1); EXCEPTION WHEN query_canceled THEN "
            "PERFORM pg_sleep(0.5); END; RETURN NEW; END $$",
        )
        await raw.execute(db, f"CREATE TRIGGER stubborn AFTER UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION dal_stubborn()")
        loop = asyncio.get_running_loop()
        landed = 0
        # Now and then PostgreSQL cancels the UPDATE although the trigger catches the cancel
        # (seen with plain asyncpg too, under CPU load): try until it landed, and check the
        # cache against what the server did every time.
        for attempt in range(6):
            value = f"new{attempt}"
            task = asyncio.ensure_future(repo.update(key, {"name": value}))
            # Cancel once the UPDATE is inside its trigger (the cancel must reach the sleep it swallows).
            while not await raw.fetch(  # noqa: ASYNC110 - polling the server
                "db1" if db == "db0" else "db0",
                f"SELECT 1 FROM pg_stat_activity WHERE datname = '{BATCH_DBS[int(db[-1])]}' "
                "AND wait_event = 'PgSleep' AND query LIKE 'UPDATE%'",
            ):
                await asyncio.sleep(0.01)
            t0 = loop.time()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            waited = loop.time() - t0
            stored = await stored_name(raw, key)
            assert (await repo.get(key))["name"] == stored  # never the cached older row
            if stored == value:
                landed += 1
                assert waited >= 0.4, waited  # the cancellation waited for the server's answer
                break
        assert landed, "the UPDATE never outlived its cancel"
        await layer.drop_all()


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_commit_cut_off_is_commit_unknown_and_invalidated(backend: str, urls: list[str], raw: Any, ns: str) -> None:
    """A COMMIT that runs long (a deferred constraint trigger) and passes query_timeout:
    CommitUnknownError naming the node, may_have_landed; the transaction's keys are
    invalidated, and the cache agrees with whatever the server did."""
    async with make(urls, ns, query_timeout=0.5) as layer:
        repo = await fresh_users(layer)
        key = KEY
        db, table = physical(key)
        await raw.execute(
            db,
            "CREATE OR REPLACE FUNCTION dal_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$",
        )
        await raw.execute(
            db,
            f"CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON {table} DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW EXECUTE FUNCTION dal_slow_commit()",
        )
        with pytest.raises(CommitUnknownError) as ei:
            async with repo.transaction(key) as tx:
                await tx.update(key, {"name": "new"})
        err = ei.value
        assert err.node == f"{db}.primary"
        # PostgreSQL's timeout is asyncpg's (the client's): the UPDATE may have committed just
        # before the cancel. MariaDB's max_statement_time and SQLite's busy timeout are the
        # server's: it refused the statement, nothing landed.
        assert err.may_have_landed is (backend == "postgresql")
        assert not isinstance(err, ConnectionUnavailableError)
        await asyncio.sleep(0.3)
        stored = await stored_name(raw, key)
        assert stored == "old"  # the cancel reached the trigger: rolled back
        assert (await repo.get(key))["name"] == stored
        assert await running_statements(backend, raw) == []
        await layer.drop_all()


async def _dal_sessions(backend: str, raw: Any) -> int:
    """Sessions on the test's shard databases other than the raw connection asking."""
    if backend == "postgresql":
        rows = await raw.fetch(
            "db0", f"SELECT count(*) FROM pg_stat_activity WHERE datname IN {BATCH_DBS!r} AND pid <> pg_backend_pid()"
        )
    else:
        rows = await raw.fetch(
            "db0",
            f"SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB IN {BATCH_DBS!r} AND ID <> CONNECTION_ID()",
        )
    return int(rows[0][0])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
async def test_cancellation_soak_leaves_cache_equal_to_primary(backend: str, urls: list[str], raw: Any, ns: str) -> None:
    """Thousands of writes and COMMITs cancelled at random points, with readers filling the
    cache meanwhile: afterwards, for every key, the cache (L1 of this process, L2 for a new
    one) holds what the primary holds; no connection leaked; nothing is left running."""
    import random

    rng = random.Random(20261204)
    keys = list(range(1, 41))
    ops = 2500
    stats: dict[str, int] = {"cancelled": 0, "completed": 0, "failed": 0}
    async with make(urls, ns, max_size=6) as layer:
        await layer.drop_all()
        await layer.create_all()
        repo = layer.repository("users")
        await repo.insert_many([{"id": k, "name": "v0"} for k in keys])
        for k in keys:
            await repo.get(k)

        def write(i: int) -> Any:
            key = rng.choice(keys)
            r = rng.random()
            if r < 0.35:
                return repo.update(key, {"name": f"u{i}"})
            if r < 0.55:

                async def tx() -> None:
                    async with repo.transaction(key) as t:
                        await t.update(key, {"name": f"t{i}"})
                        if await t.get(key) is None:
                            await t.insert({"id": key, "name": f"ti{i}"})

                return tx()
            if r < 0.62:
                return repo.delete(key)
            if r < 0.7:  # a batch: its COMMIT cut off too
                some = rng.sample(keys, 3)
                return repo.upsert_many([{"id": k, "name": f"m{i}"} for k in some], raise_on_error=False)
            if r < 0.85:
                return repo.insert({"id": key, "name": f"i{i}"})
            return repo.upsert({"id": key, "name": f"s{i}"})

        limit = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with limit:
                task = asyncio.ensure_future(write(i))
                if rng.random() < 0.7:  # the rest run to the end, keeping the rows changing
                    await asyncio.sleep(rng.uniform(0, 0.008))
                    if not task.done():
                        task.cancel()
                res = (await asyncio.gather(task, return_exceptions=True))[0]
                if isinstance(res, asyncio.CancelledError):
                    stats["cancelled"] += 1
                elif isinstance(res, BaseException):
                    assert isinstance(res, DalError), repr(res)
                    stats["failed"] += 1
                else:
                    stats["completed"] += 1

        stop = asyncio.Event()

        async def reader() -> None:
            while not stop.is_set():
                with contextlib.suppress(DalError):
                    await repo.get(rng.choice(keys))
                await asyncio.sleep(0)

        readers = [asyncio.ensure_future(reader()) for _ in range(3)]
        await asyncio.gather(*(one(i) for i in range(ops)))
        stop.set()
        await asyncio.gather(*readers)
        print(f"soak on {backend}: {stats}")
        assert stats["cancelled"] > ops // 4, stats
        assert stats["completed"] > ops // 10, stats
        # Background settling and cache retries are done before anything is compared.
        for node in layer.cluster.nodes.values():
            while node.pool._background:
                await asyncio.gather(*node.pool._background, return_exceptions=True)
        assert layer.cache is not None
        while layer.cache._background or layer.cache.retry.pending:  # noqa: ASYNC110 - polling
            await asyncio.sleep(0.05)
        mismatches = []
        for k in keys:
            stored = await stored_name(raw, k)
            cached = await repo.get(k)
            if (cached["name"] if cached else None) != stored:
                mismatches.append((k, stored, cached))
        async with make(urls, ns) as other:
            fresh = other.repository("users")
            for k in keys:
                stored = await stored_name(raw, k)
                got = await fresh.get(k)
                if (got["name"] if got else None) != stored:
                    mismatches.append((k, stored, got, "L2"))
        assert mismatches == [], (mismatches, stats)
        assert await running_statements(backend, raw) == []
        open_sessions = await _dal_sessions(backend, raw)
        assert open_sessions <= 2 * 6, open_sessions  # at most the pools' size
        await layer.drop_all()
    # Every connection dal opened is closed once the layer is.
    for _ in range(50):
        if await _dal_sessions(backend, raw) == 0:
            break
        await asyncio.sleep(0.1)
    assert await _dal_sessions(backend, raw) == 0


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
async def test_pooled_connection_closed_by_the_server_is_not_used(backend: str, urls: list[str], raw: Any, ns: str) -> None:
    """An idle pooled connection the server closed (restart, idle timeout, terminated) is
    dropped at checkout: a write on it would be in doubt (CommitUnknownError), though nothing
    of it could have been sent."""
    async with make(urls, ns) as layer:
        repo = await fresh_users(layer)
        key = KEY
        db, _ = physical(key)
        node = layer.cluster.primary(db)
        assert node.pool.idle >= 1
        if backend == "postgresql":
            await raw.execute(
                db,
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{BATCH_DBS[int(db[-1])]}' "
                "AND pid <> pg_backend_pid()",
            )
        else:
            ids = await raw.fetch(
                db,
                f"SELECT ID FROM information_schema.PROCESSLIST WHERE DB = '{BATCH_DBS[int(db[-1])]}' "
                "AND ID <> CONNECTION_ID()",
            )
            for (thread_id,) in ids:
                await raw.execute(db, f"KILL CONNECTION {int(thread_id)}")
        await asyncio.sleep(0.2)  # the client hears of it
        assert await repo.update(key, {"name": "new"})
        assert (await repo.get(key))["name"] == "new"
        await layer.drop_all()
