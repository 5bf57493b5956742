"""``dal bench``: run the scenarios, print a table, write JSON.

See :mod:`dal.bench.scenarios` for what each scenario measures and
:mod:`dal.bench.measure` for how (warm-up, alternating rounds, medians).

JSON written to ``--json PATH`` (and returned by :func:`run_bench`)::

    {
      "scenarios": [
        {"name": "pg.get.nocache", "kind": "dal", "concurrency": 1,
         "ops_per_s": 15000.0, "p50_us": 62.1, "p99_us": 110.4, "ops": 37000, "rounds": 5,
         "vs": {"asyncpg.pool.fetchrow": 0.62, ...},          # dal / baseline time per op
         "vs_range": {"asyncpg.pool.fetchrow": [0.6, 0.64], ...},  # min, max over rounds
         "vs_cpu": {"asyncpg.pool.fetchrow": 0.5, ...},     # dal / baseline client CPU per op
         "cpu_us_per_op": 40.2,                             # this process's CPU time per op
         "targets": {"asyncpg.pool.fetchrow": 0.7, ...}},
        {"name": "asyncpg.pool.fetchrow", "kind": "baseline", "baseline_of": "pg.get.nocache",
         "vs": {}, ...},
        {"name": "get.l1_hit", "kind": "dal", ..., "vs": {"cachetools.tlru.getitem": 4.1, ...},
         "vs_net": {"cachetools.tlru.getitem": 5.3, ...},  # net of the measuring loop's own time
         "loop_overhead_ns": 120.0, "targets": {...}, "met": {...},
         "counters": {"l1_hits": 61000, "l1_misses": 0, "db_loads": 0, ...}},  # changes over the scenario
        {"name": "stampede", "kind": "dal", "concurrency": 1000, "burst": 1000,
         "db_queries": 1, "db_queries_per_burst": [1, 1, ...],   # statements per burst of cold gets
         "targets": {"db_queries": 1}, "met": {"db_queries": true}, "vs": {...}, ...},
        ...
      ],
      "machine": {"python": ..., "platform": ..., "cpus": ..., "servers": {...}, ...},
      "run": {"quick": false, "timing": {...}, "wall_s": ...},
      "notes": [...]
    }

A ratio below 1 means dal takes less time per operation than the baseline.

``--config FILE`` is a dal.toml (the first PostgreSQL and the first MySQL
primary of its topology are benched) and/or a ``[bench]`` table; every key is
optional::

    [bench]
    pg_url = "postgresql://postgres@127.0.0.1:5432/test"
    mysql_url = "mysql://root@127.0.0.1:3306/test"
    rows = 10000          # rows loaded into the bench table
    seed = 1234           # key sequence
    pool_size = 10        # max connections of every pool (dal and baselines)
    table = "dal_bench_users"  # logical table (physical: table_0 .. table_3), dropped at the end
    rounds = 10           # alternating rounds per scenario (bursts, for stampede)
    round_seconds = 0.25  # per contender per round
    warmup_ops = 500      # per contender, before the first round
    redis_url = "redis://127.0.0.1:6379/0"  # L2 of the cache scenarios (or a dal.toml's [cache] redis)

Server URLs are taken from the arguments, else the config file, else
``DAL_TEST_PG_URL`` / ``DAL_TEST_MYSQL_URL`` / ``DAL_TEST_REDIS_URL``, else
the loopback defaults (the same servers ``make test`` uses). Passwords are
never printed. The cache scenarios (``get.l1_hit``, ``get.l2_hit``,
``stampede``) use the PostgreSQL server and Redis; their Redis keys live in a
namespace of their own, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.engine import make_url

from dal.bench.measure import (
    Bulk,
    Burst,
    BurstResult,
    Comparison,
    Result,
    Timing,
    compare,
    paired_net_ratio,
    paired_ratio,
    run_bulk,
    run_bursts,
)
from dal.bench.scenarios import SCENARIOS, SUITES, TABLE_SHARDS, Scenario, SuiteOptions, select

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

FULL = Timing(rounds=10, round_seconds=0.25, warmup_ops=500)
QUICK = Timing(rounds=4, round_seconds=0.2, warmup_ops=200)


class BenchError(Exception):
    """A usage problem (bad ``--only``, bad config file): exit code 2."""


@dataclass(frozen=True, slots=True)
class Settings:
    pg_url: str
    mysql_url: str
    redis_url: str
    timing: Timing
    options: SuiteOptions


_CONFIG_KEYS = {
    "pg_url": str,
    "mysql_url": str,
    "rows": int,
    "seed": int,
    "pool_size": int,
    "table": str,
    "rounds": int,
    "round_seconds": float,
    "warmup_ops": int,
    "redis_url": str,
    "bulk_rows": int,
    "bulk_sample": int,
    "bulk_databases": str,
}

QUICK_BULK_ROWS = 20_000  # rows per load of the batch scenarios with --quick (else 100,000)
QUICK_BULK_SAMPLE = 1_000  # rows of the row-by-row baseline with --quick (else 2,000)


def _read_config(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise BenchError(f"config {path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"config {path}: invalid TOML: {exc}") from None
    section = data.get("bench", {})
    if not isinstance(section, dict):
        raise BenchError(f"config {path}: [bench] must be a table")
    topology = {k: v for k, v in data.items() if k != "bench"}
    if topology:
        # A dal.toml: bench its first PostgreSQL and first MySQL primary.
        from dal.config import Config
        from dal.errors import ConfigError

        try:
            cfg = Config.from_dict(topology)
        except ConfigError as exc:
            raise BenchError(f"config {path}: {exc}") from None
        for db in cfg.databases:
            url = db.primary.dsn.url
            key = {"postgresql": "pg_url", "mysql": "mysql_url"}.get(db.backend)
            if key is not None and key not in section:
                plain = url.set(drivername="postgresql" if key == "pg_url" else "mysql")
                section = {**section, key: plain.render_as_string(hide_password=False)}
        if cfg.cache.redis is not None and "redis_url" not in section:
            section = {**section, "redis_url": cfg.cache.redis.url}
    for key, value in section.items():
        typ = _CONFIG_KEYS.get(key)
        if typ is None:
            raise BenchError(f"config {path}: unknown key bench.{key}; expected one of {sorted(_CONFIG_KEYS)}")
        ok = isinstance(value, typ) or (typ is float and isinstance(value, int))
        if not ok or isinstance(value, bool):
            raise BenchError(f"config {path}: bench.{key} must be {typ.__name__}")
    return dict(section)


def resolve_settings(
    *,
    quick: bool,
    config: str | None,
    pg_url: str | None,
    mysql_url: str | None,
    env: Mapping[str, str] | None = None,
    redis_url: str | None = None,
) -> Settings:
    """Settings from arguments, then the config file, then the environment, then defaults."""
    env = os.environ if env is None else env
    cfg = _read_config(config) if config else {}
    base = QUICK if quick else FULL
    try:
        timing = replace(
            base,
            rounds=cfg.get("rounds", base.rounds),
            round_seconds=float(cfg.get("round_seconds", base.round_seconds)),
            warmup_ops=cfg.get("warmup_ops", base.warmup_ops),
        )
        defaults = SuiteOptions()
        options = SuiteOptions(
            rows=cfg.get("rows", defaults.rows),
            seed=cfg.get("seed", defaults.seed),
            pool_size=cfg.get("pool_size", defaults.pool_size),
            table=cfg.get("table", defaults.table),
            bulk_rows=cfg.get("bulk_rows", QUICK_BULK_ROWS if quick else defaults.bulk_rows),
            bulk_sample=cfg.get("bulk_sample", QUICK_BULK_SAMPLE if quick else defaults.bulk_sample),
            bulk_databases=cfg.get("bulk_databases", defaults.bulk_databases),
        )
    except ValueError as exc:
        raise BenchError(f"config {config}: {exc}") from None
    return Settings(
        pg_url=pg_url or cfg.get("pg_url") or env.get("DAL_TEST_PG_URL") or DEFAULT_PG_URL,
        mysql_url=mysql_url or cfg.get("mysql_url") or env.get("DAL_TEST_MYSQL_URL") or DEFAULT_MYSQL_URL,
        redis_url=redis_url or cfg.get("redis_url") or env.get("DAL_TEST_REDIS_URL") or DEFAULT_REDIS_URL,
        timing=timing,
        options=options,
    )


# -- results ----------------------------------------------------------------------------
def _num(x: float, digits: int) -> float:
    return round(x, digits) if math.isfinite(x) else 0.0


def _entry(result: Result, rounds: int) -> dict[str, Any]:
    return {
        "name": result.name,
        "concurrency": result.concurrency,
        "ops_per_s": _num(result.ops_per_s, 1),
        "p50_us": _num(result.percentile_us(0.50), 1),
        "p99_us": _num(result.percentile_us(0.99), 1),
        "cpu_us_per_op": _num(result.cpu_us_per_op, 1),
        "ops": result.ops,
        "rounds": rounds,
    }


def scenario_entries(
    comparison: Comparison | Burst | Bulk,
    results: Sequence[Result],
    rounds: int,
    counters: Mapping[str, int] | None = None,
    queries: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """JSON entries: dal's (with ratios against each baseline), then each baseline's.

    With a comparison's ``loop_overhead`` the do-nothing contender comes last
    in ``results``: it gives ``vs_net`` and is not an entry itself. For a
    burst, ``queries`` holds each contender's database statements per burst.
    ``counters``: dal's counter changes over the scenario. A contender's
    ``info`` (batch size, rows per call, ...) goes into its entry; entries whose
    operations are rows (``"unit": "row"``) also get ``us_per_row``.
    """
    overhead: Result | None = None
    if isinstance(comparison, Comparison) and comparison.loop_overhead:
        *results, overhead = results
    dal, *bases = results
    infos = {c.name: dict(getattr(c, "info", {})) for c in comparison.contenders}
    head = _entry(dal, rounds)
    _add_info(head, dal, infos.get(dal.name, {}))
    head["kind"] = "dal"
    head["description"] = comparison.description
    head["vs"] = {}
    head["vs_range"] = {}
    head["vs_cpu"] = {}
    for b in bases:
        med, lo, hi = paired_ratio(dal, b)
        head["vs"][b.name] = _num(med, 3)
        head["vs_range"][b.name] = [_num(lo, 3), _num(hi, 3)]
        head["vs_cpu"][b.name] = _num(dal.cpu_us_per_op / b.cpu_us_per_op, 3)
    judged = head["vs"]
    if overhead is not None:
        head["loop_overhead_ns"] = _num(statistics.median(r.ns_per_op for r in overhead.runs), 1)
        head["vs_net"] = {}
        head["vs_net_range"] = {}
        for b in bases:
            med, lo, hi = paired_net_ratio(dal, b, overhead)
            head["vs_net"][b.name] = _num(med, 3)
            head["vs_net_range"][b.name] = [_num(lo, 3), _num(hi, 3)]
        judged = head["vs_net"]
        head["targets_judged_on"] = "vs_net"
    if queries is not None:
        head["burst"] = dal.concurrency
        head["db_queries"] = max(queries[dal.name])  # the worst burst
        head["db_queries_per_burst"] = list(queries[dal.name])
        judged = {**judged, "db_queries": head["db_queries"]}
    head["targets"] = {k: _num(v, 3) for k, v in comparison.targets.items()}
    head["met"] = {k: judged[k] <= v for k, v in comparison.targets.items() if k in judged}
    if counters is not None:
        head["counters"] = dict(counters)
    out = [head]
    for b in bases:
        e = _entry(b, rounds)
        _add_info(e, b, infos.get(b.name, {}))
        e["kind"] = "baseline"
        e["baseline_of"] = dal.name
        e["vs"] = {}
        if queries is not None:
            e["burst"] = b.concurrency
            e["db_queries"] = max(queries[b.name])
        out.append(e)
    return out


def _add_info(entry: dict[str, Any], result: Result, info: Mapping[str, Any]) -> None:
    entry.update(info)
    if info.get("unit") == "row":
        entry["us_per_row"] = _num(statistics.median(r.ns_per_op for r in result.runs) / 1000.0, 3)


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("dal", "asyncpg", "aiomysql", "PyMySQL", "SQLAlchemy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(servers: Mapping[str, Any]) -> dict[str, Any]:
    """Python, OS, CPU and library versions, and the servers (DSNs masked)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    loop = asyncio.get_running_loop()
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in load],
        "event_loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        "packages": _versions(),
        "servers": dict(servers),
    }


