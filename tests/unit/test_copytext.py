"""COPY text rendering (no I/O): the text of each value, and which batch gets which lines.

What the server makes of the text is checked against PostgreSQL in
tests/integration/batch/test_copy_text.py.
"""

from __future__ import annotations

import asyncio
import zlib
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from dal.backends.copytext import text_forms, text_lines, text_payload
from dal.backends.pg_copy import LiveTextSource, TextFeed, TextSource
from dal.routing.sharding import by_slot


def render(columns: list[list[Any]]) -> list[str] | None:
    forms = text_forms(columns)
    return None if forms is None else text_lines(columns, forms)


def test_values_and_nulls() -> None:
    assert render([[1, -2**63, None], [Decimal("1.50"), None, Decimal("1E+2")], [True, False, None]]) == [
        "1\t1.50\tt",
        "-9223372036854775808\t\\N\tf",
        "\\N\t1E+2\t\\N",
    ]


def test_strings_are_escaped_only_where_needed() -> None:
    raw = ["plain", "tab\there", "nl\nx", "cr\rx", "back\\slash", "\\N", "\\.", "", "中文😀"]
    assert render([raw]) == [
        "plain", "tab\\there", "nl\\nx", "cr\\rx", "back\\\\slash", "\\\\N", "\\\\.", "", "中文😀",
    ]
    assert render([["a", None, ""]]) == ["a", "\\N", ""]  # NULL is not the empty string
    assert render([[None, None]]) == ["\\N", "\\N"]


@pytest.mark.parametrize(
    "column",
    [[1.5], [1, "1"], [b"x"], [Decimal(1), 1], [True, 1], ["ok\ud800"], [None, "ok\udfff"]],
    ids=["float", "int+str", "bytes", "decimal+int", "bool+int", "surrogate", "null+surrogate"],
)
def test_no_text_form(column: list[Any]) -> None:
    assert text_forms([[1] * len(column), column]) is None


def test_payload_is_newline_terminated_utf8() -> None:
    payload = text_payload(["a\tb", "é"])
    assert isinstance(payload, memoryview)  # bytes would be taken for a file path by asyncpg
    assert bytes(payload) == "a\tb\né\n".encode()


def test_by_slot_keeps_order() -> None:
    assert by_slot([2, 0, 2, 1, 0], 4, "abcde") == [["b", "e"], ["d"], ["a", "c"], []]


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("batch_size", [1, 4, 5, 100])
def test_source_hands_each_batch_exactly_its_rows(
    chunk: int, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TextSource, "CHUNK", chunk)
    ids = list(range(1, 48))
    names = [f"n{i}" for i in ids]
    slots = [zlib.crc32(str(i).encode()) % 4 for i in ids]
    per_slot = by_slot(slots, 4, ids)
    feeds: dict[int, list[TextFeed]] = {}
    expected: list[tuple[TextFeed, list[int]]] = []
    for slot, keys in enumerate(per_slot):
        for s in range(0, len(keys), batch_size):
            feed = TextFeed(len(keys[s : s + batch_size]))
            feeds.setdefault(slot, []).append(feed)
            expected.append((feed, keys[s : s + batch_size]))
    columns: list[list[Any]] = [ids, names]
    forms = text_forms(columns)
    assert forms is not None
    TextSource(columns, forms, slots, batch_size, feeds)

    async def drain(feed: TextFeed) -> list[str]:
        return [line for chunk in [bytes(c).decode() async for c in feed] for line in chunk.splitlines()]

    async def main() -> None:
        # the last batch pulls first: it renders every chunk, the others find theirs buffered
        for feed, keys in reversed(expected):
            assert await drain(feed) == [f"{k}\tn{k}" for k in keys]
            assert feed.missing == 0

    asyncio.run(main())


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("batch_size", [1, 4, 5, 100])
def test_live_source_cuts_the_same_batches_as_the_planner(
    chunk: int, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots worked out a chunk at a time: every physical table's rows are cut into
    batches of batch_size in the caller's order (as the eager planner cuts them),
    each batch opened when its first row comes, holding exactly its rows and keys,
    and closed once full or once every row is rendered."""
    monkeypatch.setattr(TextSource, "CHUNK", chunk)
    ids = list(range(1, 48))
    names = [f"n{i}" for i in ids]
    per_slot = by_slot([zlib.crc32(str(i).encode()) % 4 for i in ids], 4, ids)
    expected = [(slot, keys[s : s + batch_size]) for slot, keys in enumerate(per_slot) for s in range(0, len(keys), batch_size)]
    columns: list[list[Any]] = [ids, names]
    forms = text_forms(columns)
    assert forms is not None
    source = LiveTextSource(columns, forms, batch_size, 0, ids, 4)
    opened: list[tuple[int, Any]] = []

    def open_batch(slot: int) -> Any:
        feed = TextFeed(0)
        feed.closed = False
        feed.source = source
        b = SimpleNamespace(keys=[], text=feed)
        opened.append((slot, b))
        return b

    source.open_batch = open_batch

    async def drain(feed: TextFeed) -> list[str]:
        return [line for chunk in [bytes(c).decode() async for c in feed] for line in chunk.splitlines()]

    async def main() -> None:
        source.step()
        # the first batch opened pulls first: it renders until it is full (or every row is rendered)
        b = opened[0][1]
        assert await drain(b.text) == [f"{k}\tn{k}" for k in b.keys]
        assert b.text.closed and (len(b.keys) == batch_size or source.pos == len(ids))
        source.run()
        for _, b in opened[1:]:
            assert b.text.closed
            assert await drain(b.text) == [f"{k}\tn{k}" for k in b.keys]

    asyncio.run(main())
    assert sorted((slot, b.keys) for slot, b in opened) == sorted(expected)
