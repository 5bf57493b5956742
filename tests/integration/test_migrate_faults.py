"""``dal migrate`` under faults: the migrate process SIGKILLed mid-run (PostgreSQL,
MariaDB), a crash between a DDL statement and its progress record (MariaDB), the
MariaDB server killed mid-run, a standby/replica given as a primary, and replicas
that must never be written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from dal.migrate.ops import Step
from dal.migrate.runner import Direction
from tests.migrate_support import (
    BOOKKEEPING,
    EXPECTED_BASE,
    USERS_COLUMNS,
    MigEnv,
    ServerDatabases,
    foreign_sessions,
    holding,
    sigkill,
    slots_on,
    wait_until,
)
from tests.replication import MariaDBReplicaSet, PgReplicaSet

pytestmark = pytest.mark.integration

SERVERS = ["postgresql", "mysql"]


@pytest.fixture(scope="module")
def server_dbs() -> Iterator[ServerDatabases]:
    dbs = ServerDatabases("b")
    yield dbs
    dbs.drop_all()


@pytest.fixture
def env(request: pytest.FixtureRequest, tmp_path: Path, server_dbs: ServerDatabases) -> Iterator[MigEnv]:
    backend = str(request.param)
    e = MigEnv(backend, tmp_path, server_dbs.fresh(backend))
    yield e
    e.close()


HELD = {"db0": "users_1", "db1": "users_3"}
BLOCKED = ["ALTER TABLE users_1 ADD COLUMN age INTEGER", "ALTER TABLE users_3 ADD COLUMN age INTEGER"]


def _blocked(env: MigEnv) -> list[str]:
    return sorted(q for q in foreign_sessions(env) if q in BLOCKED)


def statements_run(stdout: str) -> int:
    m = re.search(r"\((\d+) statements", stdout)
    assert m, stdout
    return int(m.group(1))


# --------------------------------------------------------------------------- a migration with many steps

BIG = '''"""A table in 32 shards (with an index), users.age, then a column and an index on every shard."""

import sqlalchemy as sa


def upgrade(op):
    op.create_table(
        "big",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("note", sa.String(32)),
        sa.Index("ix_big_note", "note"),
    )
    op.add_column("users", sa.Column("age", sa.Integer))
    op.add_column("big", sa.Column("extra", sa.Integer))
    op.create_index("ix_big_extra", "big", ["extra"])


def downgrade(op):
    op.drop_column("users", "age")
    op.drop_table("big")
'''
BIG_TABLES = {"big": {"shard_key": "id", "table_shards": 32}}


def big_steps(env: MigEnv, db: str) -> list[Step]:
    migrator = env.migrator()
    big = next(m for m in migrator.migrations if m.version == "0003")
    return migrator.steps(big, "up", db)


def assert_big_applied(env: MigEnv) -> None:
    for db in ("db0", "db1"):
        raw = env.raw(db)
        bigs = {f"big_{s}" for s in slots_on(db, 32)}
        assert raw.tables() == EXPECTED_BASE[db] | bigs | BOOKKEEPING, db
        for s in slots_on(db, 32):
            assert list(raw.columns(f"big_{s}")) == ["id", "note", "extra"]
            assert raw.indexes(f"big_{s}") == {f"ix_big_note_{s}": ["note"], f"ix_big_extra_{s}": ["extra"]}
        for s in slots_on(db, 4):
            assert list(raw.columns(f"users_{s}")) == [*USERS_COLUMNS, "age"]
            assert raw.indexes(f"users_{s}") == {f"ix_users_email_{s}": ["email"]}
        assert raw.versions() == ["0001", "0002", "0003"]
        assert raw.step_rows() == 0


def _big_count(env: MigEnv) -> int:
    return sum(1 for db in ("db0", "db1") for t in env.raw(db).tables() if t.startswith("big_"))


@pytest.mark.parametrize("env", ["mysql"], indirect=True)
def test_sigkill_mid_run_on_mariadb_then_rerun(env: MigEnv) -> None:
    env.write_config(tables=BIG_TABLES)
    env.add_migration("0003_big.py", BIG)
    assert all(r.error is None for r in env.run("up", to=2))

    proc = env.popen("up")
    try:
        wait_until(lambda: _big_count(env) >= 3 or proc.poll() is not None, 30, "some big_* tables", interval=0)
    finally:
        sigkill(proc)
    assert proc.returncode == -9
    # Let the server finish whatever statement the killed run had in flight.
    wait_until(lambda: not foreign_sessions(env), 20, "the killed run's sessions to end", interval=0.01)
    assert 3 <= _big_count(env) < 32, "the kill should land mid-run"

    # The crash window between a DDL and its progress record: run by hand the
    # first statement not yet recorded, as if the killed run had got that far.
    expected = 0
    simulated = []
    for db in ("db0", "db1"):
        raw = env.raw(db)
        steps = big_steps(env, db)
        if "0003" in raw.versions():
            continue
        recorded = raw.step_numbers("0003")
        done = {i for i in recorded if i >= 0}
        assert done == set(range(len(done))), "steps are recorded in order, each once"
        pending = list(range(len(done), len(steps)))
        if recorded:  # this database's run of 0003 had started
            first = steps[pending[0]]
            assert first.probe is not None
            if raw.has_effect(first.probe):  # the kill itself landed in that window
                simulated.append(f"{db}: killed after {first.sql[0].splitlines()[0]}")
            else:
                raw.execute(first.sql[0])
                simulated.append(f"{db}: by hand {first.sql[0].splitlines()[0]}")
            pending = pending[1:]
        expected += sum(len(steps[i].sql) for i in pending)
    assert simulated, "no shard database was left mid-migration"

    rerun = env.ok("up")
    assert statements_run(rerun.stdout) == expected, (simulated, rerun.stdout)
    assert_big_applied(env)


@pytest.mark.parametrize("env", ["postgresql"], indirect=True)
def test_sigkill_mid_run_on_postgresql_then_rerun(env: MigEnv) -> None:
    env.write_config(tables=BIG_TABLES)
    env.add_migration("0003_big.py", BIG)
    assert all(r.error is None for r in env.run("up", to=2))
    total = sum(len(s.sql) for db in ("db0", "db1") for s in big_steps(env, db))

    # Hold users_1 and users_3: each database's run stops inside 0003, right
    # after creating its 16 big_* tables (in its uncommitted transaction).
    with holding(env, HELD):
        proc = env.popen("up")
        try:
            wait_until(lambda: _blocked(env) == BLOCKED or proc.poll() is not None, 30, "both runs blocked",
                       interval=0.01)
            assert proc.poll() is None
        finally:
            sigkill(proc)
        assert proc.returncode == -9

    # The killed run's server sessions notice, roll back and go away.
    wait_until(lambda: not foreign_sessions(env), 20, "the killed run's sessions to end", interval=0.01)
    for db in ("db0", "db1"):
        assert env.raw(db).tables() == EXPECTED_BASE[db] | BOOKKEEPING, "0003 must have rolled back"
        assert env.raw(db).versions() == ["0001", "0002"]
        assert all("age" not in env.raw(db).columns(f"users_{s}") for s in slots_on(db, 4))

    rerun = env.ok("up")
    assert "applied 0003_big on 2/2" in rerun.stdout
    assert statements_run(rerun.stdout) == total
    assert_big_applied(env)


# --------------------------------------------------------------------------- crash after each step (MariaDB)

EVERY_KIND = '''"""One step of every kind that has a probe."""

import sqlalchemy as sa


def upgrade(op):
    op.create_table(
        "legacy",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("note", sa.String(32)),
        sa.Index("ix_legacy_note", "note"),
    )
    op.rename_table("legacy", "audit")
    op.add_column("users", sa.Column("age", sa.Integer, index=True))
    op.alter_column("users", "age", new_column_name="years", existing_type=sa.Integer)
    op.create_index("ix_users_name", "users", ["name"])
    op.drop_index("ix_users_email", "users")
    op.drop_column("orders", "item")


def downgrade(op):
    op.add_column("orders", sa.Column("item", sa.String(64)))
    op.create_index("ix_users_email", "users", ["email"])
    op.drop_index("ix_users_name", "users")
    op.alter_column("users", "years", new_column_name="age", existing_type=sa.Integer)
    op.drop_column("users", "age")
    op.rename_table("audit", "legacy")
    op.drop_table("legacy")
'''


class SimulatedCrash(Exception):
    pass


def crash_after_every_step(env: MigEnv, direction: Direction) -> int:
    """Run until done, each run dying right after the DDL of a step it had not reached before.

    The progress callback runs after a step's statements and before its progress
    record: raising there leaves exactly the state of a process killed in that
    window. The next run must see (probe) that the step took effect and go on.
    """
    seen: dict[str, set[str]] = {"db0": set(), "db1": set()}

    def progress(db: str, what: str) -> None:
        if what not in seen[db]:
            seen[db].add(what)
            raise SimulatedCrash(f"simulated crash after {what}")

    crashes = 0
    while True:
        errors = [r.error for r in env.run(direction, progress=progress) if r.error]
        if not errors:
            return crashes
        for e in errors:
            assert "simulated crash after" in e, e  # anything else: a step ran twice, or failed
        crashes += 1
        assert crashes < 100


@pytest.mark.parametrize("env", ["mysql"], indirect=True)
def test_mariadb_resumes_after_a_crash_between_any_ddl_and_its_record(env: MigEnv) -> None:
    env.write_config(tables={"legacy": {"shard_key": "id", "table_shards": 4},
                             "audit": {"shard_key": "id", "table_shards": 4}})
    env.add_migration("0003_every_kind.py", EVERY_KIND)
    assert all(r.error is None for r in env.run("up", to=2))
    migrator = env.migrator()
    mig = migrator.migrations[-1]
    n_up = len(migrator.steps(mig, "up", "db0"))
    assert n_up == len(migrator.steps(mig, "up", "db1"))

    assert crash_after_every_step(env, "up") == n_up
    for db in ("db0", "db1"):
        raw = env.raw(db)
        assert env.user_tables(db) == EXPECTED_BASE[db] | {f"audit_{s}" for s in slots_on(db, 4)}
        for s in slots_on(db, 4):
            assert list(raw.columns(f"audit_{s}")) == ["id", "note"]
            assert raw.indexes(f"audit_{s}") == {f"ix_legacy_note_{s}": ["note"]}
            assert list(raw.columns(f"users_{s}")) == [*USERS_COLUMNS, "years"]
            assert raw.indexes(f"users_{s}") == {f"ix_users_{s}_age": ["years"], f"ix_users_name_{s}": ["name"]}
            assert list(raw.columns(f"orders_{s}")) == ["user_id", "order_id", "amount"]
        assert raw.versions() == ["0001", "0002", "0003"]
        assert raw.step_rows() == 0

    assert crash_after_every_step(env, "down") == len(migrator.steps(mig, "down", "db0"))
    env.assert_base_schema()


# --------------------------------------------------------------------------- the MariaDB server dies


def _rs_urls(dsn: str, names: list[str]) -> list[str]:
    return [make_url(dsn).set(database=n).render_as_string(hide_password=False) for n in names]


def test_mariadb_server_killed_mid_run_then_rerun(tmp_path: Path, mariadb_replica_set: MariaDBReplicaSet) -> None:
    rs = mariadb_replica_set
    names = [f"dal_mig_crash_{os.getpid()}_{i}" for i in range(2)]
    for n in names:
        rs.primary_sql(f"DROP DATABASE IF EXISTS {n}; CREATE DATABASE {n}", database=None)
    env = MigEnv("mysql", tmp_path, _rs_urls(rs.primary_dsn, names))
    try:
        env.write_config(tables=BIG_TABLES)
        env.add_migration("0003_big.py", BIG)
        assert all(r.error is None for r in env.run("up", to=2))
        # Each database's run waits (metadata lock) in the middle of 0003:
        # big_* created, users.age half done. Then the server dies.
        with holding(env, HELD):
            proc = env.popen("up")
            try:
                wait_until(lambda: _blocked(env) == BLOCKED or proc.poll() is not None, 30, "both runs waiting",
                           interval=0.01)
                assert proc.poll() is None
                assert _big_count(env) == 32
                env.close()
                rs.kill_primary()
                out, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    sigkill(proc)
                rs.start_primary()
        assert proc.returncode == 1, out + err
        assert "db0: FAILED" in err and "db1: FAILED" in err

        rerun = env.ok("up")
        assert "on 2/2 shard databases ok" in rerun.stdout
        assert_big_applied(env)
    finally:
        env.close()
        for n in names:
            rs.primary_sql(f"DROP DATABASE IF EXISTS {n}", database=None)
        rs.wait_for_replica_catchup()


# --------------------------------------------------------------------------- standbys and replicas


@pytest.fixture
def rs_database(request: pytest.FixtureRequest) -> Iterator[tuple[str, PgReplicaSet | MariaDBReplicaSet, str]]:
    """A fresh database on a replica set's primary, replicated: (kind, replica set, name)."""
    kind = str(request.param)
    rs: PgReplicaSet | MariaDBReplicaSet = request.getfixturevalue(
        "pg_replica_set" if kind == "postgresql" else "mariadb_replica_set")
    name = f"dal_mig_rs_{os.getpid()}"
    if isinstance(rs, PgReplicaSet):
        rs.primary_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        rs.primary_sql(f"CREATE DATABASE {name}")
        rs.wait_for_standby_catchup()
    else:
        rs.primary_sql(f"DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}", database=None)
        rs.wait_for_replica_catchup()
    yield kind, rs, name
    if isinstance(rs, PgReplicaSet):
        rs.resume_replay()
        rs.primary_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        rs.wait_for_standby_catchup()
    else:
        rs.resume_replication()
        rs.primary_sql(f"DROP DATABASE IF EXISTS {name}", database=None)
        rs.wait_for_replica_catchup()


