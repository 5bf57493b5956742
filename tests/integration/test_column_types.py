"""Every common SQLAlchemy column type through every repository path, on every backend.

One sharded table (``typed``: 4 physical tables over the two shard databases of
the batch tests) has one nullable column per portable SQLAlchemy type. A
handful of rows (typical values, both ends of every range, empty and
non-ASCII strings, a NULL in every column, floats such as 0.1, -0.0 and huge
ones) go through ``insert``/``get``, ``get_many``, ``find`` (equality, IS
NULL, order across shards), ``insert_many``/``upsert_many`` (dict rows with
one key set: the column-wise planner; and row by row), ``update_many``,
``upsert``, the ``BatchWriter``, ``update``, and cached reads (L1 and Redis).
What dal returns must be exactly the expected row: same Python types, same
values (floats bit for bit, Decimals with their scale, datetimes with their
offset, JSON type for type).

Values a backend would change (offsets, fractions of a second, digits) are
refused by dal (README.md, "Values: what is stored, what is refused"), so each
backend's rows hold what it stores (:func:`storable`). Where a backend stores a
value in another form, the expected row says so explicitly
(:func:`expected_value`), never by skipping:

- MySQL/MariaDB: ``DATETIME``/``TIME`` without fsp keep whole seconds
  (MariaDB truncates the fraction); ``DateTime(timezone=True)`` is a plain
  ``DATETIME`` (the driver sends the wall clock and drops the offset);
  ``Interval`` is a ``DATETIME`` holding 1970-01-01 + the interval (so whole
  seconds too); ``sa.Float`` is a 4-byte ``FLOAT`` the server prints with 6
  significant digits (its values here are exact in 6 digits and in float32);
  -0.0 is stored as 0; ``Text`` holds 65,535 bytes (longer values: see
  ``test_huge_text_round_trips`` in test_bad_input.py).
- SQLite: -0.0 is stored as 0 (REAL values without a fraction are kept as
  integers); ``Numeric`` goes through a float (SQLAlchemy's documented
  behaviour on SQLite), so values beyond 15 significant digits are rounded;
  ``DateTime(timezone=True)`` keeps the wall clock and drops the offset.
- PostgreSQL: ``timestamptz`` comes back in UTC; ``uuid`` comes back as
  asyncpg's subclass of ``uuid.UUID`` (as under SQLAlchemy Core); asyncpg
  sends ``date.max``/``datetime.max`` as ``'infinity'`` (and reads it back as
  them), which the raw reads check.

Raw reads of each physical table (no dal code: :class:`tests.batch_support.Raw`)
check that what dal reads back is what the server holds: once through
SQLAlchemy Core with the declared types, and once as the server's own text of
each value, parsed here, so a value that dal writes and reads back wrong in
the same way is still caught.

Also here: values of other Python types that dal's validation accepts for a
column (stored as the column's type, or rejected up front), and values a
column cannot hold (a dal error, never a "lost connection"). The dal bugs
found are ``xfail(strict=True)`` tests with the exact cause in their reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import json
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa

from dal import (
    BatchError,
    ConnectionUnavailableError,
    DalError,
    DataLayer,
    ValidationError,
)
from dal.batch import BatchPlanner
from tests.batch_support import Raw
from tests.cache_support import cache_topology, delete_ns, unique_namespace
from tests.conftest import REDIS_URL, topology

SHARDS = 4
TABLES: dict[str, Any] = {"typed": {"shard_key": "id", "table_shards": SHARDS}}


class Color(enum.Enum):
    # values unlike the names: SQLAlchemy stores the names
    RED = "r"
    GREEN = "g"
    BLUE = "b"


# No type is left out on any backend: SQLAlchemy maps every one of them on all three.
# (PostgreSQL's enum type is created by the tlay fixture: test_create_all_creates_the_enum_type;
# MySQL's LargeBinary holds NULL in the matrix while no bytes can be sent: test_bytes_on_mysql.)
COLOR_TYPE = sa.Enum(Color, name="typed_color")
COLUMNS: dict[str, sa.types.TypeEngine[Any]] = {
    "small": sa.SmallInteger(),
    "i32": sa.Integer(),
    "big": sa.BigInteger(),
    "flt": sa.Float(),
    "dbl": sa.Double(),
    "num12": sa.Numeric(12, 2),
    "num20": sa.Numeric(20, 6),
    "s40": sa.String(40),
    "txt": sa.Text(),
    "uni": sa.Unicode(40),
    "flag": sa.Boolean(),
    "day": sa.Date(),
    "ts": sa.DateTime(),
    "tstz": sa.DateTime(timezone=True),
    "tod": sa.Time(),
    "span": sa.Interval(),
    "blob": sa.LargeBinary(),
    "uid": sa.Uuid(),
    "doc": sa.JSON(),
    "color": COLOR_TYPE,
}
NAMES = ("id", *COLUMNS)
SCALE = {"num12": 2, "num20": 6}


def typed_metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "typed", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        *(sa.Column(name, type_, nullable=True) for name, type_ in COLUMNS.items()),
    )
    return md


# --------------------------------------------------------------------------- placement (independent of dal)


def slot_of(key: int) -> int:
    return zlib.crc32(str(key).encode()) % SHARDS


def db_of_slot(slot: int) -> str:
    return f"db{slot * 2 // SHARDS}"


# --------------------------------------------------------------------------- values

UTC = dt.UTC
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
PDT = dt.timezone(dt.timedelta(hours=-7))
EPOCH = dt.datetime(1970, 1, 1)

ID_TYPICAL, ID_MAX, ID_MIN, ID_NULL, ID_ODD = 1, 2, 3, 4, 5
IDS = (ID_TYPICAL, ID_MAX, ID_MIN, ID_NULL, ID_ODD)
assert {db_of_slot(slot_of(i)) for i in IDS} == {"db0", "db1"}


def rows_for(backend: str) -> list[dict[str, Any]]:
    """The rows of the matrix, every one with every column (one key set)."""
    mysql = backend == "mysql"
    # MySQL: TEXT's limit exactly, 65,535 bytes; elsewhere 70,010 characters
    long_text = "ab" * 32767 + "c" if mysql else "abcdefghi\u00e9" * 7_001
    typical: dict[str, Any] = {
        "id": ID_TYPICAL,
        "small": 7,
        "i32": 123_456,
        "big": 9_000_000_000,
        # MySQL FLOAT: single precision printed with 6 digits (see the module docstring)
        "flt": 0.5 if mysql else 0.1,
        "dbl": 0.1,
        "num12": Decimal("123.45"),
        "num20": Decimal("-0.000001"),
        "s40": "hello",
        "txt": "plain text\nsecond line",
        "uni": "na\u00efve caf\u00e9",
        "flag": True,
        "day": dt.date(2024, 2, 29),
        "ts": dt.datetime(2024, 2, 29, 13, 45, 7, 123_456),
        "tstz": dt.datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=IST),
        "tod": dt.time(13, 45, 7, 250_000),
        "span": dt.timedelta(days=3, hours=4, microseconds=5),
        "blob": b"\x00\x01\xfe\xff",
        "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "doc": {"a": 1, "b": [1, 2.5, "x", None, True, False], "c": {"\u00fc": "\u4e2d\u6587"}},
        "color": Color.GREEN,
    }
    maxima: dict[str, Any] = {
        "id": ID_MAX,
        "small": 2**15 - 1,
        "i32": 2**31 - 1,
        "big": 2**63 - 1,
        "flt": 3.40282e38 if mysql else 1e300,
        "dbl": 1.7976931348623157e308,
        "num12": Decimal("9999999999.99"),
        "num20": Decimal("99999999999999.999999"),
        "s40": "\U0001f600" * 40,
        "txt": long_text,
        "uni": "\u00e9" * 40,
        "flag": False,
        # date.max / datetime.max: 'infinity' on PostgreSQL (asyncpg's mapping, see check_raw)
        "day": dt.date(9999, 12, 31),
        "ts": dt.datetime(9999, 12, 31, 23, 59, 59, 999_999),
        # (not datetime.max in UTC: asyncpg sends that as 'infinity' and decodes it naive)
        "tstz": dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=IST),
        "tod": dt.time(23, 59, 59, 999_999),
        "span": dt.timedelta(days=99_999, seconds=86_399, microseconds=999_999),
        "blob": bytes(range(256)) * 64,
        "uid": uuid.UUID(int=2**128 - 1),
        "doc": [1, 2**64, 1e300, "\U0001f600", [[]], {}],
        "color": Color.BLUE,
    }
    minima: dict[str, Any] = {
        "id": ID_MIN,
        "small": -(2**15),
        "i32": -(2**31),
        "big": -(2**63),
        "flt": -0.0,
        "dbl": -0.0,
        "num12": Decimal("-9999999999.99"),
        "num20": Decimal("-99999999999999.999999"),
        "s40": "",
        "txt": "",
        "uni": "",
        "flag": False,
        "day": dt.date(1000, 1, 1),
        "ts": dt.datetime(1000, 1, 1),
        "tstz": dt.datetime(1970, 1, 1, tzinfo=UTC),
        "tod": dt.time(0, 0),
        "span": dt.timedelta(0),
        "blob": b"",
        "uid": uuid.UUID(int=0),
        "doc": {},
        "color": Color.RED,
    }
    nulls: dict[str, Any] = {"id": ID_NULL, **dict.fromkeys(COLUMNS)}
    odd: dict[str, Any] = {
        "id": ID_ODD,
        "small": 0,
        "i32": -1,
        "big": -1,
        "flt": -2.25 if mysql else 1 / 3,
        "dbl": 5e-324,
        "num12": Decimal("1E+2"),  # comes back with the column's scale: 100.00
        "num20": Decimal("0.1"),
        "s40": "\u00dcn\u00efc\u00f6d\u00e9 \u4e2d\u6587 \U0001f600 \t\\N",
        "txt": "\u00c4\u00d6\u00dc \u00df\r\n\t\\ \u4e2d\u6587 \U0001f600" * 1000,
        "uni": "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u65e5\u672c\u8a9e",
        "flag": True,
        "day": dt.date(1970, 1, 1),
        "ts": dt.datetime(1969, 12, 31, 23, 59, 59, 1),
        "tstz": dt.datetime(2000, 6, 15, 12, 0, 0, 500_000, tzinfo=PDT),
        "tod": dt.time(12, 0, 0, 1),
        "span": dt.timedelta(seconds=-1, microseconds=250_000),  # -0.75 s
        "blob": b"\\N\t\n\r\\.",
        "uid": uuid.uuid5(uuid.NAMESPACE_URL, "https://example.org/\u00e9"),
        "doc": {"emoji": "\U0001f600", "quote": "\"'\\", "n": None, "f": 0.1, "big": 2**63, "s": "x\ny"},
        "color": Color.GREEN,
    }
    rows = [storable(backend, r) for r in (typical, maxima, minima, nulls, odd)]
    assert [r["id"] for r in rows] == list(IDS)
    assert all(tuple(r) == NAMES for r in rows)
    return rows


def storable(backend: str, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as this backend can store it so that it reads back equal (else dal refuses
    it: README.md, "Values: what is stored, what is refused"): on MySQL whole seconds;
    on MySQL and SQLite naive ``tstz`` values (the wall clock); on SQLite ``Numeric``
    values a float keeps."""
    out = dict(row)
    if backend in ("mysql", "sqlite") and out["tstz"] is not None:
        out["tstz"] = out["tstz"].replace(tzinfo=None)
    if backend == "mysql":
        for c in ("ts", "tstz", "tod"):
            if out[c] is not None:
                out[c] = out[c].replace(microsecond=0)
        if out["span"] is not None:
            out["span"] -= dt.timedelta(microseconds=out["span"].microseconds)
    if backend == "sqlite" and out["num20"] is not None and len(out["num20"].as_tuple().digits) > 15:
        out["num20"] = Decimal("99999999.999999") * (1 if out["num20"] > 0 else -1)
    return out


