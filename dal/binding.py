"""A logical table bound to one data layer: what its repositories and batches run with.

:class:`TableBinding` is built once per table by the :class:`~dal.layer.DataLayer`
and handed to :class:`~dal.repository.Repository` and the batch code, so they get
the table, where its rows live (targets per slot and role), its compiled
statements, its cache and the layer's shared limits as values, instead of
reading the layer's internals (and without importing the layer: the layer sits
above them).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dal.cluster import Cluster, Node
from dal.events import Events
from dal.routing.router import Role, Router, Target
from dal.schema import Key, LogicalTable
from dal.sql import Statements

if TYPE_CHECKING:
    from dal.cache.tiered import CacheRuntime, TableCache


@dataclass(frozen=True, eq=False, slots=True)
class TableBinding:
    """One logical table of one layer (immutable; shared by every repository of it).

    ``statements[slot]``, ``primary_targets[slot]`` and ``replica_targets[slot]`` are
    the compiled statements and the targets of physical table ``slot``. ``fanout``
    bounds the physical-table statements of fan-outs and batches run at once
    (``fanout_concurrency``), shared by the whole layer; ``primary_scope`` is the
    layer's "read from primaries" context variable. ``bind(name)`` gives the binding
    of another table of the same layer.
    """

    table: LogicalTable
    router: Router
    cluster: Cluster
    statements: tuple[Statements, ...]
    primary_targets: tuple[Target, ...]
    replica_targets: tuple[Target, ...]
    cache: TableCache | None
    cache_runtime: CacheRuntime | None
    fanout: asyncio.Semaphore
    primary_scope: contextvars.ContextVar[bool]
    max_rows_scanned: int
    in_doubt_timeout: float
    events: Events
    clock: Callable[[], float]
    bind: Callable[[str], TableBinding]

    def targets(self, role: Role) -> tuple[Target, ...]:
        """The target of every physical table (by slot) for ``role``."""
        return self.primary_targets if role is Role.PRIMARY else self.replica_targets

    def node(self, key: Key, role: Role) -> Node:
        """The node that serves ``key``'s physical table for ``role``."""
        targets = self.primary_targets if role is Role.PRIMARY else self.replica_targets
        return self.cluster.node(targets[key.slot])
