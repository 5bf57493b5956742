"""A key is located once: a cold cached get probes L1 once, and loads from the slot its
cache bytes give (SQLite files, cache in L1 only: nothing but dal's own counters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dal import DataLayer
from tests.cache_support import cache_topology, unique_namespace

pytestmark = pytest.mark.integration


def metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table("ints", md, sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False), sa.Column("v", sa.Text))
    sa.Table("strs", md, sa.Column("id", sa.String(40), primary_key=True), sa.Column("v", sa.Text))
    sa.Table(
        "pairs", md,
        sa.Column("a", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("b", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("v", sa.Text),
    )  # fmt: skip
    return md


TABLES: dict[str, Any] = {
    "ints": {"shard_key": "id", "table_shards": 8, "cache": True},
    "strs": {"shard_key": "id", "table_shards": 8, "cache": True},
    "pairs": {"shard_key": "a", "table_shards": 8, "cache": True},
}


@pytest.mark.parametrize(
    ("table", "rows", "key"),
    [
        ("ints", [{"id": i, "v": str(i)} for i in range(50)], 37),
        ("strs", [{"id": f"k{i}", "v": str(i)} for i in range(50)], "k37"),
        ("pairs", [{"a": i, "b": i % 3, "v": str(i)} for i in range(50)], (37, 1)),
    ],
)
async def test_cold_cached_get_probes_l1_once_and_loads_the_right_row(
    tmp_path: Path, table: str, rows: list[dict[str, Any]], key: Any
) -> None:
    urls = [f"sqlite+aiosqlite:///{tmp_path}/db{i}.sqlite3" for i in range(2)]
    async with DataLayer(cache_topology(urls, TABLES, redis=None, namespace=unique_namespace()), metadata(), env={}) as layer:
        await layer.create_all()
        repo = layer.repository(table)
        await repo.insert_many(rows)
        l1 = layer.cache_of(table).l1  # type: ignore[union-attr]
        want = next(r for r in rows if layer.tables[table].key_of(r) == key)
        for k in [layer.tables[table].key_of(r) for r in rows]:  # every slot, cold
            misses, hits = l1.misses, l1.hits
            got = await repo.get(k)
            assert got == next(r for r in rows if layer.tables[table].key_of(r) == k)
            assert (l1.misses - misses, l1.hits - hits) == (1, 0)  # one probe, a miss
            assert await repo.get(k) == got and l1.hits - hits == 1  # then a hit
        assert await repo.get(key) == want
