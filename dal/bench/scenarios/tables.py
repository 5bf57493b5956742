"""The bench's tables and data: schemas, rows, topologies, and checks that the rows arrived.

Two logical tables, each sharded on ``id`` (BIGINT primary key):

* ``dal_bench_users`` (``name``, ``email``, ``age``, ``active``), read by the
  read and cache scenarios: :data:`~dal.bench.scenarios.catalog.TABLE_SHARDS`
  physical tables in one shard database, ``rows`` rows;
* ``bench_items`` (``name``, ``amount``, ``flag``), written by the batch
  scenarios: :data:`BULK_SHARDS` physical tables in :data:`BULK_DATABASES`
  shard databases of their own.

Rows are deterministic (built from their id) so that dal and the baselines
see the same values in every run.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dal.errors import BenchError
from dal.layer import DataLayer

USER_COLUMNS = ("id", "name", "email", "age", "active")
KEY_COUNT = 100_000  # length of the pre-generated key sequence of the read scenarios (cycled)

ITEMS_TABLE = "bench_items"
BULK_SHARDS = 8
BULK_DATABASES = 2
ITEM_COLUMNS = ("id", "name", "amount", "flag")

UserRow = tuple[int, str, str, int, bool]


def _keyed_table(name: str, *columns: sa.Column[Any]) -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(name, md, sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False), *columns)
    return md


def users_metadata(table: str) -> sa.MetaData:
    """The users table dal is given (its physical tables are copies of it)."""
    return _keyed_table(
        table,
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("email", sa.String(128)),
        sa.Column("age", sa.Integer),
        sa.Column("active", sa.Boolean, nullable=False),
    )


def items_metadata() -> sa.MetaData:
    """The batch scenarios' table."""
    return _keyed_table(
        ITEMS_TABLE,
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        sa.Column("flag", sa.Boolean, nullable=False),
    )


ITEMS_COPY_DDL = (
    "(id BIGINT PRIMARY KEY, name VARCHAR(50) NOT NULL, amount NUMERIC(12, 2) NOT NULL, flag BOOLEAN NOT NULL)"
)
"""Columns of the baselines' plain copy of the items table (valid on PostgreSQL and MySQL)."""


def orm_class(table_name: str) -> type[Any]:
    """The SQLAlchemy ORM baseline's mapped class, on the physical table the keys live in."""

    class Base(DeclarativeBase):
        pass

    class BenchUser(Base):
        __tablename__ = table_name

        id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(64))
        email: Mapped[str | None] = mapped_column(sa.String(128))
        age: Mapped[int | None] = mapped_column(sa.Integer)
        active: Mapped[bool] = mapped_column(sa.Boolean)

    return BenchUser


def topology(databases: Mapping[str, URL], table: str, shards: int, pool_size: int) -> dict[str, Any]:
    """A topology of primaries only, with ``table`` sharded on ``id`` over ``shards`` physical tables."""
    return {
        "databases": {
            name: {"primary": url.render_as_string(hide_password=False)} for name, url in databases.items()
        },
        "tables": {table: {"shard_key": "id", "table_shards": shards}},
        "pool": {"min_size": 1, "max_size": pool_size},
    }


def user_rows(n: int) -> list[UserRow]:
    """Users ``1 .. n``."""
    return [(i, f"user{i:06d}", f"user{i}@example.com", 18 + i % 70, i % 3 != 0) for i in range(1, n + 1)]


def by_physical_table(layer: DataLayer, table_name: str, rows: Sequence[UserRow]) -> dict[str, list[UserRow]]:
    """``rows`` grouped by the physical table dal places each in."""
    table = layer.tables[table_name]
    out: dict[str, list[UserRow]] = {p.table: [] for p in table.placements}
    for row in rows:
        out[table.place(row[0]).table].append(row)
    return out


def read_keys(rows: Sequence[UserRow], seed: int) -> list[int]:
    """:data:`KEY_COUNT` ids drawn (seeded) from ``rows``: the read scenarios' key sequence."""
    return random.Random(seed).choices([r[0] for r in rows], k=KEY_COUNT)


def item_rows(n: int, *, version: int = 0, step: int = 1) -> list[dict[str, Any]]:
    """Items with ids ``step, 2*step, ...`` up to ``n``; ``version`` changes every non-key value."""
    return [
        {
            "id": i,
            "name": f"item{i:08d}" if version == 0 else f"item{i:08d}-v{version}",
            "amount": Decimal((i * 7 + version) % 10_000_000) / 100,
            "flag": (i + version) % 2 == 0,
        }
        for i in range(step, n + 1, step)
    ]


def as_tuples(rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """Item dicts as the drivers' tuples, in :data:`ITEM_COLUMNS` order."""
    return [tuple(r[c] for c in ITEM_COLUMNS) for r in rows]


async def check_row(name: str, op: Callable[[Any], Awaitable[object]], key: int, row_id: Callable[[Any], object]) -> None:
    """Raise :class:`BenchError` unless ``op(key)`` returns the row with id ``key``.

    Run before timing, so that no contender is measured doing something else.
    """
    got = await op(key)
    if got is None or row_id(got) != key:
        raise BenchError(f"{name}: expected the row with id {key}, got {got!r}")


def expect_rows(name: str, got: int, want: int) -> None:
    """Raise :class:`BenchError` unless a load left ``want`` rows."""
    if got != want:
        raise BenchError(f"{name}: expected {want:,} rows after the load, found {got:,}")
