"""Routing: which shard database, which role, which physical table. Never executes.

The router turns (logical table, shard key, intent) into a :class:`Target`.
Writes, and reads that must see the latest commit, target the primary; other
reads target the replica role, and the cluster's balancer then picks one
*available* replica (falling back to the primary when there is none). Grouping
many keys by target is what lets ``get_many`` send one query per physical
table.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dal.errors import UnknownTableError
from dal.schema import LogicalTable


class Role(enum.Enum):
    PRIMARY = "primary"
    REPLICA = "replica"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a statement goes: a shard database, a role in it, and a physical table."""

    database: str
    table: str
    slot: int
    role: Role


class Router:
    """Computes targets for the declared tables. Pure and cheap: precomputed per slot."""

    def __init__(self, tables: Mapping[str, LogicalTable]) -> None:
        self._tables = dict(tables)
        self._targets: dict[str, dict[Role, tuple[Target, ...]]] = {
            name: {
                role: tuple(Target(p.database, p.table, p.slot, role) for p in t.placements)
                for role in Role
            }
            for name, t in self._tables.items()
        }

    @property
    def tables(self) -> Mapping[str, LogicalTable]:
        return self._tables

    def table(self, name: object) -> LogicalTable:
        t = self._tables.get(name) if type(name) is str else None
        if t is None:
            raise UnknownTableError(f"no table {name!r} is declared (known: {sorted(self._tables)})")
        return t

    @staticmethod
    def role(*, write: bool, primary: bool = False) -> Role:
        return Role.PRIMARY if write or primary else Role.REPLICA

    def route(self, table: LogicalTable, shard_value: object, role: Role) -> Target:
        """The target for the row whose shard key is ``shard_value``."""
        slot = 0 if table.sharder is None else table.sharder.slot(shard_value)
        return self._targets[table.name][role][slot]

    def route_slot(self, table: LogicalTable, slot: int, role: Role) -> Target:
        return self._targets[table.name][role][slot]

    def route_all(self, table: LogicalTable, role: Role) -> tuple[Target, ...]:
        """Every physical table of ``table`` (for fan-out queries)."""
        return self._targets[table.name][role]

    def group(
        self, table: LogicalTable, key_values: Iterable[tuple[Any, ...]], role: Role
    ) -> dict[Target, list[tuple[Any, ...]]]:
        """Validated primary keys (column-value tuples) grouped by target, in first-seen order."""
        out: dict[Target, list[tuple[Any, ...]]] = {}
        targets = self._targets[table.name][role]
        sharder = table.sharder
        i = table.shard_key_index
        for kv in key_values:
            target = targets[0] if sharder is None else targets[sharder.slot(kv[i])]
            out.setdefault(target, []).append(kv)
        return out
