"""The batch scenarios: bulk loads and write-behind, on shard databases of their own.

Every scenario writes the logical table ``bench_items`` (``id`` BIGINT primary
key and shard key, ``name`` VARCHAR(50), ``amount`` NUMERIC(12,2), ``flag``
BOOLEAN) sharded over ``BULK_SHARDS`` = 8 physical tables in
``BULK_DATABASES`` = 2 shard databases (4 tables each) that the bench creates
on the server, ``{bulk_databases}_0`` and ``_1`` (``dal_bench_0``/``_1`` by
default), and drops again at the end. The baselines write one plain table
with the same columns, ``bench_items_copy``, in the first of them.

The data: ``bulk_rows`` rows (100,000; 20,000 with ``--quick``) built before
the scenario (untimed), as dicts for dal and as tuples of the same values
for the drivers. Every load starts from empty tables (TRUNCATE, untimed).
Operations are rows: ratios are dal's time per row / the baseline's.

* ``pg.insert_many``: ``await repo.insert_many(rows, batch_size=B)`` with
  ``B`` = the largest physical table's share of the rows (one COPY per
  physical table), against ``asyncpg.copy``
  (``conn.copy_records_to_table`` of the same rows as tuples into one table)
  and ``asyncpg.row_autocommit`` (``await conn.execute(INSERT ...)`` row by
  row in autocommit on one connection, on a sample of ``bulk_sample`` rows).
* ``pg.insert_many:b1000``: the same with ``batch_size=1000`` (104 small batches).
* ``pg.upsert_many``: ``await repo.upsert_many(rows, batch_size=B)`` of new
  values for every row, half of which (the even ids) exist (loaded untimed
  before each round), against ``asyncpg.copy`` of the rows into an empty table.
* ``batchwriter.insert:c1000``: 1,000 tasks each doing ``await
  writer.insert(row)`` one row after another (one :class:`~dal.batch.BatchWriter`
  with its defaults), against ``repo.insert:c1000``: the same 1,000 tasks doing
  ``await repo.insert(row)`` on the same layer (pool ``max_size`` =
  ``pool_size`` per shard database). ``ops_per_s`` is rows per second.
* ``mysql.insert_many``: ``await repo.insert_many(rows, batch_size=B)`` on
  MariaDB/MySQL against ``aiomysql.executemany``: one autocommit connection,
  ``cursor.executemany("INSERT ... VALUES (%s, %s, %s, %s)", chunk)`` per
  chunk of 1,000 rows (which PyMySQL rewrites into one multi-row INSERT).
"""


from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import URL

from dal.bench.harness import Bulk, BulkContender, Comparison, Contender
from dal.bench.scenarios.catalog import SCENARIOS, Scenario, SuiteOptions
from dal.bench.scenarios.drivers import aiomysql_args, asyncpg_args, driver, reach
from dal.bench.scenarios.tables import (
    BULK_DATABASES,
    BULK_SHARDS,
    ITEM_COLUMNS,
    ITEMS_COPY_DDL,
    ITEMS_TABLE,
    as_tuples,
    expect_rows,
    item_rows,
    items_metadata,
    topology,
)
from dal.errors import BenchError
from dal.layer import DataLayer

COPY_TABLE = "bench_items_copy"  # the baselines' plain table, in the first bulk database
MYSQL_CHUNK = 1000  # rows per executemany of the aiomysql baseline
SMALL_BATCH = 1000  # batch_size of the :b1000 scenario
WRITER_FIRST_ID = 1_000_000_000  # ids of the write-behind scenario: clear of the bulk loads'

Load = Callable[[], Awaitable[Sequence[int]]]


async def _own_databases(
    stack: contextlib.AsyncExitStack,
    opts: SuiteOptions,
    info: dict[str, Any],
    execute: Callable[[str], Awaitable[object]],
    quote: str,
    drop_options: str = "",
) -> list[str]:
    """Create the batch scenarios' databases, dropping leftovers first; ``stack`` drops them again.

    ``execute`` runs one statement on an admin connection; ``quote`` quotes an
    identifier there; ``drop_options`` ends every DROP DATABASE.
    """
    dbs = [f"{opts.bulk_databases}_{i}" for i in range(BULK_DATABASES)]

    async def drop_databases() -> None:
        for d in dbs:
            await execute(f"DROP DATABASE IF EXISTS {quote}{d}{quote}{drop_options}")

    stack.push_async_callback(drop_databases)  # after the layer and connections close (LIFO)
    await drop_databases()  # leftovers of an interrupted run
    for d in dbs:
        await execute(f"CREATE DATABASE {quote}{d}{quote}")
    info["bulk_databases"] = dbs
    return dbs


