"""BatchWriter (write-behind) on every backend: many concurrent single-row
callers coalesced into batches.

Each caller's ``await`` must return only once its row is committed (checked by
reading the row from the primary right after the await), or raise that row's
own error; what is committed is checked with raw SQL on the physical tables.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import pytest

from dal import DalError, DataLayer, DuplicateKeyError, UnknownColumnError, ValidationError
from dal.batch import BatchWriter
from dal.batch import writer as batch_mod
from tests.batch_support import SHARDS, Raw, db_of_slot, expected_batches, slot_of


def user(i: int, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"id": i, "name": f"n{i}", "age": i % 100}
    if i % 3 == 0:  # rows of different column sets share physical tables
        row["email"] = f"u{i}@x"
    row.update(over)
    return row


async def test_concurrent_callers_return_after_commit(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    ids = list(range(1, 1001))
    w = users.writer(max_rows=100, max_delay=0.005)
    seen_after_await: dict[int, Any] = {}

    async def call(i: int) -> None:
        await w.insert(user(i))
        # Committed before the await returned: visible on the primary right now.
        seen_after_await[i] = await users.get(i, primary=True)

    await asyncio.gather(*(call(i) for i in ids))
    await w.aclose()
    missing = [i for i in ids if seen_after_await[i] is None]
    assert missing == [], f"{len(missing)} callers returned before their row was visible: {missing[:10]}"
    assert all(seen_after_await[i]["name"] == f"n{i}" for i in ids)
    got = await raw.users()
    assert set(got) == set(ids)
    assert all(got[i]["email"] == (f"u{i}@x" if i % 3 == 0 else None) for i in ids)
    assert w.rows == 1000
    assert SHARDS <= w.batches < 1000  # coalesced


async def test_one_duplicate_fails_only_its_caller(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    dup = 613
    await users.insert(user(dup, name="pre-existing"))
    ids = list(range(1, 1001))
    w = users.writer(max_rows=250, max_delay=0.01)
    outcomes = await asyncio.gather(*(w.insert(user(i)) for i in ids), return_exceptions=True)
    await w.aclose()
    failed = {i: o for i, o in zip(ids, outcomes, strict=True) if o is not None}
    assert list(failed) == [dup], failed
    assert isinstance(failed[dup], DuplicateKeyError)
    got = await raw.users()
    assert set(got) == set(ids)
    assert got[dup]["name"] == "pre-existing"
    assert w.rows == 999
    # The batch holding the duplicate was split (in halves, ~2 log2(n) more batches).
    assert w.batches >= expected_batches(ids, 250) + 2 * 6

    # Two callers with the same new key: the first accepted wins, the second fails alone.
    w = users.writer(max_rows=250, max_delay=0.01)
    rows = [user(i) for i in range(2001, 2301)]
    rows.insert(150, user(2100, name="second"))
    outcomes = await asyncio.gather(*(w.insert(r) for r in rows), return_exceptions=True)
    await w.aclose()
    failed_at = [n for n, o in enumerate(outcomes) if o is not None]
    assert failed_at == [150], [outcomes[n] for n in failed_at]
    assert isinstance(outcomes[150], DuplicateKeyError)
    assert (await raw.users())[2100]["name"] == "n2100"


class Pending:
    """Rows a writer holds (accepted, not yet committed or failed), and the peak.

    Counts the writer's per-row records (``dal.batch.writer._Pending``) from creation to
    the settling of their future, whatever queue or batch they sit in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 0
        self.peak = 0
        counter = self

        class Counted(batch_mod._Pending):  # type: ignore[name-defined, misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                counter.now += 1
                counter.peak = max(counter.peak, counter.now)
                self.future.add_done_callback(counter._settled)

        monkeypatch.setattr(batch_mod, "_Pending", Counted)

    def _settled(self, _: Any) -> None:
        self.now -= 1


async def test_backpressure_bounds_pending_rows(lay: DataLayer, raw: Raw, monkeypatch: pytest.MonkeyPatch) -> None:
    users = lay.repository("users")
    pending = Pending(monkeypatch)
    w = users.writer(max_rows=4, max_delay=0.001, max_pending=10)
    gate = asyncio.Event()
    original = w._runner.execute

    async def gated(op: Any, b: Any) -> int:
        await gate.wait()
        return await original(op, b)

    w._runner.execute = gated  # type: ignore[method-assign]
    tasks = [asyncio.create_task(w.insert(user(i))) for i in range(1, 101)]
    await asyncio.sleep(0.2)
    # Nothing can commit: exactly 10 rows accepted, the other 90 callers blocked.
    assert pending.now == 10
    assert not any(t.done() for t in tasks)
    gate.set()
    await asyncio.gather(*tasks)
    await w.aclose()
    assert pending.peak == 10 and pending.now == 0
    assert len(await raw.users()) == 100

    # Ungated: a stream of 400 callers never has more than 10 rows waiting.
    pending.peak = 0
    w2 = users.writer(max_rows=3, max_delay=0.001, max_pending=10)
    await asyncio.gather(*(w2.insert(user(i)) for i in range(1001, 1401)))
    await w2.aclose()
    assert pending.peak == 10 and pending.now == 0
    assert len(await raw.users()) == 500


