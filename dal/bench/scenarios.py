"""The benchmark scenarios: tables, data, dal layers and the baselines they are compared with.

Every scenario reads rows by primary key from a table of ``rows`` rows
(10,000 by default) that the bench creates and drops itself:

* the logical table ``dal_bench_users`` (``id`` BIGINT primary key and shard
  key, ``name``, ``email``, ``age``, ``active``) sharded over
  ``TABLE_SHARDS`` = 4 physical tables ``dal_bench_users_0`` .. ``_3`` in one
  shard database (a primary only);
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

The cache scenarios read the same PostgreSQL table through other layers whose
table has ``cache`` on (Redis at ``redis_url``, a namespace and pub/sub
channel of their own, ``l1_ttl`` and ``l2_ttl`` of an hour so nothing expires
during a run; every Redis key of the namespace is deleted at the end):

* ``get.l1_hit``: ``await repo.get(key)`` with every key in L1 (warmed
  first), against ``cachetools.tlru.getitem``, a bare
  ``TLRUCache.__getitem__`` of an existing key (int ids) in a cache of the
  same ``maxsize``, holding the same ``(expiry, row)`` entries as dal's L1 and
  called without ``await`` in the same loop, and against
  ``asyncpg.pool.fetchrow``. Ratios are also given net of the measuring
  loop's own time per op (``vs_net``), which the targets are judged on.
* ``get.l2_hit``: ``await repo.get(key)`` answered by L2: the layer's L1
  holds one entry (``l1_max_size = 1``) and the keys are the distinct ids in
  a shuffled cycle, so consecutive keys always differ and L1 misses every
  time (nothing is flushed; the eviction is part of dal's L1 fill). Against
  ``redis.get``: ``await client.get(k)`` of the same key (the row dal
  stored, so the same bytes), decoded with dal's msgpack codec, on a
  ``redis.asyncio.Redis.from_url()`` client with redis-py's defaults.
* ``stampede``: 1,000 concurrent ``repo.get`` of one cold key (not in L1,
  nor in L2, no version key, no lease: reset untimed before every burst),
  counting the database statements each burst runs (the layer's node
  counters); against ``asyncpg.pool.fetchrow:c1000``: 1,000 concurrent
  ``pool.fetchrow`` of it (1,000 statements).

The batch-write scenarios (``pg.insert_many``, ``pg.insert_many:b1000``,
``pg.upsert_many``, ``batchwriter.insert:c1000``, ``mysql.insert_many``) use
shard databases and a table of their own: see :mod:`dal.bench.bulk`.

Baseline names are unique per dal scenario, not overall (``get.l1_hit``
re-measures ``asyncpg.pool.fetchrow``): a baseline entry is identified by its
``baseline_of`` and ``name``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dal.bench.measure import Bulk, Burst, BurstContender, Comparison, Contender, Op
from dal.layer import DataLayer

LOGICAL_TABLE = "dal_bench_users"
TABLE_SHARDS = 4
COLUMNS = ("id", "name", "email", "age", "active")
CONCURRENCY = 32
KEY_COUNT = 100_000  # length of the pre-generated key sequence (cycled)
STAMPEDE = 1_000  # concurrent cold gets per stampede burst
WRITERS = 1_000  # concurrent single-row writers of batchwriter.insert:c1000
CACHE_TTL = 3600.0  # l1_ttl and l2_ttl of the cached layers: nothing expires during a run

Backend = Literal["pg", "mysql"]
Scenario = Comparison | Burst | Bulk


@dataclass(frozen=True, slots=True)
class ScenarioSpec:
    """A dal scenario: its backend, concurrency, baselines and targets.

    Targets are the largest acceptable ratio per baseline, or for a burst the
    largest acceptable counter (``db_queries``). ``cache``: it needs Redis and
    a cached layer. ``batch``: a batch-write scenario (:mod:`dal.bench.bulk`),
    on databases of its own.
    """

    name: str
    backend: Backend
    concurrency: int
    baselines: tuple[str, ...]
    targets: Mapping[str, float]
    cache: bool = False
    batch: bool = False


def _specs() -> dict[str, ScenarioSpec]:
    pg_base = ("asyncpg.pool.fetchrow", "asyncpg.conn.fetchrow", "sqlalchemy.orm.get")
    my_base = ("aiomysql.pool.autocommit",)
    pg_targets = {"asyncpg.pool.fetchrow": 0.7, "asyncpg.conn.fetchrow": 1.25, "sqlalchemy.orm.get": 1 / 3}
    my_targets = {"aiomysql.pool.autocommit": 1.2}
    out: dict[str, ScenarioSpec] = {}
    for name, backend, bases, targets in (
        ("pg.get.nocache", "pg", pg_base, pg_targets),
        ("mysql.get.nocache", "mysql", my_base, my_targets),
    ):
        be: Backend = "pg" if backend == "pg" else "mysql"
        out[name] = ScenarioSpec(name, be, 1, bases, targets)
        sfx = f":c{CONCURRENCY}"
        out[name + sfx] = ScenarioSpec(name + sfx, be, CONCURRENCY, tuple(b + sfx for b in bases), {})
    for spec in (
        ScenarioSpec(
            "get.l1_hit",
            "pg",
            1,
            ("cachetools.tlru.getitem", "asyncpg.pool.fetchrow"),
            {"cachetools.tlru.getitem": 5.0, "asyncpg.pool.fetchrow": 0.02},
            cache=True,
        ),
        ScenarioSpec("get.l2_hit", "pg", 1, ("redis.get",), {"redis.get": 1.15}, cache=True),
        ScenarioSpec(
            "stampede", "pg", STAMPEDE, (f"asyncpg.pool.fetchrow:c{STAMPEDE}",), {"db_queries": 1}, cache=True
        ),
        *(
            ScenarioSpec(
                name,
                "pg",
                1,
                ("asyncpg.copy", "asyncpg.row_autocommit"),
                {"asyncpg.copy": 1.25, "asyncpg.row_autocommit": 0.01},
                batch=True,
            )
            for name in ("pg.insert_many", "pg.insert_many:b1000")
        ),
        ScenarioSpec("pg.upsert_many", "pg", 1, ("asyncpg.copy",), {"asyncpg.copy": 2.5}, batch=True),
        ScenarioSpec(
            f"batchwriter.insert:c{WRITERS}",
            "pg",
            WRITERS,
            (f"repo.insert:c{WRITERS}",),
            {f"repo.insert:c{WRITERS}": 0.1},
            batch=True,
        ),
        ScenarioSpec(
            "mysql.insert_many", "mysql", 1, ("aiomysql.executemany",), {"aiomysql.executemany": 1.0}, batch=True
        ),
    ):
        out[spec.name] = spec
    return out


SCENARIOS: dict[str, ScenarioSpec] = _specs()
"""Every dal scenario by name, in run order. Targets apply to the single-task variants."""


def select(only: Sequence[str]) -> list[str]:
    """Scenario names matching ``only`` (all when empty).

    A pattern matches a name exactly, or as a prefix ending at a ``.`` or ``:``
    boundary: ``pg.get.nocache`` selects it and ``pg.get.nocache:c32``; ``pg``
    selects every PostgreSQL scenario. An unknown pattern raises ValueError.
    """
    if not only:
        return list(SCENARIOS)
    chosen: set[str] = set()
    for pattern in only:
        hits = {
            n for n in SCENARIOS if n == pattern or n.startswith(pattern + ".") or n.startswith(pattern + ":")
        }
        if not hits:
            raise ValueError(f"no scenario matches {pattern!r}; known: {', '.join(SCENARIOS)}")
        chosen |= hits
    return [n for n in SCENARIOS if n in chosen]


@dataclass(frozen=True, slots=True)
class SuiteOptions:
    """Data, pool size and table name shared by every scenario.

    ``bulk_rows``: rows per load of the batch-write scenarios (100,000;
    ``--quick`` uses 20,000); ``bulk_sample``: rows of the row-by-row
    baseline; ``bulk_databases``: the prefix of the two databases they create
    (``{prefix}_0``, ``{prefix}_1``) and drop.
    """

    rows: int = 10_000
    seed: int = 1234
    pool_size: int = 10
    table: str = LOGICAL_TABLE  # logical table; the physical ones are {table}_0 .. _3
    bulk_rows: int = 100_000
    bulk_sample: int = 2_000
    bulk_databases: str = "dal_bench"

    def __post_init__(self) -> None:
        if self.rows < TABLE_SHARDS * 10:
            raise ValueError(f"rows must be >= {TABLE_SHARDS * 10}")
        if self.pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", self.table):
            raise ValueError("table must be a lowercase identifier of at most 41 characters")
        if self.bulk_rows < 100:
            raise ValueError("bulk_rows must be >= 100")
        if not 1 <= self.bulk_sample <= self.bulk_rows:
            raise ValueError("bulk_sample must be between 1 and bulk_rows")
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", self.bulk_databases):
            raise ValueError("bulk_databases must be a lowercase identifier of at most 41 characters")

    @property
    def physical_table(self) -> str:
        """The physical table every benchmarked key lives in (the baselines query it)."""
        return f"{self.table}_0"


# -- schema and data --------------------------------------------------------------------
def bench_metadata(table: str = LOGICAL_TABLE) -> sa.MetaData:
    """The logical table dal is given (the physical tables are copies of it)."""
    md = sa.MetaData()
    sa.Table(
        table,
        md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("email", sa.String(128)),
        sa.Column("age", sa.Integer),
        sa.Column("active", sa.Boolean, nullable=False),
    )
    return md


def orm_class(table_name: str) -> type[Any]:
    """The SQLAlchemy ORM baseline's mapped class, on the physical table the keys live in."""

    class Base(DeclarativeBase):
        pass

    class BenchUser(Base):
        __tablename__ = table_name

        id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(64))
        email: Mapped[str | None] = mapped_column(sa.String(128))
        age: Mapped[int | None] = mapped_column(sa.Integer)
        active: Mapped[bool] = mapped_column(sa.Boolean)

    return BenchUser


