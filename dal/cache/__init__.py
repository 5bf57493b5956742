"""The two-level cache: L1 in process, L2 in Redis, kept consistent with writes.

Read :mod:`dal.cache.tiered` for the read and write paths; the parts are
``runtime`` (what every table's cache shares), ``local`` (L1), ``remote`` (L2 and its Lua scripts), ``bloom`` (penetration),
``flight`` (stampedes), ``invalidation`` (pub/sub and retries), ``codec``
(msgpack/JSON, never pickle).

Importing this package (or :mod:`dal.cache.keys`, :mod:`dal.cache.local`, which
every repository needs) loads no serializer, Bloom filter or Redis client: those
load with :mod:`dal.cache.tiered`, when a layer with a cached table is built.
The names below resolve on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dal.cache.keys import encode_cache_key
    from dal.cache.runtime import CacheRuntime
    from dal.cache.tiered import TableCache

__all__ = ["CacheRuntime", "TableCache", "encode_cache_key"]


def __getattr__(name: str) -> Any:
    if name == "encode_cache_key":
        from dal.cache.keys import encode_cache_key

        return encode_cache_key
    if name == "CacheRuntime":
        from dal.cache.runtime import CacheRuntime

        return CacheRuntime
    if name == "TableCache":
        from dal.cache.tiered import TableCache

        return TableCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
