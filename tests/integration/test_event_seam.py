"""The execution seam: every statement the server ran is accounted for by a ``QueryFinished``.

``Node.session`` hands out a :class:`dal.cluster.Watched` connection while someone listens
for "query" events, and each call on it reports how many statements the adapter sent
(``QueryFinished.statements``). These tests hold that against what the server itself
counted, on servers of this module's own (free ports, temp dirs, started with the
replica sets of tests/replication.py; only their primaries are used):

- PostgreSQL with ``pg_stat_statements`` (``track = all``, ``track_utility = on``):
  ``sum(calls)`` of the two shard databases. pg_stat_statements records a statement
  when it completes, so a statement the server refused (the duplicate-key insert) is
  in the events (outcome "error") but not in its count.
- MariaDB with ``general_log = ON``, ``log_output = TABLE``: the ``Query``/``Execute``
  rows of ``mysql.general_log`` logged by the layer's connections (the log records a
  command as it arrives, refused ones included).

The layer's pools have ``min_size == max_size``, so every connection is open before the
measured window (what a connection runs while it is set up does not go through the
seam) and none is opened during it: the tests check that the server's sessions are the
same ones before and after.

A native enum column is a case of its own: asyncpg looks the type up (statements of its
own, on the same connection) the first time a connection uses it
(``test_statements_the_driver_adds_for_a_native_enum_are_accounted_for``).

The smaller tests at the end use the shared servers (tests/conftest.py fixtures) or
SQLite files.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiomysql
import asyncpg
import pytest
import sqlalchemy as sa

from dal import DataLayer, DuplicateKeyError
from dal.cluster import Watched
from dal.events import Counters, Event, NodeStateChanged, PoolWait, QueryFinished
from tests.conftest import topology
from tests.replication import MariaDBReplicaSet, MissingBinaryError, PgReplicaSet

pytestmark = pytest.mark.integration

SHARD_DBS = {"db0": "sdb0", "db1": "sdb1"}  # dal's shard database -> database on the server
TABLE_SHARDS = 4
POOL = 4


def items_metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "items", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("qty", sa.Integer),
        sa.Column("price", sa.Numeric(12, 2)),
        sa.Column("active", sa.Boolean, nullable=False, default=True),
    )  # fmt: skip
    return md


def item(i: int, **over: Any) -> dict[str, Any]:
    row = {
        "id": i,
        "name": f"item {i}",
        "qty": i % 7,
        "price": Decimal(f"{i}.25"),
        "active": i % 2 == 0,
    }
    row.update(over)
    return row


def db_of(key: int) -> str:
    """The shard database of ``key``, computed as README says (not by dal)."""
    slot = zlib.crc32(str(key).encode()) % TABLE_SHARDS
    return f"db{slot * len(SHARD_DBS) // TABLE_SHARDS}"


# --------------------------------------------------------------------------- servers of our own


@pytest.fixture(scope="module")
def seam_pg() -> Iterator[PgReplicaSet]:
    """A PostgreSQL of this module's own with pg_stat_statements tracking everything."""
    rs = PgReplicaSet(
        extra_conf={"pg_stat_statements.track": "all", "pg_stat_statements.track_utility": "on"}
    )
    try:
        try:
            rs.start()
        except MissingBinaryError as exc:
            pytest.skip(f"cannot start a PostgreSQL of our own: {exc}")
        preload = rs.primary_sql("SHOW shared_preload_libraries", dbname="postgres")
        if "pg_stat_statements" not in preload:
            pytest.skip("pg_stat_statements is not installed (postgresql-contrib)")
        for db in SHARD_DBS.values():
            rs.primary_sql(f"CREATE DATABASE {db}", dbname="postgres")
        # The view is read from "postgres" (the counts are cluster-wide, kept per dbid):
        # the observing queries then are not counted among the shard databases'.
        rs.primary_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", dbname="postgres")
        yield rs
    finally:
        rs.stop()


@pytest.fixture(scope="module")
def seam_mariadb() -> Iterator[MariaDBReplicaSet]:
    """A MariaDB of this module's own logging every command to mysql.general_log."""
    rs = MariaDBReplicaSet(extra_args=["--general-log=ON", "--log-output=TABLE"])
    try:
        try:
            rs.start()
        except MissingBinaryError as exc:
            pytest.skip(f"cannot start a MariaDB of our own: {exc}")
        for db in SHARD_DBS.values():
            rs.primary_sql(
                f"CREATE DATABASE `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci",
                database=None,
            )
        yield rs
    finally:
        rs.stop()


