"""PostgreSQL transactions: BEGIN travels with the transaction's first statement.

``PostgresConnection.begin()`` sends nothing; BEGIN goes in front of the
transaction's first COPY (one round trip for both), or on its own just before
any other first statement. These tests watch the server: the backend's state
and last query text in ``pg_stat_activity``, and what another connection
sees, so they fail if BEGIN were sent early, sent separately before a COPY,
or lost (a COPY committed on its own would be visible outside at once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from dal import DataError, DataLayer, DuplicateKeyError, QueryError
from dal.backends import postgres
from dal.backends.postgres import PostgresConnection
from dal.cluster import Node

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

COLUMNS = ("id", "name", "email", "age", "active")


class Probe:
    """A transaction's connection and, beside it, what the server says about it."""

    def __init__(self, node: Node, conn: PostgresConnection, pid: int, table: str) -> None:
        self.node, self.conn, self.pid, self.table = node, conn, pid, table

    async def activity(self) -> tuple[str, str]:
        """(state, last query text) of the transaction's backend, read on another connection."""
        row = await self.node.fetch_one("SELECT state, query FROM pg_stat_activity WHERE pid = $1", (self.pid,))
        assert row is not None
        return str(row[0]), str(row[1])

    async def ids_outside(self) -> list[int]:
        """The ids committed in the table, as another connection sees them."""
        rows = await self.node.fetch_all(f'SELECT id FROM "{self.table}" ORDER BY id', ())
        return [int(r[0]) for r in rows]


@pytest.fixture
async def probe(layer: DataLayer) -> AsyncIterator[Probe]:
    placement = layer.tables["users"].placements[0]
    node = layer.cluster.primary(placement.database)
    conn: Any = await node.pool.acquire()
    assert isinstance(conn, PostgresConnection)
    row = await conn.fetch_one("SELECT pg_backend_pid()", ())
    assert row is not None
    try:
        yield Probe(node, conn, int(row[0]), placement.table)
    finally:
        node.pool.release(conn)


def rows(*ids: int) -> list[tuple[Any, ...]]:
    return [(i, f"n{i}", None, i, True) for i in ids]


async def test_begin_is_sent_with_the_copy(probe: Probe) -> None:
    conn = probe.conn
    await conn.begin()
    assert conn.in_transaction()
    assert (await probe.activity())[0] == "idle"  # nothing sent yet
    await conn.copy_records(probe.table, COLUMNS, rows(1, 2))
    state, query = await probe.activity()
    assert state == "idle in transaction"
    assert query.startswith("BEGIN;COPY ")  # one query, one round trip
    assert await probe.ids_outside() == []  # not committed by the COPY itself
    await conn.rollback()
    assert not conn.in_transaction()
    assert await probe.ids_outside() == []

    await conn.begin()
    await conn.copy_records(probe.table, COLUMNS, rows(3, 4))
    await conn.copy_records(probe.table, COLUMNS, rows(5))  # the second COPY: no BEGIN
    assert (await probe.activity())[1].startswith("COPY ")
    await conn.commit()
    assert await probe.ids_outside() == [3, 4, 5]
    assert (await probe.activity())[0] == "idle"


async def test_begin_is_sent_with_a_text_copy(probe: Probe) -> None:
    async def text() -> AsyncIterator[memoryview]:
        yield memoryview(b"7\tseven\t\\N\t7\tt\n8\teight\t\\N\t8\tf\n")

    await probe.conn.begin()
    await probe.conn.copy_text(probe.table, COLUMNS, text())
    assert (await probe.activity())[1].startswith("BEGIN;COPY ")
    assert await probe.ids_outside() == []
    await probe.conn.commit()
    assert await probe.ids_outside() == [7, 8]


