"""insert_many / upsert_many through PostgreSQL's COPY *text* fast path.

Lists of dicts with one key set whose columns hold only int / Decimal / bool /
str (and None) go to PostgreSQL as COPY text (dal/backends/copytext.py); other
values go as binary records. Every test writes through dal across the 8
physical tables of the two shard databases of the batch tests and reads back
both with ``get_many`` and with raw SQL on each physical table
(:class:`tests.batch_support.Raw`, no dal code), comparing exact values.

A spy on :class:`PostgresConnection` counts which COPY form the batches took,
so a test of the text path fails if its rows went binary (and the reverse for
the fallbacks). The same rows given as ``MappingProxyType`` instead of dicts
take the row-by-row planner, which always sends binary records: the reference
the text path must agree with.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from dal import ConnectionUnavailableError, DataLayer, ValidationError
from dal.backends.postgres import PostgresConnection
from dal.batch import BatchResult
from dal.repository import Repository
from tests.batch_support import SHARDS, Raw, db_of_slot, slot_of
from tests.conftest import topology

only_pg = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

MAXLEN = 24
TABLES: dict[str, Any] = {
    name: {"shard_key": "id", "table_shards": SHARDS} for name in ("texts", "mixed", "nums", "events", "docs", "floats")
}


def copy_metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "texts", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("s", sa.String(MAXLEN)),
        sa.Column("note", sa.Text),
        sa.Column("tag", sa.String(8), default="dflt"),
    )
    sa.Table(
        "mixed", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("req", sa.String(8), nullable=False),
        sa.Column("s", sa.String(16)),
        sa.Column("n", sa.Integer),
        sa.Column("d", sa.Numeric(12, 2)),
        sa.Column("b", sa.Boolean),
    )
    sa.Table(
        "nums", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("big", sa.BigInteger, nullable=False),
        sa.Column("i", sa.Integer, nullable=False),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        sa.Column("flag", sa.Boolean, nullable=False),
    )
    sa.Table(
        "events", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", sa.DateTime(timezone=True)),
        sa.Column("blob", sa.LargeBinary),
        sa.Column("u", sa.Uuid),
    )
    sa.Table(
        "docs", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("doc", sa.JSON),
        sa.Column("docb", postgresql.JSONB().with_variant(sa.JSON(), "mysql", "sqlite")),
    )
    sa.Table(
        "floats", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("ratio", sa.Float),
    )
    return md


@pytest.fixture
async def clay(urls: list[str]) -> AsyncIterator[DataLayer]:
    """A started layer over the batch tests' shard databases, with this module's tables."""
    async with DataLayer(topology(urls, TABLES), copy_metadata(), env={}) as layer:
        await layer.drop_all()
        await layer.create_all()
        yield layer
        await layer.drop_all()


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many COPYs went as text and as binary records (PostgreSQL only)."""
    seen: Counter[str] = Counter()
    text, records = PostgresConnection.copy_text, PostgresConnection.copy_records

    # (*args: the COPY data argument is the backend's business)
    async def spy_text(self: PostgresConnection, *args: Any) -> None:
        seen["text"] += 1
        await text(self, *args)

    async def spy_records(self: PostgresConnection, *args: Any) -> None:
        seen["records"] += 1
        await records(self, *args)

    monkeypatch.setattr(PostgresConnection, "copy_text", spy_text)
    monkeypatch.setattr(PostgresConnection, "copy_records", spy_records)
    return seen


def proxies(rows: list[dict[str, Any]]) -> list[Mapping[str, Any]]:
    """The same rows as non-dict mappings: the row-by-row planner, binary records."""
    return [MappingProxyType(r) for r in rows]


def expect_path(backend: str, copies: Counter[str], text: int, records: int) -> None:
    """The COPYs made since the last call (PostgreSQL); other backends make none."""
    if backend == "postgresql":
        assert (copies["text"], copies["records"]) == (text, records), dict(copies)
    else:
        assert copies == Counter(), dict(copies)
    copies.clear()