Row = tuple[int, str, str, int, bool]


def make_rows(n: int) -> list[Row]:
    """Rows ``1 .. n``; deterministic."""
    return [(i, f"user{i:06d}", f"user{i}@example.com", 18 + i % 70, i % 3 != 0) for i in range(1, n + 1)]


def _by_table(layer: DataLayer, table_name: str, rows: Sequence[Row]) -> dict[str, list[Row]]:
    table = layer.tables[table_name]
    out: dict[str, list[Row]] = {p.table: [] for p in table.placements}
    for row in rows:
        out[table.place(row[0]).table].append(row)
    return out


def _keys(by_table: Mapping[str, Sequence[Row]], opts: SuiteOptions) -> list[int]:
    ids = [r[0] for r in by_table[opts.physical_table]]
    return random.Random(opts.seed).choices(ids, k=KEY_COUNT)


def _topology(url: URL, opts: SuiteOptions) -> dict[str, Any]:
    return {
        "databases": {"bench": {"primary": url.render_as_string(hide_password=False)}},
        "tables": {opts.table: {"shard_key": "id", "table_shards": TABLE_SHARDS}},
        "pool": {"min_size": 1, "max_size": opts.pool_size},
    }


async def _start_layer(stack: contextlib.AsyncExitStack, url: URL, opts: SuiteOptions) -> DataLayer:
    """A started layer with fresh (empty) bench tables, dropped again when ``stack`` closes."""
    # env={}: DAL_BENCH_PRIMARY and the like in the environment must not redirect the bench.
    layer = DataLayer(_topology(url, opts), bench_metadata(opts.table), env={})
    stack.push_async_callback(layer.aclose)
    await layer.start()
    stack.push_async_callback(layer.drop_all)  # runs before aclose, after the baselines close
    await layer.drop_all()  # leftovers of an interrupted run
    await layer.create_all()
    if layer.tables[opts.table].physical[0].name != opts.physical_table:
        raise RuntimeError("unexpected physical table naming")
    return layer


