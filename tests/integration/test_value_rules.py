"""What dal stores and what it refuses (README.md, "Values: what is stored, what is refused").

Every value is either stored so that it reads back equal on the backend, or
rejected with ValidationError naming ``table.column`` before any I/O (no
statement counted on any node, no row in any physical table, read with raw SQL)
by every path that takes values: ``insert``, ``upsert``, ``update``,
``insert_many``/``upsert_many``/``update_many`` (column-wise and row by row),
the ``BatchWriter``, ``find``/``count`` filters (``eq``, ``in_``) and ``after``
cursors. Keys (``get``, ``get_many``, ``delete``, ``delete_many``,
``transaction``) are checked the same way.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
import sqlalchemy as sa

from dal import DataLayer, ValidationError, in_
from dal.batch import BatchPlanner
from tests.batch_support import Raw
from tests.conftest import topology

SHARDS = 2
TABLES: dict[str, Any] = {
    "vals": {"shard_key": "id", "table_shards": SHARDS},
    "skeys": {"shard_key": "k", "table_shards": SHARDS},
}
ALL = frozenset({"postgresql", "mysql", "sqlite"})
PG = frozenset({"postgresql"})
NOT_PG = frozenset({"mysql", "sqlite"})
NOT_MYSQL = frozenset({"postgresql", "sqlite"})
NONE: frozenset[str] = frozenset()
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))


def metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "vals", md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("s", sa.String(40)),
        sa.Column("txt", sa.Text),
        sa.Column("flt", sa.Float),
        sa.Column("dbl", sa.Double),
        sa.Column("num", sa.Numeric(38, 10)),
        sa.Column("num12", sa.Numeric(12, 2)),
        sa.Column("ts", sa.DateTime),
        sa.Column("tstz", sa.DateTime(timezone=True)),
        sa.Column("tod", sa.Time),
        sa.Column("span", sa.Interval),
        sa.Column("day", sa.Date),
        sa.Column("doc", sa.JSON),
    )
    sa.Table(
        "skeys", md,
        sa.Column("k", sa.String(40), primary_key=True),
        sa.Column("v", sa.Text),
    )
    return md


def nested(depth: int) -> Any:
    """``depth`` arrays inside each other, built without recursion."""
    v: Any = []
    for _ in range(depth - 1):
        v = [v]
    return v


SURROGATES = ("a\ud800b", "\udfff", "\ud83d", "ok \U0001f600 \udc00")

# (case id, column, value, backends that store it so that it reads back equal)
RULES: list[tuple[str, str, Any, frozenset[str]]] = [
    # str: no lone surrogate anywhere; NUL only where text can hold it
    *((f"str-surrogate-{i}", "s", v, NONE) for i, v in enumerate(SURROGATES)),
    ("text-surrogate", "txt", "x" * 100 + "\ud800", NONE),
    ("str-nul", "s", "a\x00b", NOT_PG),
    ("text-nul", "txt", "\x00", NOT_PG),
    ("str-non-ascii", "s", "\u00e9\u4e2d\U0001f600", ALL),
    # JSON: only what json writes and reads back equal, nested at most 31 deep on MySQL, 100 elsewhere
    ("json-5000-deep", "doc", nested(5000), NONE),
    ("json-101-deep", "doc", nested(101), NONE),
    ("json-100-deep", "doc", nested(100), NOT_MYSQL),
    ("json-32-deep", "doc", nested(32), NOT_MYSQL),
    ("json-31-deep", "doc", {"a": nested(30)}, ALL),
    ("json-int-key", "doc", {1: "a"}, NONE),
    ("json-none-key", "doc", {None: "a"}, NONE),
    ("json-set", "doc", {"a": {1, 2}}, NONE),
    ("json-tuple", "doc", [(1, 2)], NONE),
    ("json-object", "doc", [object()], NONE),
    ("json-decimal", "doc", {"a": Decimal("1.5")}, NONE),
    ("json-nan", "doc", [1.5, float("nan")], NONE),
    ("json-inf", "doc", {"x": float("-inf")}, NONE),
    ("json-surrogate-value", "doc", {"a": ["\ud800"]}, NONE),
    ("json-surrogate-key", "doc", {"k\udfff": 1}, NONE),
    ("json-scalar-surrogate", "doc", "\ud800", NONE),
    ("json-nul", "doc", {"a\x00": "\x00"}, ALL),
    ("json-ok", "doc", {"a": [1, 2.5, "\u00fc", None, True, {"b": 2**64}]}, ALL),
    # Float: finite, exact, and on MySQL's 4-byte FLOAT what 6 significant digits give back
    ("float-nan", "flt", float("nan"), NONE),
    ("float-inf", "flt", float("inf"), NONE),
    ("double-nan", "dbl", float("nan"), NONE),
    ("double--inf", "dbl", float("-inf"), NONE),
    ("double-decimal-nan", "dbl", Decimal("NaN"), NONE),
    ("float-third", "flt", 1 / 3, NOT_MYSQL),
    ("float-subnormal32", "flt", 1e-40, NOT_MYSQL),
    ("float-1e39", "flt", 1e39, NOT_MYSQL),
    ("float-half", "flt", 0.5, ALL),
    ("double-third", "dbl", 1 / 3, ALL),
    ("double-int-inexact", "dbl", 2**53 + 1, NONE),
    ("double-decimal-inexact", "dbl", Decimal("0.1"), NONE),
    ("double-decimal-exact", "dbl", Decimal("0.5"), ALL),
    # Numeric: finite, no digit beyond the scale, and on SQLite what a float gives back
    ("numeric-nan", "num", Decimal("NaN"), NONE),
    ("numeric-snan", "num", Decimal("sNaN"), NONE),
    ("numeric-inf", "num12", Decimal("-Infinity"), NONE),
    ("numeric-float-nan", "num12", float("nan"), NONE),
    ("numeric-38-digits", "num", Decimal("1234567890123456789012345678.1234567891"), PG | {"mysql"}),
    ("numeric-16-digits", "num", Decimal("1234567890.123456"), PG | {"mysql"}),
    ("numeric-15-digits", "num", Decimal("12345.1234567891"), ALL),
    ("numeric-beyond-scale", "num12", Decimal("1.005"), NONE),
    ("numeric-float-inexact", "num12", 0.1, NONE),
    ("numeric-float-exact", "num12", 0.25, ALL),
    ("numeric-scale-zeros", "num12", Decimal("1.5000"), ALL),
    ("numeric-neg-zero", "num12", Decimal("-0"), ALL),
    # datetimes: offsets only where kept, fractions only where kept
    ("naive-col-aware", "ts", dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=IST), NONE),
    ("tz-col-aware", "tstz", dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=IST), PG),
    ("tz-col-naive", "tstz", dt.datetime(2024, 1, 2, 3, 4, 5), NOT_PG),
    ("tz-col-aware-max", "tstz", dt.datetime.max.replace(tzinfo=dt.UTC), NONE),
    ("tz-col-aware-overflow", "tstz", dt.datetime.max.replace(tzinfo=dt.timezone(-dt.timedelta(hours=1))), NONE),
    ("datetime-micro", "ts", dt.datetime(2024, 1, 2, 3, 4, 5, 6), NOT_MYSQL),
    ("datetime-whole", "ts", dt.datetime(2024, 1, 2, 3, 4, 5), ALL),
    ("time-micro", "tod", dt.time(1, 2, 3, 4), NOT_MYSQL),
    ("time-aware", "tod", dt.time(1, 2, 3, tzinfo=IST), NONE),
    ("time-whole", "tod", dt.time(1, 2, 3), ALL),
    ("interval-micro", "span", dt.timedelta(seconds=1, microseconds=5), NOT_MYSQL),
    ("interval-huge", "span", dt.timedelta(days=999_999_999), PG),
    ("interval-whole", "span", dt.timedelta(days=-3, seconds=7), ALL),
    ("date-datetime", "day", dt.datetime(2024, 1, 2, 3, 4, 5), NONE),
    ("date-ok", "day", dt.date(2024, 1, 2), ALL),
]


def queries(layer: DataLayer) -> int:
    return sum(n.queries for n in layer.cluster.nodes.values())


@pytest.fixture
async def vlay(backend: str, urls: list[str]) -> AsyncIterator[DataLayer]:
    async with DataLayer(topology(urls, TABLES), metadata(), env={}) as layer:
        await layer.drop_all()
        await layer.create_all()
        yield layer
        await layer.drop_all()


async def raw_ids(raw: Raw, table: str, key: str) -> list[Any]:
    out: list[Any] = []
    for slot in range(SHARDS):
        for db in raw.engines:
            if f"{table}_{slot}" in await raw.tables(db):
                out += [r[0] for r in await raw.fetch(db, f"SELECT {key} FROM {table}_{slot}")]
    return sorted(out)


def write_paths(repo: Any, column: str, value: Any) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    async def writer(op: str) -> None:
        async with repo.writer(max_rows=2) as w:
            await getattr(w, op)({"id": 8, column: value})

    return [
        ("insert", lambda: repo.insert({"id": 1, column: value})),
        ("upsert", lambda: repo.upsert({"id": 9, column: value})),
        ("update", lambda: repo.update(9, {column: value})),
        ("insert_many columns", lambda: repo.insert_many([{"id": 2, column: None}, {"id": 3, column: value}])),
        ("insert_many rows", lambda: repo.insert_many([MappingProxyType({"id": 4, column: value})])),
        ("upsert_many", lambda: repo.upsert_many([{"id": 9, column: None}, {"id": 5, column: value}])),
        ("update_many", lambda: repo.update_many([{"id": 9, column: value}])),
        ("BatchWriter.insert", lambda: writer("insert")),
        ("BatchWriter.upsert", lambda: writer("upsert")),
    ]


def read_paths(repo: Any, column: str, value: Any) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    return [
        ("find eq", lambda: repo.find({column: value})),
        ("find in_", lambda: repo.find({column: in_([value])})),
        ("count", lambda: repo.count({column: value})),
        ("after", lambda: repo.find(order_by=column, limit=1, after={column: value, "id": 1})),
    ]


@pytest.mark.parametrize(("case", "column", "value", "stored_on"), RULES, ids=[r[0] for r in RULES])
async def test_value_rules(
    backend: str, vlay: DataLayer, raw: Raw, case: str, column: str, value: Any, stored_on: frozenset[str]
) -> None:
    repo = vlay.repository("vals")
    await repo.insert({"id": 9})
    if backend in stored_on:
        await repo.insert({"id": 1, column: value})
        assert (await repo.get(1, primary=True))[column] == value, case
        res = await repo.insert_many([{"id": 2, column: value}, {"id": 3, column: value}])
        assert res.ok, res.failures
        assert await repo.update(9, {column: value}) is True
        got = await repo.get_many([1, 2, 3, 9])
        assert sorted(got) == [1, 2, 3, 9]
        assert all(r[column] == value for r in got.values()), got
        return
    before = queries(vlay)
    for label, call in [*write_paths(repo, column, value), *read_paths(repo, column, value)]:
        with pytest.raises(ValidationError) as ei:
            await call()
        assert f"vals.{column}" in str(ei.value), (label, str(ei.value))
    assert queries(vlay) == before, "rejected after I/O"
    assert await raw_ids(raw, "vals", "id") == [9]
    assert (await repo.get(9, primary=True))[column] is None


@pytest.mark.parametrize("bad", SURROGATES)
async def test_lone_surrogates_in_keys(vlay: DataLayer, raw: Raw, bad: str) -> None:
    """A key with a lone surrogate is a ValidationError naming the key column, in every key path."""
    repo = vlay.repository("skeys")
    await repo.insert({"k": "fine", "v": "x"})
    before = queries(vlay)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: repo.get(bad),
        lambda: repo.get(bad, primary=True),
        lambda: repo.get_many(["fine", bad]),
        lambda: repo.delete(bad),
        lambda: repo.delete_many(["fine", bad]),
        lambda: repo.update(bad, {"v": "y"}),
        lambda: repo.insert({"k": bad, "v": "y"}),
        lambda: repo.upsert({"k": bad, "v": "y"}),
        lambda: repo.insert_many([{"k": "new", "v": "y"}, {"k": bad, "v": "y"}]),
        lambda: repo.find({"k": bad}),
        lambda: repo.find({"k": in_(["fine", bad])}),
        lambda: repo.find({"v": bad}),
        lambda: repo.update("fine", {"v": bad}),
    ]
    for call in calls:
        with pytest.raises(ValidationError) as ei:
            await call()
        assert "skeys.k" in str(ei.value) or "skeys.v" in str(ei.value), str(ei.value)
    with pytest.raises(ValidationError):
        async with repo.transaction(bad):
            pass
    assert queries(vlay) == before, "rejected after I/O"
    assert await raw_ids(raw, "skeys", "k") == ["fine"]


@pytest.mark.parametrize("items", ["abc", b"ab", bytearray(b"ab"), {"id": 1}, MappingProxyType({"id": 1})],
                         ids=["str", "bytes", "bytearray", "dict", "mapping"])
async def test_a_str_or_mapping_is_not_a_collection(vlay: DataLayer, raw: Raw, items: Any) -> None:
    repo = vlay.repository("skeys")
    await repo.insert({"k": "a", "v": "x"})
    before = queries(vlay)
    for arg, call in (
        ("keys", lambda: repo.get_many(items)),
        ("keys", lambda: repo.get_many(items, primary=True)),
        ("keys", lambda: repo.delete_many(items)),
        ("rows", lambda: repo.insert_many(items)),
        ("rows", lambda: repo.upsert_many(items)),
        ("rows", lambda: repo.update_many(items)),
    ):
        with pytest.raises(ValidationError) as ei:
            await call()
        assert f"skeys: {arg} must be a collection" in str(ei.value), str(ei.value)
    planner = BatchPlanner(repo.binding)
    for op in ("insert", "upsert", "update", "delete"):
        with pytest.raises(ValidationError):
            planner.plan(op, items, 10)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            planner.plan_load(op, items, 10)  # type: ignore[arg-type]
    assert queries(vlay) == before
    assert await raw_ids(raw, "skeys", "k") == ["a"]
