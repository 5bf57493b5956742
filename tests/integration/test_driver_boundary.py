"""The driver boundary on real servers: values never change a statement, secrets go
where they belong, driver errors map into the tree, and nothing is left behind at exit.

MySQL/MariaDB escaping is checked on a MariaDB of this test's own (free port,
temp datadir) started with ``NO_BACKSLASH_ESCAPES`` and a 1 MiB
``max_allowed_packet``; the other tests use the per-process shard databases
(``urls``/``raw``, tests/batch_support.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from dal import DataLayer
from dal.config import DSN, Config
from dal.errors import ConfigError, DataError, IntegrityError, QueryError, QueryTimeoutError
from tests.batch_support import Raw
from tests.conftest import _mysql_admin
from tests.replication import MariaDBReplicaSet

PW = "Pw_s3cr3t_9f2"
ROOT = Path(__file__).resolve().parents[2]


def notes_metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "notes", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("data", sa.LargeBinary),
    )  # fmt: skip
    return md


def notes_layer(dsn: str, **pool: Any) -> DataLayer:
    cfg = {
        "databases": {"db0": {"primary": dsn}},
        "tables": {"notes": {"shard_key": "id", "table_shards": 1}},
        "pool": {"min_size": 0, "max_size": 4, **pool},
    }
    return DataLayer(cfg, notes_metadata(), env={})


# -- MySQL/MariaDB: no value can change a statement ---------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("charset=gbk", "databases.db0.primary?charset"),
        ("charset=latin1", "databases.db0.primary?charset"),
        ("init_command=SET+sql_mode%3D%27NO_BACKSLASH_ESCAPES%27", "databases.db0.primary?init_command"),
        ("sql_mode=NO_BACKSLASH_ESCAPES", "databases.db0.primary?sql_mode"),
    ],
)
def test_mysql_dsn_refuses_what_would_change_escaping(query: str, field: str) -> None:
    with pytest.raises(ConfigError) as ei:
        Config.from_dict({"databases": {"db0": {"primary": f"mysql+aiomysql://root@127.0.0.1/x?{query}"}}}, env={})
    assert ei.value.field == field
    Config.from_dict({"databases": {"db0": {"primary": "mysql+aiomysql://root@127.0.0.1/x?charset=utf8mb4"}}}, env={})


@pytest.fixture(scope="module")
def odd_mariadb() -> Iterator[MariaDBReplicaSet]:
    """A MariaDB of our own whose global sql_mode is NO_BACKSLASH_ESCAPES, max_allowed_packet 1 MiB."""
    rs = MariaDBReplicaSet(extra_args=["--sql-mode=NO_BACKSLASH_ESCAPES", "--max-allowed-packet=1M"])
    try:
        rs.start()
        yield rs
    finally:
        rs.stop()


@pytest.fixture
async def odd_notes(odd_mariadb: MariaDBReplicaSet) -> AsyncIterator[DataLayer]:
    async with notes_layer(odd_mariadb.primary_dsn) as lay:
        await lay.drop_all()
        await lay.create_all()
        yield lay
        await lay.drop_all()


async def stored(notes: Any, column: str) -> Any:
    row = await notes.get(1, primary=True)
    assert row is not None
    return row[column]


def _raw_rows(rs: MariaDBReplicaSet) -> list[tuple[Any, ...]]:
    """The notes rows, read over a plain PyMySQL connection (binary column as hex)."""
    conn = pymysql.connect(host="127.0.0.1", port=rs.primary_port, user="root", database="test", charset="utf8mb4")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, name, HEX(data) FROM notes_0 ORDER BY id")
            return list(cur.fetchall())
    finally:
        conn.close()


async def test_crafted_values_are_stored_verbatim_under_no_backslash_escapes(
    odd_mariadb: MariaDBReplicaSet, odd_notes: DataLayer
) -> None:
    assert "NO_BACKSLASH_ESCAPES" in odd_mariadb.primary_sql("SELECT @@GLOBAL.sql_mode")
    notes = odd_notes.repository("notes")
    for i in (1, 2, 3):
        await notes.insert({"id": i, "name": f"n{i}", "data": b"x"})
    before = _raw_rows(odd_mariadb)
    crafted_bytes = [b"' WHERE 0 OR 1 -- ", b"\\' WHERE 0 OR 1 # ", b"\\", b"'", b"\x00\\'\"\x1a"]
    crafted_str = ["' WHERE 0 OR 1 -- ", "\\' , name = 'pwned' WHERE 0 OR 1 # ", "\\", "'\\''", "é\\'"]
    for payload in crafted_bytes:
        assert await notes.update(1, {"data": payload}) is True
        assert await stored(notes, "data") == payload
        assert _raw_rows(odd_mariadb)[1:] == before[1:]  # rows 2 and 3 untouched
    for text in crafted_str:
        assert await notes.update(1, {"name": text}) is True
        assert await stored(notes, "name") == text
        assert _raw_rows(odd_mariadb)[1:] == before[1:]
    assert await notes.count() == 3
    # The session dal reads through is the one dal verified.
    row = await odd_notes.cluster.primary("db0").fetch_one(
        "SELECT @@SESSION.sql_mode, @@character_set_client, @@character_set_connection", ()
    )
    assert row is not None
    assert "NO_BACKSLASH_ESCAPES" not in row[0] and "STRICT_ALL_TABLES" in row[0]
    assert (row[1], row[2]) == ("utf8mb4", "utf8mb4")


async def test_oversized_statement_is_a_data_error_and_the_connection_is_kept(
    odd_mariadb: MariaDBReplicaSet, odd_notes: DataLayer
) -> None:
    notes = odd_notes.repository("notes")
    await notes.insert({"id": 1, "name": "n1", "data": b"x"})
    pool = odd_notes.cluster.primary("db0").pool
    size_before = pool.size
    for size in (2 << 20, 17 << 20):  # one packet / several packets (over 16 MiB)
        with pytest.raises(DataError, match="max_allowed_packet") as ei:
            await notes.update(1, {"data": b"y" * size})
        # Measured against the server's max_allowed_packet (read at connect) and refused
        # before it is sent: the server would close the connection, and its answer can be
        # lost in a reset while the statement is still being written.
        assert "was not sent" in str(ei.value) and ei.value.__cause__ is None
        assert pool.size == size_before  # nothing was sent: the connection is kept
        assert _raw_rows(odd_mariadb) == [(1, "n1", "78")]
        assert await stored(notes, "data") == b"x"
    assert await notes.update(1, {"data": b"z"}) is True  # and the connection works


async def test_an_oversized_read_is_refused_before_it_is_sent(
    odd_mariadb: MariaDBReplicaSet, odd_notes: DataLayer
) -> None:
    """A read (one find, a get_many's IN list) is measured like a write: a DataError, and
    the connection stays in the pool."""
    notes = odd_notes.repository("notes")
    await notes.insert({"id": 1, "name": "n1", "data": b"x"})
    pool = odd_notes.cluster.primary("db0").pool
    size_before = pool.size
    with pytest.raises(DataError, match="was not sent"):
        await notes.find({"data": b"y" * (2 << 20)}, primary=True)
    assert pool.size == size_before
    assert [r["id"] for r in await notes.find({"data": b"x"}, primary=True)] == [1]


def test_the_server_refusing_a_packet_maps_to_a_data_error() -> None:
    """Behind the size check (a server whose limit shrank after connect): ER_NET_PACKET_TOO_LARGE
    and aiomysql's early-answer error are DataErrors naming max_allowed_packet."""
    from dal.backends.mysql import map_error

    too_large = pymysql.err.OperationalError(1153, "Got a packet bigger than 'max_allowed_packet' bytes")
    early = pymysql.err.InternalError("Packet sequence number wrong - got 1 expected 5")
    for exc in (too_large, early):
        err = map_error(exc, "db0.primary")
        assert isinstance(err, DataError) and "max_allowed_packet" in str(err)


async def test_mysql_check_constraint_and_unencodable_str(odd_mariadb: MariaDBReplicaSet, odd_notes: DataLayer) -> None:
    node = odd_notes.cluster.primary("db0")
    await node.execute("CREATE OR REPLACE TABLE ck (a INT CHECK (a > 0))", ())
    try:
        with pytest.raises(IntegrityError) as ei:
            await node.execute("INSERT INTO ck (a) VALUES (%s)", (-1,))
        assert isinstance(ei.value.__cause__, pymysql.err.MySQLError) and ei.value.__cause__.args[0] == 4025
        size = node.pool.size
        with pytest.raises(DataError, match="cannot be encoded") as enc:
            # (dal's validation refuses lone surrogates; this is the boundary behind it)
            await node.execute("INSERT INTO notes_0 (id, name) VALUES (%s, %s)", (5, "a\ud800b"))
        assert isinstance(enc.value.__cause__, UnicodeEncodeError)
        assert node.pool.size == size and node.pool.idle == size  # nothing was sent: the connection is kept
    finally:
        await node.execute("DROP TABLE IF EXISTS ck", ())


# -- secrets --------------------------------------------------------------------------------

_SECRET_DSNS = [
    f"postgresql+asyncpg://app:{PW}@db.example/app",
    f"postgresql+asyncpg://app@db.example/app?password={PW}",
    f"postgresql+asyncpg://app@db.example/app?sslmode=require&sslkey=/k.pem&sslpassword={PW}",
    f"postgresql+asyncpg://app@db.example/app?passfile=/{PW}/pgpass",
    f"mysql+aiomysql://app@db.example/app?password={PW}",
    f"mysql+aiomysql://app:{PW}@db.example/app?charset=utf8mb4",
]


@pytest.mark.parametrize("dsn", _SECRET_DSNS)
def test_secrets_never_shown(dsn: str) -> None:
    cfg = Config.from_dict(
        {"databases": {"db0": {"primary": dsn, "replicas": [dsn.replace("db.example", "r.example")]}},
         "tables": {"t": {"shard_key": "id", "table_shards": 2}}},
        env={},
    )  # fmt: skip
    md = sa.MetaData()
    sa.Table("t", md, sa.Column("id", sa.BigInteger, primary_key=True))
    layer = DataLayer(cfg, md, env={})
    db = cfg.databases[0]
    shown: list[object] = [cfg, db, *db.nodes, *(n.dsn for n in db.nodes), *layer.cluster.nodes.values()]
    for obj in shown:
        assert PW not in str(obj) and PW not in repr(obj), type(obj)
    assert "***" in DSN(dsn).masked


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("api_token=x", "?api_token"),
        ("client_secret=x", "?client_secret"),
        ("connect_timeout=3", "?connect_timeout"),
        ("client_encoding=latin1", "?client_encoding"),
        ("sslmode=sometimes", "?sslmode"),
        ("bad-name=1", "?bad-name"),
        ("search_path=a&search_path=b", "?search_path"),
        (f"password={PW}", "?password"),  # with the userinfo one: given twice
    ],
)
def test_postgres_query_arguments_refused(query: str, field: str) -> None:
    with pytest.raises(ConfigError) as ei:
        DSN(f"postgresql+asyncpg://u:pw@h/db?{query}", field_name="f")
    assert ei.value.field == "f" + field
    assert PW not in str(ei.value)


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_postgres_query_password_is_a_password_not_a_setting(
    urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    real = asyncpg.connect

    async def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(dict(kwargs, _args=args))
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncpg, "connect", spy)  # dal.backends.postgres calls asyncpg.connect
    url = make_url(urls[0])
    dsn = url.set(password=None).render_as_string(hide_password=False)
    dsn += f"?password={PW}&application_name=dal_pw_probe&sslmode=disable"
    async with notes_layer(dsn) as lay:
        row = await lay.cluster.primary("db0").fetch_one(
            "SELECT current_setting('password', true), current_setting('application_name'), "
            "(SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid() AND application_name = 'dal_pw_probe')",
            (),
        )
    assert row is not None and tuple(row) == (None, "dal_pw_probe", 1)
    assert seen and all(k["password"] == PW for k in seen)
    for k in seen:
        assert "password" not in (k["server_settings"] or {})
        assert PW not in repr(k["_args"]) and PW not in repr(k.get("server_settings"))