async def physical(raw: Raw, table: str, columns: Sequence[str]) -> dict[int, dict[str, Any]]:
    """Every row of ``table`` by id, read with raw SQL on each physical table (placement checked)."""
    out: dict[int, dict[str, Any]] = {}
    for slot, rows in (await raw.rows(table, ", ".join(columns))).items():
        for r in rows:
            assert slot_of(r[0]) == slot, f"{table} id {r[0]} in {table}_{slot}"
            assert r[0] not in out, f"{table} id {r[0]} present twice"
            out[r[0]] = dict(zip(columns, r, strict=True))
    return out


def all_slots(ids: Sequence[int]) -> None:
    """The test spans every physical table of both shard databases."""
    assert {slot_of(i) for i in ids} == set(range(SHARDS))


def assert_ok(res: BatchResult, rows: int) -> None:
    assert res.ok, res.failures
    assert res.rows == rows and res.committed == rows
    assert res.batches == res.committed_batches


# --------------------------------------------------------------------------- strings

SPECIAL: list[str] = [
    "tab\there",
    "\t",
    "line\nbreak",
    "\n",
    "cr\rhere",
    "crlf\r\n",
    "back\\slash",
    "\\",
    "\\\\",
    "\\N",  # backslash-N: COPY's NULL marker, as data
    "\\\\N",
    "N",
    "NULL",
    "\\.",  # COPY's end-of-data marker
    "\\.\n",
    "\n\\.\n",
    "\\t\\n\\r",  # escape sequences as literal text
    "\\x41\\101",  # hex / octal escapes of COPY text, as literal text
    "",
    " ",
    "  lead",
    "trail  ",
    " \t both \t ",
    "\x0b\x0c\x01\x7f",  # other control characters pass as data
    "é",
    "中文",
    "😀",
    "mixé\t中\\N😀\r\n",
    "x" * MAXLEN,
    "é" * MAXLEN,
    "😀" * MAXLEN,
    "\\" * MAXLEN,
]
assert all(len(s) <= MAXLEN for s in SPECIAL)
TEXT_COLUMNS = ("id", "s", "note", "tag")


def text_rows(ids: Sequence[int]) -> list[dict[str, Any]]:
    n = len(SPECIAL)
    return [
        {"id": i, "s": SPECIAL[i % n], "note": "|".join(SPECIAL) if i % 5 == 0 else SPECIAL[(i * 7) % n] * 3}
        for i in ids
    ]


async def test_special_strings_round_trip(backend: str, clay: DataLayer, raw: Raw, copies: Counter[str]) -> None:
    """Every backend stores the strings that stress COPY text exactly; on PostgreSQL
    they go as text, and the binary path (the reference) stores the same."""
    texts = clay.repository("texts")
    ids = list(range(1, 4 * len(SPECIAL) + 1))
    all_slots(ids)
    rows = text_rows(ids)
    want = {r["id"]: {**r, "tag": "dflt"} for r in rows}

    res = await texts.insert_many(rows, batch_size=5)
    assert_ok(res, len(rows))
    expect_path(backend, copies, text=res.batches, records=0)
    assert await texts.get_many(ids) == want
    assert await physical(raw, "texts", TEXT_COLUMNS) == want

    # The same rows through binary records, under other keys: the same values.
    shifted = [{**r, "id": r["id"] + 10_000} for r in rows]
    res = await texts.insert_many(proxies(shifted), batch_size=5)
    assert_ok(res, len(rows))
    expect_path(backend, copies, text=0, records=res.batches)
    got = await physical(raw, "texts", TEXT_COLUMNS)
    for r in shifted:
        assert got[r["id"]] == {**r, "tag": "dflt"}
    assert len(got) == 2 * len(rows)


# --------------------------------------------------------------------------- NULLs

MIXED_COLUMNS = ("id", "req", "s", "n", "d", "b")
S_CYCLE: list[str | None] = [None, "", "x", " ", "\\N", "NULL", "\t"]


