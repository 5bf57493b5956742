"""The settings of a ``dal bench`` run: server URLs, timing and data, from arguments, file and environment.

``--config FILE`` is a dal.toml (the first PostgreSQL and the first MySQL
primary of its topology are benched, and its ``[cache] redis`` is the cache
scenarios' Redis) and/or a ``[bench]`` table; every key is optional::

    [bench]
    pg_url = "postgresql://postgres@127.0.0.1:5432/test"
    mysql_url = "mysql://root@127.0.0.1:3306/test"
    redis_url = "redis://127.0.0.1:6379/0"  # L2 of the cache scenarios
    rows = 10000          # rows loaded into the read scenarios' table
    seed = 1234           # key sequence
    pool_size = 10        # max connections of every pool (dal and baselines)
    table = "dal_bench_users"  # logical table (physical: table_0 .. table_3), dropped at the end
    rounds = 10           # alternating rounds per scenario (bursts, for stampede)
    round_seconds = 0.25  # per contender per round
    warmup_ops = 500      # per contender, before the first round
    bulk_rows = 100000    # rows per load of the batch scenarios (--quick: 20000)
    bulk_sample = 2000    # rows of the row-by-row baseline (--quick: 1000)
    bulk_databases = "dal_bench"  # prefix of the batch scenarios' two databases

Server URLs are taken from the arguments, else the config file, else
``DAL_TEST_PG_URL`` / ``DAL_TEST_MYSQL_URL`` / ``DAL_TEST_REDIS_URL``, else
the loopback defaults (the same servers ``make test`` uses). A bad file or
value is a :class:`~dal.errors.BenchError`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dal.bench.harness import Timing
from dal.bench.scenarios.catalog import SuiteOptions
from dal.config import Config
from dal.errors import BenchError, ConfigError

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

FULL = Timing(rounds=10, round_seconds=0.25, warmup_ops=500)
QUICK = Timing(rounds=4, round_seconds=0.2, warmup_ops=200)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run needs besides the scenario names."""

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
