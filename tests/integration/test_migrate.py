"""``dal migrate`` on PostgreSQL, MariaDB and SQLite: up/down/status/--sql/new, column
operations, a migration failing on one node, an unreachable shard database, and
concurrent runs serialized by the migration lock.

Topology: db0/db1 x users, orders (4 table shards each, contiguous ranges:
slots 0-1 on db0, 2-3 on db1). Every check of the result goes around dal: a
raw driver connection and the catalog (tests/migrate_support.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dal.config import load_config
from dal.migrate import load_migrations, new_migration
from dal.migrate.ops import MigrationError, expand
from dal.migrate.scripts import resolve_target
from tests.migrate_support import (
    BOOKKEEPING,
    EXPECTED_BASE,
    USERS_COLUMNS,
    MigEnv,
    ServerDatabases,
    foreign_sessions,
    holding,
    section,
    sigkill,
    slots_on,
    wait_until,
)

pytestmark = pytest.mark.integration

ALL = ["sqlite", "postgresql", "mysql"]
SERVERS = ["postgresql", "mysql"]


@pytest.fixture(scope="module")
def server_dbs() -> Iterator[ServerDatabases]:
    dbs = ServerDatabases("a")
    yield dbs
    dbs.drop_all()


@pytest.fixture(params=ALL)
def env(request: pytest.FixtureRequest, tmp_path: Path, server_dbs: ServerDatabases) -> Iterator[MigEnv]:
    backend = str(request.param)
    if backend == "sqlite":
        urls = [f"sqlite+aiosqlite:///{tmp_path}/shard{i}.sqlite3" for i in range(2)]
    else:
        urls = server_dbs.fresh(backend)
    e = MigEnv(backend, tmp_path, urls)
    yield e
    e.close()


def status_of(output: str, db: str) -> str:
    """One shard database's block of ``dal migrate status``."""
    m = re.search(rf"^{db} \(.*?(?=^db\d+ \(|\Z)", output, re.S | re.M)
    assert m, f"no status for {db} in:\n{output}"
    return m.group(0)


