"""The two-level cache: L1 in process, L2 in Redis, kept consistent with writes.

Read :mod:`dal.cache.tiered` for the read and write paths; the parts are
``local`` (L1), ``remote`` (L2 and its Lua scripts), ``bloom`` (penetration),
``flight`` (stampedes), ``invalidation`` (pub/sub and retries), ``codec``
(msgpack/JSON, never pickle).
"""

from dal.cache.keys import encode_cache_key
from dal.cache.tiered import CacheRuntime, TableCache

__all__ = ["CacheRuntime", "TableCache", "encode_cache_key"]
