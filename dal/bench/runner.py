"""``dal bench``: the command line and the run: settings, suites, harness, report, in that order.

:func:`run_bench` selects the scenarios (:mod:`dal.bench.scenarios`), sets
up each backend's suite, has the harness (:mod:`dal.bench.harness`) measure
every scenario, and hands the results to the report (:mod:`dal.bench.report`):
a table on ``out`` and, with ``json_path``, the JSON file described there.
Settings (URLs, timing, ``--config``) are :mod:`dal.bench.settings`'s.

The cache scenarios (``get.l1_hit``, ``get.l2_hit``, ``stampede``) use the
PostgreSQL server and Redis; their Redis keys live in a namespace of their
own, deleted at the end. Passwords are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TextIO

from sqlalchemy.engine import make_url

from dal.bench.harness import (
    Bulk,
    Burst,
    Progress,
    Result,
    Timing,
    compare,
    run_bulk,
    run_bursts,
)
from dal.bench.report import machine_info, print_table, scenario_entries, write_json
from dal.bench.scenarios import SCENARIOS, SUITES, Scenario, SuiteOptions, notes_for, select
from dal.bench.settings import resolve_settings
from dal.errors import BenchError

__all__ = ["add_arguments", "main_from_args", "resolve_settings", "run_bench"]


def _headline(scenario: Scenario) -> str:
    contenders = f"{scenario.name}: {len(scenario.contenders)} contenders"
    if isinstance(scenario, Bulk):
        return f"{contenders}, one load each per round"
    if isinstance(scenario, Burst):
        return f"{contenders}, bursts of {scenario.size} concurrent gets"
    return f"{contenders} at concurrency {scenario.concurrency}"


async def _measure(
    scenario: Scenario, timing: Timing, progress: Progress
) -> tuple[list[Result], dict[str, Sequence[int]] | None]:
    """The harness's results for ``scenario``, and for a burst each contender's statements per burst."""
    if isinstance(scenario, Bulk):
        return await run_bulk(scenario, timing, progress), None
    if isinstance(scenario, Burst):
        bursts = await run_bursts(scenario, timing, progress)
        return [b.result for b in bursts], {b.result.name: b.queries for b in bursts}
    return await compare(scenario, timing, progress), None


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
            print(_headline(scenario), file=out, flush=True)
            results, queries = await _measure(scenario, timing, progress)
            counters = None
            if scenario.counters is not None and before is not None:
                after = scenario.counters()
                counters = {k: after[k] - before.get(k, 0) for k in after}
            entries.extend(scenario_entries(scenario, results, timing.rounds, counters, queries))


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
    JSON holds. Raises :class:`~dal.errors.BenchError` when the bench cannot run
    (a bad ``only`` or config, a missing driver or server, a failed scenario
    precondition); the bench's tables, databases and Redis keys are dropped
    however the run ends.
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
        "notes": notes_for(settings.timing, settings.options, names),
    }
    report["run"]["wall_s"] = round(time.perf_counter() - wall0, 2)
    print_table(report, out)
    print(f"wall time {report['run']['wall_s']:.1f} s", file=out)
    if json_path:
        write_json(json_path, report)
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
    """Run ``dal bench`` for parsed ``args``; returns the exit code.

    0: ran; 2: could not run (:class:`~dal.errors.BenchError`: usage, a
    missing driver or server, a failed precondition); 1: failed while running;
    130: interrupted.
    """
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