async def _check(name: str, op: Op, key: int, row_id: Callable[[Any], object]) -> None:
    """Fail early unless ``op`` really returns the row for ``key``."""
    got = await op(key)
    if got is None or row_id(got) != key:
        raise RuntimeError(f"{name}: expected the row with id {key}, got {got!r}")


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


# -- PostgreSQL -------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def pg_suite(
    urls: Mapping[str, str], opts: SuiteOptions, servers: dict[str, Any], wanted: Sequence[str]
) -> AsyncIterator[dict[str, Scenario]]:
    """PostgreSQL (cache, batch) scenarios on loaded tables; everything is closed and dropped on exit.

    The cached layers and Redis (``urls["redis"]``) are set up only when a
    cache scenario is in ``wanted``, the batch databases only for a batch scenario.
    """
    u = make_url(urls["pg"])
    servers["postgresql"] = {"dsn": u.render_as_string(hide_password=True)}
    async with contextlib.AsyncExitStack() as stack:
        scenarios: dict[str, Scenario] = {}
        if any(not SCENARIOS[n].batch for n in wanted):
            scenarios.update(await _pg_get_scenarios(stack, urls, opts, servers, wanted))
        batch = [n for n in wanted if SCENARIOS[n].batch]
        if batch:
            from dal.bench.bulk import pg_bulk_scenarios

            scenarios.update(await pg_bulk_scenarios(stack, u, opts, servers, batch))
        yield scenarios


