"""The suites: per backend, which scenario modules a run needs, set up and torn down together.

A suite is an async context manager that yields the built scenarios by name
and, on exit however the run ends, closes every layer, pool and connection
and drops every table, database and Redis key the scenarios created. Only
what the wanted scenarios need is set up: the loaded users table for a read
or cache scenario, Redis and the cached layers for a cache scenario, the
batch databases for a batch scenario.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import URL, make_url

from dal.bench.scenarios.batch import mysql_bulk_scenarios, pg_bulk_scenarios
from dal.bench.scenarios.cache import cache_scenarios
from dal.bench.scenarios.catalog import SCENARIOS, Backend, Scenario, SuiteOptions
from dal.bench.scenarios.reads import mysql_reads, pg_reads

Part = Callable[[contextlib.AsyncExitStack, list[str]], Awaitable[Mapping[str, Scenario]]]
"""Builds the named scenarios of one kind, registering their clean-up on the stack."""


@contextlib.asynccontextmanager
async def _suite(
    server: str, url: URL, servers: dict[str, Any], wanted: Sequence[str], reads: Part, batch: Part
) -> AsyncIterator[dict[str, Scenario]]:
    """The scenarios in ``wanted`` from ``reads`` (reads and cache) and ``batch``; cleaned up on exit."""
    servers[server] = {"dsn": url.render_as_string(hide_password=True)}
    async with contextlib.AsyncExitStack() as stack:
        scenarios: dict[str, Scenario] = {}
        for part, names in (
            (reads, [n for n in wanted if not SCENARIOS[n].batch]),
            (batch, [n for n in wanted if SCENARIOS[n].batch]),
        ):
            if names:
                scenarios.update(await part(stack, names))
        yield scenarios


def pg_suite(
    urls: Mapping[str, str], opts: SuiteOptions, servers: dict[str, Any], wanted: Sequence[str]
) -> contextlib.AbstractAsyncContextManager[dict[str, Scenario]]:
    """The PostgreSQL scenarios in ``wanted`` (reads, cache with Redis at ``urls["redis"]``, batch)."""
    url = make_url(urls["pg"])

    async def reads(stack: contextlib.AsyncExitStack, names: list[str]) -> dict[str, Scenario]:
        comparisons, loaded = await pg_reads(stack, url, opts, servers, names)
        scenarios: dict[str, Scenario] = dict(comparisons)
        cached = [n for n in names if SCENARIOS[n].cache]
        if cached:
            scenarios.update(await cache_scenarios(stack, loaded, urls["redis"], opts, servers, cached))
        return scenarios

    async def batch(stack: contextlib.AsyncExitStack, names: list[str]) -> dict[str, Scenario]:
        return await pg_bulk_scenarios(stack, url, opts, servers, names)

    return _suite("postgresql", url, servers, wanted, reads, batch)


def mysql_suite(
    urls: Mapping[str, str], opts: SuiteOptions, servers: dict[str, Any], wanted: Sequence[str]
) -> contextlib.AbstractAsyncContextManager[dict[str, Scenario]]:
    """The MySQL/MariaDB scenarios in ``wanted`` (reads, batch)."""
    url = make_url(urls["mysql"])

    async def reads(stack: contextlib.AsyncExitStack, names: list[str]) -> dict[str, Scenario]:
        return dict(await mysql_reads(stack, url, opts, servers, names))

    async def batch(stack: contextlib.AsyncExitStack, names: list[str]) -> dict[str, Scenario]:
        return await mysql_bulk_scenarios(stack, url, opts, servers, names)

    return _suite("mysql", url, servers, wanted, reads, batch)


Suite = Callable[
    [Mapping[str, str], SuiteOptions, dict[str, Any], Sequence[str]],
    contextlib.AbstractAsyncContextManager[dict[str, Scenario]],
]
SUITES: dict[Backend, Suite] = {"pg": pg_suite, "mysql": mysql_suite}
"""Per backend: (server URLs by "pg"/"mysql"/"redis", options, the report's servers
dict to fill, wanted scenario names) -> the scenarios by name."""
