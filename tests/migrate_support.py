"""Helpers for the ``dal migrate`` integration tests (tests/integration/test_migrate*.py).

Everything here checks databases *around* dal, never through it: :class:`Raw`
opens its own driver connection (asyncpg, PyMySQL, sqlite3) and introspects the
catalog. :class:`ServerDatabases` owns a few scratch databases on the shared
PostgreSQL / MariaDB servers (named ``dal_mig_<backend>_<pid>_<n>``), wiped
before each test and dropped at the end. :class:`MigEnv` is one test's world:
a tmp ``dal.toml``, a copy of the repo's ``migrations/`` plus the test's own
files, and ``dal migrate`` run as a real subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pymysql
from sqlalchemy.engine import make_url

from dal.config import load_config
from dal.migrate import Migrator, Probe, load_migrations
from dal.migrate.runner import DatabaseResult, DatabaseStatus, Direction
from tests.conftest import MYSQL_URL, PG_URL, _mysql_admin, _pg_admin, backend_url

REPO = Path(__file__).resolve().parent.parent
REPO_MIGRATIONS = REPO / "migrations"
VERSIONS = "dal_schema_migrations"
STEPS = "dal_schema_migration_steps"
BOOKKEEPING = {VERSIONS, STEPS}
RAW_APPLICATION = "dal-test-raw"  # application_name of the checking connections on PostgreSQL
_MYSQL_RAW_IDS: set[int] = set()  # CONNECTION_ID() of the checking connections on MySQL

# users and orders: 4 table shards over db0/db1 by contiguous ranges.
USERS_ORDERS: dict[str, dict[str, Any]] = {
    "users": {"shard_key": "id", "table_shards": 4},
    "orders": {"shard_key": "user_id", "table_shards": 4},
}
EXPECTED_BASE = {
    "db0": {"users_0", "users_1", "orders_0", "orders_1"},
    "db1": {"users_2", "users_3", "orders_2", "orders_3"},
}
USERS_COLUMNS = ["id", "name", "email"]
ORDERS_COLUMNS = ["user_id", "order_id", "amount", "item"]


def slots_on(db: str, shards: int, databases: int = 2) -> list[int]:
    """Slots a contiguous-range table keeps on ``db`` (``db0``, ``db1``, ...)."""
    i = int(db.removeprefix("db"))
    return [s for s in range(shards) if s * databases // shards == i]


# --------------------------------------------------------------------------- raw access


class Raw:
    """A direct driver connection to one database (a dal DSN), for checks and tampering."""

    def __init__(self, dsn: str) -> None:
        url = make_url(dsn)
        self.dsn = dsn
        self.backend = url.get_backend_name()
        if self.backend == "mariadb":
            self.backend = "mysql"
        self._loop: asyncio.AbstractEventLoop | None = None
        if self.backend == "postgresql":
            self._loop = asyncio.new_event_loop()
            self._pg = self._loop.run_until_complete(
                asyncpg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                                database=url.database, timeout=10,
                                server_settings={"application_name": RAW_APPLICATION})
            )
        elif self.backend == "mysql":
            self._my = pymysql.connect(host=url.host, port=url.port or 3306, user=url.username or "root",
                                       password=url.password or "", database=url.database, autocommit=True)
            self._my_id = self.session_id()
            _MYSQL_RAW_IDS.add(self._my_id)
        else:
            self._lite = sqlite3.connect(url.database or ":memory:", isolation_level=None)

    def close(self) -> None:
        if self.backend == "postgresql":
            assert self._loop is not None
            self._loop.run_until_complete(self._pg.close())
            self._loop.close()
        elif self.backend == "mysql":
            _MYSQL_RAW_IDS.discard(self._my_id)
            with contextlib.suppress(pymysql.err.Error):
                self._my.close()
        else:
            self._lite.close()

    def session_id(self) -> int:
        """The server's id of this connection (``CONNECTION_ID()`` / ``pg_backend_pid()``)."""
        return int(self.rows("SELECT pg_backend_pid()" if self.backend == "postgresql" else "SELECT CONNECTION_ID()")[0][0])

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of ``sql``; placeholders are ``$1`` (PostgreSQL), ``%s`` (MySQL), ``?`` (SQLite)."""
        if self.backend == "postgresql":
            assert self._loop is not None
            return [tuple(r) for r in self._loop.run_until_complete(self._pg.fetch(sql, *params))]
        if self.backend == "mysql":
            with self._my.cursor() as cur:
                cur.execute(sql, params or None)
                return [tuple(r) for r in cur.fetchall()]
        return [tuple(r) for r in self._lite.execute(sql, params).fetchall()]

    def execute(self, sql: str) -> None:
        if self.backend == "postgresql":
            assert self._loop is not None
            self._loop.run_until_complete(self._pg.execute(sql))
        elif self.backend == "mysql":
            with self._my.cursor() as cur:
                cur.execute(sql)
        else:
            self._lite.executescript(sql)

    # -- catalog -------------------------------------------------------------------------
    def tables(self) -> set[str]:
        if self.backend == "postgresql":
            sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        elif self.backend == "mysql":
            sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()"
        else:
            sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
        return {str(r[0]) for r in self.rows(sql)}

    def table_count(self, table: str, name: str) -> int:
        """How many tables called ``name`` exist (0 or 1: a catalog never holds duplicates)."""
        return sum(1 for t in self.tables() if t == name)

    def columns(self, table: str) -> dict[str, bool]:
        """Column name -> nullable, in ordinal order."""
        if self.backend == "sqlite":
            return {str(r[1]): not r[3] for r in self.rows(f"PRAGMA table_info({table})")}
        schema = "current_schema()" if self.backend == "postgresql" else "DATABASE()"
        ph = "$1" if self.backend == "postgresql" else "%s"
        rows = self.rows(
            f"SELECT column_name, is_nullable FROM information_schema.columns "
            f"WHERE table_schema = {schema} AND table_name = {ph} ORDER BY ordinal_position", table)
        return {str(r[0]): r[1] == "YES" for r in rows}

    def indexes(self, table: str) -> dict[str, list[str]]:
        """Secondary (non-primary-key) index name -> its columns."""
        out: dict[str, list[str]] = {}
        if self.backend == "postgresql":
            rows = self.rows(
                "SELECT i.relname, a.attname FROM pg_index x "
                "JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
                "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY(x.indkey) "
                "WHERE t.relname = $1 AND t.relnamespace = current_schema()::regnamespace "
                "AND NOT x.indisprimary ORDER BY i.relname, a.attnum", table)
        elif self.backend == "mysql":
            rows = self.rows(
                "SELECT index_name, column_name FROM information_schema.statistics "
                "WHERE table_schema = DATABASE() AND table_name = %s AND index_name <> 'PRIMARY' "
                "ORDER BY index_name, seq_in_index", table)
        else:
            names = [str(r[0]) for r in self.rows(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                "AND name NOT LIKE 'sqlite_autoindex%'", table)]
            rows = [(n, str(c[2])) for n in names for c in self.rows(f"PRAGMA index_info({n})")]
        for name, col in rows:
            out.setdefault(str(name), []).append(str(col))
        return out

    def versions(self) -> list[str]:
        """Versions in ``dal_schema_migrations`` (with repeats, if any), or [] without the table."""
        if VERSIONS not in self.tables():
            return []
        return sorted(str(r[0]) for r in self.rows(f"SELECT version FROM {VERSIONS}"))

    def step_rows(self) -> int:
        if STEPS not in self.tables():
            return 0
        return int(self.rows(f"SELECT COUNT(*) FROM {STEPS}")[0][0])

    def step_numbers(self, version: str, direction: str = "up") -> list[int]:
        """Step numbers recorded in ``dal_schema_migration_steps`` for a migration (MySQL)."""
        if STEPS not in self.tables():
            return []
        ph = "$1, $2" if self.backend == "postgresql" else ("%s, %s" if self.backend == "mysql" else "?, ?")
        a, b = (x.strip() for x in ph.split(","))
        return sorted(int(r[0]) for r in self.rows(
            f"SELECT step FROM {STEPS} WHERE version = {a} AND direction = {b}", version, direction))

    def has_effect(self, probe: Probe) -> bool:
        """Whether what a step's probe names exists, as the catalog says (not dal)."""
        if probe.kind == "table":
            return probe.table in self.tables()
        if probe.kind == "column":
            return probe.name in self.columns(probe.table)
        return probe.name in self.indexes(probe.table)


