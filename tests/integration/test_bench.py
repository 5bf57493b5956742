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

from dal.bench import Timing, run_bench

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
    from dal.bench import BenchError

    with pytest.raises(BenchError, match="no scenario matches"):
        await run_bench(only=["pg.nope"], out=io.StringIO())
