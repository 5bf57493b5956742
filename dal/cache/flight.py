"""Singleflight: concurrent misses of one key in a process share one load (缓存击穿).

The load runs as its own task, not inside the first caller: a caller that is
cancelled (a timeout, a client gone) stops waiting but does not cancel the load
the others wait for, and the result still fills the cache. (The cross-process
half, a short lease in Redis, lives in :mod:`dal.cache.remote`.)
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    __slots__ = ("_calls", "_on_shared", "shared")

    def __init__(self, *, on_shared: Callable[[], None] | None = None) -> None:
        """``on_shared``: called each time a caller joins a load already running."""
        self._calls: dict[Hashable, asyncio.Task[T]] = {}
        self._on_shared = on_shared
        self.shared = 0  # callers served by a load another caller started

    async def do(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        task = self._calls.get(key)
        if task is None:
            task = asyncio.ensure_future(load())
            self._calls[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        else:
            self.shared += 1
            if self._on_shared is not None:
                self._on_shared()
        return await asyncio.shield(task)

    def forget(self, key: Hashable) -> None:
        """Callers from now on start a new load (the key was written; the running load may be stale)."""
        self._calls.pop(key, None)

    def _done(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when every caller left

    def __contains__(self, key: Hashable) -> bool:
        return key in self._calls

    def __len__(self) -> int:
        return len(self._calls)
