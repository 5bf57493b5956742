"""insert_many / upsert_many / update_many / delete_many on every backend.

Two shard databases x 8 table shards (``users``: key ``id``; ``orders``: key
``(user_id, order_id)``, sharded by ``user_id``). Every check of what landed
where is raw SQL on each physical table, with the slot recomputed per row as
``zlib.crc32(str(key).encode()) % 8`` (slots 0-3 on db0, 4-7 on db1).
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from dal import (
    CrossShardTransactionError,
    DataLayer,
    DuplicateKeyError,
    InputError,
    ShardKeyError,
    UnknownColumnError,
    ValidationError,
)
from dal.batch import BatchError, BatchResult
from tests.batch_support import (
    DBS,
    SHARDS,
    Raw,
    db_of_slot,
    expected_batches,
    ids_on,
    slot_of,
    written_per_db,
)
from tests.conftest import topology


async def reset(layer: DataLayer) -> None:
    await layer.drop_all()
    await layer.create_all()


def user(i: int, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"id": i, "name": f"n{i}", "email": None, "age": abs(i) % 100, "active": i % 2 == 0}
    row.update(over)
    return row


def chunks_by_slot(ids: list[Any], batch_size: int) -> dict[int, list[list[Any]]]:
    """The batches a call makes: per slot, the slot's keys in input order, in chunks."""
    per: dict[int, list[Any]] = {}
    for k in ids:
        per.setdefault(slot_of(k[0] if isinstance(k, tuple) else k), []).append(k)
    return {s: [ks[i : i + batch_size] for i in range(0, len(ks), batch_size)] for s, ks in per.items()}


def summary(res: BatchResult) -> dict[str, Any]:
    return {
        "rows": res.rows,
        "batches": res.batches,
        "committed_batches": res.committed_batches,
        "written": dict(res.written),
        "affected": res.affected,
        "failures": sorted(
            (f.table, f.database, sorted(f.keys), f.failed_keys, type(f.error).__name__) for f in res.failures
        ),
    }


def assert_adds_up(res: BatchResult, *, atomic: bool = False) -> None:
    if atomic:  # one transaction: a failure is one entry holding every row
        assert res.committed_batches in (0, res.batches)
        assert len(res.failures) == (res.committed_batches == 0)
    else:
        assert res.batches == res.committed_batches + len(res.failures)
    failed_rows = sum(len(f.keys) for f in res.failures)
    assert res.committed + failed_rows == res.rows
    assert res.committed == sum(res.written.values())


# --------------------------------------------------------------------------- 100,000 rows


ROWS_100K = {"postgresql": 100_000, "mysql": 100_000, "sqlite": 100_000}


async def test_100k_rows_each_once_in_its_physical_table(backend: str, lay: DataLayer, raw: Raw) -> None:
    n = ROWS_100K[backend]
    # Mostly consecutive ids, plus negative and 63-bit ones.
    ids = list(range(1, n - 1000 + 1)) + [-(i * 104_729) for i in range(1, 501)] + [2**62 + i for i in range(500)]
    assert len(set(ids)) == n
    users = lay.repository("users")
    t0 = time.monotonic()
    res = await users.insert_many([user(i) for i in ids], batch_size=1000)
    elapsed = time.monotonic() - t0

    assert res.ok and res.failures == []
    assert res.rows == n
    assert res.batches == expected_batches(ids, 1000) == res.committed_batches
    assert res.written == written_per_db(ids)
    assert res.committed == n and res.affected == n
    assert_adds_up(res)

    # Raw SQL: each physical table holds exactly the rows whose CRC32 maps to it.
    seen: dict[int, int] = {}
    for slot, rows in (await raw.rows("users", "id, name, age")).items():
        for rid, name, age in rows:
            assert slot_of(rid) == slot, f"id {rid} in users_{slot}"
            assert rid not in seen, f"id {rid} in users_{seen[rid]} and users_{slot}"
            seen[rid] = slot
            assert (name, age) == (f"n{rid}", abs(rid) % 100)
    assert set(seen) == set(ids)
    # Each shard database holds only its own 4 physical tables.
    for db in DBS:
        tables = {t for t in await raw.tables(db) if t.startswith("users_")}
        assert tables == {f"users_{s}" for s in range(SHARDS) if db_of_slot(s) == db}
    print(f"{backend}: {n} rows in {elapsed:.2f}s")


