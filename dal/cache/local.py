"""L1: the in-process cache, a cachetools ``TLRUCache`` with one expiry per entry.

Each entry expires at its own jittered time (``TLRUCache``'s time-to-use is
read from the entry). Fills are *guarded*: a reader notes :meth:`generation`
before it starts reading (from L2 or the database) and passes it to
:meth:`put`; if the key was invalidated since, the fill is dropped, because
the value it carries may predate the write that invalidated it.

Rows are stored as dicts owned by the cache; :meth:`get` hands out copies
(deep copies for tables with JSON/array columns) so callers cannot change
what the next reader sees.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable
from typing import Any

from cachetools import TLRUCache

MISS: Any = object()
"""Returned by :meth:`LocalCache.get` when the key is not cached (``None`` means cached as absent)."""

_MAX_TOUCHED = 100_000


class LocalCache:
    __slots__ = ("_cache", "_clock", "_floor", "_gen", "_touched", "copy", "hits", "misses", "rejected_fills")

    def __init__(self, maxsize: int, *, clock: Callable[[], float], deep_copy: bool = False) -> None:
        self._clock = clock
        self._cache: TLRUCache[Hashable, tuple[float, dict[str, Any] | None]] = TLRUCache(
            maxsize, ttu=lambda _k, v, _now: v[0], timer=clock
        )
        self.copy: Callable[[dict[str, Any]], dict[str, Any]] = copy.deepcopy if deep_copy else dict
        self._gen = 0
        self._floor = 0  # fills that started before this generation are dropped
        self._touched: dict[Hashable, int] = {}
        self.hits = 0
        self.misses = 0
        self.rejected_fills = 0

    def get(self, key: Hashable) -> dict[str, Any] | None:
        """A copy of the cached row, ``None`` if cached as absent, or :data:`MISS`."""
        try:
            row = self._cache[key][1]
        except KeyError:
            self.misses += 1
            return MISS  # type: ignore[no-any-return]
        self.hits += 1
        return None if row is None else self.copy(row)

    def generation(self) -> int:
        return self._gen

    def put(self, key: Hashable, row: dict[str, Any] | None, ttl: float, since: int) -> bool:
        """Cache ``row`` for ``ttl`` seconds unless ``key`` was invalidated after generation ``since``."""
        if since < self._floor or self._touched.get(key, -1) > since:
            self.rejected_fills += 1
            return False
        self._cache[key] = (self._clock() + ttl, row)
        return True

    def invalidate(self, keys: list[Hashable] | tuple[Hashable, ...]) -> None:
        self._gen += 1
        gen = self._gen
        touched = self._touched
        for key in keys:
            touched[key] = gen
            self._cache.pop(key, None)
        if len(touched) > _MAX_TOUCHED:
            # Forget per-key history; conservatively drop every fill in flight.
            touched.clear()
            self._floor = gen

    def flush(self) -> None:
        """Drop everything (e.g. after missing invalidations); fills in flight are dropped too."""
        self._gen += 1
        self._floor = self._gen
        self._touched.clear()
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)
