"""`dal bench` end to end on the PostgreSQL, MariaDB (and Redis) test servers: schema of the JSON report.

Short timing (no timing asserts): the point is that the harness creates its
tables, measures dal and every baseline, reports ratios, and cleans up.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from dal.bench import BenchError, SuiteOptions, Timing, run_bench
from tests.conftest import MYSQL_URL, PG_URL, REDIS_URL

pytestmark = pytest.mark.integration

PG_BASELINES = ("asyncpg.pool.fetchrow", "asyncpg.conn.fetchrow", "sqlalchemy.orm.get")


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


async def test_bench_pg_get_nocache_json(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    out = io.StringIO()
    returned = await run_bench(
        quick=True,
        only=["pg.get.nocache"],
        json_path=str(path),
        out=out,
        timing=Timing(rounds=2, round_seconds=0.1, warmup_ops=50),
        # Own table name: a `dal bench` running at the same time keeps its tables.
        options=SuiteOptions(rows=2000, table="dal_bench_pytest"),
    )
    report = json.loads(path.read_text())
    assert report == returned

    by_name = {e["name"]: e for e in report["scenarios"]}
    expected = {"pg.get.nocache", "pg.get.nocache:c32", *PG_BASELINES, *(f"{b}:c32" for b in PG_BASELINES)}
    assert set(by_name) == expected
    for e in report["scenarios"]:
        for field in ("ops_per_s", "p50_us", "p99_us"):
            assert _positive(e[field]), (e["name"], field, e[field])
        assert e["p50_us"] <= e["p99_us"]
        assert isinstance(e["vs"], dict)
    for name, sfx in (("pg.get.nocache", ""), ("pg.get.nocache:c32", ":c32")):
        vs = by_name[name]["vs"]
        assert set(vs) == {b + sfx for b in PG_BASELINES}
        assert all(_positive(r) for r in vs.values()), vs
    assert by_name["asyncpg.pool.fetchrow"]["vs"] == {}
    assert by_name["pg.get.nocache"]["targets"]["asyncpg.pool.fetchrow"] == 0.7

    machine = report["machine"]
    assert machine["python"] and machine["platform"]
    assert "postgresql" in machine["servers"] and "mysql" not in machine["servers"]
    text = out.getvalue()
    assert "pg.get.nocache:c32" in text and "asyncpg.conn.fetchrow" in text


async def test_bench_cache_scenarios_json(tmp_path: Path) -> None:
    from redis.asyncio import Redis

    path = tmp_path / "bench.json"
    out = io.StringIO()
    report = await run_bench(
        only=["get", "stampede"],
        json_path=str(path),
        out=out,
        redis_url=REDIS_URL,
        timing=Timing(rounds=2, round_seconds=0.05, warmup_ops=50),
        options=SuiteOptions(rows=2000, table="dal_bench_pytest_cache"),
    )
    assert json.loads(path.read_text()) == report
    dal = [e for e in report["scenarios"] if e["kind"] == "dal"]
    assert [e["name"] for e in dal] == ["get.l1_hit", "get.l2_hit", "stampede"]
    by_name = {e["name"]: e for e in dal}
    baselines = {(e["baseline_of"], e["name"]): e for e in report["scenarios"] if e["kind"] == "baseline"}
    assert set(baselines) == {
        ("get.l1_hit", "cachetools.tlru.getitem"),
        ("get.l1_hit", "asyncpg.pool.fetchrow"),
        ("get.l2_hit", "redis.get"),
        ("stampede", "asyncpg.pool.fetchrow:c1000"),
    }
    for e in report["scenarios"]:
        for field in ("ops_per_s", "p50_us", "p99_us"):
            assert _positive(e[field]), (e["name"], field, e[field])

    l1 = by_name["get.l1_hit"]
    assert l1["targets"] == {"cachetools.tlru.getitem": 5.0, "asyncpg.pool.fetchrow": 0.02}
    assert set(l1["vs"]) == set(l1["vs_net"]) == set(l1["met"]) == set(l1["targets"])
    assert all(_positive(r) for r in [*l1["vs"].values(), *l1["vs_net"].values()])
    assert all(isinstance(m, bool) for m in l1["met"].values())
    assert _positive(l1["loop_overhead_ns"]) and l1["targets_judged_on"] == "vs_net"
    assert l1["counters"]["l1_misses"] == 0 and l1["counters"]["db_loads"] == 0  # all L1 hits
    assert l1["counters"]["l1_hits"] > 0

    l2 = by_name["get.l2_hit"]
    assert l2["targets"] == {"redis.get": 1.15} and set(l2["vs"]) == {"redis.get"}
    assert _positive(l2["vs"]["redis.get"]) and isinstance(l2["met"]["redis.get"], bool)
    assert l2["counters"]["l1_hits"] == 0 and l2["counters"]["db_loads"] == 0  # all from L2
    assert l2["counters"]["l1_misses"] > 0

    st = by_name["stampede"]
    assert st["burst"] == st["concurrency"] == 1000
    assert st["targets"] == {"db_queries": 1} and isinstance(st["met"]["db_queries"], bool)
    assert isinstance(st["db_queries"], int) and st["db_queries"] >= 1
    assert len(st["db_queries_per_burst"]) == 2 and max(st["db_queries_per_burst"]) == st["db_queries"]
    assert _positive(st["vs"]["asyncpg.pool.fetchrow:c1000"])
    assert baselines[("stampede", "asyncpg.pool.fetchrow:c1000")]["db_queries"] == 1000

    redis_info = report["machine"]["servers"]["redis"]
    assert redis_info["version"] and redis_info["keys_deleted"] > 0
    client = Redis.from_url(REDIS_URL)
    try:  # every key of the bench's namespace is gone
        left = [k async for k in client.scan_iter(match=redis_info["namespace"] + ":*", count=1000)]
    finally:
        await client.aclose()
    assert left == []
    text = out.getvalue()
    assert "db queries per burst of 1000" in text and "net of loop" in text


async def test_bench_rejects_unknown_scenario() -> None:
    with pytest.raises(BenchError, match="no scenario matches"):
        await run_bench(only=["pg.nope"], out=io.StringIO())


def test_only_matches_names_and_prefixes() -> None:
    from dal.bench.scenarios import select

    assert select(["pg.get.nocache"]) == ["pg.get.nocache", "pg.get.nocache:c32"]
    assert select(["pg.get.nocache:c32"]) == ["pg.get.nocache:c32"]
    assert select(["mysql"]) == ["mysql.get.nocache", "mysql.get.nocache:c32", "mysql.insert_many"]
    assert select(["get"]) == ["get.l1_hit", "get.l2_hit"]
    assert select(["stampede", "get.l1_hit"]) == ["get.l1_hit", "stampede"]
    assert select(["pg.insert_many"]) == ["pg.insert_many", "pg.insert_many:b1000"]
    assert select(["batchwriter"]) == ["batchwriter.insert:c1000"]
    assert len(select([])) == 12
    with pytest.raises(ValueError):
        select(["pg.get.noc"])  # prefixes end at a '.' or ':' boundary


BATCH = {
    # dal scenario: {baseline: target}
    "pg.insert_many": {"asyncpg.copy": 1.25, "asyncpg.row_autocommit": 0.01},
    "pg.insert_many:b1000": {"asyncpg.copy": 1.25, "asyncpg.row_autocommit": 0.01},
    "pg.upsert_many": {"asyncpg.copy": 2.5},
    "batchwriter.insert:c1000": {"repo.insert:c1000": 0.1},
    "mysql.insert_many": {"aiomysql.executemany": 1.0},
}


async def _databases_left(prefix: str) -> list[str]:
    import aiomysql
    import asyncpg

    pg, my = make_url(PG_URL), make_url(MYSQL_URL)
    conn = await asyncpg.connect(host=pg.host, port=pg.port, user=pg.username, password=pg.password, database=pg.database)
    try:
        left = [r[0] for r in await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", prefix + "%")]
    finally:
        await conn.close()
    mconn = await aiomysql.connect(host=my.host, port=my.port or 3306, user=my.username, password=my.password or "")
    try:
        async with mconn.cursor() as cur:
            await cur.execute("SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s", (prefix + "%",))
            left += [r[0] for r in await cur.fetchall()]
    finally:
        mconn.close()
    return left


async def test_bench_batch_scenarios_json(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    out = io.StringIO()
    prefix = "dal_bench_pytest"  # own databases: a `dal bench` running at the same time keeps its own
    report = await run_bench(
        only=["pg.insert_many", "pg.upsert_many", "batchwriter", "mysql.insert_many"],
        json_path=str(path),
        out=out,
        pg_url=PG_URL,
        mysql_url=MYSQL_URL,
        timing=Timing(rounds=2, round_seconds=0.05, warmup_ops=50),
        options=SuiteOptions(rows=2000, bulk_rows=2000, bulk_sample=50, bulk_databases=prefix),
    )
    assert json.loads(path.read_text()) == report
    dal = {e["name"]: e for e in report["scenarios"] if e["kind"] == "dal"}
    assert list(dal) == list(BATCH)
    baselines = {(e["baseline_of"], e["name"]): e for e in report["scenarios"] if e["kind"] == "baseline"}
    assert set(baselines) == {(d, b) for d, targets in BATCH.items() for b in targets}
    for e in report["scenarios"]:
        for field in ("ops_per_s", "p50_us", "p99_us", "us_per_row"):
            assert _positive(e[field]), (e["name"], field, e[field])
        assert e["unit"] == "row" and e["p50_us"] <= e["p99_us"]
    for name, targets in BATCH.items():
        e = dal[name]
        assert e["targets"] == targets and set(e["vs"]) == set(e["met"]) == set(targets)
        assert all(_positive(r) for r in e["vs"].values()) and all(isinstance(m, bool) for m in e["met"].values())
        assert all(lo <= hi for lo, hi in e["vs_range"].values())
    for name in ("pg.insert_many", "pg.insert_many:b1000", "pg.upsert_many", "mysql.insert_many"):
        e = dal[name]
        assert e["rows"] == e["rows_per_call"] == 2000 and e["ops"] == 2000 * 2  # two rounds of one load
        assert e["databases"] == 2 and e["physical_tables"] == 8 and e["batches_per_call"] >= 8
    assert dal["pg.insert_many:b1000"]["batch_size"] == 1000
    assert dal["pg.insert_many"]["batch_size"] < 2000 and dal["pg.insert_many"]["batches_per_call"] == 8
    assert dal["pg.upsert_many"]["existing_rows"] == 1000
    row_by_row = baselines[("pg.insert_many", "asyncpg.row_autocommit")]
    assert row_by_row["rows"] == 50 and row_by_row["rows_per_call"] == 1 and row_by_row["sample_of"] == 2000
    assert baselines[("mysql.insert_many", "aiomysql.executemany")]["rows_per_call"] == 1000

    writer = dal["batchwriter.insert:c1000"]
    assert writer["concurrency"] == 1000 and writer["writer"] == {"max_rows": 500, "max_delay": 0.005}
    assert writer["counters"]["writer_rows"] > 0 and writer["counters"]["writer_batches"] > 0
    assert baselines[("batchwriter.insert:c1000", "repo.insert:c1000")]["concurrency"] == 1000

    assert report["run"]["bulk_rows"] == 2000 and report["run"]["bulk_sample"] == 50
    for server in ("postgresql", "mysql"):
        assert report["machine"]["servers"][server]["bulk_databases"] == [f"{prefix}_0", f"{prefix}_1"]
    assert await _databases_left(prefix) == []  # dropped at the end
    text = out.getvalue()
    assert "batch scenario" in text and "µs/row" in text and "batch_size 1,000" in text


def test_quick_uses_fewer_bulk_rows() -> None:
    from dal.bench.runner import resolve_settings

    assert resolve_settings(quick=True, config=None, pg_url=None, mysql_url=None, env={}).options.bulk_rows == 20_000
    assert resolve_settings(quick=False, config=None, pg_url=None, mysql_url=None, env={}).options.bulk_rows == 100_000


def test_cli_arguments_and_config(tmp_path: Path) -> None:
    import argparse

    from dal.bench import add_arguments
    from dal.bench.runner import resolve_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--only", "pg.get.nocache", "--only", "mysql", "--quick", "--json", "b.json"])
    assert args.only == ["pg.get.nocache", "mysql"] and args.quick and args.json_path == "b.json"
    assert args.config is None

    cfg = tmp_path / "bench.toml"
    cfg.write_text('[bench]\npg_url = "postgresql://u:secret@db:5433/x"\nrows = 500\nround_seconds = 1\n')
    s = resolve_settings(quick=False, config=str(cfg), pg_url=None, mysql_url=None, env={})
    assert s.pg_url == "postgresql://u:secret@db:5433/x" and s.options.rows == 500
    assert s.timing.round_seconds == 1.0
    assert s.mysql_url == "mysql://root@127.0.0.1:3306/test"
    cfg.write_text("[bench]\nrowz = 1\n")
    with pytest.raises(BenchError, match="unknown key"):
        resolve_settings(quick=False, config=str(cfg), pg_url=None, mysql_url=None, env={})


def test_config_may_be_a_dal_toml(tmp_path: Path) -> None:
    from dal.bench.runner import resolve_settings

    cfg = tmp_path / "dal.toml"
    cfg.write_text(
        '[databases.db0]\nprimary = "sqlite+aiosqlite:///x.db"\n'
        '[databases.db1]\nprimary = "postgresql+asyncpg://u:pw@pg.example:5433/app"\n'
        '[databases.db2]\nprimary = "mariadb+aiomysql://root@my.example/app"\n'
        "[bench]\nrows = 100\n"
    )
    s = resolve_settings(quick=True, config=str(cfg), pg_url=None, mysql_url=None, env={})
    assert s.pg_url == "postgresql://u:pw@pg.example:5433/app"
    assert s.mysql_url == "mysql://root@my.example/app"
    assert s.options.rows == 100
    assert s.redis_url == "redis://127.0.0.1:6379/0"  # no [cache] redis: the default
    cfg.write_text(cfg.read_text().replace("[bench]", '[cache]\nredis = "redis://cache.example:6380/2"\n[bench]'))
    s = resolve_settings(quick=True, config=str(cfg), pg_url=None, mysql_url=None, env={})
    assert s.redis_url == "redis://cache.example:6380/2"
