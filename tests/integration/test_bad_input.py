"""Bad input on every backend: a typed error, and nothing written.

"Nothing written" is checked against the servers: the row count of every
physical table, read with raw SQL on each primary, is the same before and
after. Input errors must also be raised before any I/O (no statement counted
on any node).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from dal import (
    ConfigError,
    ConnectionUnavailableError,
    DalError,
    DataError,
    DataLayer,
    DuplicateKeyError,
    InputError,
    PoolTimeoutError,
    ShardKeyError,
    UnknownColumnError,
    UnknownTableError,
    ValidationError,
    gt,
    in_,
    like,
    lt,
)
from dal.config import DSN
from tests.conftest import MYSQL_URL, PG_URL, USERS_ORDERS_TABLES, topology, users_orders_metadata

SHARDS = 4
PHYSICAL = [f"{t}_{s}" for t in ("users", "orders") for s in range(SHARDS)] + ["countries"]


def slot_of(key: int | str) -> int:
    return zlib.crc32(str(key).encode("utf-8")) % SHARDS


def db_of_table(name: str) -> str:
    if name == "countries":
        return "db0"
    return "db0" if int(name.rpartition("_")[2]) < 2 else "db1"


async def raw_counts(layer: DataLayer, tables: list[str] = PHYSICAL) -> dict[str, int]:
    """Rows per physical table, counted on the primaries (fails if a table is missing)."""
    out = {}
    for name in tables:
        row = await layer.cluster.primary(db_of_table(name)).fetch_one(f"SELECT COUNT(*) FROM {name}", ())
        assert row is not None
        out[name] = int(row[0])
    return out


def total_queries(layer: DataLayer) -> int:
    return sum(n.queries for n in layer.cluster.nodes.values())


@asynccontextmanager
async def unchanged(layer: DataLayer, *, io: bool = False) -> AsyncIterator[None]:
    """The block writes nothing; unless ``io``, it runs no statement at all."""
    before = await raw_counts(layer)
    queries = total_queries(layer)
    yield
    if not io:
        assert total_queries(layer) == queries, "an input error was raised after I/O"
    assert await raw_counts(layer) == before


async def seed(layer: DataLayer) -> None:
    users = layer.repository("users")
    for i in range(1, 21):
        await users.insert({"id": i, "name": f"u{i}", "email": f"u{i}@x.io", "age": 20 + i, "active": i % 2 == 0})
        await layer.repository("orders").insert({"user_id": i, "order_id": 1, "amount": Decimal("9.99")})
    await layer.repository("countries").insert({"code": "de", "name": "Deutschland"})


@pytest.fixture
async def seeded(layer: DataLayer) -> DataLayer:
    await seed(layer)
    return layer


# -- keys -----------------------------------------------------------------------------
USER_KEYS: list[tuple[Any, type[InputError]]] = [
    (None, ShardKeyError),
    (1.5, ShardKeyError),
    (1.0, ShardKeyError),
    (True, ShardKeyError),
    (False, ShardKeyError),
    (Decimal(1), ShardKeyError),
    ({"id": 1}, ShardKeyError),
    ((1,), ShardKeyError),
    ([1], ShardKeyError),
    ("1", ValidationError),
    ("1; DROP TABLE users_0; --", ValidationError),
    (b"1", ValidationError),
]
ORDER_KEYS: list[tuple[Any, type[InputError]]] = [
    (5, ValidationError),
    ((5,), ValidationError),
    ((5, 1, 2), ValidationError),
    ([5, 1], ValidationError),
    ({"user_id": 5, "order_id": 1}, ValidationError),
    ("5,1", ValidationError),
    ((None, 1), ShardKeyError),
    ((5, None), ValidationError),
    ((5, "1"), ValidationError),
    (("5", 1), ValidationError),
    ((5.0, 1), ShardKeyError),
    ((True, 1), ShardKeyError),
    ((5, True), ValidationError),
]
COUNTRY_KEYS: list[tuple[Any, type[InputError]]] = [
    (1, ValidationError),
    (None, ValidationError),
    ("deu", ValidationError),  # String(2)
    (("de",), ValidationError),
]


async def test_wrong_key_types(seeded: DataLayer) -> None:
    layer = seeded
    cases = [
        ("users", USER_KEYS, {"name": "x"}),
        ("orders", ORDER_KEYS, {"note": "x"}),
        ("countries", COUNTRY_KEYS, {"name": "x"}),
    ]
    async with unchanged(layer):
        for table, keys, values in cases:
            repo = layer.repository(table)
            ops: list[tuple[str, Callable[[Any], Awaitable[Any]]]] = [
                ("get", repo.get),
                ("get primary", lambda k, repo=repo: repo.get(k, primary=True)),
                ("get_many", lambda k, repo=repo: repo.get_many([k])),
                ("update", lambda k, repo=repo, values=values: repo.update(k, values)),
                ("delete", repo.delete),
            ]
            for key, error in keys:
                for label, op in ops:
                    with pytest.raises(error):
                        await op(key)
                    try:
                        await op(key)
                    except error as exc:
                        assert table in str(exc), (table, key, label, str(exc))
        # one bad key among good ones: nothing is read at all
        with pytest.raises(ValidationError):
            await layer.repository("users").get_many([1, 2, "3"])
        with pytest.raises(ValidationError):
            await layer.repository("orders").get_many([(1, 1), (2, 1), (3,)])
    # bad shard values for a transaction (None is a ValidationError here, a ShardKeyError in get())
    users = layer.repository("users")
    async with unchanged(layer):
        for key, _ in USER_KEYS:
            with pytest.raises(InputError):
                async with users.transaction(key):
                    pass


async def test_wrong_key_types_in_rows(seeded: DataLayer) -> None:
    layer = seeded
    users = layer.repository("users")
    orders = layer.repository("orders")
    async with unchanged(layer):
        for bad in (None, 1.5, True, "21", b"21", Decimal(21)):
            for op in (users.insert, users.upsert):
                with pytest.raises(InputError):
                    await op({"id": bad, "name": "x"})
        with pytest.raises(ValidationError):
            await users.insert({"name": "no id"})
        for bad_row in (
            {"user_id": "1", "order_id": 2, "amount": Decimal(1)},
            {"user_id": 1, "order_id": None, "amount": Decimal(1)},
            {"user_id": 1, "amount": Decimal(1)},
            {"order_id": 2, "amount": Decimal(1)},
        ):
            with pytest.raises(InputError):
                await orders.insert(bad_row)
        for not_a_row in (None, 1, "id=1", [("id", 1)], ({"id": 1},)):
            with pytest.raises(ValidationError):
                await users.insert(not_a_row)
            with pytest.raises(ValidationError):
                await users.update(1, not_a_row)


async def test_unknown_table(layer: DataLayer) -> None:
    for name in ("nope", "users_0", "USERS", "", "users; DROP TABLE users_0", None, 1):
        with pytest.raises(UnknownTableError) as ei:
            layer.repository(name)  # type: ignore[call-overload]
        assert repr(name) in str(ei.value)
    async with layer.repository("users").transaction(1) as tx:
        with pytest.raises(UnknownTableError):
            tx.repository("nope")


async def test_unknown_columns(seeded: DataLayer) -> None:
    layer = seeded
    users = layer.repository("users")
    async with unchanged(layer):
        for bogus in ("bogus", "Name", "NAME", " name", "name ", "users.name", "id; --"):
            cases: list[Callable[[], Awaitable[Any]]] = [
                lambda b=bogus: users.insert({"id": 99, "name": "x", b: 1}),
                lambda b=bogus: users.upsert({"id": 99, "name": "x", b: 1}),
                lambda b=bogus: users.update(1, {b: 1}),
                lambda b=bogus: users.update(1, {"name": "y", b: 1}),
                lambda b=bogus: users.find({b: 1}),
                lambda b=bogus: users.find({b: gt(1)}),
                lambda b=bogus: users.count({b: 1}),
                lambda b=bogus: users.find(order_by=b),
                lambda b=bogus: users.find(order_by=["name", b]),
                lambda b=bogus: users.find(order_by="-" + b),
            ]
            for call in cases:
                with pytest.raises(UnknownColumnError) as ei:
                    await call()
                assert repr(bogus) in str(ei.value) or repr(bogus.lstrip("-")) in str(ei.value), str(ei.value)
        for non_str in (1, None, ("name",)):
            with pytest.raises(UnknownColumnError):
                await users.insert({"id": 99, "name": "x", non_str: 1})
            with pytest.raises(UnknownColumnError):
                await users.find({non_str: 1})
    assert await users.get(1) == {"id": 1, "name": "u1", "email": "u1@x.io", "age": 21, "active": False}


# -- SQL injection --------------------------------------------------------------------
INJECTIONS = [
    "1; DROP TABLE users_0; --",
    "' OR '1'='1",
    "x' OR '1'='1' --",
    "'; DROP TABLE users_1; --",
    "\\'; DROP TABLE users_2; -- ",
    "\\",
    "' OR 1=1 #",
    '" OR ""="',
    "1' UNION SELECT id, name FROM users_0 --",
    "Robert'); DROP TABLE orders_0;--",
    "%' OR '1'='1",
    "$1",
    "?",
    "%s",
    ":k_k",
]


def kv_metadata() -> sa.MetaData:
    md = users_orders_metadata()
    sa.Table(
        "kvinj", md,
        sa.Column("k", sa.String(200), primary_key=True),
        sa.Column("v", sa.Text),
    )
    return md


@pytest.fixture
async def kv_layer(seeded: DataLayer, make_layer: Callable[..., DataLayer]) -> AsyncIterator[DataLayer]:
    tables = {**USERS_ORDERS_TABLES, "kvinj": {"shard_key": "k", "table_shards": SHARDS}}
    async with make_layer(tables, kv_metadata()) as lay:
        await lay.drop_all(["kvinj"])
        await lay.create_all(["kvinj"])
        try:
            yield lay
        finally:
            await lay.drop_all(["kvinj"])


async def test_sql_injection_in_string_keys_and_values(seeded: DataLayer, kv_layer: DataLayer) -> None:
    layer = seeded
    before = await raw_counts(layer)
    kv = kv_layer.repository("kvinj")
    for s in INJECTIONS:
        assert await kv.get(s) is None
    for s in INJECTIONS:
        await kv.insert({"k": s, "v": s})
    for s in INJECTIONS:
        assert await kv.get(s) == {"k": s, "v": s}
        assert await kv.find({"k": s}) == [{"k": s, "v": s}]
        assert await kv.find({"v": s}) == [{"k": s, "v": s}]
        assert await kv.count({"v": s}) == 1
        assert await kv.update(s, {"v": s + "!"}) is True
    assert await kv.get_many([*INJECTIONS, "nope"]) == {s: {"k": s, "v": s + "!"} for s in INJECTIONS}
    assert await kv.count() == len(INJECTIONS)
    assert await kv.find({"k": "x' OR '1'='1"}) == []
    for s in INJECTIONS:
        assert await kv.delete(s) is True
    assert await kv.count() == 0
    assert await raw_counts(layer) == before


async def test_sql_injection_in_filter_values_and_like(seeded: DataLayer) -> None:
    layer = seeded
    users = layer.repository("users")
    async with unchanged(layer, io=True):
        for s in INJECTIONS:
            assert await users.find({"name": s}) == []
            assert await users.count({"name": s}) == 0
            assert await users.find({"email": in_([s, "nobody"])}) == []
            assert await users.find({"name": lt(s)}, limit=1) is not None
        for pattern in (
            "%' OR '1'='1",
            "x%'; DROP TABLE users_0; --",
            "' OR name LIKE '%",
            "%') OR ('1'='1",
            "u1' --",
        ):
            assert await users.find({"name": like(pattern)}) == []
            assert await users.count({"name": like(pattern)}) == 0
        assert await users.count({"name": like("u1%")}) == 11  # still a working LIKE
        # an int column given an injection string is a type error before I/O
        for s in INJECTIONS:
            with pytest.raises(ValidationError):
                await users.find({"id": s})
            with pytest.raises(ValidationError):
                await users.find({"age": s})
            with pytest.raises(ValidationError):
                await users.get(s)


async def test_sql_injection_in_identifiers(seeded: DataLayer) -> None:
    layer = seeded
    users = layer.repository("users")
    async with unchanged(layer):
        for order_by in (
            "name; DROP TABLE users_0",
            "name DESC",
            "name desc",
            "-",
            "",
            "--name",
            "name,id",
            "1",
            "(SELECT 1)",
            "name; --",
            "-name; DROP TABLE users_0",
            ["name", "id; DROP TABLE users_0"],
        ):
            with pytest.raises(UnknownColumnError):
                await users.find(order_by=order_by)
        for column in (
            "name; DROP TABLE users_0; --",
            "name) VALUES (1); DROP TABLE users_0; --",
            "name = 'x', age",
            "`name`",
            '"name"',
        ):
            with pytest.raises(UnknownColumnError):
                await users.insert({"id": 99, "name": "x", column: "y"})
            with pytest.raises(UnknownColumnError):
                await users.upsert({"id": 1, column: "y"})
            with pytest.raises(UnknownColumnError):
                await users.update(1, {column: "y"})
            with pytest.raises(UnknownColumnError):
                await users.find({column: "y"})
            with pytest.raises(UnknownColumnError):
                await users.count({column: "y"})
    # every physical table still exists and holds what it held
    counts = await raw_counts(layer)
    assert sum(counts[f"users_{s}"] for s in range(SHARDS)) == 20
    assert sum(counts[f"orders_{s}"] for s in range(SHARDS)) == 20
    assert counts["countries"] == 1


# -- values ---------------------------------------------------------------------------
async def test_oversized_strings_are_rejected_before_io(seeded: DataLayer) -> None:
    layer = seeded
    users = layer.repository("users")
    countries = layer.repository("countries")
    async with unchanged(layer):
        for name in ("x" * 65, "é" * 65, "🚀" * 65):
            with pytest.raises(ValidationError) as ei:
                await users.insert({"id": 99, "name": name})
            assert "name" in str(ei.value)
            with pytest.raises(ValidationError):
                await users.upsert({"id": 1, "name": name})
            with pytest.raises(ValidationError):
                await users.update(1, {"name": name})
            with pytest.raises(ValidationError):
                await users.find({"name": name})
        with pytest.raises(ValidationError):
            await users.insert({"id": 99, "name": "x", "email": "e" * 129})
        with pytest.raises(ValidationError):
            await countries.insert({"code": "deu", "name": "x"})
    # exactly at the limit, in characters (not bytes), on every backend
    for i, name in enumerate(("x" * 64, "é" * 64, "名" * 64, "🚀" * 64)):
        await users.insert({"id": 100 + i, "name": name})
        assert (await users.get(100 + i))["name"] == name  # type: ignore[index]


async def test_large_text_round_trips(seeded: DataLayer) -> None:
    orders = seeded.repository("orders")
    # up to 65,535 bytes: the smallest Text of any backend (MySQL TEXT)
    big = ("0123456789abcdef" * 4000) + ("ü" * 500)
    assert len(big.encode()) < 65_535
    await orders.insert({"user_id": 1, "order_id": 2, "amount": Decimal("1.00"), "note": big})
    assert (await orders.get((1, 2)))["note"] == big  # type: ignore[index]


async def test_text_beyond_capacity_is_stored_whole_or_a_typed_error(seeded: DataLayer) -> None:
    """Never truncated, never half-written; and the pool stays healthy afterwards."""
    layer = seeded
    orders = layer.repository("orders")
    users = layer.repository("users")
    # 1 MB is over MySQL's TEXT; 20 MB is over MariaDB's max_allowed_packet (16 MB),
    # after which the server drops the connection
    for size in (1_000_000, 20_000_000):
        huge = "x" * size
        before = await raw_counts(layer)
        try:
            await orders.insert({"user_id": 1, "order_id": 3, "amount": Decimal("1.00"), "note": huge})
        except DataError:
            assert await raw_counts(layer) == before
            assert await orders.get((1, 3)) is None
        else:
            assert (await orders.get((1, 3)))["note"] == huge  # type: ignore[index]
            assert await orders.delete((1, 3)) is True
        try:
            await orders.update((1, 1), {"note": huge})
        except DataError:
            assert (await orders.get((1, 1)))["note"] is None  # type: ignore[index]
        else:
            assert (await orders.get((1, 1)))["note"] == huge  # type: ignore[index]
            assert await orders.update((1, 1), {"note": None}) is True
        # every pooled connection still works (a dead one must not be handed out)
        for _ in range(3):
            rows = await asyncio.gather(*(users.get(i, primary=True) for i in range(1, 21)))
            assert all(r is not None for r in rows)
            assert await orders.count() == 20


async def test_huge_text_round_trips(seeded: DataLayer, backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "mysql":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                raises=DataError,
                reason="sa.Text compiles to MySQL TEXT (max 65,535 bytes): a 1 MB value is rejected "
                "with DataError, while PostgreSQL and SQLite store it; dal's DDL would need LONGTEXT "
                "for Text on MySQL to make Text mean the same on every backend",
            )
        )
    orders = seeded.repository("orders")
    huge = "0123456789" * 100_000
    await orders.insert({"user_id": 1, "order_id": 4, "amount": Decimal("1.00"), "note": huge})
    assert (await orders.get((1, 4)))["note"] == huge  # type: ignore[index]


async def test_not_null_and_required_columns(seeded: DataLayer) -> None:
    layer = seeded
    users = layer.repository("users")
    orders = layer.repository("orders")
    async with unchanged(layer):
        for row in (
            {"id": 99},
            {"id": 99, "name": None},
            {"id": 99, "name": "x", "active": None},
            {"id": 99, "email": "x@y"},
        ):
            with pytest.raises(ValidationError):
                await users.insert(row)
            with pytest.raises(ValidationError):
                await users.upsert(row)
        for values in ({"name": None}, {"active": None}):
            with pytest.raises(ValidationError):
                await users.update(1, values)
        for row in (
            {"user_id": 1, "order_id": 9},
            {"user_id": 1, "order_id": 9, "amount": None},
        ):
            with pytest.raises(ValidationError):
                await orders.insert(row)
        with pytest.raises(ValidationError):
            await orders.update((1, 1), {"amount": None})


async def test_wrong_value_types(seeded: DataLayer) -> None:
    layer = seeded
    users = layer.repository("users")
    orders = layer.repository("orders")
    async with unchanged(layer):
        for values in (
            {"age": "30"},
            {"age": 30.0},
            {"age": 1.5},
            {"age": True},
            {"age": Decimal(30)},
            {"active": 1},
            {"active": 0},
            {"active": "true"},
            {"active": None},
            {"name": 5},
            {"name": b"bytes"},
            {"email": ["a"]},
        ):
            with pytest.raises(ValidationError) as ei:
                await users.insert({"id": 99, "name": "x", **values})
            assert next(iter(values)) in str(ei.value)
            with pytest.raises(ValidationError):
                await users.upsert({"id": 1, "name": "x", **values})
            with pytest.raises(ValidationError):
                await users.update(1, values)
            if next(iter(values.values())) is not None:
                with pytest.raises(ValidationError):
                    await users.find(values)
                with pytest.raises(ValidationError):
                    await users.count(values)
        for amount in ("1.50", None, b"1", [1]):
            with pytest.raises(ValidationError):
                await orders.insert({"user_id": 1, "order_id": 9, "amount": amount})
        with pytest.raises(ValidationError):
            await orders.insert({"user_id": 1, "order_id": 9, "amount": Decimal(1), "note": 5})
        # filters get the same checks
        for where in (
            {"age": in_([1, "2"])},
            {"age": gt("1")},
            {"age": gt(None)},
            {"name": like(5)},
            {"active": in_([True, 1])},
        ):
            with pytest.raises(ValidationError):
                await users.find(where)
        for bad_in in ("abc", 5, None):
            with pytest.raises(ValidationError):
                await users.find({"age": in_(bad_in)})  # type: ignore[arg-type]


async def test_integers_beyond_64_bits(seeded: DataLayer) -> None:
    layer = seeded
    users = layer.repository("users")
    async with unchanged(layer, io=True):
        for row in (
            {"id": 2**63, "name": "x"},  # BigInteger
            {"id": 2**70, "name": "x"},
            {"id": -(2**63) - 1, "name": "x"},
            {"id": 99, "name": "x", "age": 2**64},
        ):
            with pytest.raises((ValidationError, DataError)):
                await users.insert(row)
        with pytest.raises((ValidationError, DataError)):
            await users.update(1, {"age": 2**64})
    assert await users.get(99) is None
    assert await users.get(1) is not None  # the connection that failed is fine


async def test_values_outside_the_declared_column_range(
    seeded: DataLayer, backend: str, request: pytest.FixtureRequest
) -> None:
    layer = seeded
    users = layer.repository("users")
    orders = layer.repository("orders")
    before = await raw_counts(layer)
    for row in (
        {"id": 99, "name": "x", "age": 2**31},  # Integer
        {"id": 99, "name": "x", "age": -(2**31) - 1},
    ):
        with pytest.raises((ValidationError, DataError)):
            await users.insert(row)
    with pytest.raises((ValidationError, DataError)):
        await orders.insert({"user_id": 1, "order_id": 2**31, "amount": Decimal(1)})
    with pytest.raises((ValidationError, DataError)):
        await orders.insert({"user_id": 1, "order_id": 9, "amount": Decimal("1e12")})  # Numeric(12, 2)
    assert await raw_counts(layer) == before
    assert await users.get(99) is None


async def test_limit_offset_and_after(seeded: DataLayer) -> None:
    layer = seeded
    users = layer.repository("users")
    async with unchanged(layer):
        for limit in (-1, 1.5, "5", True, [5]):
            with pytest.raises(ValidationError):
                await users.find(limit=limit)  # type: ignore[arg-type]
            with pytest.raises(ValidationError):
                await users.find({"id": 1}, limit=limit)  # type: ignore[arg-type]
        for offset in (-1, None, 1.0, "0", False):
            with pytest.raises(ValidationError):
                await users.find(limit=5, offset=offset)  # type: ignore[arg-type]
        for order_by, after in (
            ("name", {"name": "u1"}),  # missing the primary key
            ("name", {"id": 1}),  # missing name
            ("name", {"name": None, "id": 1}),
            ([], {"id": None}),
            ([], {}),
            ("name", {"name": 5, "id": 1}),
            ([], {"id": "1"}),
            ("age", {"age": None, "id": 3}),  # keyset cannot pass a NULL
        ):
            with pytest.raises(ValidationError):
                await users.find(order_by=order_by, limit=5, after=after)
        for after in ("u1", 1, [("id", 1)]):
            with pytest.raises(ValidationError):
                await users.find(limit=5, after=after)  # type: ignore[arg-type]
        for order_by in ([1], [None], [b"name"]):
            with pytest.raises(ValidationError):
                await users.find(order_by=order_by)  # type: ignore[arg-type]
        for where in ("name", ["name"], 1):
            with pytest.raises(ValidationError):
                await users.find(where)  # type: ignore[arg-type]
            with pytest.raises(ValidationError):
                await users.count(where)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await users.find(order_by=None)  # type: ignore[arg-type]


# -- errors never show a DSN password ---------------------------------------------------
PW = "s3cr3tPW"


def _texts(exc: BaseException) -> str:
    """Everything a log or a traceback would show of ``exc`` and its chain."""
    parts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        parts += [str(cause), repr(cause)]
        cause = cause.__cause__ or cause.__context__
    return "\n".join(parts)


def probe_metadata() -> sa.MetaData:
    md = sa.MetaData()
    for name in ("pwprobe", "pwprobe_dead"):
        sa.Table(
            name, md,
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("name", sa.String(20), nullable=False),
        )
    return md


def _pw_layer(live: str, dead: str, **pool: Any) -> DataLayer:
    """``pwprobe`` (4 shards) on the live ``db0``; ``pwprobe_dead`` on the unreachable ``db1``."""
    cfg = {
        "databases": {"db0": {"primary": live}, "db1": {"primary": dead}},
        "tables": {
            "pwprobe": {"shard_key": "id", "table_shards": SHARDS, "databases": ["db0"]},
            "pwprobe_dead": {"database": "db1"},
        },
        "pool": {"min_size": 0, "max_size": 2, "connect_timeout": 5.0, **pool},
    }
    return DataLayer(cfg, probe_metadata(), env={})


@contextmanager
def no_password_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.DEBUG):
        yield
    assert PW not in caplog.text


async def test_postgres_password_never_in_errors(server_databases: None, caplog: pytest.LogCaptureFixture) -> None:
    base = make_url(PG_URL).set(drivername="postgresql+asyncpg", password=PW)
    live = base.set(host="127.0.0.1", database="dal_test_0").render_as_string(hide_password=False)
    dead = base.set(host="127.0.0.1", port=1, database="dal_test_1").render_as_string(hide_password=False)
    assert PW in live
    with no_password_logged(caplog):
        lay = _pw_layer(live, dead, min_size=1)
        assert PW not in repr(lay.config)
        assert all(PW not in repr(n) for n in lay.cluster.nodes.values())
        async with lay:
            await lay.drop_all(["pwprobe"])
            await lay.create_all(["pwprobe"])
            try:
                probe = lay.repository("pwprobe")
                await probe.insert({"id": 1, "name": "a"})
                with pytest.raises(DuplicateKeyError) as dup:
                    await probe.insert({"id": 1, "name": "b"})
                assert PW not in _texts(dup.value)
                dead_repo = lay.repository("pwprobe_dead")
                with pytest.raises(ConnectionUnavailableError) as down:
                    await dead_repo.get(1)
                assert PW not in _texts(down.value)
                with pytest.raises(ConnectionUnavailableError) as down_tx:
                    async with dead_repo.transaction(None):
                        pass
                assert PW not in _texts(down_tx.value)
            finally:
                await lay.drop_all(["pwprobe"])
    # a wrong password on a server that checks it (MariaDB's root has none)
    bad_my = make_url(MYSQL_URL).set(drivername="mysql+aiomysql", password=PW, database="dal_test_0")
    with no_password_logged(caplog):
        async with _pw_layer(bad_my.render_as_string(hide_password=False), dead) as lay:
            with pytest.raises(ConnectionUnavailableError) as denied:
                await lay.repository("pwprobe").get(1)
            assert PW not in _texts(denied.value)
    # a malformed DSN holding a password
    for raw in (f"postgresql+asyncpg://u:{PW}@host:notaport/db", f"nosuchdb://u:{PW}@h/db"):
        with pytest.raises(ConfigError) as bad:
            DSN(raw)
        assert PW not in _texts(bad.value)
        with pytest.raises(ConfigError) as bad_cfg:
            _pw_layer(raw, dead)
        assert PW not in _texts(bad_cfg.value)


# -- unreachable nodes and exhausted pools ---------------------------------------------
def _dead_url(backend: str, tmp_path: Path, db: str) -> str:
    if backend == "postgresql":
        return f"postgresql+asyncpg://postgres:{PW}@127.0.0.1:1/{db}"
    if backend == "mysql":
        return f"mysql+aiomysql://root:{PW}@127.0.0.1:1/{db}"
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where a directory should be")
    return f"sqlite+aiosqlite:///{blocker}/{db}.sqlite3"


async def test_unreachable_node_raises_connection_unavailable(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    urls = [_dead_url(backend, tmp_path, db) for db in ("dal_test_0", "dal_test_1")]
    cfg = topology(urls, USERS_ORDERS_TABLES)
    cfg["pool"] = {"min_size": 1, "max_size": 2, "connect_timeout": 3.0}
    with no_password_logged(caplog):
        async with DataLayer(cfg, users_orders_metadata(), env={}) as lay:  # start() does not fail
            users = lay.repository("users")
            ops: list[Callable[[], Awaitable[Any]]] = [
                lambda: users.get(1),
                lambda: users.get(1, primary=True),
                lambda: users.insert({"id": 1, "name": "a"}),
                lambda: users.update(1, {"name": "b"}),
                lambda: users.delete(1),
                lambda: users.find(),
                lambda: users.count(),
                lambda: users.get_many([1, 2, 3]),
                lambda: lay.repository("countries").get("de"),
            ]
            for op in ops:
                t0 = time.monotonic()
                with pytest.raises(ConnectionUnavailableError) as ei:
                    await op()
                assert time.monotonic() - t0 < 4
                assert not isinstance(ei.value, PoolTimeoutError)
                assert PW not in _texts(ei.value)
            with pytest.raises(ConnectionUnavailableError):
                async with users.transaction(1):
                    pass
            for node in lay.cluster.nodes.values():
                assert node.pool.size == 0, node.name  # failed connects are not counted
                assert node.in_flight == 0


async def test_pool_timeout_when_exhausted(layer: DataLayer, shard_urls: list[str]) -> None:
    cfg = topology(shard_urls, USERS_ORDERS_TABLES)
    cfg["pool"] = {"min_size": 0, "max_size": 1, "acquire_timeout": 0.2}
    def db_of(key: int) -> str:
        return "db0" if slot_of(key) < 2 else "db1"

    uid = 1
    same = next(i for i in range(2, 100) if db_of(i) == db_of(uid))
    other = next(i for i in range(2, 100) if db_of(i) != db_of(uid))
    async with DataLayer(cfg, users_orders_metadata(), env={}) as small:
        users = small.repository("users")
        await users.insert({"id": other, "name": "other"})
        async with users.transaction(uid) as tx:
            await tx.insert({"id": uid, "name": "held"})
            ops: list[Callable[[], Awaitable[Any]]] = [
                lambda: users.get(uid),
                lambda: users.insert({"id": same, "name": "x"}),
                lambda: users.count(),  # fans out to both databases
            ]
            for op in ops:
                t0 = time.monotonic()
                with pytest.raises(PoolTimeoutError) as ei:
                    await op()
                elapsed = time.monotonic() - t0
                assert 0.15 <= elapsed < 2, elapsed
                assert isinstance(ei.value, ConnectionUnavailableError)
                assert isinstance(ei.value, DalError)
            # the other shard database has its own pool
            assert (await users.get(other))["name"] == "other"  # type: ignore[index]
            # the transaction is unaffected
            assert (await tx.get(uid))["name"] == "held"  # type: ignore[index]
        # released: everything works again, and the waiters left nothing behind
        assert (await users.get(uid))["name"] == "held"  # type: ignore[index]
        got = await asyncio.gather(*(users.get(uid) for _ in range(20)))
        assert all(r is not None for r in got)
        for node in small.cluster.nodes.values():
            assert node.pool.size <= 1
    assert await layer.repository("users").count() == 2