def _whole_seconds(v: dt.datetime) -> dt.datetime:
    return v.replace(microsecond=0)


def expected_value(backend: str, column: str, v: Any) -> Any:
    """What ``backend`` gives back for value ``v`` of ``column`` (see the module docstring)."""
    if v is None:
        return None
    if column in SCALE:
        if backend == "sqlite":  # through a float
            return Decimal(f"{float(v):.{SCALE[column]}f}")
        return v.quantize(Decimal(1).scaleb(-SCALE[column]))
    if column in ("flt", "dbl") and v == 0 and backend in ("mysql", "sqlite"):
        return 0.0  # -0.0 loses its sign
    if column == "tstz":
        if backend == "postgresql":
            return v.astimezone(UTC)
        wall = v.replace(tzinfo=None)
        return _whole_seconds(wall) if backend == "mysql" else wall
    if backend == "mysql":
        if column == "ts":
            return _whole_seconds(v)
        if column == "tod":
            return v.replace(microsecond=0)
        if column == "span":  # DATETIME 1970-01-01 + span, truncated to the second
            return _whole_seconds(EPOCH + v) - EPOCH
    return v


def expected(backend: str, row: Mapping[str, Any]) -> dict[str, Any]:
    return {c: expected_value(backend, c, v) for c, v in row.items()}


