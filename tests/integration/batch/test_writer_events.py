"""BatchWriter's BatchFlushed events on every backend: one per batch sent, with the
rows it held, why it was sent ("size", "delay", "flush") and how it ended."""

from __future__ import annotations

import asyncio
from typing import Any

from dal import DataLayer, DuplicateKeyError
from dal.events import BatchFlushed, Event
from tests.batch_support import DBS, Raw, written_per_db


def user(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"n{i}", "age": i % 100}  # one shape: a table's runs are cut by max_rows only


def recorder(lay: DataLayer) -> list[BatchFlushed]:
    events: list[BatchFlushed] = []

    def on_event(e: Event) -> None:
        assert isinstance(e, BatchFlushed)
        events.append(e)

    lay.listen(on_event, "batch")
    return events


async def test_concurrent_rows_go_in_full_batches(lay: DataLayer, raw: Raw) -> None:
    """Many rows at once with a small max_rows: batches sent because they are full."""
    events = recorder(lay)
    ids = list(range(1, 501))
    w = lay.repository("users").writer(max_rows=10, max_delay=0.005)
    await asyncio.gather(*(w.insert(user(i)) for i in ids))
    await w.aclose()
    assert len(await raw.users()) == len(ids)
    assert sum(e.rows for e in events) == len(ids)
    assert len(events) == w.batches
    assert all(e.table == "users" and e.outcome == "ok" and 1 <= e.rows <= 10 for e in events), events
    assert {e.reason for e in events} <= {"size", "delay", "flush"}
    # every physical table is sent full batches while its rows keep coming
    assert sum(e.rows for e in events if e.reason == "size") >= len(ids) // 2, events
    per_db: dict[str, int] = {}
    for e in events:
        per_db[e.database] = per_db.get(e.database, 0) + e.rows
    assert set(per_db) <= set(DBS)
    assert per_db == written_per_db(ids)


async def test_rows_below_max_rows_go_after_the_delay_or_on_flush(lay: DataLayer, raw: Raw) -> None:
    events = recorder(lay)
    users = lay.repository("users")
    w = users.writer(max_rows=1000, max_delay=0.005)
    await asyncio.gather(*(w.insert(user(i)) for i in range(1, 21)))
    assert sum(e.rows for e in events) == 20
    assert {e.reason for e in events} == {"delay"}, events
    await w.aclose()

    events.clear()
    w = users.writer(max_rows=1000, max_delay=60.0)
    tasks = [asyncio.create_task(w.insert(user(i))) for i in range(21, 51)]
    await asyncio.sleep(0.05)  # all queued, none sent: the delay is far off
    assert events == []
    await asyncio.wait_for(w.flush(), 10)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert sum(e.rows for e in events) == 30
    assert {e.reason for e in events} == {"flush"}, events
    assert all(e.outcome == "ok" for e in events)
    await w.aclose()
    assert len(await raw.users()) == 50


async def test_failing_batch_reports_error(lay: DataLayer, raw: Raw) -> None:
    """A batch that fails on a duplicate key is reported "error", then each half it is
    split into, down to the one row that fails; the others commit and say "ok"."""
    users = lay.repository("users")
    dup = 7
    await users.insert(user(dup))
    events = recorder(lay)
    w = users.writer(max_rows=50, max_delay=0.005)
    ids = list(range(1, 101))
    outcomes = await asyncio.gather(*(w.insert(user(i)) for i in ids), return_exceptions=True)
    await w.aclose()
    failed = {i: o for i, o in zip(ids, outcomes, strict=True) if o is not None}
    assert list(failed) == [dup] and isinstance(failed[dup], DuplicateKeyError)
    errors = [e for e in events if e.outcome == "error"]
    assert errors and errors[0].rows > 1, events  # the whole batch first
    assert errors[-1].rows == 1  # then split down to the duplicate alone
    assert sum(e.rows for e in events if e.outcome == "ok") == len(ids) - 1
    assert {e.outcome for e in events} == {"ok", "error"}
    assert len(await raw.users()) == len(ids)