async def _pg_get_scenarios(
    stack: contextlib.AsyncExitStack,
    urls: Mapping[str, str],
    opts: SuiteOptions,
    servers: dict[str, Any],
    wanted: Sequence[str],
) -> dict[str, Scenario]:
    """The read scenarios (and the cache ones in ``wanted``) on a loaded table, cleaned up by ``stack``."""
    import asyncpg

    u = make_url(urls["pg"])
    info: dict[str, Any] = servers["postgresql"]
    connect_kw: dict[str, Any] = {
        "host": u.host or "127.0.0.1",
        "port": u.port or 5432,
        "user": u.username,
        "password": u.password,
        "database": u.database,
    }
    layer = await _start_layer(stack, u.set(drivername="postgresql+asyncpg"), opts)
    conn = await asyncpg.connect(**connect_kw)
    stack.push_async_callback(conn.close)
    info["version"] = str(await conn.fetchval("SHOW server_version"))
    by_table = _by_table(layer, opts.table, make_rows(opts.rows))
    for table, rows in by_table.items():
        await conn.copy_records_to_table(table, records=rows, columns=COLUMNS)
        await conn.execute(f'ANALYZE "{table}"')
    keys = _keys(by_table, opts)

    pool = await asyncpg.create_pool(**connect_kw)  # asyncpg's defaults: min 10, max 10 connections
    stack.push_async_callback(pool.close)
    engine = create_async_engine(
        u.set(drivername="postgresql+asyncpg"), pool_size=opts.pool_size, max_overflow=0
    )
    stack.push_async_callback(engine.dispose)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    sql = f"SELECT {', '.join(COLUMNS)} FROM {opts.physical_table} WHERE id = $1"
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

    await _check("dal", repo.get, keys[0], lambda r: r["id"])
    for name, op in baselines(1).items():
        await _check(name, op, keys[0], lambda r: r.id if isinstance(r, user) else r["id"])
    info["rows"] = opts.rows
    scenarios: dict[str, Scenario] = dict(_comparisons("pg", keys, repo.get, baselines))
    cached = [n for n in wanted if SCENARIOS[n].cache]
    if cached:
        by_id = {r[0]: dict(zip(COLUMNS, r, strict=True)) for r in by_table[opts.physical_table]}
        scenarios.update(
            await _cache_scenarios(
                stack, u, urls["redis"], opts, servers, cached, keys, by_id, functools.partial(pool.fetchrow, sql)
            )
        )
    return scenarios


# -- cache scenarios (PostgreSQL + Redis) -----------------------------------------------
def _cached_topology(
    url: URL, redis_url: str, opts: SuiteOptions, namespace: str, policy: Mapping[str, Any]
) -> dict[str, Any]:
    topo = _topology(url, opts)
    topo["tables"][opts.table]["cache"] = {
        "namespace": namespace,
        "l1_ttl": CACHE_TTL,
        "l2_ttl": CACHE_TTL,
        **policy,
    }
    # Own pub/sub channel: other processes' invalidations (or gaps) must not flush this L1.
    topo["cache"] = {"redis": redis_url, "channel": f"{namespace}:invalidate"}
    return topo


@dataclass(frozen=True, slots=True)
class _CacheEnv:
    stack: contextlib.AsyncExitStack
    url: URL  # PostgreSQL, postgresql+asyncpg
    redis_url: str
    opts: SuiteOptions
    namespace: str