# --------------------------------------------------------------------------- exact comparison


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down: floats bit for bit, Decimals
    with their exponent, datetimes/times with their UTC offset, JSON per element."""
    if isinstance(b, uuid.UUID) and isinstance(a, uuid.UUID):
        # asyncpg returns its own subclass of uuid.UUID, as it does under SQLAlchemy Core
        return bool(a == b) and str(a) == str(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return bool(a.hex() == b.hex())
    if isinstance(a, Decimal):
        return bool(a.as_tuple() == b.as_tuple())
    if isinstance(a, dt.datetime | dt.time):
        return bool(a == b) and a.utcoffset() == b.utcoffset()
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 120 else f"{r[:100]}... ({len(r)} chars)"


def assert_row(got: Mapping[str, Any] | None, want: Mapping[str, Any], where: str = "") -> None:
    assert got is not None, f"{where}: row {want['id']} missing"
    assert tuple(got) == tuple(want), f"{where}: columns {tuple(got)}"
    bad = {
        c: f"got {short(got[c])} ({type(got[c]).__name__}), want {short(want[c])} ({type(want[c]).__name__})"
        for c in want
        if not same(got[c], want[c])
    }
    assert not bad, f"{where}: row {want['id']}: {bad}"


def assert_rows(got: Mapping[Any, Mapping[str, Any]], want: Mapping[Any, Mapping[str, Any]], where: str) -> None:
    assert sorted(got) == sorted(want), f"{where}: keys {sorted(got)}"
    for k, w in want.items():
        assert_row(got[k], w, where)


# --------------------------------------------------------------------------- fixtures


# ``urls`` (the batch tests' two shard databases of ``backend``) and ``raw``:
# tests/integration/conftest.py


async def pg_enum_type(raw: Raw, *, create: bool) -> None:
    """Create (if missing) or drop (if present) PostgreSQL's ``typed_color`` type on both
    databases, as SQLAlchemy's ``MetaData.create_all``/``drop_all`` do around the tables."""

    def ddl(conn: sa.Connection) -> None:
        if create:
            COLOR_TYPE.create(conn, checkfirst=True)
        else:
            COLOR_TYPE.drop(conn, checkfirst=True)

    for engine in raw.engines.values():
        async with engine.begin() as conn:
            await conn.run_sync(ddl)


