"""Cache keys of rows: stable bytes of a primary key (defined with the key encoding
in :mod:`dal.routing.sharding`; named here for the cache's users)."""

from __future__ import annotations

from dal.routing.sharding import encode_cache_key

__all__ = ["encode_cache_key"]