async def _cached_layer(env: _CacheEnv, **policy: Any) -> tuple[DataLayer, Any, Any]:
    """A started layer over the loaded tables with ``cache`` on: (layer, repository, table cache)."""
    opts, stack = env.opts, env.stack
    topo = _cached_topology(env.url, env.redis_url, opts, env.namespace, policy)
    layer = DataLayer(topo, bench_metadata(opts.table), env={})
    stack.push_async_callback(layer.aclose)
    await layer.start()
    cache = layer.cache_of(opts.table)
    if cache is None or cache.runtime.remote is None:
        raise RuntimeError("the bench layer has no Redis-backed cache")
    return layer, layer.repository(opts.table), cache


async def _warm(repo: Any, keys: Sequence[int]) -> None:
    """Fill L2 (and L1) with ``keys``: get_many in chunks (a few Redis connections at a time)."""
    for i in range(0, len(keys), 50):
        chunk = keys[i : i + 50]
        got = await repo.get_many(chunk)
        if len(got) != len(chunk):
            raise RuntimeError(f"cache warm-up: {len(chunk) - len(got)} rows missing")


async def _delete_namespace(client: Any, namespace: str) -> int:
    """Delete every Redis key of ``namespace`` (SCAN + UNLINK, never a flush)."""
    deleted = 0
    for pattern in (f"{namespace}:*", "{" + namespace + ":*"):
        batch: list[bytes] = []
        async for k in client.scan_iter(match=pattern, count=1000):
            batch.append(k)
            if len(batch) >= 500:
                deleted += await client.unlink(*batch)
                batch = []
        if batch:
            deleted += await client.unlink(*batch)
    return deleted


def _cache_counters(cache: Any) -> Callable[[], dict[str, int]]:
    remote = cache.runtime.remote

    def counters() -> dict[str, int]:
        return {
            "l1_hits": cache.l1.hits,
            "l1_misses": cache.l1.misses,
            "db_loads": cache.db_loads,
            "lease_waits": cache.lease_waits,
            "singleflight_shared": cache.flight.shared,
            "redis_errors": remote.errors,
            "redis_breaker_trips": remote.breaker.trips,
        }

    return counters


async def _cache_scenarios(
    stack: contextlib.AsyncExitStack,
    url: URL,
    redis_url_text: str,
    opts: SuiteOptions,
    servers: dict[str, Any],
    wanted: Sequence[str],
    keys: Sequence[int],
    rows: Mapping[int, dict[str, Any]],
    pool_fetchrow: Op,
) -> dict[str, Scenario]:
    """The cache scenarios in ``wanted``; Redis keys of the bench's namespace are deleted on exit."""
    from redis.asyncio import Redis

    redis_url = make_url(redis_url_text.replace("rediss://", "redis://", 1))
    # redis-py's defaults: the redis.get baseline, and the bench's own key clean-up.
    plain = Redis.from_url(redis_url_text)
    stack.push_async_callback(plain.aclose)
    try:
        await plain.ping()
    except Exception as exc:
        raise RuntimeError(
            f"Redis at {redis_url.render_as_string(hide_password=True)} unreachable ({exc}); the cache "
            f"scenarios ({', '.join(wanted)}) need it: set DAL_TEST_REDIS_URL or bench.redis_url, "
            "or leave them out with --only"
        ) from None
    info = await plain.info("server")
    servers["redis"] = {
        "dsn": redis_url.render_as_string(hide_password=True),
        "version": str(info.get("redis_version", "?")),
    }
    namespace = f"dalbench_{os.getpid()}_{secrets.token_hex(4)}"
    servers["redis"]["namespace"] = namespace

    async def clean_up() -> None:
        servers["redis"]["keys_deleted"] = await _delete_namespace(plain, namespace)

    stack.push_async_callback(clean_up)  # after the layers have closed (LIFO)
    env = _CacheEnv(stack, url.set(drivername="postgresql+asyncpg"), redis_url_text, opts, namespace)

    distinct = sorted(set(keys))
    out: dict[str, Scenario] = {}
    for name in wanted:
        if name == "get.l1_hit":
            out[name] = await _l1_hit(env, keys, distinct, rows, pool_fetchrow)
        elif name == "get.l2_hit":
            out[name] = await _l2_hit(env, plain, distinct)
        elif name == "stampede":
            out[name] = await _stampede(env, plain, keys[0], pool_fetchrow)
    return out