@pytest.fixture
async def tlay(backend: str, urls: list[str], raw: Raw) -> AsyncIterator[DataLayer]:
    """A started layer with the ``typed`` table freshly created.

    On PostgreSQL ``create_all`` creates the enum type too
    (:func:`test_create_all_creates_the_enum_type`).
    """
    async with DataLayer(topology(urls, TABLES), typed_metadata(), env={}) as layer:
        await layer.drop_all()
        await layer.create_all()
        yield layer
        await layer.drop_all()
    if backend == "postgresql":
        # once the layer's connections are closed: their upsert staging tables use the type
        await pg_enum_type(raw, create=False)


# --------------------------------------------------------------------------- tests


async def test_insert_then_get(backend: str, tlay: DataLayer) -> None:
    """Each row by ``insert``, read back by ``get``: exactly the expected row."""
    repo = tlay.repository("typed")
    rows = rows_for(backend)
    for row in rows:
        await repo.insert(row)
    for row in rows:
        assert_row(await repo.get(row["id"]), expected(backend, row), "get")
        assert_row(await repo.get(row["id"], primary=True), expected(backend, row), "get(primary)")
    assert await repo.get(999) is None


async def test_get_many_and_find(backend: str, tlay: DataLayer) -> None:
    """``get_many`` and ``find`` with equality, IS NULL and ordering on typed columns."""
    repo = tlay.repository("typed")
    rows = rows_for(backend)
    for row in rows:
        await repo.insert(row)
    want = {r["id"]: expected(backend, r) for r in rows}

    assert_rows(await repo.get_many([*IDS, 999, ID_ODD]), want, "get_many")
    assert_rows(await repo.get_many([ID_MIN, ID_NULL]), {i: want[i] for i in (ID_MIN, ID_NULL)}, "get_many")

    checked = 0
    for col in ("small", "i32", "big", "num12", "s40", "uni", "flag", "day", "uid", "color"):
        for value in dict.fromkeys(r[col] for r in rows if r[col] is not None):
            stored = expected_value(backend, col, value)
            ids = [i for i, w in want.items() if w[col] is not None and same(w[col], stored)]
            assert ids, (col, value)
            got = await repo.find({col: value}, order_by="id")
            assert [g["id"] for g in got] == ids, f"find {col} = {short(value)}"
            for g in got:
                assert_row(g, want[g["id"]], f"find {col}")
            checked += 1
    assert checked >= 30
    # two rows each for one value (both shard databases)
    assert [g["id"] for g in await repo.find({"flag": False}, order_by="id")] == [ID_MAX, ID_MIN]
    assert [g["id"] for g in await repo.find({"color": Color.GREEN}, order_by="id")] == [ID_TYPICAL, ID_ODD]

    for col in COLUMNS:
        nulls = [i for i, w in want.items() if w[col] is None]
        assert [g["id"] for g in await repo.find({col: None}, order_by="id")] == nulls, f"find {col} IS NULL"
        assert await repo.count({col: None}) == len(nulls)

    # find by the shard key: one physical table
    (one,) = await repo.find({"id": ID_ODD})
    assert_row(one, want[ID_ODD], "find id")

    # order across shards (merged in Python): NULLs first ascending, last descending
    for col in ("small", "i32", "big", "dbl", "num12", "num20", "day", "ts", "tstz", "tod", "span", "uid"):
        present = sorted((i for i, w in want.items() if w[col] is not None), key=lambda i: (want[i][col], i))
        nulls = sorted(i for i, w in want.items() if w[col] is None)
        desc = sorted(sorted(present), key=lambda i: want[i][col], reverse=True)
        assert [g["id"] for g in await repo.find(order_by=col)] == nulls + present, f"order by {col}"
        assert [g["id"] for g in await repo.find(order_by="-" + col)] == desc + nulls, f"order by -{col}"
        assert [g["id"] for g in await repo.find(order_by=col, limit=2, offset=1)] == (nulls + present)[1:3]