async def _items_layer(
    stack: contextlib.AsyncExitStack, url: URL, dbs: Sequence[str], pool_size: int
) -> tuple[DataLayer, Any]:
    """A started layer with the items table over ``dbs`` (``bench0``, ``bench1``): (layer, repository)."""
    databases = {f"bench{i}": url.set(database=d) for i, d in enumerate(dbs)}
    layer = DataLayer(topology(databases, ITEMS_TABLE, BULK_SHARDS, pool_size), items_metadata(), env={})
    stack.push_async_callback(layer.aclose)
    await layer.start()
    await layer.create_all()
    return layer, layer.repository(ITEMS_TABLE)


def _per_table_batch(layer: DataLayer, rows: Sequence[Mapping[str, Any]]) -> int:
    """The largest physical table's share of ``rows``: the batch_size of one batch per table."""
    table = layer.tables[ITEMS_TABLE]
    counts = collections.Counter(table.place(r["id"]).slot for r in rows)
    return max(counts.values())


def _tables_by_database(layer: DataLayer) -> list[list[str]]:
    """The physical tables of each bulk database (``bench0``, ``bench1``), in slot order."""
    out: dict[str, list[str]] = {f"bench{i}": [] for i in range(BULK_DATABASES)}
    for p in layer.tables[ITEMS_TABLE].placements:
        out[p.database].append(p.table)
    return list(out.values())


def _timed(fn: Callable[[], Awaitable[object]]) -> Load:
    async def load() -> list[int]:
        t0 = time.perf_counter_ns()
        await fn()
        return [time.perf_counter_ns() - t0]

    return load


def _dal_load(
    call: Callable[..., Awaitable[Any]], rows: list[dict[str, Any]], batch_size: int, info: dict[str, Any]
) -> Load:
    """``await call(rows, batch_size=...)`` timed; its batches per call go into ``info``."""

    async def load() -> list[int]:
        t0 = time.perf_counter_ns()
        result = await call(rows, batch_size=batch_size)
        lat = time.perf_counter_ns() - t0
        info["batches_per_call"] = result.batches
        if result.rows != len(rows) or result.committed != len(rows):
            raise BenchError(f"insert/upsert_many wrote {result.committed} of {len(rows)} rows")
        return [lat]

    return load


def _bulk_info(opts: SuiteOptions, batch_size: int) -> dict[str, Any]:
    return {
        "unit": "row",
        "rows": opts.bulk_rows,
        "rows_per_call": opts.bulk_rows,
        "batch_size": batch_size,
        "databases": BULK_DATABASES,
        "physical_tables": BULK_SHARDS,
    }


