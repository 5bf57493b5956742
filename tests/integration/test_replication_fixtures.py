"""The replica-set fixtures behave the way routing / failover tests rely on."""

import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from tests.replication import MariaDBReplicaSet, PgReplicaSet, ReplicaSetError

pytestmark = [pytest.mark.integration, pytest.mark.replication]

# How long a row gets to (wrongly) show up on a paused replica. Unpaused replication
# here takes a few milliseconds, so this is a generous margin.
PAUSED_GRACE = 0.5


def _table() -> str:
    return f"repl_{uuid.uuid4().hex[:10]}"


_SERVER_COMMS = {"postgres", "mariadbd", "mysqld"}


def _orphan_zombies() -> list[str]:
    """Server zombies nobody will reap: parented to PID 1 (which doesn't reap here) or us."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        state, ppid = stat[stat.rfind(")") + 2 :].split()[:2]
        if state == "Z" and int(ppid) in (1, os.getpid()) and comm in _SERVER_COMMS:
            found.append(f"{entry} ({comm})")
    return found


def _pids_mentioning(needle: str) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if needle.encode() in cmdline:
                pids.add(int(entry))
    return pids


def _children(pids: set[int]) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) in pids:
                kids.add(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


# --------------------------------------------------------------------------- PostgreSQL


class TestPostgres:
    def test_row_on_primary_appears_on_standby(self, pg_replica_set: PgReplicaSet) -> None:
        rs = pg_replica_set
        t = _table()
        rs.primary_sql(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
        rs.primary_sql(f"INSERT INTO {t} VALUES (1, 'hello')")
        rs.wait_for_standby_catchup(timeout=10)
        assert rs.standby_sql(f"SELECT v FROM {t} WHERE id = 1") == "hello"

    def test_standby_refuses_writes(self, pg_replica_set: PgReplicaSet) -> None:
        rs = pg_replica_set
        assert rs.primary_sql("SELECT pg_is_in_recovery()") == "f"
        assert rs.standby_sql("SELECT pg_is_in_recovery()") == "t"
        with pytest.raises(ReplicaSetError, match="read-only transaction"):
            rs.standby_sql(f"CREATE TABLE {_table()} (id int)")

    async def test_each_node_reports_its_own_port(self, pg_replica_set: PgReplicaSet) -> None:
        rs = pg_replica_set
        assert rs.primary_port != rs.standby_port
        for dsn, port, in_recovery in (
            (rs.primary_dsn, rs.primary_port, False),
            (rs.standby_dsn, rs.standby_port, True),
        ):
            engine = create_async_engine(dsn, poolclass=NullPool)
            try:
                async with engine.connect() as conn:
                    row = (
                        await conn.execute(text("SELECT inet_server_port(), pg_is_in_recovery()"))
                    ).one()
            finally:
                await engine.dispose()
            assert tuple(row) == (port, in_recovery)

    async def test_standby_refuses_writes_through_driver(
        self, pg_replica_set: PgReplicaSet
    ) -> None:
        engine = create_async_engine(pg_replica_set.standby_dsn, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                with pytest.raises(DBAPIError, match="read-only transaction"):
                    await conn.execute(text(f"CREATE TABLE {_table()} (id int)"))
        finally:
            await engine.dispose()

    def test_paused_replay_holds_back_rows(self, pg_replica_set: PgReplicaSet) -> None:
        rs = pg_replica_set
        t = _table()
        rs.primary_sql(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        rs.wait_for_standby_catchup(timeout=10)
        rs.pause_replay()
        try:
            rs.primary_sql(f"INSERT INTO {t} VALUES (1)")
            with pytest.raises(TimeoutError):
                rs.wait_for_standby_catchup(timeout=PAUSED_GRACE)
            assert rs.standby_sql(f"SELECT count(*) FROM {t}") == "0"
        finally:
            rs.resume_replay()
        rs.wait_for_standby_catchup(timeout=10)
        assert rs.standby_sql(f"SELECT count(*) FROM {t}") == "1"

    def test_kill_and_restart_primary(self, pg_replica_set: PgReplicaSet) -> None:
        rs = pg_replica_set
        port = rs.primary_port
        t = _table()
        rs.primary_sql(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        rs.primary_sql(f"INSERT INTO {t} VALUES (1)")

        rs.kill_primary()
        with pytest.raises(ReplicaSetError):
            rs.primary_sql("SELECT 1")
        assert not (rs.primary_datadir / "postmaster.pid").exists()
        assert _orphan_zombies() == []
        # The standby keeps serving reads while the primary is down.
        assert rs.standby_sql("SELECT pg_is_in_recovery()") == "t"

        rs.start_primary()
        assert rs.primary_port == port
        assert rs.primary_sql("SELECT inet_server_port()") == str(port)
        # Committed before the kill -> survived crash recovery.
        assert rs.primary_sql(f"SELECT count(*) FROM {t}") == "1"
        rs.primary_sql(f"INSERT INTO {t} VALUES (2)")
        rs.wait_for_standby_catchup(timeout=15)
        assert rs.standby_sql(f"SELECT count(*) FROM {t}") == "2"

    def test_kill_and_restart_standby(self, pg_replica_set: PgReplicaSet) -> None:
        rs = pg_replica_set
        port = rs.standby_port
        t = _table()
        rs.primary_sql(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        rs.kill_standby()
        assert _orphan_zombies() == []
        rs.primary_sql(f"INSERT INTO {t} VALUES (1)")  # written while the standby is down
        rs.start_standby()
        assert rs.standby_sql("SELECT inet_server_port()") == str(port)
        rs.wait_for_standby_catchup(timeout=15)
        assert rs.standby_sql(f"SELECT count(*) FROM {t}") == "1"


# --------------------------------------------------------------------------- MariaDB


class TestMariaDB:
    def test_row_on_primary_appears_on_replica(
        self, mariadb_replica_set: MariaDBReplicaSet
    ) -> None:
        rs = mariadb_replica_set
        t = _table()
        rs.primary_sql(f"CREATE TABLE {t} (id int PRIMARY KEY, v varchar(20))")
        rs.primary_sql(f"INSERT INTO {t} VALUES (1, 'hello')")
        rs.wait_for_replica_catchup(timeout=10)
        assert rs.replica_sql(f"SELECT v FROM {t} WHERE id = 1") == "hello"

    def test_replica_is_read_only(self, mariadb_replica_set: MariaDBReplicaSet) -> None:
        rs = mariadb_replica_set
        # root has SUPER/READ_ONLY ADMIN and bypasses read_only, so assert the setting.
        assert rs.primary_sql("SELECT @@read_only") == "0"
        assert rs.replica_sql("SELECT @@read_only") == "1"
        status = rs.replica_status()
        assert status["Slave_IO_Running"] == "Yes"
        assert status["Slave_SQL_Running"] == "Yes"
        assert status["Using_Gtid"] == "Slave_Pos"

    async def test_replica_refuses_writes_from_ordinary_user(
        self, mariadb_replica_set: MariaDBReplicaSet
    ) -> None:
        rs = mariadb_replica_set
        t = _table()
        user = f"u_{uuid.uuid4().hex[:8]}"
        rs.primary_sql(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        rs.primary_sql(f"CREATE USER '{user}'@'127.0.0.1'")
        rs.primary_sql(f"GRANT ALL ON test.* TO '{user}'@'127.0.0.1'")
        try:
            rs.wait_for_replica_catchup(timeout=10)
            dsn = f"mysql+aiomysql://{user}@127.0.0.1:{rs.replica_port}/test"
            engine = create_async_engine(dsn, poolclass=NullPool)
            try:
                async with engine.connect() as conn:
                    with pytest.raises(DBAPIError, match="read-only"):
                        await conn.execute(text(f"INSERT INTO {t} VALUES (1)"))
            finally:
                await engine.dispose()
        finally:
            rs.primary_sql(f"DROP USER '{user}'@'127.0.0.1'")

    async def test_each_node_reports_its_own_port(
        self, mariadb_replica_set: MariaDBReplicaSet
    ) -> None:
        rs = mariadb_replica_set
        assert rs.primary_port != rs.replica_port
        for dsn, port, read_only in (
            (rs.primary_dsn, rs.primary_port, 0),
            (rs.replica_dsn, rs.replica_port, 1),
        ):
            engine = create_async_engine(dsn, poolclass=NullPool)
            try:
                async with engine.connect() as conn:
                    row = (await conn.execute(text("SELECT @@port, @@read_only"))).one()
            finally:
                await engine.dispose()
            assert tuple(row) == (port, read_only)

    def test_paused_replication_holds_back_rows(
        self, mariadb_replica_set: MariaDBReplicaSet
    ) -> None:
        rs = mariadb_replica_set
        t = _table()
        rs.primary_sql(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        rs.wait_for_replica_catchup(timeout=10)
        rs.pause_replication()
        try:
            rs.primary_sql(f"INSERT INTO {t} VALUES (1)")
            with pytest.raises(TimeoutError):
                rs.wait_for_replica_catchup(timeout=PAUSED_GRACE)
            assert rs.replica_sql(f"SELECT count(*) FROM {t}") == "0"
        finally:
            rs.resume_replication()
        rs.wait_for_replica_catchup(timeout=10)
        assert rs.replica_sql(f"SELECT count(*) FROM {t}") == "1"

    def test_kill_and_restart_primary(self, mariadb_replica_set: MariaDBReplicaSet) -> None:
        rs = mariadb_replica_set
        port = rs.primary_port
        t = _table()
        rs.primary_sql(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        rs.primary_sql(f"INSERT INTO {t} VALUES (1)")

        rs.kill_primary()
        with pytest.raises(ReplicaSetError):
            rs.primary_sql("SELECT 1")
        assert _orphan_zombies() == []
        assert rs.replica_sql("SELECT @@read_only") == "1"

        rs.start_primary()
        assert rs.primary_port == port
        assert rs.primary_sql("SELECT @@port") == str(port)
        assert rs.primary_sql(f"SELECT count(*) FROM {t}") == "1"
        rs.primary_sql(f"INSERT INTO {t} VALUES (2)")
        rs.wait_for_replica_catchup(timeout=15)
        assert rs.replica_sql(f"SELECT count(*) FROM {t}") == "2"

    def test_kill_and_restart_replica(self, mariadb_replica_set: MariaDBReplicaSet) -> None:
        rs = mariadb_replica_set
        port = rs.replica_port
        t = _table()
        rs.primary_sql(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        rs.kill_replica()
        rs.primary_sql(f"INSERT INTO {t} VALUES (1)")  # written while the replica is down
        rs.start_replica()
        assert rs.replica_sql("SELECT @@port, @@read_only") == f"{port}\t1"
        rs.wait_for_replica_catchup(timeout=15)
        assert rs.replica_sql(f"SELECT count(*) FROM {t}") == "1"


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("cls", [PgReplicaSet, MariaDBReplicaSet], ids=["pg", "mariadb"])
def test_stop_leaves_nothing_behind(cls: type[PgReplicaSet] | type[MariaDBReplicaSet]) -> None:
    with cls() as rs:
        tmp = rs.tmpdir
        assert tmp is not None and tmp.is_dir()
        wrappers = _pids_mentioning(str(tmp))
        servers = _children(wrappers)
        pids = wrappers | servers | _children(servers)
        assert len(pids) >= 4  # 2 wrappers + 2 servers (+ postgres workers)
        # Loose bound: catches e.g. a forgotten 5s reconnect delay, not CI jitter.
        assert rs.startup_seconds is not None and rs.startup_seconds < 30
    assert not tmp.exists()
    assert not [p for p in pids if _alive(p)]
    assert _orphan_zombies() == []
    rs.stop()  # idempotent
