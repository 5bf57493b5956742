"""Contract of single-shard transactions on every backend.

What was committed (or not) is always checked with raw SQL on the primary
(a fresh pooled connection outside the transaction), never only through the
transaction's own reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest

from dal import CrossShardTransactionError, DataLayer, Repository, TransactionError, in_

SHARDS = 4


def slot_of(key: int | str) -> int:
    return zlib.crc32(str(key).encode("utf-8")) % SHARDS


def db_of(key: int) -> str:
    return "db0" if slot_of(key) < 2 else "db1"


def ids_on_db(db: str, n: int, start: int = 1) -> list[int]:
    out = []
    i = start
    while len(out) < n:
        if db_of(i) == db:
            out.append(i)
        i += 1
    return out


async def raw_user(layer: DataLayer, uid: int) -> list[tuple[Any, ...]]:
    """The user's row(s) as the primary has them committed: (id, name, age)."""
    s = slot_of(uid)
    rows = await layer.cluster.primary(db_of(uid)).fetch_all(
        f"SELECT id, name, age FROM users_{s} WHERE id = {int(uid)}", ()
    )
    return [tuple(r) for r in rows]


async def raw_orders(layer: DataLayer, uid: int) -> list[tuple[Any, ...]]:
    s = slot_of(uid)
    rows = await layer.cluster.primary(db_of(uid)).fetch_all(
        f"SELECT user_id, order_id FROM orders_{s} WHERE user_id = {int(uid)} ORDER BY order_id", ()
    )
    return [tuple(r) for r in rows]


async def raw_total(layer: DataLayer, logical: str) -> int:
    total = 0
    for s in range(SHARDS):
        db = "db0" if s < 2 else "db1"
        row = await layer.cluster.primary(db).fetch_one(f"SELECT COUNT(*) FROM {logical}_{s}", ())
        assert row is not None
        total += int(row[0])
    return total


def order(uid: int, oid: int) -> dict[str, Any]:
    return {"user_id": uid, "order_id": oid, "amount": Decimal(f"{oid}.25"), "note": None}


class Boom(Exception):
    pass


async def test_commit_user_and_orders_together(layer: DataLayer) -> None:
    users = layer.repository("users")
    for db in ("db0", "db1"):
        uid = ids_on_db(db, 1, start=100)[0]
        async with users.transaction(uid) as tx:
            await tx.insert({"id": uid, "name": "tx", "age": 1})
            orders = tx.repository("orders")
            await orders.insert(order(uid, 1))
            await orders.insert(order(uid, 2))
            await orders.upsert(order(uid, 3))
            assert await orders.delete((uid, 3)) is True
            assert await tx.update(uid, {"age": 2}) is True
        assert await raw_user(layer, uid) == [(uid, "tx", 2)]
        assert await raw_orders(layer, uid) == [(uid, 1), (uid, 2)]
        assert await users.get(uid) == {"id": uid, "name": "tx", "email": None, "age": 2, "active": True}


async def test_exception_rolls_back_everything(layer: DataLayer) -> None:
    users = layer.repository("users")
    keep = ids_on_db("db1", 2)
    await users.insert({"id": keep[0], "name": "keep", "age": 10})
    uid = keep[1]
    with pytest.raises(Boom):
        async with users.transaction(uid) as tx:
            await tx.insert({"id": uid, "name": "gone"})
            await tx.repository("orders").insert(order(uid, 1))
            await tx.update(keep[0], {"name": "changed", "age": 11})
            await tx.delete(keep[0])
            raise Boom
    assert await raw_user(layer, uid) == []
    assert await raw_orders(layer, uid) == []
    assert await raw_user(layer, keep[0]) == [(keep[0], "keep", 10)]
    assert await raw_total(layer, "users") == 1
    assert await raw_total(layer, "orders") == 0