async def _l1_hit(
    env: _CacheEnv,
    keys: Sequence[int],
    distinct: Sequence[int],
    rows: Mapping[int, dict[str, Any]],
    pool_fetchrow: Op,
) -> Comparison:
    from cachetools import TLRUCache

    spec = SCENARIOS["get.l1_hit"]
    _, repo, cache = await _cached_layer(env)
    await _warm(repo, distinct)
    misses = cache.l1.misses
    for k in distinct:  # every key must now be an L1 hit
        await repo.get(k)
    if cache.l1.misses != misses:
        raise RuntimeError(f"get.l1_hit: {cache.l1.misses - misses} L1 misses after warm-up")
    # The same structure as dal's L1: maxsize, per-entry expiry read from (expiry, row) values.
    tlru: TLRUCache[int, tuple[float, dict[str, Any]]] = TLRUCache(
        cache.policy.l1_max_size, ttu=lambda _k, v, _now: v[0], timer=time.monotonic
    )
    expires = time.monotonic() + CACHE_TTL
    for k in distinct:
        tlru[k] = (expires, rows[k])
    if tlru[keys[0]][1]["id"] != keys[0]:
        raise RuntimeError("cachetools.tlru.getitem: wrong entry")
    return Comparison(
        name=spec.name,
        concurrency=1,
        dal=Contender(spec.name, repo.get),
        baselines=(
            Contender("cachetools.tlru.getitem", tlru.__getitem__, sync=True),
            Contender("asyncpg.pool.fetchrow", pool_fetchrow),
        ),
        keys=keys,
        targets=spec.targets,
        description=(
            f"await repo.get(key) answered by L1 ({len(distinct)} keys, all cached), random keys; "
            "baseline: a bare TLRUCache.__getitem__ of the same size and entries, no await"
        ),
        loop_overhead=True,
        counters=_cache_counters(cache),
    )


async def _l2_hit(env: _CacheEnv, plain: Any, distinct: Sequence[int]) -> Comparison:
    spec = SCENARIOS["get.l2_hit"]
    layer, repo, cache = await _cached_layer(env, l1_max_size=1)
    await _warm(repo, distinct)
    cycle = list(distinct)
    random.Random(env.opts.seed).shuffle(cycle)  # distinct neighbours: L1 (1 entry) always misses
    before = _cache_counters(cache)()
    for k in cycle[:200]:
        await repo.get(k)
    after = _cache_counters(cache)()
    if after["db_loads"] != before["db_loads"] or after["l1_hits"] != before["l1_hits"]:
        raise RuntimeError(f"get.l2_hit: not every read came from L2: {before} -> {after}")
    table = layer.tables[env.opts.table]
    redis_keys = {k: cache.base(table.cache_key(k)[0]) for k in distinct}
    get, loads = plain.get, cache.codec.loads

    async def redis_get(key: Any) -> object:
        return loads(await get(redis_keys[key]))

    await _check("redis.get", redis_get, cycle[0], lambda r: r["id"])
    return Comparison(
        name=spec.name,
        concurrency=1,
        dal=Contender(spec.name, repo.get),
        baselines=(Contender("redis.get", redis_get),),
        keys=cycle,
        targets=spec.targets,
        description=(
            f"await repo.get(key) answered by L2 (Redis): l1_max_size=1 and {len(cycle)} distinct keys "
            "in a shuffled cycle, so L1 misses every time (no flush); baseline: await client.get(k) "
            "of the same key + msgpack decode with dal's codec"
        ),
        counters=_cache_counters(cache),
    )


async def _stampede(env: _CacheEnv, plain: Any, key: int, pool_fetchrow: Op) -> Burst:
    layer, repo, cache = await _cached_layer(env)
    enc = layer.tables[env.opts.table].cache_key(key)[0]
    base = cache.base(enc)
    nodes = list(layer.cluster.nodes.values())

    async def cold() -> None:
        cache.l1.invalidate([enc])
        cache.flight.forget(enc)
        await plain.delete(base, base + ":ver", base + ":lease")

    async def dal_get() -> object:
        row = await repo.get(key)
        if row is None or row["id"] != key:
            raise RuntimeError(f"stampede: expected the row with id {key}, got {row!r}")
        return row

    fetched = 0

    async def pool_get() -> object:
        nonlocal fetched
        fetched += 1
        row: Any = await pool_fetchrow(key)
        if row is None or row["id"] != key:
            raise RuntimeError(f"stampede: expected the row with id {key}, got {row!r}")
        return row

    async def nothing() -> None:
        return None

    spec = SCENARIOS["stampede"]
    return Burst(
        name="stampede",
        size=spec.concurrency,
        dal=BurstContender("stampede", dal_get, cold, lambda: sum(n.queries for n in nodes)),
        baselines=(BurstContender(spec.baselines[0], pool_get, nothing, lambda: fetched),),
        targets=spec.targets,
        description=(
            f"{spec.concurrency} concurrent await repo.get(key) of one key, cold (L1, L2, version and "
            "lease keys removed untimed before each burst); db_queries = statements per burst (node counters)"
        ),
        counters=_cache_counters(cache),
    )


