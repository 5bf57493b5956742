"""The catalog of ``dal bench``: every scenario's name, backend, baselines and targets.

It owns what a run may select (:data:`SCENARIOS`, :func:`select`) and the
data options every scenario shares (:class:`SuiteOptions`); the scenarios
themselves are built in :mod:`~dal.bench.scenarios.reads`,
:mod:`~dal.bench.scenarios.cache` and :mod:`~dal.bench.scenarios.batch`.

Baseline names are unique per dal scenario, not overall (``get.l1_hit``
re-measures ``asyncpg.pool.fetchrow``): a baseline entry is identified by its
``baseline_of`` and ``name``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from dal.bench.harness import Bulk, Burst, Comparison

USERS_TABLE = "dal_bench_users"  # the read scenarios' logical table (default name)
TABLE_SHARDS = 4  # physical tables of the read scenarios' table
CONCURRENCY = 32  # tasks of the :c32 read variants
STAMPEDE = 1_000  # concurrent cold gets per stampede burst
WRITERS = 1_000  # concurrent single-row writers of batchwriter.insert:c1000

Backend = Literal["pg", "mysql"]
Scenario = Comparison | Burst | Bulk
"""A built scenario, ready for the harness."""


@dataclass(frozen=True, slots=True)
class ScenarioSpec:
    """A dal scenario: its backend, concurrency, baselines and targets.

    Targets are the largest acceptable ratio per baseline, or for a burst the
    largest acceptable counter (``db_queries``). ``cache``: it needs Redis and
    a cached layer. ``batch``: a batch-write scenario, on databases of its own.
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
    table: str = USERS_TABLE  # logical table; the physical ones are {table}_0 .. _3
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
