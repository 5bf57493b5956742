"""The drivers the baselines call directly, and the servers they reach.

It owns three things every scenario module needs before it measures
anything: importing a driver on demand (a missing one is a
:class:`~dal.errors.BenchError` naming the extra that installs it, not an
import error half-way through a run), the connection arguments of the
plain-driver baselines taken from a server URL, and turning an unreachable
server into a :class:`~dal.errors.BenchError` that says how to point the
bench elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Sequence
from typing import Any, Literal, TypeVar

from sqlalchemy.engine import URL

from dal.errors import BenchError

T = TypeVar("T")

_EXTRAS = {"asyncpg": "postgres", "aiomysql": "mysql", "redis": "redis"}
"""Top-level driver module -> the dal extra that installs it."""


def driver(module: str) -> Any:
    """Import ``module`` (``asyncpg``, ``aiomysql``, ``redis.asyncio``).

    Raises :class:`BenchError` naming ``pip install 'dal[<extra>]'`` when the
    driver (or one of its own dependencies) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        raise BenchError(
            f"the {top} driver is not installed ({exc}); install it with: pip install 'dal[{_EXTRAS[top]}]'"
        ) from None


def asyncpg_args(url: URL) -> dict[str, Any]:
    """``asyncpg.connect()`` / ``create_pool()`` arguments for ``url`` (its database not included)."""
    return {
        "host": url.host or "127.0.0.1",
        "port": url.port or 5432,
        "user": url.username,
        "password": url.password,
    }


def aiomysql_args(url: URL) -> dict[str, Any]:
    """``aiomysql.connect()`` / ``create_pool()`` arguments for ``url``: autocommit, as dal runs."""
    return {
        "host": url.host or "127.0.0.1",
        "port": url.port or 3306,
        "user": url.username or "root",
        "password": url.password or "",
        "charset": str(url.query.get("charset", "utf8mb4")),
        "autocommit": True,
    }


_SETTINGS = {
    "PostgreSQL": "DAL_TEST_PG_URL or bench.pg_url",
    "MySQL/MariaDB": "DAL_TEST_MYSQL_URL or bench.mysql_url",
    "Redis": "DAL_TEST_REDIS_URL or bench.redis_url",
}
"""Server -> where its URL is set (besides ``--config``'s dal.toml)."""


async def reach(
    server: Literal["PostgreSQL", "MySQL/MariaDB", "Redis"],
    url: URL,
    attempt: Awaitable[T],
    wanted: Sequence[str],
    errors: tuple[type[BaseException], ...] = (OSError,),
) -> T:
    """Await the first connection to a server; one of ``errors`` becomes a :class:`BenchError`.

    ``wanted``: the scenarios that need the server, named in the message.
    """
    try:
        return await attempt
    except errors as exc:
        raise BenchError(
            f"{server} at {url.render_as_string(hide_password=True)} unreachable ({exc}); the scenarios "
            f"{', '.join(wanted)} need it: set {_SETTINGS[server]}, or leave them out with --only"
        ) from None