# --------------------------------------------------------------------------- duplicates


async def test_duplicate_already_in_table_fails_only_its_batch(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    ids = list(range(1, 1001))
    dup = 437
    batch_size = 50
    chunks = chunks_by_slot(ids, batch_size)
    dup_slot = slot_of(dup)
    dup_batch = next(c for c in chunks[dup_slot] if dup in c)

    async def run(raise_on_error: bool) -> BatchResult:
        await users.insert(user(dup, name="pre-existing"))
        if raise_on_error:
            with pytest.raises(BatchError) as ei:
                await users.insert_many([user(i) for i in ids], batch_size=batch_size)
            assert f"users_{dup_slot}" in str(ei.value)
            return ei.value.result
        return await users.insert_many([user(i) for i in ids], batch_size=batch_size, raise_on_error=False)

    results = []
    for raise_on_error in (True, False):
        await reset(lay)
        res = await run(raise_on_error)
        results.append(res)
        assert len(res.failures) == 1
        f = res.failures[0]
        assert (f.table, f.database) == (f"users_{dup_slot}", db_of_slot(dup_slot))
        assert isinstance(f.error, DuplicateKeyError)
        assert f.failed_keys == [dup] and res.failed_keys == [dup]
        assert f.keys == dup_batch
        assert res.rows == 1000
        assert res.batches == expected_batches(ids, batch_size)
        assert res.committed_batches == res.batches - 1
        ok_ids = [i for i in ids if i not in dup_batch]
        assert res.written == written_per_db(ok_ids)
        assert res.affected == len(ok_ids)
        assert_adds_up(res)
        # Raw: every other batch committed, the failed batch left nothing, the old row stays.
        present = await raw.users()
        assert set(present) == {*ok_ids, dup}
        assert present[dup]["name"] == "pre-existing"
    assert summary(results[0]) == summary(results[1])


async def test_duplicate_is_named_with_one_fanout_permit(lay: DataLayer, urls: list[str]) -> None:
    """With fanout_concurrency=1 the lookup of a failed batch's culprit keys needs the
    only permit: the batch gives it back first (else the call would never return)."""
    from tests.batch_support import make_layer

    dup = 437
    await lay.repository("users").insert(user(dup, name="pre-existing"))
    async with make_layer(urls, fanout_concurrency=1) as one:
        res = await asyncio.wait_for(
            one.repository("users").insert_many([user(i) for i in range(1, 1001)], batch_size=50, raise_on_error=False),
            30,
        )
    assert [f.failed_keys for f in res.failures] == [[dup]]
    assert res.committed == 1000 - len(res.failures[0].keys)


async def test_duplicate_inside_the_input_fails_only_its_batch(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    batch_size = 100
    ids = list(range(1, 1001))
    dup = 612
    # A second row with the same key right after the first: same physical table, same batch.
    at = ids.index(dup)
    rows = [user(i) for i in ids]
    rows.insert(at + 1, user(dup, name="again"))
    keys = [r["id"] for r in rows]
    chunks = chunks_by_slot(keys, batch_size)
    dup_batch = next(c for c in chunks[slot_of(dup)] if dup in c)
    assert dup_batch.count(dup) == 2

    with pytest.raises(BatchError) as ei:
        await users.insert_many(rows, batch_size=batch_size)
    res = ei.value.result
    assert len(res.failures) == 1
    f = res.failures[0]
    assert (f.table, f.database) == (f"users_{slot_of(dup)}", db_of_slot(slot_of(dup)))
    assert isinstance(f.error, DuplicateKeyError)
    assert f.failed_keys == [dup]
    assert f.keys == dup_batch
    assert res.rows == 1001
    assert res.committed_batches == res.batches - 1 == expected_batches(keys, batch_size) - 1
    ok = [k for k in keys if k not in dup_batch]
    assert res.written == written_per_db(ok)
    assert_adds_up(res)
    present = await raw.users()
    assert set(present) == set(ok)

    # The same rows with raise_on_error=False: the same result.
    await reset(lay)
    res2 = await users.insert_many(rows, batch_size=batch_size, raise_on_error=False)
    assert summary(res2) == summary(res)


async def test_atomic_on_one_database_is_all_or_nothing(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    on_db0 = ids_on(lambda s: db_of_slot(s) == "db0", 400)
    dup = on_db0[333]
    await users.insert(user(dup, name="pre-existing"))
    with pytest.raises(BatchError) as ei:
        await users.insert_many([user(i) for i in on_db0], batch_size=25, atomic=True)
    res = ei.value.result
    assert res.committed == 0 and res.committed_batches == 0 and res.written == {}
    assert len(res.failures) == 1 and res.failures[0].database == "db0"
    assert isinstance(res.failures[0].error, DuplicateKeyError)
    assert res.failures[0].failed_keys == [dup]
    assert sorted(res.failures[0].keys) == sorted(on_db0)
    assert res.batches == expected_batches(on_db0, 25)
    assert_adds_up(res, atomic=True)
    assert set(await raw.users()) == {dup}

    await users.delete(dup)
    res = await users.insert_many([user(i) for i in on_db0], batch_size=25, atomic=True)
    assert res.ok and res.written == {"db0": 400} and res.committed_batches == res.batches
    assert_adds_up(res, atomic=True)
    assert set(await raw.users()) == set(on_db0)


async def test_atomic_across_databases_raises_before_any_write(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    ids = list(range(1, 201))
    assert {db_of_slot(slot_of(i)) for i in ids} == {"db0", "db1"}
    for op in ("insert_many", "upsert_many"):
        with pytest.raises(CrossShardTransactionError):
            await getattr(users, op)([user(i) for i in ids], atomic=True, raise_on_error=False)
    with pytest.raises(CrossShardTransactionError):
        await users.delete_many(ids, atomic=True)
    assert sum((await raw.counts("users")).values()) == 0


# --------------------------------------------------------------------------- upsert / update / delete


async def test_upsert_many_inserts_and_overwrites_only_given_columns(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    old = list(range(1, 201))
    await users.insert_many([user(i, name=f"old{i}", email=f"e{i}", age=7, active=False) for i in old])
    new = list(range(1001, 1101))
    rows: list[dict[str, Any]] = [{"id": i, "name": f"new{i}"} for i in old[:100]]
    rows += [{"id": i, "name": f"fresh{i}"} for i in new]
    # Duplicates within the input, far apart (different batches of one table): the last wins.
    rows += [{"id": 5, "name": "last5"}, {"id": 1001, "name": "last1001"}]
    res = await users.upsert_many(rows, batch_size=7)
    assert res.ok and res.rows == len(rows) and res.committed == len(rows)
    assert_adds_up(res)

    got = await raw.users()
    assert set(got) == {*old, *new}
    for i in old[:100]:
        want = "last5" if i == 5 else f"new{i}"
        # Only the given column changed: email, age and the defaulted `active` kept.
        assert got[i] == {"id": i, "name": want, "email": f"e{i}", "age": 7, "active": False}, got[i]
    for i in old[100:]:
        assert got[i] == {"id": i, "name": f"old{i}", "email": f"e{i}", "age": 7, "active": False}
    for i in new:
        want = "last1001" if i == 1001 else f"fresh{i}"
        assert got[i] == {"id": i, "name": want, "email": None, "age": None, "active": True}, got[i]

    # Duplicates inside one batch, with different columns: applied in order.
    res = await users.upsert_many(
        [{"id": 7, "name": "a", "age": 1}, {"id": 7, "name": "b"}, {"id": 7, "email": "x@y", "name": "c"}]
    )
    assert res.ok
    assert (await raw.users())[7] == {"id": 7, "name": "c", "email": "x@y", "age": 1, "active": False}


async def test_update_many_counts_only_existing_rows(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    existing = list(range(1, 301))
    await users.insert_many([user(i, email=f"e{i}") for i in existing])
    missing = list(range(5001, 5051))
    rows: list[dict[str, Any]] = [{"id": i, "name": f"upd{i}"} for i in existing[:150]]
    rows += [{"id": i, "age": 99, "active": True} for i in existing[150:200]]
    rows += [{"id": i, "name": "ghost"} for i in missing]
    res = await users.update_many(rows, batch_size=16)
    assert res.ok and res.rows == len(rows)
    assert res.affected == 200
    assert_adds_up(res)
    got = await raw.users()
    assert set(got) == set(existing)  # missing keys were not created
    for i in existing[:150]:
        assert got[i] == {**user(i, email=f"e{i}"), "name": f"upd{i}"}
    for i in existing[150:200]:
        assert got[i] == {**user(i, email=f"e{i}"), "age": 99, "active": True}
    for i in existing[200:]:
        assert got[i] == user(i, email=f"e{i}")

    # Atomic on one database, several batches per physical table: counts still exact.
    on_db1 = [i for i in existing if db_of_slot(slot_of(i)) == "db1"]
    res = await users.update_many(
        [{"id": i, "age": 55} for i in on_db1] + [{"id": ids_on(lambda s: s == 7, 1, 10**9)[0], "age": 1}],
        batch_size=5,
        atomic=True,
    )
    assert res.ok and res.affected == len(on_db1)
    got = await raw.users()
    assert all(got[i]["age"] == 55 for i in on_db1)

    # Duplicate keys in the input: the last value wins.
    res = await users.update_many([{"id": 3, "age": 1}, {"id": 3, "age": 2}, {"id": 3, "age": 3}])
    assert res.ok
    assert (await raw.users())[3]["age"] == 3


async def test_delete_many_counts_deleted_rows(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    existing = list(range(1, 501))
    await users.insert_many([user(i) for i in existing])
    gone = existing[::3]
    res = await users.delete_many([*gone, *range(9001, 9101)], batch_size=40)
    assert res.ok and res.rows == len(gone) + 100
    assert res.affected == len(gone)
    assert_adds_up(res)
    assert set(await raw.users()) == set(existing) - set(gone)

    on_db0 = [i for i in existing if i not in gone and db_of_slot(slot_of(i)) == "db0"]
    res = await users.delete_many(on_db0, batch_size=9, atomic=True)
    assert res.ok and res.affected == len(on_db0)
    assert set(await raw.users()) == set(existing) - set(gone) - set(on_db0)


async def order_rows(raw: Raw) -> dict[tuple[int, int], tuple[Decimal, str | None]]:
    """(user_id, order_id) -> (amount, note); SQLite's NUMERIC comes back as a float."""
    out = {}
    for rs in (await raw.rows("orders", "user_id, order_id, amount, note")).values():
        for u, o, amount, note in rs:
            out[(u, o)] = (Decimal(str(amount)).quantize(Decimal("0.01")), note)
    return out


async def test_composite_keys(lay: DataLayer, raw: Raw) -> None:
    orders = lay.repository("orders")
    keys = [(u, o) for u in range(1, 121) for o in range(1, 6)]  # 600 orders of 120 users
    res = await orders.insert_many(
        [{"user_id": u, "order_id": o, "amount": Decimal(f"{u}.{o:02d}"), "note": f"o{u}-{o}"} for u, o in keys],
        batch_size=33,
    )
    assert res.ok and res.committed == 600
    assert res.batches == expected_batches([u for u, _ in keys], 33)
    assert res.written == written_per_db([u for u, _ in keys])
    assert_adds_up(res)
    present = await raw.keys("orders")  # placement checked per row
    assert present == dict.fromkeys(keys, 1)

    # Duplicate composite key already present: that key alone is named.
    res = await orders.insert_many(
        [{"user_id": 500, "order_id": 1, "amount": Decimal(1)}, {"user_id": 7, "order_id": 3, "amount": Decimal(1)}],
        raise_on_error=False,
    )
    assert [f.failed_keys for f in res.failures] == [[(7, 3)]]
    assert res.written == written_per_db([500])

    # Upsert: overwrite amount only (note kept); new keys inserted; last duplicate wins.
    res = await orders.upsert_many(
        [{"user_id": u, "order_id": 1, "amount": Decimal("9.99")} for u in range(1, 121)]
        + [{"user_id": 999, "order_id": 1, "amount": Decimal("1.00")}, {"user_id": 999, "order_id": 1, "amount": Decimal("2.50")}],
        batch_size=10,
    )
    assert res.ok and res.rows == 122
    rows = await order_rows(raw)
    for u in range(1, 121):
        assert rows[(u, 1)] == (Decimal("9.99"), f"o{u}-1")
        assert rows[(u, 2)] == (Decimal(f"{u}.02"), f"o{u}-2")
    assert rows[(999, 1)] == (Decimal("2.50"), None)

    # Update: matched rows only.
    res = await orders.update_many(
        [{"user_id": u, "order_id": 2, "note": "upd"} for u in range(1, 61)]
        + [{"user_id": u, "order_id": 77, "note": "ghost"} for u in range(1, 11)],
        batch_size=8,
    )
    assert res.ok and res.affected == 60
    rows = await order_rows(raw)
    assert all(rows[(u, 2)][1] == "upd" for u in range(1, 61))
    assert all(rows[(u, 2)][1] == f"o{u}-2" for u in range(61, 121))
    assert not any(o == 77 for _, o in rows)

    # Delete by tuple keys.
    gone = [(u, 3) for u in range(1, 121)] + [(u, 42) for u in range(1, 21)]
    res = await orders.delete_many(gone, batch_size=13)
    assert res.ok and res.affected == 120
    present = await raw.keys("orders")
    assert set(present) == ({*keys, (500, 1), (999, 1)} - set(gone))


# --------------------------------------------------------------------------- bad input


BAD_USERS: list[tuple[str, str, dict[str, Any], type[InputError], str]] = [
    # (op, label, bad row, error class, field named)
    ("insert_many", "missing shard key", {"name": "x"}, ValidationError, "id"),
    ("insert_many", "wrong type", {"id": 5, "name": "x", "age": "old"}, ValidationError, "age"),
    ("insert_many", "bool as int key", {"id": True, "name": "x"}, ValidationError, "id"),
    ("insert_many", "unknown column", {"id": 5, "name": "x", "nickname": "y"}, UnknownColumnError, "nickname"),
    ("insert_many", "oversized", {"id": 5, "name": "x" * 65}, ValidationError, "name"),
    ("insert_many", "NOT NULL missing", {"id": 5, "email": "a@b"}, ValidationError, "name"),
    ("insert_many", "NOT NULL given None", {"id": 5, "name": None}, ValidationError, "name"),
    ("insert_many", "out of range", {"id": 2**63, "name": "x"}, ValidationError, "id"),
    ("upsert_many", "missing shard key", {"name": "x"}, ValidationError, "id"),
    ("upsert_many", "oversized", {"id": 5, "name": "y" * 200}, ValidationError, "name"),
    ("upsert_many", "unknown column", {"id": 5, "name": "x", "bogus": 1}, UnknownColumnError, "bogus"),
    ("update_many", "missing key", {"name": "x"}, ValidationError, "id"),
    ("update_many", "wrong type", {"id": 5, "active": "yes"}, ValidationError, "active"),
    ("update_many", "unknown column", {"id": 5, "bogus": 1}, UnknownColumnError, "bogus"),
    ("update_many", "NULL into NOT NULL", {"id": 5, "name": None}, ValidationError, "name"),
    ("update_many", "oversized", {"id": 5, "email": "e" * 129}, ValidationError, "email"),
    ("delete_many", "wrong key type", "5", ValidationError, "id"),
    ("delete_many", "None key", None, ShardKeyError, "id"),
]


async def test_bad_rows_rejected_before_any_io(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    base = list(range(1, 1001))
    await users.insert_many([user(i) for i in base])
    before = await raw.users()
    for op, label, bad, exc_type, fld in BAD_USERS:
        for at in (0, 517, 999):
            if op == "delete_many":
                items: list[Any] = [*range(20_001, 21_000)]
            elif op == "update_many":
                items = [{"id": i, "name": f"changed{i}"} for i in base[:999]]
            else:
                items = [user(i, name=f"changed{i}") for i in range(20_001, 21_000)]
            if op == "upsert_many":
                items = [user(i, name=f"changed{i}") for i in base[:999]]
            items.insert(at, bad)
            with pytest.raises(exc_type) as ei:
                await getattr(users, op)(items, batch_size=100)
            msg = str(ei.value)
            assert f"row {at}" in msg, f"{op} {label}: {msg}"
            assert fld in msg, f"{op} {label}: {msg}"
        # Nothing was written: the physical tables hold exactly what they held.
        assert await raw.users() == before, f"{op} {label}"

    orders = lay.repository("orders")
    good = [{"user_id": u, "order_id": 1, "amount": Decimal(1)} for u in range(1, 300)]
    for bad, fld in (
        ({"order_id": 1, "amount": Decimal(1)}, "user_id"),
        ({"user_id": 1, "order_id": 2}, "amount"),
        ({"user_id": 1, "order_id": 2, "amount": Decimal("1e12")}, "amount"),
        ({"user_id": 1, "order_id": 2, "amount": "12"}, "amount"),
    ):
        with pytest.raises(ValidationError) as ei:
            await orders.insert_many([*good[:150], bad, *good[150:]])
        assert "row 150" in str(ei.value) and fld in str(ei.value), str(ei.value)
    with pytest.raises(ValidationError) as ei:
        await orders.delete_many([(1, 1), (2, 1), 3])
    assert "row 2" in str(ei.value)
    assert sum((await raw.counts("orders")).values()) == 0


async def test_row_key_order_does_not_matter(lay: DataLayer, raw: Raw) -> None:
    """Rows whose keys come in another order than the declared columns (positional
    parameters must still land in the right columns)."""
    users = lay.repository("users")
    res = await users.insert_many(
        [{"age": i, "email": f"e{i}", "active": False, "name": f"n{i}", "id": i} for i in range(1, 301)], batch_size=64
    )
    assert res.ok
    res = await users.upsert_many([{"email": f"new{i}", "id": i} | ({"name": "x"}) for i in range(1, 301, 2)])
    assert res.ok
    got = await raw.users()
    for i in range(1, 301):
        email = f"new{i}" if i % 2 else f"e{i}"
        name = "x" if i % 2 else f"n{i}"
        assert got[i] == {"id": i, "name": name, "email": email, "age": i, "active": False}, got[i]


def tags_metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "tags", md,
        sa.Column("code", sa.String(32), primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("touched", sa.Integer, onupdate=7),
    )
    return md


async def test_string_shard_keys(urls: list[str], raw: Raw) -> None:
    """A str shard key: a lone surrogate cannot be hashed (rejected naming the row);
    update_many applies Column(onupdate=...) like Repository.update."""
    cfg = topology(urls, {"tags": {"shard_key": "code", "table_shards": SHARDS}})
    async with DataLayer(cfg, tags_metadata(), env={}) as layer:
        await layer.drop_all()
        await layer.create_all()
        try:
            tags = layer.repository("tags")
            codes = [f"c{i}" for i in range(200)]
            res = await tags.insert_many([{"code": c, "n": 1} for c in codes])
            assert res.ok and res.written == written_per_db(codes)
            for slot, rows in (await raw.rows("tags", "code")).items():
                assert all(slot_of(c) == slot for (c,) in rows)
            bad = "x\ud800"
            for op, items in (
                ("insert_many", [*({"code": f"d{i}", "n": 1} for i in range(50)), {"code": bad, "n": 1}]),
                ("upsert_many", [*({"code": c, "n": 2} for c in codes[:50]), {"code": bad, "n": 1}]),
                ("update_many", [*({"code": c, "n": 2} for c in codes[:50]), {"code": bad, "n": 1}]),
                ("delete_many", [*codes[:50], bad]),
                ("insert_many", [*({"code": f"d{i}", "n": 1} for i in range(50)), {"code": b"bytes", "n": 1}]),
            ):
                with pytest.raises(InputError) as ei:
                    await getattr(tags, op)(items)
                assert "row 50" in str(ei.value) and "code" in str(ei.value), (op, str(ei.value))
            assert sum((await raw.counts("tags")).values()) == 200

            res = await tags.update_many([{"code": c, "n": 5} for c in codes[:20]])
            assert res.ok and res.affected == 20
            got = {c: (n, t) for rows in (await raw.rows("tags", "code, n, touched")).values() for c, n, t in rows}
            assert all(got[c] == (5, 7) for c in codes[:20]) and all(got[c] == (1, None) for c in codes[20:])
        finally:
            await layer.drop_all()


async def test_at_most_two_batches_in_flight_per_shard_database(
    backend: str, lay: DataLayer, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 physical tables on 2 databases, batches of 50: at most STREAMS_PER_DATABASE (2)
    batches of one database send their rows at a time, the databases at the same time;
    a batch waiting for its COMMIT does not hold up the next. (SQLite has one writer:
    a second batch waits at BEGIN IMMEDIATE until the first has committed.)"""
    from dal.batch.dialects import BatchSql
    from dal.batch.running import BatchRunner, _Streams

    sending: dict[str, int] = dict.fromkeys(DBS, 0)
    most: dict[str, int] = dict.fromkeys(DBS, 0)
    both = [0]
    committing: dict[str, int] = dict.fromkeys(DBS, 0)
    busy = [0]  # most batches of one database sending or committing at once
    apply, commit = BatchSql.apply, BatchRunner._commit

    async def spy_apply(self: BatchSql, op: Any, conn: Any, node: Any, b: Any) -> int:
        db = b.target.database
        sending[db] += 1
        most[db] = max(most[db], sending[db])
        both[0] = max(both[0], sum(1 for n in sending.values() if n))
        busy[0] = max(busy[0], sending[db] + committing[db])
        try:
            await asyncio.sleep(0.01)  # a batch takes a while to send (then streams overlap by design, not by luck)
            return await apply(self, op, conn, node, b)
        finally:
            sending[db] -= 1

    async def spy_commit(self: BatchRunner, conn: Any, node: Any, op: Any, batches: Any) -> None:
        db = batches[0].target.database
        committing[db] += 1
        try:
            await asyncio.sleep(0.01)  # a slow WAL flush
            await commit(self, conn, node, op, batches)
        finally:
            committing[db] -= 1

    tasks = [0]  # most batch tasks alive at once
    start = _Streams._start

    def spy_start(self: _Streams, db: str) -> None:
        start(self, db)
        tasks[0] = max(tasks[0], len(self.running))

    monkeypatch.setattr(BatchSql, "apply", spy_apply)
    monkeypatch.setattr(BatchRunner, "_commit", spy_commit)
    monkeypatch.setattr(_Streams, "_start", spy_start)
    ids = list(range(1, 2001))
    res = await lay.repository("users").insert_many([user(i) for i in ids], batch_size=50)
    assert res.ok and res.committed == len(ids)
    assert res.batches == expected_batches(ids, 50) > 4 * len(DBS)
    if backend == "sqlite":
        assert most == dict.fromkeys(DBS, 1), most
    else:
        assert most == dict.fromkeys(DBS, 2), most  # never more, and the second stream is used
        assert busy[0] > 2  # two sending while another commits (with streams held through COMMIT: 2)
    assert both[0] == len(DBS)  # the databases are written concurrently
    # a task per batch running (sending, or committing on a pooled connection), not per batch
    assert 2 <= tasks[0] <= len(DBS) * (2 + 8) < res.batches, tasks
    assert sorted(await raw.keys("users")) == ids