@pytest.fixture
def column_plans(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each batched call was planned column by column (the dict fast path)."""
    seen: list[bool] = []
    plan = BatchPlanner._plan_columns

    def spy(self: BatchPlanner, *args: Any, **kwargs: Any) -> Any:
        out = plan(self, *args, **kwargs)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(BatchPlanner, "_plan_columns", spy)
    return seen


def rotated(rows: Sequence[Mapping[str, Any]], by: int) -> list[dict[str, Any]]:
    """The rows with the non-key values of the row ``by`` places further on."""
    n = len(rows)
    return [{"id": r["id"], **{c: rows[(k + by) % n][c] for c in COLUMNS}} for k, r in enumerate(rows)]


async def test_insert_many_then_upsert_many(backend: str, tlay: DataLayer, column_plans: list[bool]) -> None:
    """``insert_many`` and ``upsert_many`` of dict rows with one key set (the column-wise
    planner), read back with ``get_many``; the upsert overwrites every column of the
    existing rows (values over NULLs, NULLs over values) and inserts a new one."""
    repo = tlay.repository("typed")
    rows = rows_for(backend)
    res = await repo.insert_many(rows, batch_size=2)
    assert res.ok and res.committed == len(rows), res.failures
    assert column_plans == [True]
    want = {r["id"]: expected(backend, r) for r in rows}
    assert_rows(await repo.get_many(IDS), want, "insert_many")

    changed = rotated(rows, 1)
    new = {**rows[0], "id": 6}
    res = await repo.upsert_many([*changed, new])
    assert res.ok and res.committed == len(rows) + 1, res.failures
    assert column_plans == [True, True]
    want = {r["id"]: expected(backend, r) for r in [*changed, new]}
    for r in changed:  # every column takes another value (so an ignored column shows)
        old = expected(backend, rows[IDS.index(r["id"])])
        assert any(not same(want[r["id"]][c], old[c]) for c in COLUMNS)
    assert_rows(await repo.get_many([*IDS, 6]), want, "upsert_many")
    for i in IDS:
        assert_row(await repo.get(i), want[i], "get after upsert_many")

    # another upsert through the row-by-row planner (rows that are no dicts)
    res = await repo.upsert_many([MappingProxyType(r) for r in rotated(rows, 2)])
    assert res.ok, res.failures
    assert column_plans == [True, True, False]
    want |= {r["id"]: expected(backend, r) for r in rotated(rows, 2)}
    assert_rows(await repo.get_many([*IDS, 6]), want, "upsert_many (rows)")

    # update_many (PostgreSQL: through a COPY-filled staging table) and single-row upsert
    res = await repo.update_many(rotated(rows, 3))
    assert res.ok and res.affected == len(rows), res.failures
    want |= {r["id"]: expected(backend, r) for r in rotated(rows, 3)}
    assert_rows(await repo.get_many([*IDS, 6]), want, "update_many")
    for r in rotated(rows, 4):
        await repo.upsert(r)
        want[r["id"]] = expected(backend, r)
    assert_rows(await repo.get_many([*IDS, 6]), want, "upsert")

    # the write-behind BatchWriter (its own validation fast path)
    shifted = [{**r, "id": r["id"] + 100} for r in rows]
    async with repo.writer(max_rows=3) as writer:
        await asyncio.gather(*(writer.insert(r) for r in shifted))
    want |= {r["id"]: expected(backend, r) for r in shifted}
    assert_rows(await repo.get_many(list(want)), want, "BatchWriter")


async def test_update_typed_columns(backend: str, tlay: DataLayer) -> None:
    """``update`` of several typed columns: values over values, over NULLs, and NULLs over values."""
    repo = tlay.repository("typed")
    rows = {r["id"]: r for r in rows_for(backend)}
    for row in rows.values():
        await repo.insert(row)
    some = ("small", "big", "dbl", "num20", "s40", "flag", "day", "ts", "tstz", "uid", "doc", "color", "blob")
    changes: dict[int, dict[str, Any]] = {
        ID_TYPICAL: {c: rows[ID_MAX][c] for c in some},
        ID_MAX: {c: rows[ID_MIN][c] for c in COLUMNS},
        ID_NULL: {c: rows[ID_ODD][c] for c in COLUMNS},
        ID_MIN: dict.fromkeys(COLUMNS),
        ID_ODD: {"i32": 2**31 - 1, "flt": rows[ID_TYPICAL]["flt"], "num12": Decimal("-0.01"),
                 "txt": rows[ID_MAX]["txt"], "uni": "\u00e9", "tod": dt.time(0, 0, 1), "span": dt.timedelta(days=-1)},
    }
    for key, values in changes.items():
        assert await repo.update(key, values) is True
        rows[key] = {**rows[key], **values}
    assert await repo.update(999, {"small": 1}) is False
    for key, row in rows.items():
        assert_row(await repo.get(key), expected(backend, row), "update")


# --------------------------------------------------------------------------- raw reads


def raw_select(backend: str) -> str:
    """Every column in NAMES order, as the server's text where its text is the point."""
    quote = "`" if backend == "mysql" else '"'  # (BLOB is a keyword of MySQL)

    def q(column: str) -> str:
        return f"{quote}{column}{quote}"

    if backend == "postgresql":
        exprs = {
            "num12": "num12::text", "num20": "num20::text", "day": "day::text", "ts": "ts::text",
            "tstz": "(tstz AT TIME ZONE 'UTC')::text", "tod": "tod::text",
            "span": "EXTRACT(EPOCH FROM span)::text", "uid": "uid::text", "doc": "doc::text",
            "color": "color::text",
        }
    elif backend == "mysql":
        exprs = {c: f"CAST({q(c)} AS CHAR)" for c in ("num12", "num20", "day", "ts", "tstz", "tod", "span", "doc")}
    else:
        exprs = {}  # SQLite: values are stored as SQLAlchemy formats them (text for dates, times, UUIDs)
    return ", ".join(exprs.get(c, q(c)) for c in NAMES)


def check_raw(backend: str, col: str, got: Any, want: Any) -> str | None:
    """A problem with the raw value ``got`` of a cell whose expected dal value is ``want``."""
    if want is None:
        return None if got is None else f"not NULL: {short(got)}"
    if got is None:
        return "NULL"
    pg, lite = backend == "postgresql", backend == "sqlite"
    ok: bool
    if col in ("id", "small", "i32", "big", "s40", "txt", "uni", "blob"):
        ok = type(got) is type(want) and got == want
    elif col in ("flt", "dbl"):
        ok = same(got, want)
    elif col in SCALE:
        # SQLite: a REAL (or an INTEGER when whole); elsewhere the exact text, scale included
        ok = got == float(want) if lite else got == str(want)
    elif col == "flag":
        ok = got is want if pg else (type(got) is int and got == int(want))
    elif col == "day":
        # asyncpg sends date.max as 'infinity'
        ok = got == ("infinity" if pg and want == dt.date.max else want.isoformat())
    elif col in ("ts", "tstz"):
        if pg and want == dt.datetime.max:
            ok = got == "infinity"
        else:
            ok = dt.datetime.fromisoformat(got) == (want.astimezone(UTC).replace(tzinfo=None) if want.tzinfo else want)
    elif col == "tod":
        ok = dt.time.fromisoformat(got) == want
    elif col == "span":
        if pg:
            ok = Decimal(got) == Decimal(want.days * 86_400 + want.seconds) + Decimal(want.microseconds).scaleb(-6)
        else:  # a DATETIME holding 1970-01-01 + span
            ok = dt.datetime.fromisoformat(got) - EPOCH == want
    elif col == "uid":
        ok = got == (str(want) if pg else want.hex)
    elif col == "doc":
        ok = type(got) is str and same(json.loads(got), want)
    elif col == "color":
        ok = got == want.name
    else:
        raise AssertionError(col)
    return None if ok else f"raw {short(got)}, dal value {short(want)}"


async def physical_rows(raw: Raw, sql_columns: str) -> dict[int, tuple[Any, ...]]:
    """Every row of every physical table by id, placement checked."""
    out: dict[int, tuple[Any, ...]] = {}
    for slot in range(SHARDS):
        for r in await raw.fetch(db_of_slot(slot), f"SELECT {sql_columns} FROM typed_{slot}"):
            assert slot_of(r[0]) == slot, f"id {r[0]} in typed_{slot}"
            assert r[0] not in out, f"id {r[0]} present twice"
            out[r[0]] = r
    return out


async def core_rows(raw: Raw) -> dict[int, dict[str, Any]]:
    """Every row read with SQLAlchemy Core and the declared types (no dal code)."""
    md = sa.MetaData()
    logical = typed_metadata().tables["typed"]
    out: dict[int, dict[str, Any]] = {}
    for slot in range(SHARDS):
        t = logical.to_metadata(md, name=f"typed_{slot}")
        async with raw.engines[db_of_slot(slot)].connect() as conn:
            for r in (await conn.execute(sa.select(t))).mappings():
                out[r["id"]] = dict(r)
    return out


async def test_physical_rows_agree(backend: str, tlay: DataLayer, raw: Raw) -> None:
    """Rows written by ``insert`` and by ``insert_many``, read from each physical table
    without dal: with SQLAlchemy Core they equal what dal returns, and each value as
    the server holds it is the expected one."""
    repo = tlay.repository("typed")
    rows = rows_for(backend)
    for row in rows:
        await repo.insert(row)
    shifted = [{**r, "id": r["id"] + 100} for r in rows]
    res = await repo.insert_many(shifted)
    assert res.ok, res.failures
    want = {r["id"]: expected(backend, r) for r in [*rows, *shifted]}
    assert {db_of_slot(slot_of(i)) for i in want} == {"db0", "db1"}

    from_dal = await repo.get_many(list(want))
    assert_rows(from_dal, want, "get_many")
    assert_rows(await core_rows(raw), from_dal, "SQLAlchemy Core")

    stored = await physical_rows(raw, raw_select(backend))
    assert sorted(stored) == sorted(want)
    problems = {
        (i, col): p
        for i, r in stored.items()
        for col, got in zip(NAMES, r, strict=True)
        if (p := check_raw(backend, col, got, want[i][col])) is not None
    }
    assert not problems, problems


# --------------------------------------------------------------------------- other accepted Python types

# (case id, column, value given, value stored, whether dal must accept it): values of
# another Python type than the column's. Each is either stored as the column's value by
# every write path, or rejected by every one with ValidationError before any I/O; never
# stored as something else, never an error of another kind.
OTHER_TYPES: list[tuple[str, str, Any, Any, bool]] = [
    ("float<-int", "flt", 3, 3.0, True),
    ("float<-Decimal", "flt", Decimal("0.5"), 0.5, True),
    ("double<-int", "dbl", -7, -7.0, True),
    ("double<-Decimal", "dbl", Decimal("0.5"), 0.5, True),
    ("double<-inexact-Decimal", "dbl", Decimal("0.1"), 0.1, False),  # 0.1 != Decimal("0.1")
    ("numeric<-int", "num12", 5, Decimal("5"), True),
    ("numeric<-float", "num12", 0.25, Decimal("0.25"), True),
    ("numeric20<-int", "num20", -3, Decimal("-3"), True),
    ("enum<-name", "color", "BLUE", Color.BLUE, True),  # SQLAlchemy takes member names
    ("uuid<-str", "uid", "12345678-1234-5678-1234-567812345678",
     uuid.UUID("12345678-1234-5678-1234-567812345678"), False),
    ("uuid<-hex-str", "uid", "0123456789abcdef0123456789abcdef", uuid.UUID("0123456789abcdef0123456789abcdef"), False),
    ("bytes<-bytearray", "blob", bytearray(b"\x00ab\xff"), b"\x00ab\xff", False),
    ("bytes<-memoryview", "blob", memoryview(b"\x00cd\xff"), b"\x00cd\xff", False),
    ("date<-datetime", "day", dt.datetime(2024, 1, 2, 3, 4, 5), dt.date(2024, 1, 2), False),
]

# (case, backend) -> (reason, the exception the test fails with): none known
OTHER_TYPES_BUGS: dict[tuple[str, str], tuple[str, type[BaseException]]] = {}


@pytest.mark.parametrize(
    ("case", "column", "value", "stored", "must_accept"), OTHER_TYPES, ids=[c[0] for c in OTHER_TYPES]
)
async def test_values_of_other_python_types(
    backend: str, tlay: DataLayer, request: pytest.FixtureRequest,
    case: str, column: str, value: Any, stored: Any, must_accept: bool,
) -> None:
    """``insert``, ``insert_many`` (column-wise and row by row), ``upsert`` and ``update``
    all store the column's value, or all reject the value with ValidationError."""
    bug = OTHER_TYPES_BUGS.get((case, backend))
    if bug is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=bug[0], raises=bug[1]))
    repo = tlay.repository("typed")
    await repo.insert({"id": 9})
    writes: list[Callable[[], Awaitable[Any]]] = [
        lambda: repo.insert({"id": 1, column: value}),
        lambda: repo.insert_many([{"id": 2, column: value}, {"id": 3, column: value}]),
        lambda: repo.insert_many([MappingProxyType({"id": 4, column: value})]),
        lambda: repo.upsert({"id": 5, column: value}),
        lambda: repo.update(9, {column: value}),
    ]
    outcomes: list[BaseException | None] = []
    for write in writes:
        try:
            await write()
        except ValidationError as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)
    got = await repo.get_many([1, 2, 3, 4, 5, 9])
    if outcomes[0] is not None:
        assert not must_accept, outcomes[0]
        assert all(o is not None for o in outcomes), outcomes  # rejected by every path ...
        assert sorted(got) == [9] and got[9] == {**dict.fromkeys(NAMES), "id": 9}  # ... before any I/O
        return
    assert outcomes == [None] * len(writes), outcomes  # accepted by every path
    # the column's own value, normalised as the backend does (e.g. Decimal scale)
    want = {**dict.fromkeys(NAMES), column: expected_value(backend, column, stored)}
    assert sorted(got) == [1, 2, 3, 4, 5, 9]
    for i, row in got.items():
        assert_row(row, {**want, "id": i}, case)


