"""Cache keys of rows: stable bytes of a primary key."""

from __future__ import annotations

from typing import Any

from dal.routing.sharding import encode_key


def encode_cache_key(kv: tuple[Any, ...]) -> bytes:
    """Stable bytes of a primary key (length-prefixed parts for composite keys)."""
    if len(kv) == 1:
        return _encode_part(kv[0])
    return b"".join(len(p).to_bytes(4, "big") + p for p in map(_encode_part, kv))


def _encode_part(v: Any) -> bytes:
    try:
        return encode_key(v)
    except Exception:  # non-shard key columns may hold other types: a tagged repr
        return b"\x00" + type(v).__name__.encode() + b":" + repr(v).encode()