async def test_operations_on_one_key_apply_in_order(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    async with users.writer(max_rows=50, max_delay=0.005) as w:
        # Submitted together, in this order, without awaiting in between.
        ops: list[Any] = []
        for i in range(1, 61):
            ops += [w.insert(user(i)), w.delete(i)]
        for i in range(101, 141):
            ops += [w.insert(user(i)), w.upsert({"id": i, "name": "v2"}), w.delete(i), w.insert(user(i, name="final"))]
        for i in range(201, 221):
            ops += [w.upsert({"id": i, "name": "a", "age": 1}), w.upsert({"id": i, "name": "b"})]
        await asyncio.gather(*ops)
    got = await raw.users()
    assert not any(i in got for i in range(1, 61)), sorted(i for i in got if i < 61)
    assert {i: got[i]["name"] for i in range(101, 141)} == dict.fromkeys(range(101, 141), "final")
    assert {i: (got[i]["name"], got[i]["age"]) for i in range(201, 221)} == dict.fromkeys(range(201, 221), ("b", 1))
    assert len(got) == 60


async def test_closed_writer_and_bad_rows(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    w = users.writer()
    with pytest.raises(ValidationError, match="name"):
        await w.insert({"id": 1, "name": "x" * 65})  # rejected before it is queued
    await w.insert(user(2))
    await w.aclose()
    for call in (w.insert(user(3)), w.upsert(user(4)), w.delete(2)):
        with pytest.raises(DalError, match="closed"):
            await call
    assert set(await raw.users()) == {2}


async def test_each_row_is_checked_before_it_is_queued(lay: DataLayer, raw: Raw) -> None:
    """Concurrent callers with bad rows among good ones, in several key orders and
    column sets: each bad row fails its own caller with an error naming the field
    (a validation error, not a database error: it never reached a batch), and each
    good one, unusual values included, is written as given (defaults filled in)."""
    users, orders = lay.repository("users"), lay.repository("orders")
    bad_users: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"id": 1, "name": "x" * 65}, ValidationError, "users.name"),  # too long
        ({"id": 2, "name": 5}, ValidationError, "users.name"),  # not a str
        ({"id": 3, "name": None}, ValidationError, "users.name"),  # NOT NULL
        ({"id": 4}, ValidationError, "users.name"),  # required, missing
        ({"id": 5, "name": "n", "age": 2**31}, ValidationError, "users.age"),  # out of INTEGER's range
        ({"id": 6, "name": "n", "age": True}, ValidationError, "users.age"),  # a bool is no int here
        ({"id": 7, "name": "n", "active": None}, ValidationError, "users.active"),
        ({"id": 8, "name": "n", "bogus": 1}, UnknownColumnError, "bogus"),
        ({"id": 9.0, "name": "n"}, ValidationError, "users.id"),
        ({"name": "n", "id": "10"}, ValidationError, "users.id"),
    ]
    good_users = [
        {"id": 21, "name": "a"},  # active: the column default
        {"name": "b", "id": 22},  # the same columns in another order
        {"id": 23, "name": "c", "email": None, "age": None, "active": False},
        {"id": 24, "name": "x" * 64, "age": -(2**31), "email": "e" * 128},  # at the limits
        {"active": True, "age": 2**31 - 1, "name": "d", "id": 2**63 - 1},
    ]
    bad_orders: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"user_id": 1, "order_id": 1, "amount": Decimal("NaN")}, ValidationError, "orders.amount"),
        ({"user_id": 1, "order_id": 2, "amount": Decimal("1e10")}, ValidationError, "orders.amount"),  # NUMERIC(12, 2)
        ({"user_id": 1, "order_id": 3, "amount": "1.00"}, ValidationError, "orders.amount"),
        ({"user_id": 1, "order_id": 2**31, "amount": 1}, ValidationError, "orders.order_id"),
    ]
    good_orders = [
        {"user_id": 2, "order_id": 1, "amount": Decimal("9999999999.99")},
        {"user_id": 2, "order_id": 2, "amount": 5, "note": None},  # an int for a NUMERIC column
        {"note": "n", "amount": Decimal("-0.01"), "order_id": 3, "user_id": 2},
    ]
    w_users, w_orders = users.writer(max_delay=0.01), orders.writer(max_delay=0.01)
    calls = [w_users.insert(r) for r, _, _ in bad_users] + [w_users.insert(r) for r in good_users]
    calls += [w_orders.insert(r) for r, _, _ in bad_orders] + [w_orders.insert(r) for r in good_orders]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    await w_users.aclose()
    await w_orders.aclose()
    expected = [(t, f) for _, t, f in bad_users] + [None] * len(good_users)
    expected += [(t, f) for _, t, f in bad_orders] + [None] * len(good_orders)
    for got, want in zip(outcomes, expected, strict=True):
        if want is None:
            assert got is None
        else:
            assert isinstance(got, want[0]) and want[1] in str(got), (got, want)
    assert w_users.rows == len(good_users) and w_orders.rows == len(good_orders)
    assert await raw.users() == {
        21: {"id": 21, "name": "a", "email": None, "age": None, "active": True},
        22: {"id": 22, "name": "b", "email": None, "age": None, "active": True},
        23: {"id": 23, "name": "c", "email": None, "age": None, "active": False},
        24: {"id": 24, "name": "x" * 64, "email": "e" * 128, "age": -(2**31), "active": True},
        2**63 - 1: {"id": 2**63 - 1, "name": "d", "email": None, "age": 2**31 - 1, "active": True},
    }
    got_orders = {  # (SQLite keeps NUMERIC as a float)
        (r[0], r[1]): (Decimal(str(r[2])).quantize(Decimal("0.01")), r[3])
        for rows in (await raw.rows("orders", "user_id, order_id, amount, note")).values()
        for r in rows
    }
    assert got_orders == {
        (2, 1): (Decimal("9999999999.99"), None),
        (2, 2): (Decimal(5), None),
        (2, 3): (Decimal("-0.01"), "n"),
    }