def mixed_rows(ids: Sequence[int]) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "req": f"r{i}",
            "s": S_CYCLE[i % len(S_CYCLE)],
            "n": None if i % 3 == 0 else i - 40,
            "d": None if i % 4 == 0 else Decimal(f"{i}.{i % 100:02d}"),
            "b": None if i % 5 == 0 else i % 2 == 0,
        }
        for i in ids
    ]


def normalized(row: dict[str, Any]) -> dict[str, Any]:
    """Raw values as PostgreSQL returns them: SQLite's NUMERIC is a float, MySQL's and SQLite's BOOLEAN an int."""
    out = dict(row)
    if out.get("d") is not None and not isinstance(out["d"], Decimal):
        out["d"] = Decimal(str(out["d"])).quantize(Decimal("0.01"))
    if out.get("b") is not None:
        out["b"] = bool(out["b"])
    return out


async def check_mixed(repo: Repository[Any], raw: Raw, want: dict[int, dict[str, Any]]) -> None:
    assert await repo.get_many(list(want)) == want
    got = {i: normalized(r) for i, r in (await physical(raw, "mixed", MIXED_COLUMNS)).items()}
    assert got == want


async def test_nulls_and_empty_strings(backend: str, clay: DataLayer, raw: Raw, copies: Counter[str]) -> None:
    mixed = clay.repository("mixed")
    ids = list(range(1, 85))
    all_slots(ids)
    rows = mixed_rows(ids)
    # Every nullable column holds both NULLs and values; s holds NULL, '' and the NULL marker as text.
    for c in ("s", "n", "d", "b"):
        assert {r[c] is None for r in rows} == {True, False}
    res = await mixed.insert_many(rows, batch_size=4)
    assert_ok(res, len(rows))
    expect_path(backend, copies, text=res.batches, records=0)
    want = {r["id"]: r for r in rows}
    await check_mixed(mixed, raw, want)
    # SQL NULL (not a string) exactly where None was given; '' and '\\N' are not NULL.
    nulls = [
        (await raw.fetch(db_of_slot(slot), f"SELECT id FROM mixed_{slot} WHERE s IS NULL")) for slot in range(SHARDS)
    ]
    assert sorted(i for part in nulls for (i,) in part) == [r["id"] for r in rows if r["s"] is None]

    # Columns that are NULL in every row; NULLs in a column that needs no escaping;
    # columns not given at all.
    more: list[dict[str, Any]] = [
        {"id": i, "req": "", "s": None if i % 2 else "plain", "n": None, "d": None, "b": None}
        for i in range(101, 141)
    ]
    res = await mixed.insert_many(more, batch_size=6)
    assert_ok(res, len(more))
    expect_path(backend, copies, text=res.batches, records=0)
    bare = [{"id": i, "req": "r"} for i in range(201, 241)]
    res = await mixed.insert_many(bare, batch_size=6)
    assert_ok(res, len(bare))
    expect_path(backend, copies, text=res.batches, records=0)
    want |= {r["id"]: r for r in more}
    want |= {r["id"]: {**r, "s": None, "n": None, "d": None, "b": None} for r in bare}
    await check_mixed(mixed, raw, want)


# --------------------------------------------------------------------------- numbers

NUMS_COLUMNS = ("id", "big", "i", "amount", "flag")
BIGS = [2**63 - 1, -(2**63), 0, -1, 1, 2**53 + 1, -(2**62) - 7]
INTS = [2**31 - 1, -(2**31), 0, -1, 7]
# (given, as numeric(12,2) returns it)
AMOUNTS = [
    (Decimal("0"), "0.00"),
    (Decimal("-0.01"), "-0.01"),
    (Decimal("1E+2"), "100.00"),
    (Decimal("123.45"), "123.45"),
    (Decimal("9999999999.99"), "9999999999.99"),
    (Decimal("-9999999999.99"), "-9999999999.99"),
    (Decimal("1.5E-1"), "0.15"),
    (Decimal("0.10"), "0.10"),
    (Decimal("7"), "7.00"),
]