# --------------------------------------------------------------------------- server-side counts


@dataclass(frozen=True)
class Ran:
    """Statements the server ran: ``calls`` of ``query`` on shard database ``database``."""

    database: str
    query: str
    calls: int


class PgCount:
    """pg_stat_statements of the shard databases, read over a connection to ``postgres``."""

    complete_only = True  # a statement that failed is not counted

    def __init__(self, conn: asyncpg.Connection, application_name: str) -> None:
        self.conn = conn
        self.application_name = application_name

    @classmethod
    async def open(cls, rs: PgReplicaSet, application_name: str) -> PgCount:
        """Counting for the layer whose DSNs carry ``application_name`` (its sessions are
        told apart from those of a layer closed just before, still ending)."""
        conn = await asyncpg.connect(
            host="127.0.0.1", port=rs.primary_port, user=rs.user, database="postgres"
        )
        return cls(conn, application_name)

    async def sessions(self) -> set[tuple[int, str]]:
        rows = await self.conn.fetch(
            "SELECT pid, datname FROM pg_stat_activity"
            " WHERE datname = ANY($1::text[]) AND application_name = $2",
            list(SHARD_DBS.values()),
            self.application_name,
        )
        return {(int(r[0]), str(r[1])) for r in rows}

    async def reset(self) -> None:
        await self.conn.execute("SELECT pg_stat_statements_reset()")

    async def ran(self) -> list[Ran]:
        rows = await self.conn.fetch(
            "SELECT d.datname, s.query, s.calls FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = ANY($1::text[])",
            list(SHARD_DBS.values()),
        )
        # Entries evicted (past pg_stat_statements.max) would take their counts with them.
        assert await self.conn.fetchval("SELECT dealloc FROM pg_stat_statements_info") == 0
        by_name = {v: k for k, v in SHARD_DBS.items()}
        return [Ran(by_name[r[0]], " ".join(str(r[1]).split()), int(r[2])) for r in rows]

    async def aclose(self) -> None:
        await self.conn.close()