async def test_a_dal_error_inside_rolls_back(layer: DataLayer) -> None:
    users = layer.repository("users")
    uid, dup = ids_on_db("db0", 2)
    await users.insert({"id": dup, "name": "dup"})
    from dal import DuplicateKeyError

    with pytest.raises(DuplicateKeyError):
        async with users.transaction(uid) as tx:
            await tx.insert({"id": uid, "name": "gone"})
            await tx.insert({"id": dup, "name": "again"})
    assert await raw_user(layer, uid) == []
    assert await raw_user(layer, dup) == [(dup, "dup", None)]


def _cross_ops(other: int, local: int) -> list[tuple[str, Callable[[Repository[Any]], Awaitable[Any]]]]:
    return [
        ("insert", lambda tx: tx.insert({"id": other, "name": "x"})),
        ("get", lambda tx: tx.get(other)),
        ("update", lambda tx: tx.update(other, {"age": 1})),
        ("delete", lambda tx: tx.delete(other)),
        ("upsert", lambda tx: tx.upsert({"id": other, "name": "x"})),
        ("orders insert", lambda tx: tx.repository("orders").insert(order(other, 1))),
        ("get_many", lambda tx: tx.get_many([local, other])),
        ("find fan-out", lambda tx: tx.find()),
        ("find in_", lambda tx: tx.find({"id": in_([local, other])})),
        ("count fan-out", lambda tx: tx.count()),
    ]


async def test_cross_shard_operation_rolls_back_and_poisons_the_transaction(layer: DataLayer) -> None:
    users = layer.repository("users")
    local, keep, nxt = ids_on_db("db0", 3)
    other = ids_on_db("db1", 1)[0]
    await users.insert({"id": keep, "name": "keep", "age": 1})
    for label, op in _cross_ops(other, local):
        other_queries = layer.cluster.primary("db1").queries
        with pytest.raises(CrossShardTransactionError) as ei:
            async with users.transaction(local) as tx:
                await tx.insert({"id": local, "name": "local"})
                await tx.update(keep, {"name": "changed"})
                await tx.repository("orders").insert(order(local, 1))
                try:
                    await op(tx)
                except CrossShardTransactionError:
                    # everything before is not committed (and never will be)
                    assert await raw_user(layer, local) == []
                    # any further operation on the transaction fails
                    with pytest.raises(TransactionError):
                        await tx.get(local)
                    with pytest.raises(TransactionError):
                        await tx.insert({"id": nxt, "name": "next"})
                    with pytest.raises(TransactionError):
                        await tx.repository("orders").get((local, 1))
                    raise
        assert "db1" in str(ei.value), label
        assert layer.cluster.primary("db1").queries == other_queries, label  # nothing ran there
        assert await raw_user(layer, local) == [], label
        assert await raw_orders(layer, local) == [], label
        assert await raw_user(layer, keep) == [(keep, "keep", 1)], label
        assert await raw_user(layer, nxt) == [], label
        assert await raw_user(layer, other) == [], label
    assert await raw_total(layer, "users") == 1
    assert await raw_total(layer, "orders") == 0


async def test_swallowed_cross_shard_error_still_fails_the_block(layer: DataLayer) -> None:
    users = layer.repository("users")
    local = ids_on_db("db1", 1)[0]
    other = ids_on_db("db0", 1)[0]
    with pytest.raises(TransactionError) as ei:
        async with users.transaction(local) as tx:
            await tx.insert({"id": local, "name": "local"})
            await tx.repository("orders").insert(order(local, 1))
            # the caller swallows the error and leaves the block normally
            with contextlib.suppress(CrossShardTransactionError):
                await tx.repository("orders").insert(order(other, 1))
    assert not isinstance(ei.value, CrossShardTransactionError)
    assert await raw_user(layer, local) == []
    assert await raw_orders(layer, local) == []
    assert await raw_orders(layer, other) == []
    # also when the caller swallows the follow-up TransactionError as well
    with pytest.raises(TransactionError):
        async with users.transaction(local) as tx:
            await tx.insert({"id": local, "name": "local"})
            for _ in range(2):
                with contextlib.suppress(TransactionError):
                    await tx.get(other)
    assert await raw_total(layer, "users") == 0
    assert await raw_total(layer, "orders") == 0