def num_rows(ids: Sequence[int]) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "big": BIGS[i % len(BIGS)],
            "i": INTS[i % len(INTS)],
            "amount": AMOUNTS[i % len(AMOUNTS)][0],
            "flag": i % 2 == 0,
        }
        for i in ids
    ]


def num_want(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    scale = dict(AMOUNTS)
    return {r["id"]: {**r, "amount": Decimal(scale[r["amount"]])} for r in rows}


async def check_nums(repo: Repository[Any], raw: Raw, want: dict[int, dict[str, Any]]) -> None:
    for got in (await repo.get_many(list(want)), await physical(raw, "nums", NUMS_COLUMNS)):
        assert got == want
        for i, r in want.items():
            # the scale too: Decimal('1E+2') == Decimal('100.00') alone would not show it
            assert str(got[i]["amount"]) == str(r["amount"]), (i, got[i]["amount"])
            assert type(got[i]["flag"]) is bool and type(got[i]["big"]) is int


@only_pg
async def test_numbers_round_trip(clay: DataLayer, raw: Raw, copies: Counter[str]) -> None:
    nums = clay.repository("nums")
    ids = list(range(1, 91))
    all_slots(ids)
    rows = num_rows(ids)
    for col, values in (("big", BIGS), ("i", INTS), ("amount", [a for a, _ in AMOUNTS]), ("flag", [True, False])):
        assert {r[col] for r in rows} == set(values), col  # every value is used
    res = await nums.insert_many(rows, batch_size=4)
    assert_ok(res, len(rows))
    expect_path("postgresql", copies, text=res.batches, records=0)
    want = num_want(rows)
    await check_nums(nums, raw, want)

    # Binary records (the reference) store the same.
    shifted = [{**r, "id": r["id"] + 1000} for r in rows]
    res = await nums.insert_many(proxies(shifted), batch_size=4)
    assert_ok(res, len(rows))
    expect_path("postgresql", copies, text=0, records=res.batches)
    want |= num_want(shifted)
    await check_nums(nums, raw, want)

    # Ints for a Numeric column.
    extra = [
        {"id": 5000 + k, "big": 1, "i": 1, "amount": v, "flag": True}
        for k, v in enumerate([5, 9_999_999_999, -42, 0, -9_999_999_999])
    ]
    res = await nums.insert_many(extra)
    assert_ok(res, len(extra))
    copies.clear()
    want |= {r["id"]: {**r, "amount": Decimal(f"{r['amount']}.00")} for r in extra}
    await check_nums(nums, raw, want)


# --------------------------------------------------------------------------- fallbacks

EVENTS_COLUMNS = ("id", "at", "blob", "u")
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
PDT = dt.timezone(dt.timedelta(hours=-7))
ATS = [
    dt.datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=IST),
    dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
    dt.datetime(2038, 1, 19, 3, 14, 8, 1, tzinfo=PDT),
    None,
]
BLOBS = [b"", b"\x00\xff", b"\\N", b"\\.\n", b"\t\r\n", bytes(range(256)), None]
DOCS: list[Any] = [
    {"a": [1, "x\ty"], "k": "\\N", "z": None},
    [1, 2.5, "three"],
    {"nested": {"é": "😀", "\\": "\n"}},
    "just a string",
    42,
    True,
]
UUIDS = [uuid.UUID(int=0), uuid.UUID("12345678-1234-5678-1234-567812345678"), uuid.UUID(int=2**128 - 1), None]


def event_rows(ids: Sequence[int]) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "at": ATS[i % len(ATS)],
            "blob": BLOBS[i % len(BLOBS)],
            "u": UUIDS[i % len(UUIDS)],
        }
        for i in ids
    ]