# -- MySQL / MariaDB --------------------------------------------------------------------
@contextlib.asynccontextmanager
async def mysql_suite(
    urls: Mapping[str, str], opts: SuiteOptions, servers: dict[str, Any], wanted: Sequence[str]
) -> AsyncIterator[dict[str, Scenario]]:
    """MySQL/MariaDB comparisons on loaded tables; everything is closed and dropped on exit."""
    u = make_url(urls["mysql"])
    servers["mysql"] = {"dsn": u.render_as_string(hide_password=True)}
    async with contextlib.AsyncExitStack() as stack:
        scenarios: dict[str, Scenario] = {}
        if any(not SCENARIOS[n].batch for n in wanted):
            scenarios.update(await _mysql_get_scenarios(stack, u, opts, servers))
        batch = [n for n in wanted if SCENARIOS[n].batch]
        if batch:
            from dal.bench.bulk import mysql_bulk_scenarios

            scenarios.update(await mysql_bulk_scenarios(stack, u, opts, servers, batch))
        yield scenarios


async def _mysql_get_scenarios(
    stack: contextlib.AsyncExitStack, u: URL, opts: SuiteOptions, servers: dict[str, Any]
) -> dict[str, Scenario]:
    import aiomysql

    info: dict[str, Any] = servers["mysql"]
    layer = await _start_layer(stack, u.set(drivername="mysql+aiomysql"), opts)
    # aiomysql's defaults (minsize 1, maxsize 10) but autocommit, as dal runs.
    pool = await aiomysql.create_pool(
        host=u.host or "127.0.0.1",
        port=u.port or 3306,
        user=u.username or "root",
        password=u.password or "",
        db=u.database,
        charset=str(u.query.get("charset", "utf8mb4")),
        autocommit=True,
    )

    async def close_pool() -> None:
        pool.close()
        await pool.wait_closed()

    stack.push_async_callback(close_pool)
    by_table = _by_table(layer, opts.table, make_rows(opts.rows))
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT VERSION()")
        info["version"] = str((await cur.fetchone())[0])
        for table, rows in by_table.items():
            insert = f"INSERT INTO {table} ({', '.join(COLUMNS)}) VALUES (%s, %s, %s, %s, %s)"
            for i in range(0, len(rows), 1000):
                await cur.executemany(insert, rows[i : i + 1000])
            await cur.execute(f"ANALYZE TABLE {table}")
            await cur.fetchall()
    keys = _keys(by_table, opts)

    sql = f"SELECT {', '.join(COLUMNS)} FROM {opts.physical_table} WHERE id = %s"
    repo = layer.repository(opts.table)

    async def pool_get(key: Any) -> object:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, (key,))
            return await cur.fetchone()

    def baselines(concurrency: int) -> dict[str, Op]:
        return {"aiomysql.pool.autocommit": pool_get}

    await _check("dal", repo.get, keys[0], lambda r: r["id"])
    await _check("aiomysql.pool.autocommit", pool_get, keys[0], lambda r: r[0])
    info["rows"] = opts.rows
    return dict(_comparisons("mysql", keys, repo.get, baselines))


Suite = Callable[
    [Mapping[str, str], SuiteOptions, dict[str, Any], Sequence[str]],
    contextlib.AbstractAsyncContextManager[dict[str, Scenario]],
]
SUITES: dict[Backend, Suite] = {"pg": pg_suite, "mysql": mysql_suite}
"""Per backend: (server URLs by "pg"/"mysql"/"redis", options, the report's servers
dict to fill, wanted scenario names) -> the scenarios by name."""