# --------------------------------------------------------------------------- up / down / status / --sql


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_up_creates_exactly_the_expected_physical_tables(env: MigEnv) -> None:
    proc = env.ok("up")
    assert "applied 0001_create_users_and_orders..0002_index_users_email on 2/2 shard databases ok" in proc.stdout
    env.assert_base_schema()
    for db in ("db0", "db1"):
        assert env.raw(db).tables() == EXPECTED_BASE[db] | BOOKKEEPING

    for st in env.status():
        assert (st.error, st.current, st.applied, st.pending, st.differences) == (None, "0002", ["0001", "0002"], [], [])

    again = env.run("up")
    assert [(r.database, r.applied, r.statements, r.error) for r in again] == [("db0", [], 0, None), ("db1", [], 0, None)]
    env.assert_base_schema()


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_down_reverts_latest_then_to_version_then_everything(env: MigEnv) -> None:
    env.ok("up")
    proc = env.ok("down")
    assert "reverted 0002_index_users_email on 2/2" in proc.stdout
    env.assert_base_schema(index=False, versions=["0001"])

    assert all(r.error is None for r in env.run("up"))
    env.assert_base_schema()
    migrator = env.migrator()
    assert [r.applied for r in asyncio.run(migrator.run("down", resolve_target(migrator.migrations, "1")))] == [
        ["0002_index_users_email"], ["0002_index_users_email"]]
    env.assert_base_schema(index=False, versions=["0001"])

    proc = env.ok("down", "--to", "0")
    assert "reverted 0001_create_users_and_orders on 2/2" in proc.stdout
    for db in ("db0", "db1"):
        assert env.raw(db).tables() == BOOKKEEPING, db
        assert env.raw(db).versions() == []
        assert env.raw(db).step_rows() == 0
    for st in env.status():
        assert st.current is None and st.error is None
        assert st.pending == ["0001_create_users_and_orders", "0002_index_users_email"]


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_sql_prints_ddl_per_node_and_runs_nothing(env: MigEnv) -> None:
    out = env.ok("up", "--sql").stdout
    for db, mine, theirs in (("db0", (0, 1), (2, 3)), ("db1", (2, 3), (0, 1))):
        block = section(out, db)
        assert f"{db}.primary" in block
        for s in mine:
            assert re.search(rf"CREATE TABLE [`\"]?users_{s}\b", block), block
            assert re.search(rf"CREATE TABLE [`\"]?orders_{s}\b", block), block
            assert re.search(rf"CREATE INDEX [`\"]?ix_users_email_{s}\b", block), block
        for s in theirs:
            assert f"users_{s}" not in block and f"orders_{s}" not in block
        assert ("BEGIN;" in block) == (env.backend != "mysql")
    # Nothing ran: not a table, not even the bookkeeping ones (nor, on SQLite, the file).
    for db in ("db0", "db1"):
        if env.backend == "sqlite":
            assert not Path(env.urls[db].split("///", 1)[1]).exists()
        else:
            assert env.raw(db).tables() == set(), db

    assert "CREATE INDEX" not in "\n".join(asyncio.run(env.migrator().sql("up", 1)))

    assert all(r.error is None for r in env.run("up"))
    down = "\n".join(asyncio.run(env.migrator().sql("down", None)))
    assert re.search(r"DROP INDEX [`\"]?ix_users_email_0\b", section(down, "db0"))
    assert re.search(r"DROP INDEX [`\"]?ix_users_email_2\b", section(down, "db1"))
    assert "DROP TABLE" not in down
    everything = "\n".join(asyncio.run(env.migrator().sql("down", 0)))
    assert re.search(r"DROP TABLE [`\"]?users_3\b", section(everything, "db1"))
    env.assert_base_schema()  # still all there


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_status_shows_version_pending_and_diverging_tables(env: MigEnv) -> None:
    assert all(r.error is None for r in env.run("up", to=1))
    for st in env.status():
        assert (st.error, st.current, st.applied, st.pending, st.differences) == (
            None, "0001", ["0001"], ["0002_index_users_email"], [])

    env.raw("db0").execute("DROP TABLE users_1")
    env.raw("db1").execute("ALTER TABLE users_3 DROP COLUMN email")
    st = env.ok("status").stdout
    assert "current: 0001 (1 applied)" in status_of(st, "db0") and "pending: 0002_index_users_email" in status_of(st, "db1")
    assert "differs: users_1: missing" in status_of(st, "db0")
    assert "differs: users_3: lacks columns ['email']" in status_of(st, "db1")
    assert "users_0" not in status_of(st, "db0") and "users_2" not in status_of(st, "db1")


# --------------------------------------------------------------------------- column operations

COLUMNS_MIGRATION = '''"""Add, backfill and tighten a column; drop one; create and rename a table."""

import sqlalchemy as sa


def upgrade(op):
    op.add_column("users", sa.Column("age", sa.Integer))
    op.execute("UPDATE {table} SET age = 7 WHERE age IS NULL", table="users")
    if op.backend("db0") != "sqlite":
        op.alter_column("users", "age", nullable=False, existing_type=sa.Integer)
    op.drop_column("orders", "item")
    op.create_table(
        "legacy",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("note", sa.String(32)),
    )
    op.rename_table("legacy", "audit")


def downgrade(op):
    op.rename_table("audit", "legacy")
    op.drop_table("legacy")
    op.add_column("orders", sa.Column("item", sa.String(64)))
    if op.backend("db0") != "sqlite":
        op.alter_column("users", "age", nullable=True, existing_type=sa.Integer)
    op.drop_column("users", "age")
'''

