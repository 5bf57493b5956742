"""upsert_many on PostgreSQL 15+: MERGE, and the ON CONFLICT replay when a key is inserted concurrently.

MERGE matches the staged rows against the table once, at its snapshot; a key
that another transaction inserts after that snapshot makes MERGE's INSERT fail
with a unique violation, where INSERT ... ON CONFLICT would have updated the
row. dal rolls the MERGE back to a savepoint and replays the batch with ON
CONFLICT, so users see upsert semantics either way. The race is made
deterministic: another transaction holds an uncommitted insert of the key,
so MERGE's insert waits on it, and commits once dal is seen waiting.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from dal import DataLayer
from tests.batch_support import Raw, ids_on, slot_of

only_pg = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


def user(i: int, name: str) -> dict[str, Any]:
    return {"id": i, "name": name, "email": None, "age": 30, "active": True}


async def _pg(url: str) -> asyncpg.Connection:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)


@only_pg
async def test_upsert_many_overwrites_and_inserts(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    ids = list(range(1, 401))
    await users.insert_many([user(i, "old") for i in ids[::2]])
    res = await users.upsert_many([user(i, f"new{i}") for i in ids])
    assert res.ok and res.committed == 400
    got = await users.get_many(ids)
    assert {k: r["name"] for k, r in got.items()} == {i: f"new{i}" for i in ids}


@only_pg
async def test_key_inserted_concurrently_is_updated_not_a_duplicate(lay: DataLayer, urls: list[str], raw: Raw) -> None:
    users = lay.repository("users")
    # keys of one physical table on db0, so the racing insert and the batch meet
    ids = ids_on(lambda s: s == 0, 20)  # slot 0 lives on db0
    racing = ids[5]
    table = f"users_{slot_of(racing)}"
    other = await _pg(urls[0])
    watcher = await _pg(urls[0])
    try:
        assert (await other.fetchval("SELECT to_regclass($1)", table)) is not None, table
        tx = other.transaction()
        await tx.start()
        await other.execute(
            f'INSERT INTO "{table}" (id, name, active) VALUES ($1, $2, true)', racing, "inserted concurrently"
        )
        task = asyncio.create_task(users.upsert_many([user(i, f"upserted{i}") for i in ids]))
        # wait until dal's statement is blocked on the uncommitted key
        for _ in range(200):
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            if waiting:
                break
            await asyncio.sleep(0.025)
        assert waiting, "the batch never waited on the concurrent insert"
        await tx.commit()
        res = await asyncio.wait_for(task, 30)
    finally:
        await other.close()
        await watcher.close()
    assert res.ok, res.failures
    assert res.committed == len(ids)
    got = await users.get_many(ids, primary=True)
    assert {k: r["name"] for k, r in got.items()} == {i: f"upserted{i}" for i in ids}
