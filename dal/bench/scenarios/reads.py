"""The read scenarios: ``repo.get`` by primary key, no cache, against the plain drivers.

Every read scenario reads rows by primary key from a table of ``rows`` rows
(10,000 by default) that the bench creates and drops itself:

* the logical table ``dal_bench_users`` sharded over ``TABLE_SHARDS`` = 4
  physical tables ``dal_bench_users_0`` .. ``_3`` in one shard database (a
  primary only);
* the keys are drawn with a seeded RNG among the rows that live in the first
  physical table, ``dal_bench_users_0``, so that dal (which hashes every key
  and routes it there) and the baselines (which query that physical table
  directly, as an application without dal would) read exactly the same rows.

``pg.get.nocache`` measures ``await repo.get(key)`` of a started
:class:`~dal.DataLayer` on PostgreSQL (no cache in front), against:

* ``asyncpg.pool.fetchrow``: ``await pool.fetchrow(sql, key)`` on an
  ``asyncpg.create_pool()`` with asyncpg's default settings;
* ``asyncpg.conn.fetchrow``: ``await conn.fetchrow(sql, key)`` on one held
  connection (at concurrency > 1 the tasks share it through an
  :class:`asyncio.Lock`: the honest limit of one connection);
* ``sqlalchemy.orm.get``: ``async with Session() as s: await s.get(User, key)``
  per operation with ``create_async_engine("postgresql+asyncpg://...")``
  (a new session each time, so the identity map never answers).

``mysql.get.nocache`` measures the same ``repo.get(key)`` on MariaDB/MySQL
against ``aiomysql.pool.autocommit``: ``aiomysql.create_pool(autocommit=True)``,
then per operation acquire, cursor, execute, fetchone, release.

The ``:c32`` variants run the same operations from 32 concurrent tasks. The dal
pool, the asyncpg pool, the SQLAlchemy pool and the aiomysql pool are all
capped at ``pool_size`` = 10 connections (asyncpg's and aiomysql's default
maximum).

The loaded PostgreSQL table is also what the cache scenarios read
(:mod:`dal.bench.scenarios.cache`): :func:`pg_reads` hands it on as a
:class:`PgTable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from dal.bench.harness import Comparison, Contender, Op
from dal.bench.scenarios.catalog import SCENARIOS, TABLE_SHARDS, Backend, SuiteOptions
from dal.bench.scenarios.drivers import aiomysql_args, asyncpg_args, driver, reach
from dal.bench.scenarios.tables import (
    USER_COLUMNS,
    by_physical_table,
    check_row,
    orm_class,
    read_keys,
    topology,
    user_rows,
    users_metadata,
)
from dal.errors import BenchError
from dal.layer import DataLayer


@dataclass(frozen=True, slots=True)
class PgTable:
    """The loaded users table on PostgreSQL, as the cache scenarios read it too."""

    url: URL  # postgresql+asyncpg
    keys: Sequence[int]
    rows: Mapping[int, dict[str, Any]]  # the rows of the keys' physical table, by id
    pool_fetchrow: Op  # the asyncpg.pool.fetchrow baseline


def users_topology(url: URL, opts: SuiteOptions) -> dict[str, Any]:
    """One shard database (``bench``, a primary only) holding the sharded users table."""
    return topology({"bench": url}, opts.table, TABLE_SHARDS, opts.pool_size)


async def _start_layer(stack: contextlib.AsyncExitStack, url: URL, opts: SuiteOptions) -> DataLayer:
    """A started layer with fresh (empty) users tables, dropped again when ``stack`` closes."""
    # env={}: DAL_BENCH_PRIMARY and the like in the environment must not redirect the bench.
    layer = DataLayer(users_topology(url, opts), users_metadata(opts.table), env={})
    stack.push_async_callback(layer.aclose)
    await layer.start()
    stack.push_async_callback(layer.drop_all)  # runs before aclose, after the baselines close
    await layer.drop_all()  # leftovers of an interrupted run
    await layer.create_all()
    if layer.tables[opts.table].physical[0].name != opts.physical_table:
        raise BenchError(f"{opts.table}: unexpected physical table naming")
    return layer


def _locked(lock: asyncio.Lock, op: Op) -> Op:
    async def run(key: Any) -> object:
        async with lock:
            return await op(key)

    return run


def _comparisons(
    backend: Backend,
    keys: Sequence[int],
    dal_op: Op,
    baselines: Callable[[int], dict[str, Op]],
) -> dict[str, Comparison]:
    """Every uncached read scenario of ``backend``; ``baselines(concurrency)`` gives their operations."""
    out: dict[str, Comparison] = {}
    for spec in SCENARIOS.values():
        if spec.backend != backend or spec.cache or spec.batch:
            continue
        ops = baselines(spec.concurrency)
        sfx = "" if spec.concurrency == 1 else f":c{spec.concurrency}"
        out[spec.name] = Comparison(
            name=spec.name,
            concurrency=spec.concurrency,
            dal=Contender(spec.name, dal_op),
            baselines=tuple(Contender(base + sfx, op) for base, op in ops.items()),
            keys=keys,
            targets=spec.targets,
            description=(
                f"await repo.get(key) on {'PostgreSQL' if backend == 'pg' else 'MySQL/MariaDB'}, "
                f"random existing keys, {spec.concurrency} concurrent task(s) doing sequential gets"
            ),
        )
    return out


async def pg_reads(
    stack: contextlib.AsyncExitStack, url: URL, opts: SuiteOptions, servers: dict[str, Any], wanted: Sequence[str]
) -> tuple[dict[str, Comparison], PgTable]:
    """The PostgreSQL read scenarios on a loaded users table, closed and dropped by ``stack``."""
    asyncpg = driver("asyncpg")
    info: dict[str, Any] = servers["postgresql"]
    connect_kw = {**asyncpg_args(url), "database": url.database}
    conn = await reach("PostgreSQL", url, asyncpg.connect(**connect_kw), wanted)
    stack.push_async_callback(conn.close)
    info["version"] = str(await conn.fetchval("SHOW server_version"))
    layer = await _start_layer(stack, url.set(drivername="postgresql+asyncpg"), opts)
    by_table = by_physical_table(layer, opts.table, user_rows(opts.rows))
    for table, rows in by_table.items():
        await conn.copy_records_to_table(table, records=rows, columns=USER_COLUMNS)
        await conn.execute(f'ANALYZE "{table}"')
    keys = read_keys(by_table[opts.physical_table], opts.seed)

    pool = await asyncpg.create_pool(**connect_kw)  # asyncpg's defaults: min 10, max 10 connections
    stack.push_async_callback(pool.close)
    engine = create_async_engine(
        url.set(drivername="postgresql+asyncpg"), pool_size=opts.pool_size, max_overflow=0
    )
    stack.push_async_callback(engine.dispose)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    sql = f"SELECT {', '.join(USER_COLUMNS)} FROM {opts.physical_table} WHERE id = $1"
    repo = layer.repository(opts.table)
    lock = asyncio.Lock()
    user = orm_class(opts.physical_table)

    async def orm_get(key: Any) -> object:
        async with sessions() as s:
            return await s.get(user, key)

    def baselines(concurrency: int) -> dict[str, Op]:
        conn_op: Op = functools.partial(conn.fetchrow, sql)
        return {
            "asyncpg.pool.fetchrow": functools.partial(pool.fetchrow, sql),
            "asyncpg.conn.fetchrow": conn_op if concurrency == 1 else _locked(lock, conn_op),
            "sqlalchemy.orm.get": orm_get,
        }

    await check_row("dal", repo.get, keys[0], lambda r: r["id"])
    for name, op in baselines(1).items():
        await check_row(name, op, keys[0], lambda r: r.id if isinstance(r, user) else r["id"])
    info["rows"] = opts.rows
    loaded = PgTable(
        url=url.set(drivername="postgresql+asyncpg"),
        keys=keys,
        rows={r[0]: dict(zip(USER_COLUMNS, r, strict=True)) for r in by_table[opts.physical_table]},
        pool_fetchrow=functools.partial(pool.fetchrow, sql),
    )
    return _comparisons("pg", keys, repo.get, baselines), loaded


async def mysql_reads(
    stack: contextlib.AsyncExitStack, url: URL, opts: SuiteOptions, servers: dict[str, Any], wanted: Sequence[str]
) -> dict[str, Comparison]:
    """The MySQL/MariaDB read scenarios on a loaded users table, closed and dropped by ``stack``."""
    aiomysql = driver("aiomysql")
    info: dict[str, Any] = servers["mysql"]
    # aiomysql's defaults (minsize 1, maxsize 10) but autocommit, as dal runs.
    connecting = aiomysql.create_pool(**aiomysql_args(url), db=url.database)
    pool = await reach("MySQL/MariaDB", url, connecting, wanted, (OSError, aiomysql.OperationalError))

    async def close_pool() -> None:
        pool.close()
        await pool.wait_closed()

    stack.push_async_callback(close_pool)
    layer = await _start_layer(stack, url.set(drivername="mysql+aiomysql"), opts)
    by_table = by_physical_table(layer, opts.table, user_rows(opts.rows))
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT VERSION()")
        info["version"] = str((await cur.fetchone())[0])
        for table, rows in by_table.items():
            insert = f"INSERT INTO {table} ({', '.join(USER_COLUMNS)}) VALUES (%s, %s, %s, %s, %s)"
            for i in range(0, len(rows), 1000):
                await cur.executemany(insert, rows[i : i + 1000])
            await cur.execute(f"ANALYZE TABLE {table}")
            await cur.fetchall()
    keys = read_keys(by_table[opts.physical_table], opts.seed)

    sql = f"SELECT {', '.join(USER_COLUMNS)} FROM {opts.physical_table} WHERE id = %s"
    repo = layer.repository(opts.table)

    async def pool_get(key: Any) -> object:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, (key,))
            return await cur.fetchone()

    def baselines(concurrency: int) -> dict[str, Op]:
        return {"aiomysql.pool.autocommit": pool_get}

    await check_row("dal", repo.get, keys[0], lambda r: r["id"])
    await check_row("aiomysql.pool.autocommit", pool_get, keys[0], lambda r: r[0])
    info["rows"] = opts.rows
    return _comparisons("mysql", keys, repo.get, baselines)