RENAMED_TABLES = {"legacy": {"shard_key": "id", "table_shards": 4}, "audit": {"shard_key": "id", "table_shards": 4}}


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_add_backfill_alter_drop_column_and_rename_table(env: MigEnv) -> None:
    env.write_config(tables=RENAMED_TABLES)
    env.add_migration("0003_columns.py", COLUMNS_MIGRATION)
    assert all(r.error is None for r in env.run("up", to=2))
    for db in ("db0", "db1"):
        for s in slots_on(db, 4):
            env.raw(db).execute(f"INSERT INTO users_{s} (id, name) VALUES ({s}, 'u{s}')")

    env.ok("up")
    for db in ("db0", "db1"):
        raw = env.raw(db)
        assert env.user_tables(db) == EXPECTED_BASE[db] | {f"audit_{s}" for s in slots_on(db, 4)}
        for s in slots_on(db, 4):
            cols = raw.columns(f"users_{s}")
            assert list(cols) == [*USERS_COLUMNS, "age"]
            # NOT NULL after the backfill where the backend can alter a column in place.
            assert cols["age"] is (env.backend == "sqlite")
            assert raw.rows(f"SELECT id, age FROM users_{s}") == [(s, 7)]
            assert list(raw.columns(f"orders_{s}")) == ["user_id", "order_id", "amount"]
            assert list(raw.columns(f"audit_{s}")) == ["id", "note"]
        assert raw.versions() == ["0001", "0002", "0003"]
        assert raw.step_rows() == 0

    assert [r.applied for r in env.run("down")] == [["0003_columns"], ["0003_columns"]]
    env.assert_base_schema()
    for db in ("db0", "db1"):
        for s in slots_on(db, 4):
            assert env.raw(db).rows(f"SELECT id, name FROM users_{s}") == [(s, f"u{s}")]


ALTER_NULLABLE = '''"""Make users.email NOT NULL."""

import sqlalchemy as sa


def upgrade(op):
    op.alter_column("users", "email", nullable=False, existing_type=sa.String(128))


def downgrade(op):
    op.alter_column("users", "email", nullable=True, existing_type=sa.String(128))
'''


@pytest.mark.parametrize("env", ["sqlite"], indirect=True)
def test_alter_column_nullable_on_sqlite_is_a_clear_error(env: MigEnv) -> None:
    env.add_migration("0003_email_required.py", ALTER_NULLABLE)
    proc = env.cli("up")
    assert proc.returncode == 1, proc.stderr
    assert "0003_email_required" in proc.stderr
    assert "SQLite cannot alter a column in place" in proc.stderr
    assert "Traceback" not in proc.stderr
    for db in ("db0", "db1"):
        assert "0003" not in env.raw(db).versions()
        assert all(env.raw(db).columns(f"users_{s}")["email"] for s in slots_on(db, 4))
    # The error itself, as a migration's author meets it.
    with pytest.raises(MigrationError, match=r"alter_column\('users', 'email'\) on SQLite \(db0\): SQLite cannot"):
        expand(load_config(str(env.config_path), env={}), load_migrations(env.mig_dir)[-1].upgrade)


# --------------------------------------------------------------------------- new


def test_new_writes_the_next_version_with_a_loadable_skeleton(tmp_path: Path) -> None:
    env = MigEnv("sqlite", tmp_path, [f"sqlite+aiosqlite:///{tmp_path}/shard{i}.sqlite3" for i in range(2)])
    try:
        proc = env.ok("new", "add_widgets")
        path = env.mig_dir / "0003_add_widgets.py"
        assert proc.stdout.strip() == str(path)
        assert path.is_file()
        migs = load_migrations(env.mig_dir)
        assert [m.label for m in migs] == ["0001_create_users_and_orders", "0002_index_users_email", "0003_add_widgets"]
        assert migs[-1].doc == "Add widgets."
        config = load_config(str(env.config_path), env={})
        assert expand(config, migs[-1].upgrade) == [] and expand(config, migs[-1].downgrade) == []

        assert all(r.error is None and r.applied for r in env.run("up"))
        assert env.raw("db0").versions() == ["0001", "0002", "0003"]
        assert new_migration(env.mig_dir, "more") == env.mig_dir / "0004_more.py"

        bad = env.cli("new", "no-dashes")
        assert bad.returncode == 1 and "letters, digits and underscores" in bad.stderr
        assert not list(env.mig_dir.glob("0005_*"))
    finally:
        env.close()
    assert new_migration(tmp_path / "empty", "first") == tmp_path / "empty" / "0001_first.py"


# --------------------------------------------------------------------------- one node fails

FAILING = '''"""An audit table and users.age; a statement that fails on db1 only."""

import sqlalchemy as sa


def upgrade(op):
    op.create_table(
        "audit",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("note", sa.String(32)),
    )
    op.add_column("users", sa.Column("age", sa.Integer))
    op.execute("SELEC 1 FROM nowhere", database="db1")


def downgrade(op):
    op.drop_column("users", "age")
    op.drop_table("audit")
'''
AUDIT = {"audit": {"shard_key": "id", "table_shards": 4}}