def _standby_tables(rs: PgReplicaSet | MariaDBReplicaSet, name: str) -> set[str]:
    if isinstance(rs, PgReplicaSet):
        out = rs.standby_sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
                             dbname=name)
    else:
        out = rs.replica_sql(f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{name}'",
                             database=None)
    return set(out.split())


def _primary_tables(rs: PgReplicaSet | MariaDBReplicaSet, name: str) -> set[str]:
    if isinstance(rs, PgReplicaSet):
        out = rs.primary_sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
                             dbname=name)
    else:
        out = rs.primary_sql(f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{name}'",
                             database=None)
    return set(out.split())


@pytest.mark.parametrize("rs_database", SERVERS, indirect=True)
def test_standby_given_as_primary_is_refused(
    rs_database: tuple[str, PgReplicaSet | MariaDBReplicaSet, str], tmp_path: Path, server_dbs: ServerDatabases
) -> None:
    kind, rs, name = rs_database
    standby = rs.standby_dsn if isinstance(rs, PgReplicaSet) else rs.replica_dsn
    db0 = server_dbs.fresh(kind)[0]
    env = MigEnv(kind, tmp_path, [db0, *_rs_urls(standby, [name])])
    try:
        proc = env.cli("up")
        assert proc.returncode == 1
        failed = [line for line in proc.stderr.splitlines() if line.startswith("db1: FAILED")]
        assert failed, proc.stderr
        assert "db1.primary" in failed[0]
        assert re.search(r"in recovery" if kind == "postgresql" else r"read.only", failed[0]), failed[0]
        assert "failed: db1" in proc.stdout
        assert env.user_tables("db0") == EXPECTED_BASE["db0"]  # the real primary was migrated
        assert _standby_tables(rs, name) == set()  # nothing written to the standby
        assert _primary_tables(rs, name) == set()
        if isinstance(rs, MariaDBReplicaSet):
            status = rs.replica_status()
            assert status["Slave_SQL_Running"] == "Yes" and status["Last_SQL_Error"] == ""
    finally:
        env.close()


