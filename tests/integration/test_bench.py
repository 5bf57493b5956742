"""`dal bench` end to end on the PostgreSQL test server: schema of the JSON report.

Short timing (no timing asserts): the point is that the harness creates its
tables, measures dal and every baseline, reports ratios, and cleans up.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from dal.bench import BenchError, SuiteOptions, Timing, run_bench

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


async def test_bench_rejects_unknown_scenario() -> None:
    with pytest.raises(BenchError, match="no scenario matches"):
        await run_bench(only=["pg.nope"], out=io.StringIO())


def test_only_matches_names_and_prefixes() -> None:
    from dal.bench.scenarios import select

    assert select(["pg.get.nocache"]) == ["pg.get.nocache", "pg.get.nocache:c32"]
    assert select(["pg.get.nocache:c32"]) == ["pg.get.nocache:c32"]
    assert select(["mysql"]) == ["mysql.get.nocache", "mysql.get.nocache:c32"]
    assert len(select([])) == 4
    with pytest.raises(ValueError):
        select(["pg.get.noc"])  # prefixes end at a '.' or ':' boundary


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