def _audit_applied(env: MigEnv, db: str) -> None:
    raw = env.raw(db)
    assert env.user_tables(db) == EXPECTED_BASE[db] | {f"audit_{s}" for s in slots_on(db, 4)}, db
    for s in slots_on(db, 4):
        assert list(raw.columns(f"users_{s}")) == [*USERS_COLUMNS, "age"]
        assert list(raw.columns(f"audit_{s}")) == ["id", "note"]
    assert raw.versions() == ["0001", "0002", "0003"]
    assert raw.step_rows() == 0


@pytest.mark.parametrize("kind", ["bad_sql", "table_exists"])
@pytest.mark.parametrize("env", ALL, indirect=True)
def test_migration_failing_on_one_node(env: MigEnv, kind: str) -> None:
    env.write_config(tables=AUDIT)
    path = env.add_migration("0003_audit.py", FAILING)
    assert all(r.error is None for r in env.run("up", to=2))
    if kind == "table_exists":
        path.write_text(FAILING.replace("SELEC 1 FROM nowhere", "SELECT 1"))
        env.raw("db1").execute("CREATE TABLE audit_3 (other INTEGER)")
        statement = "CREATE TABLE audit_3"
    else:
        statement = "SELEC 1 FROM nowhere"

    proc = env.cli("up")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("db1: FAILED")]
    assert failed, proc.stderr
    assert "migration 0003_audit" in proc.stderr and "db1.primary" in failed[0]
    assert re.search(r"statement: .*" + re.escape(statement), proc.stderr), proc.stderr
    assert "db0: FAILED" not in proc.stderr
    assert "failed: db1" in proc.stdout

    _audit_applied(env, "db0")
    raw1 = env.raw("db1")
    assert raw1.versions() == ["0001", "0002"]
    extra = {"audit_3"} if kind == "table_exists" else set()
    if env.backend == "mysql":
        # DDL commits as it goes: what ran before the failure stays, recorded step by step.
        done = {"audit_2"} if kind == "table_exists" else {"audit_2", "audit_3"}
        assert env.user_tables("db1") == EXPECTED_BASE["db1"] | done | extra
        assert raw1.step_rows() == (1 if kind == "table_exists" else 4)
    else:
        # The node's transaction rolled back: nothing of 0003 on db1.
        assert env.user_tables("db1") == EXPECTED_BASE["db1"] | extra
        assert all("age" not in raw1.columns(f"users_{s}") for s in (2, 3))
        assert raw1.step_rows() == 0

    if kind == "table_exists":
        # Not fixed yet: the run fails the same way; the table that is in the
        # way is not taken for the migration's own (MySQL: its probe says "exists").
        again = {r.database: r.error for r in env.run("up")}
        assert again["db0"] is None
        assert again["db1"] is not None and "CREATE TABLE audit_3" in again["db1"]
        assert raw1.versions() == ["0001", "0002"]
    # Fix the cause; a rerun brings db1 up to date and leaves db0 alone.
    if kind == "table_exists":
        raw1.execute("DROP TABLE audit_3")
    else:
        path.write_text(FAILING.replace("SELEC 1 FROM nowhere", "SELECT 1"))
    assert [(r.applied, r.error) for r in env.run("up")] == [([], None), (["0003_audit"], None)]
    _audit_applied(env, "db0")
    _audit_applied(env, "db1")


# --------------------------------------------------------------------------- unreachable shard database


@pytest.mark.parametrize("env", SERVERS, indirect=True)
def test_unreachable_shard_database(env: MigEnv) -> None:
    scheme = env.urls["db1"].split("://", 1)[0]
    user = "postgres" if env.backend == "postgresql" else "root"
    bad = {"DAL_DB1_PRIMARY": f"{scheme}://{user}@127.0.0.1:1/nowhere"}

    proc = env.cli("up", env=bad)
    assert proc.returncode == 1
    assert re.search(r"^db1: FAILED: .*db1\.primary", proc.stderr, re.M), proc.stderr
    assert "db0: FAILED" not in proc.stderr
    assert "on 1/2 shard databases ok" in proc.stdout and "failed: db1" in proc.stdout
    raw0 = env.raw("db0")
    assert env.user_tables("db0") == EXPECTED_BASE["db0"] and raw0.versions() == ["0001", "0002"]
    assert env.raw("db1").tables() == set()

    st = env.cli("status", env=bad)
    assert st.returncode == 1
    assert "UNREACHABLE" in status_of(st.stdout, "db1")
    assert "current: 0002 (2 applied)" in status_of(st.stdout, "db0")

    results = env.run("up")  # DAL_DB1_PRIMARY no longer set
    assert [(r.applied, r.error) for r in results] == [
        ([], None), (["0001_create_users_and_orders", "0002_index_users_email"], None)]
    env.assert_base_schema()
    for st in env.status():
        assert (st.error, st.current, st.pending, st.differences) == (None, "0002", [], []), st


