"""Shared fixtures: where the test servers are, and layers over 2 shard databases.

Servers come from ``DAL_TEST_PG_URL``, ``DAL_TEST_MYSQL_URL`` and
``DAL_TEST_REDIS_URL`` (defaults: the loopback services). ``make test`` runs
``scripts/ensure_services.py`` first, so a missing server fails there, by
name; these fixtures never skip.

Each backend gets two shard databases of its own (``dal_test_0`` and
``dal_test_1``, created on the server if missing; files in a temp dir for
SQLite), and each test gets freshly created physical tables.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from dal import DataLayer

PG_URL = os.environ.get("DAL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("DAL_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("DAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

BACKENDS = ("sqlite", "postgresql", "mysql")
SHARD_DBS = ("dal_test_0", "dal_test_1")


def _pg_admin(sql: str) -> None:
    url = make_url(PG_URL)
    env = dict(os.environ, PGPASSWORD=url.password or "")
    subprocess.run(
        ["psql", "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432), "-U", url.username or "postgres",
         "-d", url.database or "postgres", "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
        check=True, env=env, capture_output=True,
    )


def _mysql_admin(sql: str) -> None:
    url = make_url(MYSQL_URL)
    cmd = ["mariadb", "-h", url.host or "127.0.0.1", "-P", str(url.port or 3306), "-u", url.username or "root"]
    if url.password:
        cmd.append(f"-p{url.password}")
    subprocess.run([*cmd, "-e", sql], check=True, capture_output=True)


def backend_url(backend: str, database: str) -> str:
    """A SQLAlchemy URL for ``database`` on the test server of ``backend``."""
    if backend == "postgresql":
        return make_url(PG_URL).set(drivername="postgresql+asyncpg", database=database).render_as_string(hide_password=False)
    if backend == "mysql":
        return make_url(MYSQL_URL).set(drivername="mysql+aiomysql", database=database).render_as_string(hide_password=False)
    raise ValueError(backend)


@pytest.fixture(scope="session")
def server_databases() -> Iterator[None]:
    """Create the shard databases on PostgreSQL and MariaDB once per session."""
    for db in SHARD_DBS:
        try:
            _pg_admin(f"CREATE DATABASE {db}")
        except subprocess.CalledProcessError as exc:
            if b"already exists" not in exc.stderr:
                raise
        _mysql_admin(f"CREATE DATABASE IF NOT EXISTS {db}")
    yield


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def shard_urls(backend: str, tmp_path: Path, server_databases: None) -> list[str]:
    """Primary URLs of the two shard databases of ``backend``."""
    if backend == "sqlite":
        return [f"sqlite+aiosqlite:///{tmp_path}/{db}.sqlite3" for db in SHARD_DBS]
    return [backend_url(backend, db) for db in SHARD_DBS]


def topology(urls: list[str], tables: dict[str, Any], **dal: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "databases": {f"db{i}": {"primary": u} for i, u in enumerate(urls)},
        "tables": tables,
        "pool": {"min_size": 0, "max_size": 8},
    }
    if dal:
        cfg["dal"] = dal
    return cfg


def users_orders_metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "users", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("email", sa.String(128)),
        sa.Column("age", sa.Integer),
        sa.Column("active", sa.Boolean, nullable=False, default=True),
    )
    sa.Table(
        "orders", md,
        sa.Column("user_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("order_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        sa.Column("note", sa.Text),
    )
    sa.Table(
        "countries", md,
        sa.Column("code", sa.String(2), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
    )
    return md


USERS_ORDERS_TABLES: dict[str, Any] = {
    "users": {"shard_key": "id", "table_shards": 4},
    "orders": {"shard_key": "user_id", "table_shards": 4},
    "countries": {"database": "db0"},
}


@pytest.fixture
async def layer(shard_urls: list[str]) -> AsyncIterator[DataLayer]:
    """A started layer over 2 shard databases x 4 table shards, with fresh tables."""
    async with DataLayer(topology(shard_urls, USERS_ORDERS_TABLES), users_orders_metadata(), env={}) as lay:
        await lay.drop_all()
        await lay.create_all()
        yield lay
        await lay.drop_all()


@pytest.fixture
def make_layer(shard_urls: list[str]) -> Iterator[Callable[..., DataLayer]]:
    """Build extra layers over the same shard databases (closed by the caller)."""

    def make(tables: dict[str, Any] | None = None, metadata: sa.MetaData | None = None, **dal: Any) -> DataLayer:
        return DataLayer(
            topology(shard_urls, tables or USERS_ORDERS_TABLES, **dal),
            metadata or users_orders_metadata(),
            env={},
        )

    yield make