def _notes(settings: Settings, names: Sequence[str]) -> list[str]:
    t, o = settings.timing, settings.options
    cache_notes = [
        "cache scenarios: layers with cache on the same PostgreSQL table, Redis L2 in a namespace of their "
        "own (deleted at the end), l1_ttl = l2_ttl = 3600 s so nothing expires during the run; "
        "counters = changes of dal's cache counters over the scenario, warm-up included",
        "get.l1_hit: every key in L1 before the first op; cachetools.tlru.getitem is a bare "
        "TLRUCache.__getitem__ (same maxsize, same entries, int keys) called without await in the same "
        "loop as dal's awaited repo.get; vs_net takes the loop's own time per op (loop_overhead_ns: the "
        "same loop calling the builtin id) off both sides, and the targets are judged on vs_net",
        "get.l2_hit: l1_max_size=1 and the distinct keys in a shuffled cycle, so every read misses L1 and "
        "is answered by one Redis MGET (row + version key); redis.get: await client.get(k) of the same "
        "Redis key (same bytes) + dal's msgpack decode, redis-py default client",
        f"stampede: {SCENARIOS['stampede'].concurrency} concurrent repo.get of one key made cold "
        f"(untimed) before each of {t.rounds} bursts (+1 warm-up); db_queries = the worst burst's "
        "statements (node counters); latencies run from the burst's start",
    ]
    cached = any(SCENARIOS[n].cache for n in names)
    batch_notes = [
        f"batch scenarios: ops are rows; each load writes {o.bulk_rows:,} rows"
        f"{' (--quick: fewer rows than the 100,000 of a full run)' if o.bulk_rows < 100_000 else ''} "
        f"into empty tables (TRUNCATE untimed before each load) of 2 shard databases of their own "
        f"({o.bulk_databases}_0, {o.bulk_databases}_1; dropped at the end) x 8 physical tables; one warm-up "
        f"load per contender, then {t.rounds} rounds of one load each, alternating; ratio = dal's time per "
        "row / the baseline's; p50/p99 = latency of one call (rows_per_call rows)",
        "pg.insert_many / pg.upsert_many / mysql.insert_many: batch_size = the largest physical table's share "
        "(one batch per physical table); pg.insert_many:b1000 uses batch_size=1000 (small batches, one transaction each)",
        f"asyncpg.copy: one copy_records_to_table of the same rows (tuples) into one table; "
        f"asyncpg.row_autocommit: await conn.execute(INSERT) per row on one connection (autocommit), the "
        f"first {o.bulk_sample:,} rows; aiomysql.executemany: executemany of 1,000-row chunks (rewritten "
        "into one multi-row INSERT each) on one autocommit connection",
        f"batchwriter.insert:c1000: 1,000 tasks, each awaiting one single-row write after another for "
        f"{t.round_seconds:g} s per round, writer defaults; repo.insert:c1000 the same with repo.insert, "
        f"pool max_size={o.pool_size} per shard database; ops_per_s = rows/s",
    ]
    read_notes = [
        f"{o.rows} rows in {o.table} over {TABLE_SHARDS} physical tables; keys: seeded random ids "
        f"(seed {o.seed}) of the rows in {o.physical_table}, which the baselines query directly",
        f"pools: dal max_size={o.pool_size}; asyncpg.create_pool() defaults (min 10, max 10); "
        f"SQLAlchemy pool_size={o.pool_size}, max_overflow=0; aiomysql.create_pool() defaults "
        "(min 1, max 10) with autocommit=True",
        "asyncpg.pool.fetchrow: asyncpg's pool runs its reset query on every release (its default): "
        "two round trips per op",
        "asyncpg.conn.fetchrow at c32: 32 tasks share one connection through an asyncio.Lock",
        "sqlalchemy.orm.get: a new AsyncSession per op (async with sessions() as s: await s.get(User, key)); "
        "it runs BEGIN, the SELECT and ROLLBACK",
    ]
    batched = any(SCENARIOS[n].batch for n in names)
    reads = any(not SCENARIOS[n].batch for n in names)
    return [
        "ratio = dal's wall time per operation / the baseline's, median over paired rounds; < 1 means dal is faster",
        f"each contender: {t.warmup_ops} warm-up ops, then {t.rounds} rounds x {t.round_seconds:g} s, "
        "rounds alternating A B C / C B A",
        "ops_per_s = median over rounds of ops / wall time; p50/p99 over every op's latency; "
        "cpu µs = this process's CPU time (user + system) per op, the client side only",
        *(read_notes if reads else []),
        "targets apply to the single-task scenarios, stampede and the batch scenarios; the bench never fails on them",
        *(cache_notes if cached else []),
        *(batch_notes if batched else []),
    ]