# --------------------------------------------------------------------------- server databases


class ServerDatabases:
    """Scratch databases on the shared servers: two per backend, wiped per test, dropped at the end."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.created: dict[str, list[str]] = {}

    def names(self, backend: str) -> list[str]:
        if backend not in self.created:
            short = {"postgresql": "pg", "mysql": "my"}[backend]
            names = [f"dal_mig_{short}_{self.tag}_{os.getpid()}_{i}" for i in range(2)]
            for n in names:
                if backend == "postgresql":
                    _pg_admin(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
                    _pg_admin(f"CREATE DATABASE {n}")
                else:
                    _mysql_admin(f"DROP DATABASE IF EXISTS {n}; CREATE DATABASE {n}")
            self.created[backend] = names
        return self.created[backend]

    def fresh(self, backend: str) -> list[str]:
        """DSNs of the two databases, emptied."""
        names = self.names(backend)
        for n in names:
            if backend == "postgresql":
                raw = Raw(backend_url("postgresql", n))
                try:
                    raw.execute("SET lock_timeout = '20s'; DROP SCHEMA public CASCADE; CREATE SCHEMA public")
                finally:
                    raw.close()
            else:
                _mysql_admin(f"DROP DATABASE IF EXISTS {n}; CREATE DATABASE {n}")
        return [backend_url(backend, n) for n in names]

    def drop_all(self) -> None:
        for backend, names in self.created.items():
            for n in names:
                if backend == "postgresql":
                    _pg_admin(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
                else:
                    _mysql_admin(f"DROP DATABASE IF EXISTS {n}")
        self.created.clear()


def server_url(backend: str) -> str:
    return PG_URL if backend == "postgresql" else MYSQL_URL


# --------------------------------------------------------------------------- one test's world


def toml_config(databases: Mapping[str, str | Mapping[str, Any]], tables: Mapping[str, Mapping[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    lines: list[str] = []
    for name, spec in databases.items():
        lines.append(f"[databases.{name}]")
        body = {"primary": spec} if isinstance(spec, str) else dict(spec)
        lines += [f"{k} = {value(v)}" for k, v in body.items()]
        lines.append("")
    for name, spec in tables.items():
        lines.append(f"[tables.{name}]")
        lines += [f"{k} = {value(v)}" for k, v in spec.items()]
        lines.append("")
    return "\n".join(lines)


_OVERRIDE = re.compile(r"^DAL_.*_(PRIMARY|REPLICAS)$|^DAL_CONFIG$")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``dal migrate`` subprocess: no stray DSN overrides, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not _OVERRIDE.match(k)}
    env.update(extra or {})
    return env


class MigEnv:
    """A tmp dal.toml over two shard databases, a migrations dir, and ``dal migrate`` to run on them."""

    def __init__(self, backend: str, root: Path, urls: list[str]) -> None:
        self.backend = backend
        self.root = root
        self.urls = {f"db{i}": u for i, u in enumerate(urls)}
        self.mig_dir = root / "migrations"
        shutil.copytree(REPO_MIGRATIONS, self.mig_dir, ignore=shutil.ignore_patterns("__pycache__"))
        self.config_path = root / "dal.toml"
        self.tables: dict[str, dict[str, Any]] = dict(USERS_ORDERS)
        self._raws: dict[str, Raw] = {}
        self.write_config()

    # -- files ---------------------------------------------------------------------------
    def write_config(self, databases: Mapping[str, str | Mapping[str, Any]] | None = None,
                     tables: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
        if tables is not None:
            self.tables = {**USERS_ORDERS, **tables}
        self.config_path.write_text(toml_config(databases or self.urls, self.tables))
        return self.config_path

    def add_migration(self, filename: str, source: str) -> Path:
        path = self.mig_dir / filename
        path.write_text(source)
        return path

    # -- dal migrate ------------------------------------------------------------------------
    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dal.cli", "migrate", "--config", str(self.config_path),
                "--dir", str(self.mig_dir), *args]

    def cli(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), cwd=self.root, env=clean_env(env), capture_output=True,
                              text=True, timeout=timeout, check=False)

    def ok(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``dal migrate ARGS`` and assert it exits 0."""
        proc = self.cli(*args, env=env)
        assert proc.returncode == 0, f"dal migrate {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def popen(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), cwd=self.root, env=clean_env(env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def migrator(self, **kw: Any) -> Migrator:
        return Migrator(load_config(str(self.config_path), env={}), load_migrations(self.mig_dir), **kw)

    def run(self, direction: Direction, to: int | None = None, **kw: Any) -> list[DatabaseResult]:
        """``Migrator.run`` in-process."""
        return asyncio.run(self.migrator(**kw).run(direction, to))

    def status(self) -> list[DatabaseStatus]:
        """``Migrator.status`` in-process."""
        return asyncio.run(self.migrator().status())

    # -- checks ----------------------------------------------------------------------------
    def raw(self, db: str) -> Raw:
        if db not in self._raws:
            self._raws[db] = Raw(self.urls[db])
        return self._raws[db]

    def close(self) -> None:
        for r in self._raws.values():
            r.close()
        self._raws.clear()

    def user_tables(self, db: str) -> set[str]:
        return self.raw(db).tables() - BOOKKEEPING

    def assert_base_schema(self, *, index: bool = True, versions: Iterable[str] = ("0001", "0002")) -> None:
        """The example schema (migrations 0001, 0002) is exactly what each database holds."""
        for db in ("db0", "db1"):
            raw = self.raw(db)
            assert self.user_tables(db) == EXPECTED_BASE[db], db
            for t in sorted(EXPECTED_BASE[db]):
                slot = t.rsplit("_", 1)[1]
                cols = list(raw.columns(t))
                if t.startswith("users"):
                    assert cols == USERS_COLUMNS, t
                    want = {f"ix_users_email_{slot}": ["email"]} if index else {}
                    assert raw.indexes(t) == want, t
                else:
                    assert cols == ORDERS_COLUMNS, t
                    assert raw.indexes(t) == {}, t
            assert raw.versions() == list(versions), db
            assert raw.step_rows() == 0, db