@pytest.mark.parametrize("backend", ["mysql"])
async def test_mysql_query_password_is_the_password(urls: list[str]) -> None:
    db = make_url(urls[0]).database
    _mysql_admin(
        f"CREATE USER IF NOT EXISTS 'dal_pw_test'@'127.0.0.1' IDENTIFIED BY '{PW}'; "
        f"GRANT ALL ON `{db}`.* TO 'dal_pw_test'@'127.0.0.1'"
    )
    try:
        dsn = make_url(urls[0]).set(username="dal_pw_test", password=None, host="127.0.0.1")
        text = dsn.render_as_string(hide_password=False) + f"?password={PW}"
        async with notes_layer(text) as lay:
            row = await lay.cluster.primary("db0").fetch_one("SELECT CURRENT_USER()", ())
            assert row is not None and row[0] == "dal_pw_test@127.0.0.1"
            assert PW not in repr(lay.cluster.primary("db0"))
    finally:
        _mysql_admin("DROP USER IF EXISTS 'dal_pw_test'@'127.0.0.1'")


# -- error mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_postgres_client_timeout_is_a_query_timeout(urls: list[str]) -> None:
    async with notes_layer(urls[0], query_timeout=0.3) as lay:
        node = lay.cluster.primary("db0")
        with pytest.raises(QueryTimeoutError) as ei:
            await node.fetch_one("SELECT pg_sleep(3)", ())
        assert isinstance(ei.value, TimeoutError)
        assert (await node.fetch_one("SELECT 1", ())) is not None


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_value_errors_keep_the_connection(urls: list[str]) -> None:
    async with notes_layer(urls[0]) as lay:
        await lay.create_all()
        notes = lay.repository("notes")
        await notes.insert({"id": 1, "name": "a", "data": None})
        node = lay.cluster.primary("db0")
        size = node.pool.size
        with pytest.raises(DataError, match="cannot be encoded") as ei:
            await node.execute("INSERT INTO notes_0 (id, name) VALUES (?, ?)", (2, "x\ud800"))
        assert isinstance(ei.value.__cause__, UnicodeEncodeError)
        with pytest.raises(QueryError) as nul:
            await node.fetch_one("SELECT 1\x00", ())
        assert nul.value.__cause__ is not None
        assert node.pool.size == size and node.pool.idle == size
        assert await notes.count() == 1