# --------------------------------------------------------------------------- values a column cannot hold

# (case id, column, value, backends that store it as documented (see expected_value)):
# values dal's validation lets through but that the column cannot hold on some backend.
UNSTORABLE: list[tuple[str, str, Any, frozenset[str]]] = [
    ("json-set", "doc", {1, 2}, frozenset()),
    ("enum-unknown-name", "color", "PURPLE", frozenset()),
    ("naive-datetime<-aware", "ts", dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=IST), frozenset()),
]
# (case, backend) -> (reason, the exception the test fails with): none known
UNSTORABLE_BUGS: dict[tuple[str, str], tuple[str, type[BaseException]]] = {}


@pytest.mark.parametrize(("case", "column", "value", "stored_on"), UNSTORABLE, ids=[c[0] for c in UNSTORABLE])
async def test_values_a_column_cannot_hold(
    backend: str, tlay: DataLayer, request: pytest.FixtureRequest,
    case: str, column: str, value: Any, stored_on: frozenset[str],
) -> None:
    """Such a value is either stored as documented, or rejected with a dal error that
    names no lost connection, by every write path; the table and the pool stay usable."""
    bug = UNSTORABLE_BUGS.get((case, backend))
    if bug is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=bug[0], raises=bug[1]))
    repo = tlay.repository("typed")
    await repo.insert({"id": 9})
    if backend in stored_on:
        await repo.insert({"id": 1, column: value})
        res = await repo.insert_many([{"id": 2, column: value}, {"id": 3, column: value}])
        assert res.ok, res.failures
        assert await repo.update(9, {column: value}) is True
        stored = expected_value(backend, column, value.replace(tzinfo=None))
        for i, r in (await repo.get_many([1, 2, 3, 9])).items():
            assert same(r[column], stored), (i, r[column])
        return

    def rejected(exc: BaseException) -> None:
        assert isinstance(exc, DalError) and not isinstance(exc, ConnectionUnavailableError), repr(exc)

    for call in (
        lambda: repo.insert({"id": 1, column: value}),
        lambda: repo.update(9, {column: value}),
        lambda: repo.upsert({"id": 9, column: value}),
    ):
        with pytest.raises(Exception) as ei:
            await call()
        rejected(ei.value)
    with pytest.raises(DalError) as bi:
        await repo.insert_many([{"id": 2, column: value}, {"id": 3, column: value}])
    if isinstance(bi.value, BatchError):
        for failure in bi.value.result.failures:
            rejected(failure.error)
    else:
        rejected(bi.value)
    assert sorted(await repo.get_many([1, 2, 3, 9])) == [9]
    assert (await repo.get(9, primary=True)) == {**dict.fromkeys(NAMES), "id": 9}