@pytest.mark.parametrize("rs_database", SERVERS, indirect=True)
def test_replicas_are_never_written(
    rs_database: tuple[str, PgReplicaSet | MariaDBReplicaSet, str], tmp_path: Path, server_dbs: ServerDatabases
) -> None:
    kind, rs, name = rs_database
    if isinstance(rs, PgReplicaSet):
        primary, replica = _rs_urls(rs.primary_dsn, [name])[0], _rs_urls(rs.standby_dsn, [name])[0]
    else:
        primary, replica = _rs_urls(rs.primary_dsn, [name])[0], _rs_urls(rs.replica_dsn, [name])[0]
    db1 = server_dbs.fresh(kind)[1]
    env = MigEnv(kind, tmp_path, [primary, db1])
    env.write_config(databases={"db0": {"primary": primary, "replicas": [replica]}, "db1": db1})
    try:
        # Replication is paused: whatever shows up on the replica now was written to it directly.
        if isinstance(rs, PgReplicaSet):
            rs.pause_replay()
        else:
            rs.pause_replication()
        env.ok("up")
        expected = EXPECTED_BASE["db0"] | BOOKKEEPING
        assert _primary_tables(rs, name) == expected
        assert _standby_tables(rs, name) == set()
        if isinstance(rs, PgReplicaSet):
            rs.resume_replay()
            rs.wait_for_standby_catchup()
        else:
            rs.resume_replication()
            rs.wait_for_replica_catchup()
            status = rs.replica_status()
            assert status["Slave_SQL_Running"] == "Yes" and status["Last_SQL_Error"] == ""
        # ...and once resumed, replication alone brings the schema over.
        assert _standby_tables(rs, name) == expected
    finally:
        env.close()
