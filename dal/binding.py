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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dal.cluster import Cluster
from dal.events import Events
from dal.routing.router import Role, Router, Target
from dal.schema import LogicalTable
from dal.sql import Compiled, Statements

if TYPE_CHECKING:
    from dal.cache.runtime import CacheRuntime
    from dal.cache.tiered import TableCache


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

    def key_queries(
        self, key_values: Iterable[tuple[Any, ...]], role: Role
    ) -> list[tuple[Target, Compiled, tuple[Any, ...]]]:
        """The lookups of rows by validated primary keys (column-value tuples): one
        ``(target, statement, parameters)`` per physical table and chunk of
        :data:`KEYS_PER_QUERY` keys. Rows come back in :meth:`Statements.row` form."""
        out: list[tuple[Target, Compiled, tuple[Any, ...]]] = []
        for target, group in self.router.group(self.table, key_values, role).items():
            st = self.statements[target.slot]
            for i in range(0, len(group), KEYS_PER_QUERY):
                chunk = group[i : i + KEYS_PER_QUERY]
                c = st.get_many(target.slot, len(chunk))
                out.append((target, c, c.params(st.get_many_params(chunk))))
        return out


KEYS_PER_QUERY = 500
"""Keys per IN list of a lookup by keys: well under every backend's parameter limit."""