# --------------------------------------------------------------------------- through the cache


@contextlib.asynccontextmanager
async def cached_layers(urls: list[str]) -> AsyncIterator[tuple[DataLayer, DataLayer]]:
    """Two started layers caching ``typed`` in L1 and the shared Redis (a namespace of
    their own) over the same tables: what one fills into Redis, the other reads from there.
    Started after the rows are written, so their Bloom filters know the keys."""
    ns = unique_namespace()
    tables = {"typed": {**TABLES["typed"], "cache": True}}
    layers = [DataLayer(cache_topology(urls, tables, redis=REDIS_URL, namespace=ns), typed_metadata(), env={})
              for _ in range(2)]
    r = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        for lay in layers:
            await lay.start()
        yield layers[0], layers[1]
    finally:
        for lay in layers:
            await lay.aclose()
        with contextlib.suppress(Exception):
            await delete_ns(r, ns)
        await r.aclose()


@pytest.mark.parametrize("with_enum", [False, True], ids=["all-but-enum", "enum"])
async def test_cached_reads(
    backend: str, urls: list[str], tlay: DataLayer, request: pytest.FixtureRequest, with_enum: bool
) -> None:
    """``get`` and ``get_many`` of a cached table: filled from the database, then served
    by L1 and by Redis (another layer), every value exact."""
    rows = rows_for(backend)
    if not with_enum:
        for r in rows:
            r["color"] = None
    others = [{**r, "id": r["id"] + 100} for r in rows]
    plain = tlay.repository("typed")
    for r in [*rows, *others]:
        await plain.insert(r)
    want = {r["id"]: expected(backend, r) for r in rows}
    want_others = {r["id"]: expected(backend, r) for r in others}
    async with cached_layers(urls) as layers:
        a, b = (lay.repository("typed") for lay in layers)
        for r in rows:
            assert_row(await a.get(r["id"]), want[r["id"]], "cache fill")
            assert_row(await a.get(r["id"]), want[r["id"]], "L1")
            assert_row(await b.get(r["id"]), want[r["id"]], "Redis")
        assert_rows(await b.get_many(IDS), want, "get_many (L1)")
        assert_rows(await a.get_many(list(want_others)), want_others, "get_many (fill)")
        assert_rows(await b.get_many(list(want_others)), want_others, "get_many (Redis)")


