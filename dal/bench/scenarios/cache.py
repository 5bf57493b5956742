"""The cache scenarios: ``repo.get`` answered by L1, by L2, and a stampede on one cold key.

They read the PostgreSQL users table the read scenarios loaded
(:class:`~dal.bench.scenarios.reads.PgTable`) through other layers whose
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
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachetools import TLRUCache
from sqlalchemy.engine import URL, make_url

from dal.bench.harness import Burst, BurstContender, Comparison, Contender, Op
from dal.bench.scenarios.catalog import SCENARIOS, Scenario, SuiteOptions
from dal.bench.scenarios.drivers import driver, reach
from dal.bench.scenarios.reads import PgTable, users_topology
from dal.bench.scenarios.tables import check_row, users_metadata
from dal.errors import BenchError
from dal.layer import DataLayer

CACHE_TTL = 3600.0  # l1_ttl and l2_ttl of the cached layers: nothing expires during a run


def _cached_topology(
    url: URL, redis_url: str, opts: SuiteOptions, namespace: str, policy: Mapping[str, Any]
) -> dict[str, Any]:
    topo = users_topology(url, opts)
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
    layer = DataLayer(topo, users_metadata(opts.table), env={})
    stack.push_async_callback(layer.aclose)
    await layer.start()
    cache = layer.cache_of(opts.table)
    if cache is None or cache.runtime.remote is None:
        raise BenchError("the bench layer has no Redis-backed cache")
    return layer, layer.repository(opts.table), cache


async def _warm(repo: Any, keys: Sequence[int]) -> None:
    """Fill L2 (and L1) with ``keys``: get_many in chunks (a few Redis connections at a time)."""
    for i in range(0, len(keys), 50):
        chunk = keys[i : i + 50]
        got = await repo.get_many(chunk)
        if len(got) != len(chunk):
            raise BenchError(f"cache warm-up: {len(chunk) - len(got)} rows missing")


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


async def cache_scenarios(
    stack: contextlib.AsyncExitStack,
    loaded: PgTable,
    redis_url_text: str,
    opts: SuiteOptions,
    servers: dict[str, Any],
    wanted: Sequence[str],
) -> dict[str, Scenario]:
    """The cache scenarios in ``wanted`` over ``loaded``; the namespace's Redis keys are deleted on exit."""
    redis = driver("redis.asyncio")
    redis_url = make_url(redis_url_text.replace("rediss://", "redis://", 1))
    # redis-py's defaults: the redis.get baseline, and the bench's own key clean-up.
    plain = redis.Redis.from_url(redis_url_text)
    stack.push_async_callback(plain.aclose)
    # Any failure of the first PING: redis-py's ConnectionError, TimeoutError, AuthenticationError, ...
    await reach("Redis", redis_url, plain.ping(), wanted, (Exception,))
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
    env = _CacheEnv(stack, loaded.url, redis_url_text, opts, namespace)
    keys, rows, pool_fetchrow = loaded.keys, loaded.rows, loaded.pool_fetchrow

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
    spec = SCENARIOS["get.l1_hit"]
    _, repo, cache = await _cached_layer(env)
    await _warm(repo, distinct)
    misses = cache.l1.misses
    for k in distinct:  # every key must now be an L1 hit
        await repo.get(k)
    if cache.l1.misses != misses:
        raise BenchError(f"get.l1_hit: {cache.l1.misses - misses} L1 misses after warm-up")
    # The same structure as dal's L1: maxsize, per-entry expiry read from (expiry, row) values.
    tlru: TLRUCache[int, tuple[float, dict[str, Any]]] = TLRUCache(
        cache.policy.l1_max_size, ttu=lambda _k, v, _now: v[0], timer=time.monotonic
    )
    expires = time.monotonic() + CACHE_TTL
    for k in distinct:
        tlru[k] = (expires, rows[k])
    if tlru[keys[0]][1]["id"] != keys[0]:
        raise BenchError("cachetools.tlru.getitem: wrong entry")
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
        raise BenchError(f"get.l2_hit: not every read came from L2: {before} -> {after}")
    table = layer.tables[env.opts.table]
    redis_keys = {k: cache.base(table.cache_key(k)[0]) for k in distinct}
    get, loads = plain.get, cache.codec.loads

    async def redis_get(key: Any) -> object:
        return loads(await get(redis_keys[key]))

    await check_row("redis.get", redis_get, cycle[0], lambda r: r["id"])
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

    def the_row(row: Any) -> object:
        # Checked on every get: a burst answered wrongly must not pass as a fast one.
        if row is None or row["id"] != key:
            raise BenchError(f"stampede: expected the row with id {key}, got {row!r}")
        return row

    async def dal_get() -> object:
        return the_row(await repo.get(key))

    fetched = 0

    async def pool_get() -> object:
        nonlocal fetched
        fetched += 1
        return the_row(await pool_fetchrow(key))

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