def _ratio_text(e: Mapping[str, Any], name: str) -> str:
    ratio = e["vs"][name]
    lo, hi = e["vs_range"][name]
    shown = f"{ratio:.3f}x [{lo:.3g}-{hi:.3g}]"
    if "vs_net" in e:
        nlo, nhi = e["vs_net_range"][name]
        shown += f", net of loop {e['vs_net'][name]:.3f}x [{nlo:.3g}-{nhi:.3g}]"
    key = name if name in e["targets"] else name.partition(":")[0]
    target = e["targets"].get(key)
    if target is not None:
        met = e["met"].get(key, ratio <= target)
        basis = " (net)" if "vs_net" in e else ""
        shown += f"  target{basis} <= {target:g}: {'met' if met else 'MISSED'}"
    return shown


def _per_op_rows(entries: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    w = 30
    print(
        f"\n{'scenario':<{w}} {'conc':>4} {'ops/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'cpu µs':>7}"
        "  dal/baseline time per op [min-max over rounds]",
        file=out,
    )
    print("-" * (w + 4 + 9 + 8 + 8 + 7 + 52), file=out)
    for e in entries:
        if e["kind"] != "dal" or e.get("unit") == "row":
            continue
        extra = ""
        if "db_queries" in e:
            extra = f"  db queries per burst of {e['burst']}: {e['db_queries']} (worst)"
            if "db_queries" in e["targets"]:
                target = e["targets"]["db_queries"]
                extra += f"  target <= {target:g}: {'met' if e['met']['db_queries'] else 'MISSED'}"
        print(
            f"{e['name']:<{w}} {e['concurrency']:>4} {e['ops_per_s']:>9,.0f} {e['p50_us']:>8.1f} "
            f"{e['p99_us']:>8.1f} {e['cpu_us_per_op']:>7.1f}{extra}",
            file=out,
        )
        for b in entries:
            if b.get("baseline_of") != e["name"]:
                continue
            shown = _ratio_text(e, b["name"])
            if "db_queries" in b:
                shown += f"  db queries: {b['db_queries']}"
            print(
                f"  {b['name']:<{w - 2}} {b['concurrency']:>4} {b['ops_per_s']:>9,.0f} {b['p50_us']:>8.1f} "
                f"{b['p99_us']:>8.1f} {b['cpu_us_per_op']:>7.1f}  {shown}",
                file=out,
            )
        if "loop_overhead_ns" in e:
            print(f"  (measuring loop: {e['loop_overhead_ns']:.0f} ns per op)", file=out)
        if e.get("counters"):
            shown = ", ".join(f"{k} {v:,}" for k, v in e["counters"].items())
            print(f"  counters: {shown}", file=out)


def _per_row_rows(entries: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    w = 30
    print(
        f"\n{'batch scenario':<{w}} {'conc':>4} {'rows/call':>9} {'rows/s':>9} {'µs/row':>7} "
        f"{'call p50 ms':>11} {'p99 ms':>8} {'cpu µs/row':>10}  dal/baseline time per row [min-max over rounds]",
        file=out,
    )
    print("-" * (w + 4 + 9 + 9 + 7 + 11 + 8 + 10 + 56), file=out)

    def line(e: Mapping[str, Any], indent: str, tail: str) -> str:
        return (
            f"{indent}{e['name']:<{w - len(indent)}} {e['concurrency']:>4} {e.get('rows_per_call', 1):>9,} "
            f"{e['ops_per_s']:>9,.0f} {e['us_per_row']:>7.2f} {e['p50_us'] / 1000:>11.3f} "
            f"{e['p99_us'] / 1000:>8.3f} {e['cpu_us_per_op']:>10.2f}{tail}"
        )

    for e in entries:
        if e["kind"] != "dal" or e.get("unit") != "row":
            continue
        extra = ""
        if "batch_size" in e:
            extra = f"  batch_size {e['batch_size']:,}, {e.get('batches_per_call', '?')} batches per call"
        if "writer" in e:
            extra = "  writer " + ", ".join(f"{k}={v}" for k, v in e["writer"].items())
        print(line(e, "", extra), file=out)
        for b in entries:
            if b.get("baseline_of") == e["name"]:
                print(line(b, "  ", "  " + _ratio_text(e, b["name"])), file=out)
        if e.get("counters"):
            shown = ", ".join(f"{k} {v:,}" for k, v in e["counters"].items())
            print(f"  counters: {shown}", file=out)


def print_table(report: Mapping[str, Any], out: TextIO) -> None:
    """The readable form of ``report``: dal rows, each followed by its baselines and ratios.

    Scenarios whose operations are rows (the batch writes) get a table of their own.
    """
    entries = report["scenarios"]
    if any(e["kind"] == "dal" and e.get("unit") != "row" for e in entries):
        _per_op_rows(entries, out)
    if any(e["kind"] == "dal" and e.get("unit") == "row" for e in entries):
        _per_row_rows(entries, out)
    for note in report.get("notes", []):
        print(f"note: {note}", file=out)


def _write_json(path: str, report: Mapping[str, Any]) -> None:
    Path(path).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


async def _run_suite(
    suite: contextlib.AbstractAsyncContextManager[dict[str, Scenario]],
    names: Sequence[str],
    timing: Timing,
    entries: list[dict[str, Any]],
    out: TextIO,
) -> None:
    def progress(msg: str) -> None:
        print(f"  {msg}", file=out, flush=True)

    async with suite as scenarios:
        for name in names:
            scenario = scenarios[name]
            before = scenario.counters() if scenario.counters is not None else None
            queries: dict[str, Sequence[int]] | None = None
            if isinstance(scenario, Bulk):
                print(
                    f"{name}: {len(scenario.contenders)} contenders, one load each per round",
                    file=out,
                    flush=True,
                )
                results = await run_bulk(scenario, timing, progress)
            elif isinstance(scenario, Burst):
                print(
                    f"{name}: {len(scenario.contenders)} contenders, bursts of {scenario.size} concurrent gets",
                    file=out,
                    flush=True,
                )
                bursts: list[BurstResult] = await run_bursts(scenario, timing, progress)
                results = [b.result for b in bursts]
                queries = {b.result.name: b.queries for b in bursts}
            else:
                print(
                    f"{name}: {len(scenario.contenders)} contenders at concurrency {scenario.concurrency}",
                    file=out,
                    flush=True,
                )
                results = await compare(scenario, timing, progress)
            counters = None
            if scenario.counters is not None and before is not None:
                after = scenario.counters()
                counters = {k: after[k] - before.get(k, 0) for k in after}
            entries.extend(scenario_entries(scenario, results, timing.rounds, counters, queries))


# -- entry points -----------------------------------------------------------------------
async def run_bench(
    *,
    only: Sequence[str] = (),
    quick: bool = False,
    json_path: str | None = None,
    config: str | None = None,
    pg_url: str | None = None,
    mysql_url: str | None = None,
    redis_url: str | None = None,
    out: TextIO = sys.stdout,
    timing: Timing | None = None,
    options: SuiteOptions | None = None,
) -> dict[str, Any]:
    """Run the selected scenarios; print a table to ``out``; write JSON to ``json_path``.

    ``timing`` and ``options`` override the rounds/durations and the data
    (rows, table name, pool size), e.g. for tests. Returns the report that the
    JSON holds. Raises :class:`BenchError` for a bad ``only``/config; the bench
    tables are dropped however the run ends.
    """
    wall0 = time.perf_counter()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        names = select(only)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    settings = resolve_settings(
        quick=quick, config=config, pg_url=pg_url, mysql_url=mysql_url, redis_url=redis_url
    )
    if timing is not None:
        settings = replace(settings, timing=timing)
    if options is not None:
        settings = replace(settings, options=options)
    urls = {"pg": settings.pg_url, "mysql": settings.mysql_url, "redis": settings.redis_url}

    t = settings.timing
    print(
        f"dal bench: {len(names)} scenario(s){' (quick)' if quick else ''}; per contender "
        f"{t.warmup_ops} warm-up ops + {t.rounds} x {t.round_seconds:g} s",
        file=out,
        flush=True,
    )
    entries: list[dict[str, Any]] = []
    servers: dict[str, Any] = {}
    for backend, suite in SUITES.items():
        wanted = [n for n in names if SCENARIOS[n].backend == backend]
        if not wanted:
            continue
        print(f"{backend}: {make_url(urls[backend]).render_as_string(hide_password=True)}", file=out, flush=True)
        with warnings.catch_warnings():
            # MariaDB warns "Unknown table" for DROP TABLE IF EXISTS of a missing table.
            warnings.filterwarnings("ignore", message=".*Unknown table")
            warnings.filterwarnings("ignore", message=".*Can't drop database")  # DROP DATABASE IF EXISTS
            await _run_suite(suite(urls, settings.options, servers, wanted), wanted, t, entries, out)
    report: dict[str, Any] = {
        "scenarios": entries,
        "machine": machine_info(servers),
        "run": {
            "quick": quick,
            "only": list(only),
            "timing": {"rounds": t.rounds, "round_seconds": t.round_seconds, "warmup_ops": t.warmup_ops},
            "rows": settings.options.rows,
            "table": settings.options.table,
            "pool_size": settings.options.pool_size,
            "bulk_rows": settings.options.bulk_rows,
            "bulk_sample": settings.options.bulk_sample,
            "started_utc": started,
            "wall_s": 0.0,
        },
        "notes": _notes(settings, names),
    }
    report["run"]["wall_s"] = round(time.perf_counter() - wall0, 2)
    print_table(report, out)
    print(f"wall time {report['run']['wall_s']:.1f} s", file=out)
    if json_path:
        _write_json(json_path, report)
        print(f"wrote {json_path}", file=out)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--json``, ``--quick``, ``--only`` (repeatable) and ``--config`` to ``parser``."""
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument(
        "--quick", action="store_true", help="short runs (all scenarios in well under a minute)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this scenario, or those it prefixes (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="a dal.toml topology (its first PostgreSQL and MySQL primaries) and/or a [bench] table"
    )


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``dal bench`` for parsed ``args``; returns the exit code (0 ok, 1 failed, 2 usage)."""
    try:
        asyncio.run(
            run_bench(
                only=getattr(args, "only", None) or (),
                quick=bool(getattr(args, "quick", False)),
                json_path=getattr(args, "json_path", None),
                config=getattr(args, "config", None),
            )
        )
    except BenchError as exc:
        print(f"dal bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dal bench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"dal bench: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