# --------------------------------------------------------------------------- dal bugs


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_create_all_creates_the_enum_type(urls: list[str], raw: Raw) -> None:
    async with DataLayer(topology(urls, TABLES), typed_metadata(), env={}) as layer:
        await layer.drop_all()
        await pg_enum_type(raw, create=False)
        try:
            await layer.create_all()
            await layer.create_all()  # again: the existing type is kept, not an error
            repo = layer.repository("typed")
            await repo.insert({"id": 1, "color": Color.BLUE})
            assert (await repo.get(1))["color"] is Color.BLUE  # type: ignore[index]
            type_on = "SELECT count(*) FROM pg_type WHERE typname = 'typed_color'"
            assert [(await raw.fetch(db, type_on))[0][0] for db in raw.engines] == [1, 1]
            await layer.drop_all()  # the tables, then the type no table uses any more
            assert [(await raw.fetch(db, type_on))[0][0] for db in raw.engines] == [0, 0]
        finally:
            await layer.drop_all()
            await pg_enum_type(raw, create=False)


@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
async def test_bytes_on_mysql(backend: str, tlay: DataLayer) -> None:
    """LargeBinary on MySQL through every write path. (aiomysql 0.3.2 escapes bytes with
    pymysql.converters.escape_bytes_prefixed, which PyMySQL 1.2 turned into a placeholder
    string: dal requires PyMySQL < 1.2.)"""
    repo = tlay.repository("typed")
    blobs = [b"\x00\x01\xfe\xff", bytes(range(256)) * 64, b"", b"\\N\t\n\r\\."]
    await repo.insert({"id": 1, "blob": blobs[0]})
    assert (await repo.get(1)) == {"id": 1, **dict.fromkeys(COLUMNS), "blob": blobs[0]}
    res = await repo.insert_many([{"id": 10 + k, "blob": b} for k, b in enumerate(blobs)])
    assert res.ok, res.failures
    assert await repo.update(1, {"blob": blobs[1]}) is True
    got = await repo.get_many([1, *range(10, 10 + len(blobs))])
    assert {k: r["blob"] for k, r in got.items()} == {1: blobs[1], **{10 + k: b for k, b in enumerate(blobs)}}
