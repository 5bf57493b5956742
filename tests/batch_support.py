"""Helpers for the batched-write tests (tests/integration/test_batch*.py).

- Placement computed independently of dal: ``zlib.crc32(str(key).encode()) % 8``,
  slots 0-3 on ``db0``, 4-7 on ``db1``.
- The tests' own shard databases on the shared servers
  (``dal_batch_<pid>_0`` and ``_1``, dropped when the process exits), so they
  share physical tables neither with other tests nor with a concurrent run.
- :class:`Raw`: SQL on the shard databases through SQLAlchemy engines of its
  own (no dal code involved), for counting and reading physical tables.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import subprocess
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from dal import DataLayer
from tests.conftest import _mysql_admin, _pg_admin, backend_url, topology, users_orders_metadata

SHARDS = 8
DBS = ("db0", "db1")
BATCH_DBS = (f"dal_batch_{os.getpid()}_0", f"dal_batch_{os.getpid()}_1")
TABLES: dict[str, Any] = {
    "users": {"shard_key": "id", "table_shards": SHARDS},
    "orders": {"shard_key": "user_id", "table_shards": SHARDS},
}
KEY_COLUMNS = {"users": ("id",), "orders": ("user_id", "order_id")}


def slot_of(shard_value: int | str) -> int:
    return zlib.crc32(str(shard_value).encode()) % SHARDS


def db_of_slot(slot: int) -> str:
    return "db0" if slot < SHARDS // 2 else "db1"


def slots_of_db(db: str) -> range:
    half = SHARDS // 2
    return range(0, half) if db == "db0" else range(half, SHARDS)


def ids_on(pred: Any, n: int, start: int = 1) -> list[int]:
    """The first ``n`` ints from ``start`` whose slot satisfies ``pred(slot)``."""
    out: list[int] = []
    i = start
    while len(out) < n:
        if pred(slot_of(i)):
            out.append(i)
        i += 1
    return out


def expected_batches(shard_values: Iterable[Any], batch_size: int) -> int:
    """Batches a call makes: per physical table, ceil(rows / batch_size)."""
    per_slot = Counter(slot_of(v) for v in shard_values)
    return sum(-(-n // batch_size) for n in per_slot.values())


def written_per_db(shard_values: Iterable[Any]) -> dict[str, int]:
    out: Counter[str] = Counter(db_of_slot(slot_of(v)) for v in shard_values)
    return dict(out)


# --------------------------------------------------------------------------- databases

_created = False


def ensure_databases() -> None:
    """Create the test's shard databases on PostgreSQL and MariaDB (once per process)."""
    global _created
    if _created:
        return
    for db in BATCH_DBS:
        try:
            _pg_admin(f"CREATE DATABASE {db}")
        except subprocess.CalledProcessError as exc:
            if b"already exists" not in exc.stderr:
                raise
        _mysql_admin(f"CREATE DATABASE IF NOT EXISTS {db}")
    _created = True
    atexit.register(_drop_databases)


def _drop_databases() -> None:
    for db in BATCH_DBS:
        with contextlib.suppress(subprocess.CalledProcessError):
            _pg_admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        with contextlib.suppress(subprocess.CalledProcessError):
            _mysql_admin(f"DROP DATABASE IF EXISTS {db}")


def batch_urls(backend: str, tmp_path: Path) -> list[str]:
    if backend == "sqlite":
        return [f"sqlite+aiosqlite:///{tmp_path}/{db}.sqlite3" for db in BATCH_DBS]
    ensure_databases()
    return [backend_url(backend, db) for db in BATCH_DBS]


def make_layer(urls: list[str], tables: dict[str, Any] | None = None, **dal: Any) -> DataLayer:
    cfg = topology(urls, tables or TABLES, **dal)
    return DataLayer(cfg, users_orders_metadata(), env={})


# --------------------------------------------------------------------------- raw SQL


class Raw:
    """Raw SQL on the shard databases ``db0``/``db1`` over engines of its own."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.engines: dict[str, AsyncEngine] = {
            f"db{i}": create_async_engine(u, poolclass=NullPool) for i, u in enumerate(urls)
        }

    async def aclose(self) -> None:
        await asyncio.gather(*(e.dispose() for e in self.engines.values()))

    async def fetch(self, db: str, sql: str) -> list[tuple[Any, ...]]:
        async with self.engines[db].connect() as conn:
            return [tuple(r) for r in (await conn.execute(sa.text(sql))).all()]

    async def execute(self, db: str, sql: str) -> None:
        async with self.engines[db].begin() as conn:
            await conn.execute(sa.text(sql))

    async def tables(self, db: str) -> set[str]:
        def names(sync_conn: Any) -> set[str]:
            return set(sa.inspect(sync_conn).get_table_names())

        async with self.engines[db].connect() as conn:
            return await conn.run_sync(names)

    async def rows(self, table: str, columns: str) -> dict[int, list[tuple[Any, ...]]]:
        """Rows of every physical table of ``table``, by slot (read where the slot lives)."""
        out: dict[int, list[tuple[Any, ...]]] = {}
        for slot in range(SHARDS):
            out[slot] = await self.fetch(db_of_slot(slot), f"SELECT {columns} FROM {table}_{slot}")
        return out

    async def counts(self, table: str) -> dict[int, int]:
        out = {}
        for slot in range(SHARDS):
            out[slot] = int((await self.fetch(db_of_slot(slot), f"SELECT COUNT(*) FROM {table}_{slot}"))[0][0])
        return out

    async def keys(self, table: str) -> Counter[Any]:
        """Every primary key present (tuple for composite keys), each checked to sit in
        the physical table its shard value maps to."""
        cols = KEY_COLUMNS[table]
        out: Counter[Any] = Counter()
        for slot, rows in (await self.rows(table, ", ".join(cols))).items():
            for r in rows:
                assert slot_of(r[0]) == slot, f"{table} key {r} found in {table}_{slot}, belongs in slot {slot_of(r[0])}"
                out[r[0] if len(cols) == 1 else tuple(r)] += 1
        return out

    async def users(self) -> dict[int, dict[str, Any]]:
        """Every users row by id (placement checked)."""
        out: dict[int, dict[str, Any]] = {}
        for slot, rows in (await self.rows("users", "id, name, email, age, active")).items():
            for r in rows:
                assert slot_of(r[0]) == slot
                assert r[0] not in out, f"users id {r[0]} present twice"
                out[r[0]] = {"id": r[0], "name": r[1], "email": r[2], "age": r[3], "active": bool(r[4])}
        return out
