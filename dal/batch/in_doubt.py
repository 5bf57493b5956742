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
import time
from typing import TYPE_CHECKING, Any

from dal.batch.results import Batch, Op
from dal.errors import CommitUnknownError, DalError, DuplicateKeyError

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
        deadline = time.monotonic() + self.binding.in_doubt_timeout
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
                if time.monotonic() > deadline:
                    raise CommitUnknownError(
                        f"connection lost during COMMIT on {node.name} and the primary did not come back "
                        f"within {self.binding.in_doubt_timeout}s: outcome unknown",
                        node=node.name,
                    ) from exc
                await asyncio.sleep(0.2)
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
        physical table and chunk of 500 keys."""
        t = self.table
        pk = t.primary_key
        by_slot: dict[int, list[tuple[Any, ...]]] = {}
        for key in keys:
            kv = key if len(pk) > 1 else (key,)
            by_slot.setdefault(t.shard_slot(kv), []).append(kv)
        found: list[Any] = []
        for slot, kvs in by_slot.items():
            st = self.stmts[slot]
            node = self.cluster.node(self.binding.primary_targets[slot])
            for i in range(0, len(kvs), 500):
                chunk = kvs[i : i + 500]
                c = st.get_many(slot, len(chunk))
                for r in await node.fetch_all(c.sql, c.params(st.get_many_params(chunk))):
                    found.append(t.key_of(st.row(r)))
        return found