async def test_max_delay_flushes_a_lone_row(lay: DataLayer, raw: Raw) -> None:
    users = lay.repository("users")
    await users.insert(user(1))
    t0 = time.monotonic()
    assert await users.get(1, primary=True) is not None
    rtt = time.monotonic() - t0
    max_delay = 0.1
    w: BatchWriter = users.writer(max_rows=1000, max_delay=max_delay)
    try:
        t0 = time.monotonic()
        await w.insert(user(2))
        took = time.monotonic() - t0
        assert await users.get(2, primary=True) is not None
        assert w.batches == 1
        # The flush was the timer's (max_rows was far away): about max_delay plus a commit.
        assert max_delay * 0.9 <= took <= max_delay + 0.15 + 5 * rtt, (took, rtt)
    finally:
        await w.aclose()
    assert set(await raw.users()) == {1, 2}


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_cancelled_flush_leaves_the_writes_going(lay: DataLayer, raw: Raw, urls: list[str]) -> None:
    """A timeout around flush() stops the wait, not the writes: the batch in flight
    and the rows queued behind it are committed once the table is free, and their
    callers (and later ones) get their outcome without another flush."""
    import asyncpg
    from sqlalchemy.engine import make_url

    ids = [i for i in range(1, 1000) if slot_of(i) == 1 and i % 3][:4]  # one physical table, one row shape
    users = lay.repository("users")
    w = users.writer(max_rows=100, max_delay=0.005)
    locker = await asyncpg.connect(str(make_url(urls[0]).set(drivername="postgresql")))
    assert db_of_slot(1) == "db0"
    tx = locker.transaction()
    await tx.start()
    await locker.execute('LOCK TABLE "users_1" IN ACCESS EXCLUSIVE MODE')
    first = asyncio.create_task(w.insert(user(ids[0])))
    await asyncio.sleep(0.1)  # its batch is in flight, waiting for the lock
    queued = [asyncio.create_task(w.insert(user(i))) for i in ids[1:3]]
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(w.flush(), 0.3)
    await tx.rollback()
    await locker.close()
    later = asyncio.create_task(w.insert(user(ids[3])))
    _, pending = await asyncio.wait([first, *queued, later], timeout=5)
    assert not pending
    assert [t.result() for t in (first, *queued, later)] == [None] * 4
    assert sorted(await raw.users()) == sorted(ids)
    await w.aclose()