async def test_begin_is_sent_before_other_statements(probe: Probe) -> None:
    conn, t = probe.conn, probe.table
    await conn.begin()
    assert await conn.execute(f"INSERT INTO \"{t}\" (id, name, active) VALUES (10, 'ten', true)", ()) == 1
    state, query = await probe.activity()
    assert state == "idle in transaction" and query.startswith("INSERT")  # BEGIN went alone, before it
    await conn.rollback()
    assert await probe.ids_outside() == []

    await conn.begin()
    n = await conn.execute(f'INSERT INTO "{t}" (id, name, active) VALUES ($1, $2, $3)', (11, "eleven", True))
    assert n == 1
    assert (await probe.activity())[0] == "idle in transaction"
    assert await probe.ids_outside() == []
    row = await conn.fetch_one(f'SELECT count(*) FROM "{t}"', ())
    assert row is not None and row[0] == 1  # the transaction sees its own row
    await conn.rollback()
    assert await probe.ids_outside() == []


async def test_an_empty_transaction_sends_nothing(probe: Probe) -> None:
    conn = probe.conn
    for end in (conn.commit, conn.rollback):
        await conn.begin()
        await end()
        assert not conn.in_transaction()
        assert (await probe.activity())[1] == "SELECT pg_backend_pid()"  # still the last query
    await conn.begin()
    with pytest.raises(Exception, match="already open"):
        await conn.begin()
    await conn.rollback()


async def test_a_failed_copy_leaves_an_aborted_transaction_to_roll_back(probe: Probe) -> None:
    conn = probe.conn
    await conn.begin()
    await conn.copy_records(probe.table, COLUMNS, rows(20))
    with pytest.raises(DuplicateKeyError):
        await conn.copy_records(probe.table, COLUMNS, rows(21, 20))
    assert conn.in_transaction() and not conn.broken
    await conn.rollback()
    assert await probe.ids_outside() == []
    await conn.begin()  # usable again, BEGIN folded again
    with pytest.raises(DuplicateKeyError):
        await conn.copy_records(probe.table, COLUMNS, rows(22, 22))
    await conn.rollback()
    assert await probe.ids_outside() == []


async def test_without_folding_begin_goes_alone(probe: Probe, monkeypatch: pytest.MonkeyPatch) -> None:
    """On asyncpg versions dal does not know, COPY goes through asyncpg's public API."""
    monkeypatch.setattr(postgres, "_FOLD_COPY", False)
    conn = probe.conn
    await conn.begin()
    await conn.copy_records(probe.table, COLUMNS, rows(30))
    state, query = await probe.activity()
    assert state == "idle in transaction" and query.startswith("COPY ")
    assert await probe.ids_outside() == []
    await conn.commit()
    assert await probe.ids_outside() == [30]


async def test_a_first_statement_the_server_cannot_parse_leaves_the_transaction_aborted(probe: Probe) -> None:
    """The server parses a query string whole: BEGIN in front of a statement it cannot
    parse would never run, and the statements after it would commit one by one."""
    conn, t = probe.conn, probe.table
    await conn.begin()
    with pytest.raises(QueryError):
        await conn.execute("SELEC 1", ())
    assert conn.in_transaction()
    with pytest.raises(QueryError, match="aborted"):
        await conn.execute(f'INSERT INTO "{t}" (id, name, active) VALUES ($1, $2, $3)', (40, "forty", True))
    await conn.rollback()
    assert not conn.in_transaction()
    assert await probe.ids_outside() == []


async def test_a_copy_refused_on_this_side_keeps_the_transaction_open(probe: Probe) -> None:
    """A value the binary encoder refuses fails the COPY before the server's answer is
    read: the connection still counts as in a transaction (the pool rolls it back
    rather than hand it on), and rolling back leaves it clean."""
    conn = probe.conn
    await conn.begin()
    with pytest.raises(DataError):
        await conn.copy_records(probe.table, COLUMNS, [(50, "fifty", None, "not an int", True)])
    assert conn.in_transaction()
    await conn.rollback()
    assert not conn.in_transaction()
    await conn.begin()
    await conn.copy_records(probe.table, COLUMNS, rows(51))
    await conn.commit()
    assert await probe.ids_outside() == [51]