async def test_global_table_on_the_same_database_joins_the_transaction(layer: DataLayer) -> None:
    users = layer.repository("users")
    local0 = ids_on_db("db0", 1)[0]
    local1 = ids_on_db("db1", 1)[0]
    async with users.transaction(local0) as tx:
        await tx.insert({"id": local0, "name": "u"})
        await tx.repository("countries").insert({"code": "nl", "name": "Nederland"})
        assert [r["code"] for r in await tx.repository("countries").find()] == ["nl"]
    assert await layer.repository("countries").get("nl", primary=True) == {"code": "nl", "name": "Nederland"}
    with pytest.raises(CrossShardTransactionError):
        async with users.transaction(local1) as tx:
            await tx.insert({"id": local1, "name": "u"})
            await tx.repository("countries").insert({"code": "be", "name": "Belgie"})
    assert await raw_user(layer, local1) == []
    assert await layer.repository("countries").count() == 1


async def test_ended_transaction_cannot_be_used(layer: DataLayer) -> None:
    users = layer.repository("users")
    uid, uid2 = ids_on_db("db0", 2)
    async with users.transaction(uid) as tx:
        await tx.insert({"id": uid, "name": "a"})
        with pytest.raises(TransactionError):
            async with tx.transaction(uid):  # no nesting
                pass
        orders = tx.repository("orders")
    with pytest.raises(TransactionError):
        await tx.get(uid)
    with pytest.raises(TransactionError):
        await tx.insert({"id": uid2, "name": "b"})
    with pytest.raises(TransactionError):
        await orders.insert(order(uid, 1))
    assert await raw_user(layer, uid) == [(uid, "a", None)]
    assert await raw_user(layer, uid2) == []
    assert await raw_orders(layer, uid) == []


async def test_reads_inside_see_own_writes_outside_do_not(layer: DataLayer) -> None:
    users = layer.repository("users")
    uid, existing = ids_on_db("db1", 2)
    await users.insert({"id": existing, "name": "old", "age": 1})
    async with users.transaction(uid) as tx:
        await tx.insert({"id": uid, "name": "new", "age": 7})
        await tx.update(existing, {"name": "updated"})
        orders = tx.repository("orders")
        await orders.insert(order(uid, 1))
        # inside: own uncommitted writes
        assert await tx.get(uid) == {"id": uid, "name": "new", "email": None, "age": 7, "active": True}
        assert (await tx.get(existing))["name"] == "updated"  # type: ignore[index]
        assert await tx.find({"id": uid}) == [await tx.get(uid)]
        assert await tx.count({"id": in_([uid, existing])}) == 2
        assert set(await tx.get_many([uid, existing])) == {uid, existing}
        assert await orders.get((uid, 1)) == order(uid, 1) | {"amount": Decimal("1.25")}
        assert await orders.count({"user_id": uid}) == 1
        # outside, concurrently: not visible before commit, and not blocked
        outside = layer.repository("users")
        assert await asyncio.wait_for(outside.get(uid), 5) is None
        assert await asyncio.wait_for(outside.get(uid, primary=True), 5) is None
        assert (await asyncio.wait_for(outside.get(existing, primary=True), 5))["name"] == "old"  # type: ignore[index]
        assert await asyncio.wait_for(outside.find({"id": uid}), 5) == []
        assert await asyncio.wait_for(outside.count(), 5) == 1
        assert await asyncio.wait_for(layer.repository("orders").get((uid, 1)), 5) is None
        assert await raw_user(layer, uid) == []
    assert await raw_user(layer, uid) == [(uid, "new", 7)]
    assert await raw_user(layer, existing) == [(existing, "updated", 1)]
    assert await layer.repository("orders").get((uid, 1)) is not None