class MariaCount:
    """Commands in mysql.general_log from the layer's sessions (found in the process list)."""

    complete_only = False  # logged as they arrive, refused ones too

    def __init__(self, conn: aiomysql.Connection) -> None:
        self.conn = conn
        self.threads: dict[int, str] = {}

    @classmethod
    async def open(cls, rs: MariaDBReplicaSet) -> MariaCount:
        conn = await aiomysql.connect(
            host="127.0.0.1", port=rs.primary_port, user="root", password="", autocommit=True
        )
        return cls(conn)

    async def _rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            return list(await cur.fetchall())

    async def sessions(self) -> set[tuple[int, str]]:
        # (one layer on this server: the sessions on the shard databases are its own)
        rows = await self._rows(
            "SELECT ID, DB FROM information_schema.PROCESSLIST WHERE DB IN %s",
            (tuple(SHARD_DBS.values()),),
        )
        found = {(int(r[0]), str(r[1])) for r in rows}
        by_name = {v: k for k, v in SHARD_DBS.items()}
        self.threads.update({tid: by_name[db] for tid, db in found})
        return found

    async def reset(self) -> None:
        await self._rows("TRUNCATE TABLE mysql.general_log")

    async def ran(self) -> list[Ran]:
        rows = await self._rows(
            "SELECT thread_id, CONVERT(argument USING utf8mb4) FROM mysql.general_log"
            " WHERE command_type IN ('Query', 'Execute') AND thread_id <> CONNECTION_ID()"
        )
        out: Counter[tuple[str, str]] = Counter()
        for tid, text in rows:
            # A thread not of the layer (the replica's IO thread reconnecting) is listed
            # under "?" for the breakdown; it is not one of the shard databases.
            out[(self.threads.get(int(tid), "?"), " ".join(str(text).split())[:160])] += 1
        return [Ran(db, q, n) for (db, q), n in out.items()]

    async def aclose(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- the layer


def pg_dsn(rs: PgReplicaSet, database: str, application_name: str) -> str:
    return (
        f"postgresql+asyncpg://{rs.user}@127.0.0.1:{rs.primary_port}/{database}"
        f"?application_name={application_name}"
    )


@pytest.fixture(params=["postgresql", "mysql"])
def seam_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def seam(
    seam_backend: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[DataLayer, PgCount | MariaCount]]:
    """A started layer (2 shard databases x 4 table shards, pools min = max = 4) over a
    server of our own, its tables created, and the server's count beside it."""
    counter: PgCount | MariaCount
    if seam_backend == "postgresql":
        pg: PgReplicaSet = request.getfixturevalue("seam_pg")
        urls = {name: pg_dsn(pg, db, "dal-seam") for name, db in SHARD_DBS.items()}
        counter = await PgCount.open(pg, "dal-seam")
    else:
        my: MariaDBReplicaSet = request.getfixturevalue("seam_mariadb")
        urls = {
            name: f"mysql+aiomysql://root@127.0.0.1:{my.primary_port}/{db}"
            for name, db in SHARD_DBS.items()
        }
        counter = await MariaCount.open(my)
    cfg = {
        "databases": {name: {"primary": url} for name, url in urls.items()},
        "tables": {"items": {"shard_key": "id", "table_shards": TABLE_SHARDS}},
        "pool": {"min_size": POOL, "max_size": POOL},
    }
    try:
        async with DataLayer(cfg, items_metadata(), env={}) as layer:
            await layer.drop_all()
            await layer.create_all()
            yield layer, counter
            await layer.drop_all()
    finally:
        await counter.aclose()


async def workload(layer: DataLayer) -> None:
    """Every kind of work a repository does, each checked for its result (so it ran)."""
    repo = layer.repository("items")
    for i in range(1, 13):
        await repo.insert(item(i))

    # reads by key
    got = await repo.get(1)
    assert got is not None and got["name"] == "item 1"
    assert await repo.get(999_999) is None
    many = await repo.get_many([*range(1, 13), 999_998])
    assert sorted(many) == list(range(1, 13))

    # queries: one physical table (shard key given), and fan-outs over all four
    assert [r["id"] for r in await repo.find({"id": 3})] == [3]
    top = await repo.find({"active": True}, order_by="-qty", limit=3)
    assert len(top) == 3 and all(r["active"] for r in top)
    assert len(await repo.find()) == 12
    assert await repo.count() == 12
    assert await repo.count({"id": 2}) == 1

    # single-row writes
    await repo.upsert(item(1, name="item 1 again"))  # existing
    await repo.upsert(item(13))  # new
    assert await repo.update(2, {"qty": 40}) is True
    assert await repo.update(999_997, {"qty": 1}) is False
    assert await repo.delete(3) is True
    assert await repo.delete(999_996) is False

    # a transaction on one shard database: update, get, insert
    partner = next(k for k in range(1000, 2000) if db_of(k) == db_of(4))
    async with repo.transaction(4) as tx:
        assert await tx.update(4, {"qty": 44}) is True
        in_tx = await tx.get(4)
        assert in_tx is not None and in_tx["qty"] == 44
        await tx.insert(item(partner))
    assert await repo.get(partner, primary=True) is not None
    # a transaction that does nothing: nothing is sent on PostgreSQL (BEGIN is lazy)
    async with repo.transaction(5):
        pass

    # batches: more than one batch per physical table
    loaded = await repo.insert_many([item(i) for i in range(100, 160)], batch_size=5)
    assert loaded.ok and loaded.batches > TABLE_SHARDS and loaded.committed == 60
    same_db = [k for k in range(2000, 2200) if db_of(k) == "db0"][:12]
    atomic = await repo.insert_many([item(k) for k in same_db], batch_size=4, atomic=True)
    assert atomic.ok and atomic.committed == 12
    mixed = [item(i, name=f"upserted {i}") for i in range(130, 160)] + [
        item(i) for i in range(200, 230)
    ]  # half existing, half new
    upserted = await repo.upsert_many(mixed, batch_size=5)
    assert upserted.ok and upserted.committed == 60
    updated = await repo.update_many(
        [{"id": i, "qty": 1000 + i} for i in range(100, 120)], batch_size=5
    )
    assert updated.ok and updated.affected == 20
    deleted = await repo.delete_many([*range(100, 110), 999_995], batch_size=5)
    assert deleted.ok and deleted.affected == 10

    # the write-behind writer: many concurrent callers, then upserts and deletes
    async with repo.writer(max_rows=8) as w:
        await asyncio.gather(*(w.insert(item(i)) for i in range(300, 340)))
        await asyncio.gather(
            w.upsert(item(300, name="written again")),
            w.upsert(item(400)),
            w.delete(301),
            w.delete(302),
        )
    assert (await repo.get(300, primary=True) or {}).get("name") == "written again"
    assert await repo.get(301, primary=True) is None

    # a statement the server refuses
    with pytest.raises(DuplicateKeyError):
        await repo.insert(item(1))

    # 12 + 1 + 1 - 1 + 60 + 12 + 30 - 10 + 40 + 1 - 2
    assert await repo.count() == 144


def breakdown(events: list[QueryFinished], ran: list[Ran]) -> str:
    """What the server ran against what the events said, for finding a difference."""
    lines = ["server (database, calls, query):"]
    for r in sorted(ran, key=lambda r: (r.database, r.query)):
        lines.append(f"  {r.database} {r.calls:5d}  {r.query[:160]}")
    lines.append("events (database, purpose, operation, outcome): calls, statements")
    groups: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for e in events:
        g = groups[(e.database, e.purpose, e.operation, e.outcome)]
        g[0] += 1
        g[1] += e.statements
    for k, (calls, statements) in sorted(groups.items()):
        lines.append(f"  {' '.join(k)}: {calls} calls, {statements} statements")
    return "\n".join(lines)


async def test_every_statement_the_server_ran_has_its_event(
    seam: tuple[DataLayer, PgCount | MariaCount], seam_backend: str
) -> None:
    layer, server = seam
    events: list[Event] = []
    counters = Counters()
    layer.listen(events.append, "query")
    layer.listen(counters, "query")

    sessions = await server.sessions()
    assert Counter(db for _, db in sessions) == {db: POOL for db in SHARD_DBS.values()}
    await server.reset()

    await workload(layer)

    ran = await server.ran()
    assert await server.sessions() == sessions, "a connection was opened or lost during the window"

    queries = [e for e in events if isinstance(e, QueryFinished)]
    assert len(queries) == len(events)
    report = breakdown(queries, ran)
    print(report)

    # The refused insert: its own event, outcome "error", one statement sent.
    failed = [e for e in queries if e.outcome != "ok"]
    assert [(e.purpose, e.operation, e.statements, e.outcome) for e in failed] == [
        ("write", "execute", 1, "error")
    ], report
    assert {e.database for e in queries} == set(SHARD_DBS)
    assert {e.node for e in queries} == {f"{db}.primary" for db in SHARD_DBS}

    # pg_stat_statements counts completed statements only; the general log counts all.
    counted = [e for e in queries if e.outcome == "ok"] if server.complete_only else queries
    server_total = sum(r.calls for r in ran if r.database in SHARD_DBS)
    event_total = sum(e.statements for e in counted)
    print(
        f"{seam_backend}: {len(queries)} events, {sum(e.statements for e in queries)} statements"
        f" ({event_total} counted by the server's measure); server {server_total}"
    )
    assert event_total == server_total, report
    for db in SHARD_DBS:
        on_server = sum(r.calls for r in ran if r.database == db)
        assert sum(e.statements for e in counted if e.database == db) == on_server, (db, report)

    # The Counters listener agrees with the events it saw.
    assert counters["statements"] == sum(e.statements for e in queries)
    assert counters["queries"] == len(queries)
    assert counters["query_errors"] == len(failed)

    # How BEGIN is accounted for: the transaction of update + get + insert, then the
    # empty one. On PostgreSQL BEGIN goes with the first statement (and is never sent
    # for the empty transaction); on MySQL it is sent by begin().
    tx = [(e.operation, e.statements) for e in queries if e.purpose == "transaction"]
    if seam_backend == "postgresql":
        assert tx == [
            ("begin", 0), ("execute", 2), ("fetch", 1), ("execute", 1), ("commit", 1),
            ("begin", 0), ("commit", 0),
        ]  # fmt: skip
    else:
        assert tx == [
            ("begin", 1), ("execute", 1), ("fetch", 1), ("execute", 1), ("commit", 1),
            ("begin", 1), ("commit", 1),
        ]  # fmt: skip

    # The paths the batches were meant to take were taken.
    texts = [r.query.upper() for r in ran]
    if seam_backend == "postgresql":
        assert any(t.startswith("MERGE INTO") for t in texts), report  # upsert_many on 15+
        # a batch's first COPY carries its BEGIN (2), a later one in the transaction not (1)
        assert {e.statements for e in queries if e.operation == "copy"} == {1, 2}, report
        assert {e.statements for e in queries if e.operation == "begin"} == {0}
    else:
        # update_many: one UPDATE per row in one call
        assert max(e.statements for e in queries if e.operation == "execute_many") > 1, report
        assert {e.statements for e in queries if e.operation == "begin"} == {1}


class Color(enum.Enum):
    red = "red"
    blue = "blue"


async def test_statements_the_driver_adds_for_a_native_enum_are_accounted_for(
    seam_pg: PgReplicaSet,
) -> None:
    """asyncpg looks up a type it has no codec for (a native enum: a type of the
    database's own) the first time a connection prepares a statement using it, on that
    connection, within the call: statements the server runs for the call."""
    md = sa.MetaData()
    sa.Table(
        "paints", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("color", sa.Enum(Color, name="seam_color"), nullable=False),
    )  # fmt: skip
    cfg = {
        "databases": {
            name: {"primary": pg_dsn(seam_pg, db, "dal-seam-enum")}
            for name, db in SHARD_DBS.items()
        },
        "tables": {"paints": {"shard_key": "id", "table_shards": 2}},
        "pool": {"min_size": 1, "max_size": 1},
    }
    server = await PgCount.open(seam_pg, "dal-seam-enum")
    events: list[Event] = []
    try:
        async with DataLayer(cfg, md, env={}) as layer:
            await layer.drop_all()
            await layer.create_all()
            stop = layer.listen(events.append, "query")
            repo = layer.repository("paints")
            sessions = await server.sessions()
            assert len(sessions) == 2
            await server.reset()

            for i in range(1, 5):
                await repo.insert({"id": i, "color": Color.red})
            assert await repo.get(1) == {"id": 1, "color": Color.red}
            assert await repo.update(2, {"color": Color.blue}) is True

            ran = await server.ran()
            stop()
            assert await server.sessions() == sessions
            await layer.drop_all()
    finally:
        await server.aclose()
    queries = [e for e in events if isinstance(e, QueryFinished)]
    report = breakdown(queries, ran)
    print(report)
    assert all(e.outcome == "ok" for e in queries)
    assert sum(e.statements for e in queries) == sum(r.calls for r in ran), report


# --------------------------------------------------------------------------- small contracts


def sqlite_layer(tmp_path: Path, **pool: Any) -> DataLayer:
    urls = [f"sqlite+aiosqlite:///{tmp_path}/seam{i}.sqlite3" for i in range(2)]
    cfg = topology(urls, {"items": {"shard_key": "id", "table_shards": TABLE_SHARDS}})
    cfg["pool"].update(pool)
    return DataLayer(cfg, items_metadata(), env={})


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mysql"], indirect=True)
async def test_session_hands_out_the_raw_connection_without_a_query_listener(
    shard_urls: list[str],
) -> None:
    cfg = topology(shard_urls, {})
    async with DataLayer(cfg, sa.MetaData(), env={}) as layer:
        node = layer.cluster.primary("db0")
        async with node.session("read") as conn:
            assert not isinstance(conn, Watched)
            assert await conn.fetch_one("SELECT 1", ()) is not None
        other = layer.listen(lambda e: None, "pool", "node")  # other kinds: still raw
        async with node.session("read") as conn:
            assert not isinstance(conn, Watched)
        seen: list[Event] = []
        stop = layer.listen(seen.append, "query")
        async with node.session("read") as conn:
            assert isinstance(conn, Watched)
            assert await conn.fetch_one("SELECT 1", ()) is not None
        assert len(seen) == 1
        assert [(e.statements, e.outcome) for e in seen if isinstance(e, QueryFinished)] == [
            (1, "ok")
        ]
        stop()
        stop()  # idempotent
        other()
        async with node.session("read") as conn:
            assert not isinstance(conn, Watched)
            await conn.fetch_one("SELECT 1", ())
        assert len(seen) == 1


async def test_a_failing_listener_does_not_change_the_result(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def broken(e: Event) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("listener bug")

    seen: list[Event] = []
    async with sqlite_layer(tmp_path) as layer:
        await layer.create_all()
        layer.listen(broken, "query")
        layer.listen(seen.append, "query")  # registered after it: still called
        repo = layer.repository("items")
        with caplog.at_level(logging.ERROR, logger="dal.events"):
            await repo.insert(item(1))
            assert await repo.get(1) == item(1)
            assert await repo.get(2) is None
            assert await repo.update(1, {"qty": 9}) is True
            with pytest.raises(DuplicateKeyError):  # the caller's error is the caller's
                await repo.insert(item(1))
            assert (await repo.insert_many([item(i) for i in range(10, 20)])).committed == 10
    assert calls == len(seen) > 0
    assert [e.outcome for e in seen if isinstance(e, QueryFinished)].count("error") == 1
    logged = [r for r in caplog.records if r.name == "dal.events"]
    assert len(logged) == 1  # once per listener, not once per event
    assert "listener bug" in (logged[0].exc_text or "")


def test_listen_refuses_an_unknown_kind(tmp_path: Path) -> None:
    layer = sqlite_layer(tmp_path)
    with pytest.raises(ValueError, match="nope"):
        layer.listen(lambda e: None, "nope")
    with pytest.raises(ValueError, match="nope"):
        layer.listen(lambda e: None, "query", "nope")
    with pytest.raises(TypeError):
        layer.listen("not callable", "query")  # type: ignore[arg-type]
    assert layer.events.query == ()  # nothing registered half-way


def test_mark_down_and_up_emit_one_event_each(tmp_path: Path) -> None:
    layer = sqlite_layer(tmp_path)
    seen: list[Event] = []
    queries_only: list[Event] = []
    layer.listen(seen.append, "node")
    layer.listen(queries_only.append, "query")
    counters = Counters()
    layer.listen(counters)
    name = layer.cluster.primary("db1").name
    layer.cluster.mark_down(name, "health check failed")
    layer.cluster.mark_down(name, "still failing")  # already down: no event
    layer.cluster.mark_up(name)
    layer.cluster.mark_up(name)  # already up: no event
    assert seen == [
        NodeStateChanged(name, "db1", False, "health check failed"),
        NodeStateChanged(name, "db1", True, None),
    ]
    assert queries_only == []
    assert counters["nodes_down"] == 1


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_checkout_that_waits_emits_pool_wait(shard_urls: list[str]) -> None:
    cfg = topology(shard_urls, {})
    cfg["pool"] = {"min_size": 1, "max_size": 1}
    async with DataLayer(cfg, sa.MetaData(), env={}) as layer:
        node = layer.cluster.primary("db0")
        waits: list[Event] = []
        queries: list[Event] = []
        layer.listen(waits.append, "pool")
        layer.listen(queries.append, "query")
        async with node.session("read") as conn:  # the idle connection: no wait
            await conn.fetch_one("SELECT 1", ())
        assert waits == []
        slow = asyncio.create_task(node.fetch_one("SELECT pg_sleep(0.2)", ()))
        await asyncio.sleep(0)  # its first step checks the only connection out
        assert node.in_flight == 1 and node.pool.idle == 0
        second = await node.fetch_one("SELECT 2", ())  # has to wait for it
        assert second is not None and second[0] == 2
        await slow
        assert len(waits) == 1
        (wait,) = waits
        assert isinstance(wait, PoolWait)
        assert (wait.node, wait.database, wait.outcome) == (node.name, "db0", "ok")
        assert wait.seconds >= 0
        assert [e.outcome for e in queries if isinstance(e, QueryFinished)] == ["ok"] * 3
        assert len(queries) == 3


async def test_bloom_key_scans_and_ddl_go_through_the_seam(tmp_path: Path) -> None:
    """The Bloom filter's warm-up scan and create_all/drop_all are statements like any
    other: reported, with their purpose."""
    urls = [f"sqlite+aiosqlite:///{tmp_path}/scan{i}.sqlite3" for i in range(2)]
    cfg = topology(urls, {"items": {"shard_key": "id", "table_shards": TABLE_SHARDS}})
    async with DataLayer(cfg, items_metadata(), env={}) as plain:
        await plain.create_all()
        assert (await plain.repository("items").insert_many([item(i) for i in range(1, 31)])).committed == 30
    cached = topology(urls, {"items": {"shard_key": "id", "table_shards": TABLE_SHARDS, "cache": {"bloom": True}}})
    layer = DataLayer(cached, items_metadata(), env={})
    seen: list[QueryFinished] = []
    layer.listen(seen.append, "query")  # type: ignore[arg-type]
    async with layer:
        cache = layer.cache_of("items")
        assert cache is not None and cache.bloom_ready
        scans = [e for e in seen if e.purpose == "scan"]
        assert len(scans) >= TABLE_SHARDS and all(e.operation == "fetch" and e.outcome == "ok" for e in scans)
        seen.clear()
        await layer.drop_all()
        assert {e.purpose for e in seen} == {"ddl"} and len(seen) >= TABLE_SHARDS