# -- PostgreSQL -------------------------------------------------------------------------
async def pg_bulk_scenarios(
    stack: contextlib.AsyncExitStack, url: URL, opts: SuiteOptions, servers: dict[str, Any], wanted: Sequence[str]
) -> dict[str, Scenario]:
    """The PostgreSQL batch scenarios in ``wanted``; their databases are dropped when ``stack`` closes."""
    asyncpg = driver("asyncpg")
    info = servers.setdefault("postgresql", {})
    kw = asyncpg_args(url)
    admin = await reach("PostgreSQL", url, asyncpg.connect(**kw, database=url.database), wanted)
    stack.push_async_callback(admin.close)
    info.setdefault("version", str(await admin.fetchval("SHOW server_version")))
    # FORCE (PostgreSQL 13+): drop past connections a cancelled run may have left behind.
    force = " WITH (FORCE)" if admin.get_server_version().major >= 13 else ""
    dbs = await _own_databases(stack, opts, info, admin.execute, '"', force)
    layer, repo = await _items_layer(stack, url.set(drivername="postgresql+asyncpg"), dbs, opts.pool_size)

    conns = []
    for d in dbs:
        c = await asyncpg.connect(**kw, database=d)
        stack.push_async_callback(c.close)
        conns.append(c)
    base = conns[0]  # the baselines' connection and table
    await base.execute(f"CREATE TABLE {COPY_TABLE} {ITEMS_COPY_DDL}")
    tables = _tables_by_database(layer)

    async def empty_dal() -> None:
        for c, names in zip(conns, tables, strict=True):
            await c.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in names))

    async def empty_copy() -> None:
        await base.execute(f"TRUNCATE {COPY_TABLE}")

    async def count_dal() -> int:
        total = 0
        for c, names in zip(conns, tables, strict=True):
            for t in names:
                total += int(await c.fetchval(f'SELECT count(*) FROM "{t}"'))
        return total

    async def count_copy() -> int:
        return int(await base.fetchval(f"SELECT count(*) FROM {COPY_TABLE}"))

    n = opts.bulk_rows
    rows = item_rows(n)
    records = as_tuples(rows)
    sample = records[: opts.bulk_sample]
    per_table = _per_table_batch(layer, rows)
    info["bulk_rows"] = n
    columns = list(ITEM_COLUMNS)

    async def copy() -> None:
        await base.copy_records_to_table(COPY_TABLE, records=records, columns=columns)

    insert_sql = f"INSERT INTO {COPY_TABLE} ({', '.join(ITEM_COLUMNS)}) VALUES ($1, $2, $3, $4)"

    async def row_by_row() -> list[int]:
        perf = time.perf_counter_ns
        execute = base.execute
        lat: list[int] = []
        for r in sample:
            t0 = perf()
            await execute(insert_sql, *r)
            lat.append(perf() - t0)
        return lat

    copy_cont = BulkContender(
        "asyncpg.copy", _timed(copy), empty_copy, n, {"unit": "row", "rows": n, "rows_per_call": n}
    )
    rows_cont = BulkContender(
        "asyncpg.row_autocommit",
        row_by_row,
        empty_copy,
        len(sample),
        {"unit": "row", "rows": len(sample), "rows_per_call": 1, "sample_of": n},
    )

    async def check_insert(name: str) -> None:
        if name == rows_cont.name:
            expect_rows(name, await count_copy(), len(sample))
        elif name == copy_cont.name:
            expect_rows(name, await count_copy(), n)
        else:
            expect_rows(name, await count_dal(), n)

    out: dict[str, Scenario] = {}
    for name in wanted:
        spec = SCENARIOS[name]
        if name in ("pg.insert_many", "pg.insert_many:b1000"):
            size = per_table if name == "pg.insert_many" else SMALL_BATCH
            dal_info = _bulk_info(opts, size)
            out[name] = Bulk(
                name=name,
                dal=BulkContender(name, _dal_load(repo.insert_many, rows, size, dal_info), empty_dal, n, dal_info),
                baselines=(copy_cont, rows_cont),
                targets=spec.targets,
                check=check_insert,
                description=(
                    f"await repo.insert_many({n:,} dicts, batch_size={size:,}) into {BULK_SHARDS} physical "
                    f"tables in {BULK_DATABASES} PostgreSQL databases (empty, truncated untimed); "
                    f"per row against one COPY of the same rows as tuples into one table, and against "
                    f"row-by-row autocommit INSERTs ({len(sample):,}-row sample)"
                ),
            )
        elif name == "pg.upsert_many":
            out[name] = _pg_upsert(repo, opts, per_table, empty_dal, count_dal, copy_cont, check_insert)
        elif name == "batchwriter.insert:c1000":
            out[name] = _writer(stack, repo, spec.concurrency, spec.targets)
    return out


def _pg_upsert(
    repo: Any,
    opts: SuiteOptions,
    size: int,
    empty_dal: Callable[[], Awaitable[None]],
    count_dal: Callable[[], Awaitable[int]],
    copy_cont: BulkContender,
    check_copy: Callable[[str], Awaitable[None]],
) -> Bulk:
    n = opts.bulk_rows
    existing = item_rows(n, step=2)  # the even ids, old values
    rows = item_rows(n, version=1)  # every id, new values
    probe = existing[0]["id"]

    async def preload() -> None:
        await empty_dal()
        await repo.insert_many(existing, batch_size=size)

    async def check(name: str) -> None:
        if name != "pg.upsert_many":
            await check_copy(name)
            return
        expect_rows(name, await count_dal(), n)
        got = await repo.get(probe)
        if got is None or got["name"] != rows[probe - 1]["name"]:
            raise BenchError(f"pg.upsert_many: row {probe} not overwritten: {got!r}")

    dal_info = {**_bulk_info(opts, size), "existing_rows": len(existing)}
    return Bulk(
        name="pg.upsert_many",
        dal=BulkContender("pg.upsert_many", _dal_load(repo.upsert_many, rows, size, dal_info), preload, n, dal_info),
        baselines=(copy_cont,),
        targets=SCENARIOS["pg.upsert_many"].targets,
        check=check,
        description=(
            f"await repo.upsert_many({n:,} dicts, batch_size={size:,}) over {BULK_SHARDS} physical tables in "
            f"{BULK_DATABASES} PostgreSQL databases, {len(existing):,} of the keys existing (loaded untimed "
            "before each round), new values for all; per row against one COPY of the rows into an empty table"
        ),
    )


