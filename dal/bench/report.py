"""The report of a ``dal bench`` run: JSON entries from the harness's results, tables, the JSON file.

JSON written to ``--json PATH`` (and returned by :func:`dal.bench.run_bench`)::

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
        {"name": "pg.insert_many", "kind": "dal", "unit": "row", "us_per_row": 1.2,
         "rows": 100000, "rows_per_call": 100000, "batch_size": 12600, ...},  # ops are rows
        ...
      ],
      "machine": {"python": ..., "platform": ..., "cpus": ..., "servers": {...}, ...},
      "run": {"quick": false, "timing": {...}, "wall_s": ...},
      "notes": [...]
    }

A ratio below 1 means dal takes less time per operation than the baseline.
The text form is two ``rich`` tables (operations; batch scenarios, whose
operations are rows) of dal rows, each followed by its baselines and ratios.
This module reads the harness's results and the entries it makes, never the
scenarios: what a scenario is comes to it as a ``Comparison``/``Burst``/``Bulk``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.table import Table

from dal.bench.harness import Bulk, Burst, Comparison, Result, paired_net_ratio, paired_ratio

WIDTH = 200
"""Columns of the tables when the stream is not a terminal (a log, a pipe): wide enough not to wrap."""
LAST_COLUMN = 100
"""Widest the ratio column gets; its longest lines (counters) wrap within it."""


# -- JSON entries -----------------------------------------------------------------------
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


def write_json(path: str, report: Mapping[str, Any]) -> None:
    """Write ``report`` to ``path`` (UTF-8, indented, µ kept as is)."""
    Path(path).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


# -- tables -----------------------------------------------------------------------------
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


@dataclass(frozen=True, slots=True)
class _Layout:
    """One table: which dal entries it shows and the numbers of each row."""

    first: str  # header of the name column
    numbers: tuple[str, ...]  # headers of the numeric columns
    last: str  # header of the ratio column
    rows: bool  # True: the entries whose operations are rows
    cells: Callable[[Mapping[str, Any]], list[str]]


_PER_OP = _Layout(
    "scenario",
    ("conc", "ops/s", "p50 µs", "p99 µs", "cpu µs"),
    "dal/baseline time per op [min-max over rounds]",
    False,
    lambda e: [
        str(e["concurrency"]),
        f"{e['ops_per_s']:,.0f}",
        f"{e['p50_us']:.1f}",
        f"{e['p99_us']:.1f}",
        f"{e['cpu_us_per_op']:.1f}",
    ],
)
_PER_ROW = _Layout(
    "batch scenario",
    ("conc", "rows/call", "rows/s", "µs/row", "call p50 ms", "p99 ms", "cpu µs/row"),
    "dal/baseline time per row [min-max over rounds]",
    True,
    lambda e: [
        str(e["concurrency"]),
        f"{e.get('rows_per_call', 1):,}",
        f"{e['ops_per_s']:,.0f}",
        f"{e['us_per_row']:.2f}",
        f"{e['p50_us'] / 1000:.3f}",
        f"{e['p99_us'] / 1000:.3f}",
        f"{e['cpu_us_per_op']:.2f}",
    ],
)


def _dal_extra(e: Mapping[str, Any]) -> str:
    """What dal's own row says besides its numbers: burst statements, batch size or writer settings."""
    if "db_queries" in e:
        shown = f"db queries per burst of {e['burst']}: {e['db_queries']} (worst)"
        if "db_queries" in e["targets"]:
            target = e["targets"]["db_queries"]
            shown += f"  target <= {target:g}: {'met' if e['met']['db_queries'] else 'MISSED'}"
        return shown
    if "writer" in e:
        return "writer " + ", ".join(f"{k}={v}" for k, v in e["writer"].items())
    if "batch_size" in e:
        return f"batch_size {e['batch_size']:,}, {e.get('batches_per_call', '?')} batches per call"
    return ""


def _footnotes(e: Mapping[str, Any]) -> list[str]:
    out = []
    if "loop_overhead_ns" in e:
        out.append(f"(measuring loop: {e['loop_overhead_ns']:.0f} ns per op)")
    if e.get("counters"):
        out.append("counters: " + ", ".join(f"{k} {v:,}" for k, v in e["counters"].items()))
    return out


def _table(layout: _Layout, entries: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column(layout.first, no_wrap=True)
    for header in layout.numbers:
        table.add_column(header, justify="right", no_wrap=True)
    # Bounded, so that a long counters line wraps in its cell instead of widening the whole table.
    table.add_column(layout.last, max_width=LAST_COLUMN)
    blank = [""] * len(layout.numbers)
    for e in entries:
        if e["kind"] != "dal" or (e.get("unit") == "row") != layout.rows:
            continue
        table.add_row(e["name"], *layout.cells(e), _dal_extra(e))
        for b in entries:
            if b.get("baseline_of") != e["name"]:
                continue
            shown = _ratio_text(e, b["name"])
            if "db_queries" in b:
                shown += f"  db queries: {b['db_queries']}"
            table.add_row("  " + b["name"], *layout.cells(b), shown)
        for line in _footnotes(e):
            table.add_row("", *blank, line)
    return table


def console_for(out: TextIO) -> Console:
    """A console printing plain text to ``out``: no markup, emoji or highlighting in names and notes."""
    return Console(
        file=out, width=None if out.isatty() else WIDTH, markup=False, emoji=False, highlight=False
    )


def print_table(report: Mapping[str, Any], out: TextIO) -> None:
    """The readable form of ``report``: dal rows, each followed by its baselines and ratios, then the notes.

    Scenarios whose operations are rows (the batch writes) get a table of their own.
    """
    console = console_for(out)
    entries = report["scenarios"]
    for layout in (_PER_OP, _PER_ROW):
        if any(e["kind"] == "dal" and (e.get("unit") == "row") == layout.rows for e in entries):
            console.print()
            console.print(_table(layout, entries))
    for note in report.get("notes", []):
        console.print(f"note: {note}", soft_wrap=True)  # one line per note, as a log keeps it
