"""Lookups on the primary after a batch did not simply commit.

- A COMMIT cut off by a lost connection may or may not have taken effect. Before
  the batch is reported, its outcome is checked on the primary (inserts: are the
  rows there?, waiting up to ``in_doubt_timeout`` for the primary to come back),
  so a row is never reported both failed and written; other operations cannot
  be checked and raise :class:`~dal.errors.CommitUnknownError`.
- A batch rolled back for a duplicate key is reported with exactly which of its
  keys already existed or repeat (found after the fact, only for failed batches).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from dal.batch.results import Batch, Op
from dal.clock import Backoff
from dal.errors import CommitUnknownError, DalError, DuplicateKeyError
from dal.routing.router import Role

if TYPE_CHECKING:
    from dal.binding import TableBinding
    from dal.cluster import Node


class PrimaryLookups:
    """What a failed or cut-off batch of one table left on its primary."""

    def __init__(self, binding: TableBinding) -> None:
        self.binding = binding
        self.table = binding.table
        self.cluster = binding.cluster
        self.stmts = binding.statements

    async def committed_after_all(self, node: Node, op: Op, batches: list[Batch], exc: DalError) -> bool:
        """Whether an insert batch whose COMMIT was cut off is on the primary (waits for it to return)."""
        if op != "insert":
            raise CommitUnknownError(
                f"{node.name}: connection lost during COMMIT of a {op} batch: outcome unknown ({exc})", node=node.name
            ) from exc
        clock = self.binding.clock
        deadline = clock() + self.binding.in_doubt_timeout
        backoff = Backoff(0.05, 0.5)
        b = batches[0]
        t = self.table
        slot, kv = t.locate_key(b.keys[0])
        st = self.stmts[slot]
        c = st.get[slot]
        params = st.key_only(c, kv)
        while True:
            # A connection of its own: the pool may be full of callers waiting on the
            # same outage, and this answer is what frees them.
            try:
                async with node.detached("in-doubt") as conn:
                    found = await conn.fetch_one(c.sql, params)
            except Exception:  # not back yet (refused, in recovery)
                if clock() > deadline:
                    raise CommitUnknownError(
                        f"connection lost during COMMIT on {node.name} and the primary did not come back "
                        f"within {self.binding.in_doubt_timeout}s: outcome unknown",
                        node=node.name,
                    ) from exc
                await asyncio.sleep(backoff.next())
                continue
            return found is not None

    async def culprits(self, op: Op, batches: list[Batch], exc: DalError) -> list[Any]:
        """For a duplicate-key failure of an insert: exactly which keys already existed or repeat."""
        if op != "insert" or not isinstance(exc, DuplicateKeyError):
            return []
        keys = [k for b in batches for k in b.keys]
        seen: set[Any] = set()
        repeated = [k for k in keys if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
        try:
            existing = await self._existing(list(dict.fromkeys(keys)))
        except Exception:
            return repeated
        return list(dict.fromkeys([*existing, *repeated]))

    async def _existing(self, keys: list[Any]) -> list[Any]:
        """Which of ``keys`` (validated already) are on their primaries: one query per
        physical table and chunk of keys (:meth:`TableBinding.key_queries`)."""
        t = self.table
        single = len(t.primary_key) == 1
        found: list[Any] = []
        for target, c, params in self.binding.key_queries([(k,) if single else k for k in keys], Role.PRIMARY):
            st = self.stmts[target.slot]
            for r in await self.cluster.node(target).fetch_all(c.sql, params):
                found.append(t.key_of(st.row(r)))
        return found