# --------------------------------------------------------------------------- sessions and processes


def foreign_sessions(env: MigEnv) -> list[str]:
    """The current statement of every session on the env's databases not opened by a :class:`Raw`.

    That is, the sessions of the ``dal migrate`` processes a test started.
    """
    names = [make_url(u).database for u in env.urls.values()]
    raw = env.raw("db0")
    if raw.backend == "postgresql":
        rows = raw.rows("SELECT coalesce(query, '') FROM pg_stat_activity "
                        "WHERE datname = ANY($1::text[]) AND application_name <> $2", names, RAW_APPLICATION)
    else:
        ids = sorted(_MYSQL_RAW_IDS)
        rows = raw.rows(f"SELECT coalesce(info, '') FROM information_schema.processlist "
                        f"WHERE db IN ({', '.join(['%s'] * len(names))}) "
                        f"AND id NOT IN ({', '.join(['%s'] * len(ids))})", *names, *ids)
    return [str(r[0]) for r in rows]


@contextlib.contextmanager
def holding(env: MigEnv, tables: Mapping[str, str]) -> Iterator[None]:
    """Hold ``{database: table}`` so that DDL on those tables waits until the block ends.

    PostgreSQL: ``LOCK TABLE ... ACCESS EXCLUSIVE`` in an open transaction.
    MySQL: an open transaction that read the table (its metadata lock blocks ALTER).
    """
    raws: list[Raw] = []
    try:
        for db, table in tables.items():
            raw = Raw(env.urls[db])
            raws.append(raw)
            if raw.backend == "postgresql":
                raw.execute(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            else:
                raw.execute("BEGIN")
                raw.rows(f"SELECT * FROM {table}")
        yield
    finally:
        for raw in raws:
            with contextlib.suppress(Exception):
                raw.execute("ROLLBACK")
            with contextlib.suppress(Exception):
                raw.close()



def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sigkill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a ``dal migrate`` we started, and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)


def section(output: str, db: str) -> str:
    """The ``--sql`` output block of one shard database."""
    m = re.search(rf"^-- shard database {db}:.*?(?=^-- shard database |\Z)", output, re.S | re.M)
    assert m, f"no section for {db} in:\n{output}"
    return m.group(0)