async def _assert_no_open_transactions(layer: DataLayer) -> None:
    # let shielded rollbacks / background releases finish
    for _ in range(50):
        await asyncio.sleep(0.01)
        if all(n.in_flight == 0 for n in layer.cluster.nodes.values()):
            break
    for node in layer.cluster.nodes.values():
        assert node.in_flight == 0, node.name
        assert node.pool.size <= 8, node.name
        for conn in list(node.pool._idle):
            assert not conn.in_transaction(), node.name


async def test_pool_connections_are_reusable_after_many_and_cancelled_transactions(layer: DataLayer) -> None:
    users = layer.repository("users")
    ids = ids_on_db("db0", 20) + ids_on_db("db1", 20)

    async def one(uid: int) -> None:
        async with users.transaction(uid) as tx:
            await tx.insert({"id": uid, "name": "t"})
            await tx.repository("orders").insert(order(uid, 1))
            await asyncio.sleep(0)

    # 20 sequential, then 20 concurrent (pool max_size is 8)
    for uid in ids[:10] + ids[20:30]:
        await one(uid)
    await asyncio.wait_for(asyncio.gather(*(one(uid) for uid in ids[10:20] + ids[30:40])), 30)
    assert await raw_total(layer, "users") == 40
    assert await raw_total(layer, "orders") == 40

    # a transaction cancelled while it waits between statements
    victim = ids_on_db("db1", 1, start=10_000)[0]
    started = asyncio.Event()

    async def hold() -> None:
        async with users.transaction(victim) as tx:
            await tx.insert({"id": victim, "name": "cancelled"})
            await tx.repository("orders").insert(order(victim, 1))
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _assert_no_open_transactions(layer)
    # the lock is released and the rows are gone: inserting the same keys succeeds at once
    await asyncio.wait_for(users.insert({"id": victim, "name": "after"}), 5)
    await asyncio.wait_for(layer.repository("orders").insert(order(victim, 1)), 5)
    assert await raw_user(layer, victim) == [(victim, "after", None)]
    assert await raw_orders(layer, victim) == [(victim, 1)]

    # every pooled connection still works, in and out of transactions
    more = ids_on_db("db1", 16, start=20_000)
    await asyncio.wait_for(asyncio.gather(*(one(uid) for uid in more)), 30)
    got = await asyncio.gather(*(users.get(uid, primary=True) for uid in ids + more))
    assert all(r is not None and r["name"] == "t" for r in got)
    await _assert_no_open_transactions(layer)


async def test_transaction_cancelled_mid_statement_leaves_nothing_behind(layer: DataLayer) -> None:
    users = layer.repository("users")
    for attempt, victim in enumerate(ids_on_db("db0", 5, start=30_000)):
        progress = asyncio.Event()

        async def busy(victim: int = victim, progress: asyncio.Event = progress, at: int = 3 + attempt) -> None:
            async with users.transaction(victim) as tx:
                await tx.insert({"id": victim, "name": "busy"})
                orders = tx.repository("orders")
                for oid in range(1, 100_000):
                    await orders.insert(order(victim, oid))
                    if oid == at:
                        progress.set()

        task = asyncio.create_task(busy())
        await asyncio.wait_for(progress.wait(), 10)
        task.cancel()  # most likely lands while an INSERT is in flight
        with pytest.raises(asyncio.CancelledError):
            await task
        await _assert_no_open_transactions(layer)
        assert await raw_user(layer, victim) == []
        assert await raw_orders(layer, victim) == []
        # the connections that come back give correct answers
        await asyncio.wait_for(users.insert({"id": victim, "name": "ok"}), 5)
        for _ in range(3):
            rows = await asyncio.gather(*(users.get(victim, primary=True) for _ in range(10)))
            assert all(r is not None and r["name"] == "ok" for r in rows)
            assert await users.count() == attempt + 1