# --------------------------------------------------------------------------- concurrency

SLOW = '''"""users.age, after a short pause."""

import sqlalchemy as sa


def upgrade(op):
    pg = op.backend("db0") == "postgresql"
    op.execute("SELECT pg_sleep(0.2)" if pg else "SELECT SLEEP(0.2)")
    op.add_column("users", sa.Column("age", sa.Integer))


def downgrade(op):
    op.drop_column("users", "age")
'''
# While these are held, each database's run waits inside 0003 (at users_1 / users_3),
# holding the migration lock, for as long as the test likes.
HELD = {"db0": "users_1", "db1": "users_3"}
BLOCKED = ["ALTER TABLE users_1 ADD COLUMN age INTEGER", "ALTER TABLE users_3 ADD COLUMN age INTEGER"]


def _slow_applied(env: MigEnv) -> None:
    for db in ("db0", "db1"):
        raw = env.raw(db)
        assert env.user_tables(db) == EXPECTED_BASE[db]
        for s in slots_on(db, 4):
            assert list(raw.columns(f"users_{s}")) == [*USERS_COLUMNS, "age"]
        assert raw.versions() == ["0001", "0002", "0003"]  # each exactly once
        assert raw.step_rows() == 0


def _blocked(env: MigEnv) -> list[str]:
    return sorted(q for q in foreign_sessions(env) if q in BLOCKED)


@pytest.mark.parametrize("env", SERVERS, indirect=True)
def test_two_concurrent_runs_serialize_on_the_lock(env: MigEnv) -> None:
    env.add_migration("0003_slow.py", SLOW)
    assert all(r.error is None for r in env.run("up", to=2))
    with holding(env, HELD):
        procs = [env.popen("up", "--no-progress") for _ in range(2)]
        try:
            # Per database: one run holds the migration lock and waits inside 0003,
            # the other is connected too, waiting for the migration lock.
            wait_until(lambda: len(foreign_sessions(env)) == 4 or any(p.poll() is not None for p in procs),
                       30, "both runs connected to both databases", interval=0.01)
            wait_until(lambda: _blocked(env) == BLOCKED, 10, "0003 to be under way", interval=0.01)
            time.sleep(0.3)
            assert len(foreign_sessions(env)) == 4
            assert [p.poll() for p in procs] == [None, None]
        except BaseException:
            for p in procs:
                sigkill(p)
            raise
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
    _slow_applied(env)
    # Per database, one run applied 0003 and the other found it done.
    applied = sum(out.count("0003_slow") for out, _ in outs)
    assert 1 <= applied <= 2, outs


@pytest.mark.parametrize("env", SERVERS, indirect=True)
def test_lock_timeout_gives_up_naming_the_holder(env: MigEnv) -> None:
    env.add_migration("0003_slow.py", SLOW)
    assert all(r.error is None for r in env.run("up", to=2))
    with holding(env, HELD):
        first = env.popen("up")
        try:
            wait_until(lambda: _blocked(env) == BLOCKED or first.poll() is not None, 30,
                       "the first run to hold the lock inside 0003", interval=0.01)
            second = env.cli("up", "--lock-timeout", "0.5")
            assert second.returncode == 1
            assert re.search(r"^db0: FAILED: .*another dal migrate holds the migration lock on db0\.primary",
                             second.stderr, re.M), second.stderr
            assert "db1: FAILED" in second.stderr and "gave up after 0.5s" in second.stderr
            assert first.poll() is None, "the first run should still be holding the lock"
        except BaseException:
            sigkill(first)
            raise
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, out + err
    _slow_applied(env)