# -- nothing left behind at exit ------------------------------------------------------------------

_FANOUT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from dal import DataLayer
    from dal.errors import SchemaMismatchError
    from tests.conftest import topology, users_orders_metadata

    FILL = {
        "postgresql": "INSERT INTO {t} (id, name, age, active) SELECT g, 'n' || g, g % 100, true "
                      "FROM generate_series(1, 200000) g",
        "sqlite": "INSERT INTO {t} (id, name, age, active) WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL "
                  "SELECT x + 1 FROM g WHERE x < 200000) SELECT x, 'n' || x, x % 100, 1 FROM g",
        "mysql": "INSERT INTO {t} (id, name, age, active) SELECT seq, CONCAT('n', seq), seq % 100, 1 "
                 "FROM seq_1_to_200000",
    }

    async def main(backend, urls):
        tables = {"users": {"shard_key": "id", "table_shards": 4}}  # slots 0-1 on db0, 2-3 on db1
        lay = DataLayer(topology(urls, tables), users_orders_metadata(), env={})
        await lay.start()
        await lay.drop_all()
        await lay.create_all()
        for slot in (0, 1):
            await lay.cluster.primary("db0").execute(FILL[backend].format(t=f"users_{slot}"), ())
        await lay.cluster.primary("db1").execute("DROP TABLE users_3", ())
        try:
            await lay.repository("users").find({"name": "none"}, order_by="-name")
        except SchemaMismatchError:
            print("failed as expected")
        await lay.aclose()

    asyncio.run(main(sys.argv[1], sys.argv[2:]))
    """
)


async def test_failed_fanout_leaves_nothing_at_exit(backend: str, urls: list[str], raw: Raw) -> None:
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _FANOUT_SCRIPT, backend, *urls],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.stdout.strip() == "failed as expected", proc.stderr
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for db in ("db0", "db1"):
        for t in await raw.tables(db):
            await raw.execute(db, f"DROP TABLE IF EXISTS {t}")