def _writer(stack: contextlib.AsyncExitStack, repo: Any, concurrency: int, targets: Mapping[str, float]) -> Comparison:
    writer = repo.writer()
    stack.push_async_callback(writer.aclose)  # before the layer closes (LIFO)
    ids = itertools.count(WRITER_FIRST_ID)
    amount = Decimal("12.34")

    async def writer_insert(_key: object) -> None:
        await writer.insert({"id": next(ids), "name": "writer", "amount": amount, "flag": True})

    async def repo_insert(_key: object) -> None:
        await repo.insert({"id": next(ids), "name": "insert", "amount": amount, "flag": False})

    def counters() -> dict[str, int]:
        return {"writer_batches": writer.batches, "writer_rows": writer.rows}

    name = "batchwriter.insert:c1000"
    settings = {"max_rows": writer.max_rows, "max_delay": writer.max_delay}
    return Comparison(
        name=name,
        concurrency=concurrency,
        dal=Contender(name, writer_insert, info={"unit": "row", "writer": settings}),
        baselines=(Contender(f"repo.insert:c{concurrency}", repo_insert, info={"unit": "row"}),),
        keys=[0],
        targets=targets,
        description=(
            f"{concurrency} tasks each awaiting writer.insert(row) one row after another (one BatchWriter, "
            f"max_rows={writer.max_rows}, max_delay={writer.max_delay}) against the same tasks awaiting "
            "repo.insert(row), on the PostgreSQL bulk layer; ops = rows"
        ),
        counters=counters,
    )


# -- MySQL / MariaDB --------------------------------------------------------------------
async def mysql_bulk_scenarios(
    stack: contextlib.AsyncExitStack, url: URL, opts: SuiteOptions, servers: dict[str, Any], wanted: Sequence[str]
) -> dict[str, Scenario]:
    """``mysql.insert_many`` (when wanted); its databases are dropped when ``stack`` closes."""
    aiomysql = driver("aiomysql")
    info = servers.setdefault("mysql", {})

    async def connect(db: str | None) -> Any:
        conn = await aiomysql.connect(**aiomysql_args(url), db=db)
        stack.push_async_callback(conn.ensure_closed)
        return conn

    admin = await reach("MySQL/MariaDB", url, connect(None), wanted, (OSError, aiomysql.OperationalError))

    async def sql(conn: Any, text: str) -> list[Any]:
        async with conn.cursor() as cur:
            await cur.execute(text)
            return list(await cur.fetchall())

    info.setdefault("version", str((await sql(admin, "SELECT VERSION()"))[0][0]))
    dbs = await _own_databases(stack, opts, info, functools.partial(sql, admin), "`")
    layer, repo = await _items_layer(stack, url.set(drivername="mysql+aiomysql"), dbs, opts.pool_size)
    base = await connect(dbs[0])
    await sql(base, f"CREATE TABLE {COPY_TABLE} {ITEMS_COPY_DDL}")
    tables = [f"`{d}`.`{t}`" for d, names in zip(dbs, _tables_by_database(layer), strict=True) for t in names]

    async def empty_dal() -> None:
        for t in tables:
            await sql(admin, f"TRUNCATE TABLE {t}")

    async def empty_copy() -> None:
        await sql(base, f"TRUNCATE TABLE {COPY_TABLE}")

    n = opts.bulk_rows
    rows = item_rows(n)
    records = as_tuples(rows)
    size = _per_table_batch(layer, rows)
    info["bulk_rows"] = n
    insert = f"INSERT INTO {COPY_TABLE} ({', '.join(ITEM_COLUMNS)}) VALUES (%s, %s, %s, %s)"

    async def executemany() -> list[int]:
        perf = time.perf_counter_ns
        lat: list[int] = []
        async with base.cursor() as cur:
            for i in range(0, n, MYSQL_CHUNK):
                t0 = perf()
                await cur.executemany(insert, records[i : i + MYSQL_CHUNK])
                lat.append(perf() - t0)
        return lat

    async def check(name: str) -> None:
        if name == "aiomysql.executemany":
            expect_rows(name, int((await sql(base, f"SELECT COUNT(*) FROM {COPY_TABLE}"))[0][0]), n)
        else:
            counts = [int((await sql(admin, f"SELECT COUNT(*) FROM {t}"))[0][0]) for t in tables]
            expect_rows(name, sum(counts), n)

    out: dict[str, Scenario] = {}
    if "mysql.insert_many" in wanted:
        dal_info = _bulk_info(opts, size)
        out["mysql.insert_many"] = Bulk(
            name="mysql.insert_many",
            dal=BulkContender(
                "mysql.insert_many", _dal_load(repo.insert_many, rows, size, dal_info), empty_dal, n, dal_info
            ),
            baselines=(
                BulkContender(
                    "aiomysql.executemany",
                    executemany,
                    empty_copy,
                    n,
                    {"unit": "row", "rows": n, "rows_per_call": MYSQL_CHUNK},
                ),
            ),
            targets=SCENARIOS["mysql.insert_many"].targets,
            check=check,
            description=(
                f"await repo.insert_many({n:,} dicts, batch_size={size:,}) into {BULK_SHARDS} physical tables in "
                f"{BULK_DATABASES} MariaDB/MySQL databases (truncated untimed); per row against "
                f"cursor.executemany of {MYSQL_CHUNK:,}-row chunks (multi-row INSERT) into one table on one "
                "autocommit connection"
            ),
        )
    return out
