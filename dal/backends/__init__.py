"""Driver adapters behind one protocol (:class:`dal.backends.base.Connection`)."""

from __future__ import annotations

from dal.config import NodeSpec
from dal.errors import ConfigError

from .base import Connection, Connector, Pool

__all__ = ["Connection", "Connector", "Pool", "connector_for"]


def connector_for(spec: NodeSpec) -> Connector:
    """A zero-argument coroutine function that opens one connection to ``spec``.

    The driver module is imported here, on first use, so a missing optional
    extra is reported by name instead of at ``import dal``.
    """
    extra = {"postgresql": "postgres", "mysql": "mysql", "sqlite": "sqlite"}[spec.backend]
    try:
        if spec.backend == "postgresql":
            from . import postgres as mod
            from .postgres import connector as postgres_connector
        elif spec.backend == "mysql":
            from . import mysql as mod  # type: ignore[no-redef]
        else:
            from . import sqlite as mod  # type: ignore[no-redef]
    except ImportError as exc:
        raise ConfigError(
            f"{spec.name}.dsn",
            f"the {spec.backend} driver is not installed: pip install 'dal[{extra}]' ({exc})",
        ) from exc

    if spec.backend == "postgresql":
        return postgres_connector(spec)

    async def connect() -> Connection:
        return await mod.connect(spec)

    return connect