def same_event(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got == want, (got, want)
    if want["at"] is not None:
        assert got["at"].utcoffset() is not None  # aware, and (==) the same instant


@only_pg
async def test_types_without_text_form_fall_back(clay: DataLayer, raw: Raw, copies: Counter[str]) -> None:
    events = clay.repository("events")
    ids = list(range(1, 85))
    all_slots(ids)
    rows = event_rows(ids)
    res = await events.insert_many(rows, batch_size=6)
    assert_ok(res, len(rows))
    expect_path("postgresql", copies, text=0, records=res.batches)
    want = {r["id"]: r for r in rows}
    got = await events.get_many(ids)
    assert set(got) == set(ids)
    for i in ids:
        same_event(got[i], want[i])
    assert await physical(raw, "events", EVENTS_COLUMNS) == want

    # A column of one of these types alone sends the call binary.
    base = 1000
    for col, values in (
        ("at", ATS[:3]),
        ("blob", BLOBS[:6]),
        ("u", UUIDS[:3]),
    ):
        part = [{"id": base + k, col: v} for k, v in enumerate(values)]
        res = await events.insert_many(part)
        assert_ok(res, len(part))
        expect_path("postgresql", copies, text=0, records=res.batches)
        got = await events.get_many([r["id"] for r in part])
        for r in part:
            same_event(got[r["id"]], dict.fromkeys(EVENTS_COLUMNS) | r)
        base += 1000


@only_pg
async def test_json_column(clay: DataLayer, raw: Raw, copies: Counter[str]) -> None:
    """JSON values go binary and round-trip with their JSON type (a JSON string is never sent
    as bare COPY text: "42" stays a string, "\\N" is not NULL)."""
    docs = clay.repository("docs")
    ids = list(range(1, 49))
    all_slots(ids)
    strings = ["a", "\\N", "x\ty", "42", ""]
    for base, values in enumerate((DOCS, strings)):
        rows = [{"id": i + 1000 * base, "doc": values[i % len(values)], "docb": values[-i % len(values)]} for i in ids]
        res = await docs.insert_many(rows, batch_size=4)
        assert_ok(res, len(rows))
        expect_path("postgresql", copies, text=0, records=res.batches)
        want = {r["id"]: r for r in rows}
        got = await docs.get_many(list(want))
        assert got == want
        for i, r in want.items():
            assert type(got[i]["doc"]) is type(r["doc"])  # True is not 1, "42" is not 42
            assert type(got[i]["docb"]) is type(r["docb"])
        # Raw: the stored JSON text, parsed here (no codec of dal's or SQLAlchemy's involved).
        on_disk = await physical(raw, "docs", ("id", "doc::text", "docb::text"))
        assert {
            i: {"id": i, "doc": json.loads(r["doc::text"]), "docb": json.loads(r["docb::text"])}
            for i, r in on_disk.items()
            if i in want
        } == want
    # one row at a time too (binary parameters, binary results)
    one = {"id": 5000, "doc": {"k": [1, "x\ty"]}, "docb": {"k": None}}
    await docs.insert(one)
    assert await docs.get(5000) == one
    assert await docs.find({"id": 5000}) == [one]


FLOATS = [0.1, -0.0, 1e308, 5e-324, -1e308, 1 / 3, None]  # (non-finite floats are refused)


@only_pg
async def test_float_column(clay: DataLayer, raw: Raw, copies: Counter[str]) -> None:
    """Floats go binary; ints or Decimals alone in a Float column go as text and read
    back as the nearest double; ints mixed with floats go binary."""
    floats = clay.repository("floats")
    ids = list(range(1, 65))
    all_slots(ids)
    calls: list[tuple[list[Any], int, int]] = [  # values, text COPYs expected, binary
        (FLOATS, 0, 1),
        ([None, 0, -3, 2**53, 10**18], 1, 0),  # (ints and Decimals a double holds exactly)
        ([Decimal("0.5"), Decimal("-0"), Decimal(2.0**1000), None], 1, 0),
        ([1, 2.5, Decimal("0.5")], 0, 1),  # mixed types in one column
    ]
    want: dict[int, dict[str, Any]] = {}
    for base, (values, text, records) in enumerate(calls):
        rows = [{"id": i, "ratio": values[i % len(values)]} for i in ids]
        rows = [{**r, "id": r["id"] + 1000 * base} for r in rows]
        res = await floats.insert_many(rows, batch_size=100)
        assert_ok(res, len(rows))
        expect_path("postgresql", copies, text=text * res.batches, records=records * res.batches)
        want |= {r["id"]: {**r, "ratio": None if r["ratio"] is None else float(r["ratio"])} for r in rows}
    for got in (await floats.get_many(list(want)), await physical(raw, "floats", ("id", "ratio"))):
        assert got == want
        for i, r in want.items():
            if r["ratio"] is not None:
                assert type(got[i]["ratio"]) is float
                assert math.copysign(1.0, got[i]["ratio"]) == math.copysign(1.0, r["ratio"])  # -0.0


# --------------------------------------------------------------------------- lone surrogate

BAD = 77  # the row whose note holds a lone surrogate


@only_pg
@pytest.mark.parametrize("raise_on_error", [True, False])
async def test_lone_surrogate_is_refused_before_io(clay: DataLayer, raw: Raw, copies: Counter[str], raise_on_error: bool) -> None:
    """A string that is not valid Unicode cannot be stored by any backend: the call is
    refused with a ValidationError naming the column and row, and nothing is sent."""
    texts = clay.repository("texts")
    ids = list(range(1, 201))
    all_slots(ids)
    rows = text_rows(ids)
    rows[ids.index(BAD)]["note"] = "ok\ud800ok"
    with pytest.raises(ValidationError) as ei:
        await texts.insert_many(rows, batch_size=10, raise_on_error=raise_on_error)
    assert "texts.note" in str(ei.value) and f"(row {ids.index(BAD)})" in str(ei.value), str(ei.value)
    assert copies == Counter(), dict(copies)
    assert await physical(raw, "texts", TEXT_COLUMNS) == {}
    with pytest.raises(ValidationError):  # the single-row path agrees
        await texts.insert({"id": 10_001, "note": "ok\ud800ok"})


@only_pg
async def test_lone_surrogate_fails_only_its_writer_caller(clay: DataLayer) -> None:
    """Refused before it is queued: the BatchWriter fails that caller alone."""
    texts = clay.repository("texts")
    ids = list(range(20_001, 20_041))
    rows = text_rows(ids)
    bad = ids[17]
    rows[17]["note"] = "ok\ud800ok"
    async with texts.writer(max_rows=40, max_delay=0.05) as writer:
        outcomes = await asyncio.gather(*(writer.insert(r) for r in rows), return_exceptions=True)
    failed = {i: o for i, o in zip(ids, outcomes, strict=True) if o is not None}
    assert list(failed) == [bad], failed
    assert isinstance(failed[bad], ValidationError)
    got = await texts.get_many(ids, primary=True)
    assert sorted(got) == [i for i in ids if i != bad]


# --------------------------------------------------------------------------- upsert


@only_pg
async def test_upsert_special_strings(clay: DataLayer, raw: Raw, copies: Counter[str]) -> None:
    texts = clay.repository("texts")
    n = len(SPECIAL)
    old_ids = list(range(1, 2 * n + 1))
    res = await texts.insert_many(
        [{"id": i, "s": f"old{i}", "note": f"old note {i}", "tag": "custom"} for i in old_ids], batch_size=9
    )
    assert_ok(res, len(old_ids))
    copies.clear()

    # Half the keys exist; every special string, in both columns; some set to NULL.
    up_ids = list(range(n + 1, 3 * n + 1))
    all_slots(up_ids)
    rows = [{**r, "note": None} if r["id"] % 6 == 0 else r for r in text_rows(up_ids)]
    assert {r["id"] for r in rows if r["note"] is None} & set(old_ids)
    res = await texts.upsert_many(rows, batch_size=5)
    assert_ok(res, len(rows))
    expect_path("postgresql", copies, text=res.batches, records=0)
    want: dict[int, dict[str, Any]] = {
        i: {"id": i, "s": f"old{i}", "note": f"old note {i}", "tag": "custom"} for i in old_ids
    }
    for r in rows:
        # tag was not given: an existing row keeps its own, a new one gets the default
        want[r["id"]] = {**r, "tag": want[r["id"]]["tag"] if r["id"] in want else "dflt"}
    assert await texts.get_many(list(want)) == want
    assert await physical(raw, "texts", TEXT_COLUMNS) == want

    # Key-only rows: existing rows unchanged, missing ones inserted with defaults / NULLs.
    key_ids = list(range(2 * n + 1, 4 * n + 1))
    res = await texts.upsert_many([{"id": i} for i in key_ids], batch_size=7)
    assert_ok(res, len(key_ids))
    expect_path("postgresql", copies, text=res.batches, records=0)
    for i in key_ids:
        want.setdefault(i, {"id": i, "s": None, "note": None, "tag": "dflt"})
    assert len(want) == 4 * n
    assert await texts.get_many(list(want)) == want
    assert await physical(raw, "texts", TEXT_COLUMNS) == want



@only_pg
async def test_copy_streams_start_before_the_text_is_rendered(
    clay: DataLayer, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text is rendered a chunk at a time as the COPYs pull it; every stream a
    call may run at once (2 per shard database) begins while rows are still being
    rendered, instead of waiting for the first COPY to render them all."""
    from dal.backends.pg_copy import TextSource
    from dal.batch import STREAMS_PER_DATABASE

    started_at: list[int] = []  # rows rendered when each COPY began
    real = PostgresConnection.copy_text

    async def spy(self: PostgresConnection, table: str, columns: Sequence[str], source: Any) -> None:
        started_at.append(source.source.pos)
        await real(self, table, columns, source)

    nums = clay.repository("nums")
    # Small batches first: each database's pool then holds a connection per stream
    # (opening one takes round trips, while rendering goes on).
    warm = num_rows(range(1_000_001, 1_000_401))
    assert_ok(await nums.insert_many(warm, batch_size=10), len(warm))
    monkeypatch.setattr(PostgresConnection, "copy_text", spy)
    ids = list(range(1, 5 * TextSource.CHUNK + 1))
    rows = num_rows(ids)
    res = await nums.insert_many(rows)
    assert_ok(res, len(rows))
    assert res.batches == SHARDS
    early = [pos for pos in started_at if pos < len(rows)]
    assert len(early) == STREAMS_PER_DATABASE * 2, started_at
    await check_nums(nums, raw, num_want(warm + rows))



@only_pg
async def test_a_batch_cut_off_mid_copy_reports_all_its_keys(
    clay: DataLayer, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load's batches learn their keys as their rows are rendered (the physical
    table of each row is worked out a chunk at a time). A COPY cut off after its
    first chunk (the connection lost) still reports every key of its batch as
    failed: every row ends up either committed or reported failed, none both."""
    from dal.backends.pg_copy import TextSource

    monkeypatch.setattr(TextSource, "CHUNK", 4)  # 500 chunks: the cut comes long before the last
    victim = 3  # the physical table whose COPY is cut off
    real = PostgresConnection.copy_text

    async def cut_off(self: PostgresConnection, table: str, columns: Sequence[str], source: Any) -> None:
        if table != f"nums_{victim}":
            await real(self, table, columns, source)
            return
        await source.__anext__()  # the first chunk goes, then the connection is gone
        self.broken = True
        raise ConnectionUnavailableError(f"{table}: connection lost mid-COPY (injected)")

    monkeypatch.setattr(PostgresConnection, "copy_text", cut_off)
    nums = clay.repository("nums")
    ids = list(range(1, 2001))
    rows = num_rows(ids)
    res = await nums.insert_many(rows, batch_size=100_000, raise_on_error=False)
    assert res.batches == SHARDS and len(res.failures) == 1
    (failure,) = res.failures
    assert failure.table == f"nums_{victim}"
    assert isinstance(failure.error, ConnectionUnavailableError)
    lost = [i for i in ids if slot_of(i) == victim]
    assert failure.keys == lost  # all of them, in order: not only those rendered before the cut
    stored = await physical(raw, "nums", NUMS_COLUMNS)
    assert sorted(stored) == [i for i in ids if slot_of(i) != victim]
    assert res.committed == len(stored) and res.committed + len(failure.keys) == len(ids)



@only_pg
async def test_a_cancelled_load_leaves_no_batch_running(clay: DataLayer, raw: Raw, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelling insert_many while its batches are sending returns only once they
    are over (as a gather of them would): nothing of the call is left running, no
    connection is left in a transaction, and nothing of it is committed."""
    from dal.backends.pg_copy import TextSource

    monkeypatch.setattr(TextSource, "CHUNK", 256)
    sending = asyncio.Event()
    real = PostgresConnection.copy_text

    async def spy(self: PostgresConnection, *args: Any) -> None:
        sending.set()
        await real(self, *args)

    monkeypatch.setattr(PostgresConnection, "copy_text", spy)
    nums = clay.repository("nums")
    # Each database's streams find their connections open: a connect cut off by the cancel
    # would (by design) finish into the pool in a task of the pool's, not of the call.
    from dal.batch import STREAMS_PER_DATABASE

    for db in ("db0", "db1"):
        pool = clay.cluster.primary(db).pool
        held = [await pool.acquire() for _ in range(STREAMS_PER_DATABASE)]
        for conn in held:
            pool.release(conn)
    before = asyncio.all_tasks()
    load = asyncio.create_task(nums.insert_many(num_rows(range(1, 20_001))))
    await sending.wait()
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    left = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()]
    assert left == []
    for db in ("db0", "db1"):
        assert not any(c.in_transaction() for c in clay.cluster.primary(db).pool._idle)
    assert await physical(raw, "nums", NUMS_COLUMNS) == {}


# --------------------------------------------------------------------------- BatchWriter


async def test_writer_inserts_go_as_text(backend: str, clay: DataLayer, raw: Raw, copies: Counter[str]) -> None:
    """BatchWriter insert batches take COPY text as bulk loads do, with the same values;
    a batch holding a value without a text form goes as binary records."""

    async def write(repo: Repository[Any], rows: list[dict[str, Any]], max_rows: int) -> int:
        async with repo.writer(max_rows=max_rows, max_delay=0.05) as w:
            outcomes = await asyncio.gather(*(w.insert(r) for r in rows), return_exceptions=True)
        assert outcomes == [None] * len(rows)
        assert w.rows == len(rows)
        return w.batches

    texts, mixed = clay.repository("texts"), clay.repository("mixed")
    ids = list(range(30_001, 30_001 + 3 * len(SPECIAL)))
    all_slots(ids)
    rows = text_rows(ids)
    expect_path(backend, copies, text=await write(texts, rows, 7), records=0)
    want = {r["id"]: {**r, "tag": "dflt"} for r in rows}
    assert await texts.get_many(ids) == want
    assert await physical(raw, "texts", TEXT_COLUMNS) == want

    m_ids = list(range(1, 85))
    m_rows = mixed_rows(m_ids)
    expect_path(backend, copies, text=await write(mixed, m_rows, 5), records=0)
    await check_mixed(mixed, raw, {r["id"]: r for r in m_rows})

    if backend == "postgresql":
        nums, events = clay.repository("nums"), clay.repository("events")
        n_rows = num_rows(list(range(1, 91)))
        expect_path(backend, copies, text=await write(nums, n_rows, 6), records=0)
        await check_nums(nums, raw, num_want(n_rows))
        e_rows = event_rows(list(range(1, 41)))
        expect_path(backend, copies, text=0, records=await write(events, e_rows, 6))
        got = await events.get_many([r["id"] for r in e_rows])
        for r in e_rows:
            same_event(got[r["id"]], r)
