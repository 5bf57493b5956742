"""Serializers for cached rows: msgpack (default) or JSON. Never pickle.

Both round-trip the values rows hold: ``None``, bool, int (any size), float,
str, bytes, lists/dicts (JSON columns), and, through explicit tags,
``datetime``, ``date``, ``time``, ``timedelta``, ``Decimal`` and ``UUID``. A
row is a dict; ``None`` encodes "no such row" (a negative-cache placeholder).
In JSON, user dicts that look like a tag (one key starting with ``$``) are
escaped, so a JSON column holding ``{"$dt": "..."}`` comes back as that dict.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import msgpack


class Codec(Protocol):
    def dumps(self, value: dict[str, Any] | None) -> bytes: ...

    def loads(self, data: bytes) -> dict[str, Any] | None: ...


_DT, _DATE, _TIME, _TD, _DEC, _UUID, _BIGINT = 1, 2, 3, 4, 5, 6, 7


def _pack_ext(v: Any) -> msgpack.ExtType:
    if isinstance(v, dt.datetime):
        return msgpack.ExtType(_DT, v.isoformat().encode())
    if isinstance(v, dt.date):
        return msgpack.ExtType(_DATE, v.isoformat().encode())
    if isinstance(v, dt.time):
        return msgpack.ExtType(_TIME, v.isoformat().encode())
    if isinstance(v, dt.timedelta):
        return msgpack.ExtType(_TD, msgpack.packb([v.days, v.seconds, v.microseconds]))
    if isinstance(v, decimal.Decimal):
        return msgpack.ExtType(_DEC, str(v).encode())
    if isinstance(v, uuid.UUID):
        return msgpack.ExtType(_UUID, v.bytes)
    if isinstance(v, int) and not isinstance(v, bool):
        # msgpack ints stop at 64 bits; it hands larger ones (NUMERIC keys, counters) here.
        return msgpack.ExtType(_BIGINT, str(int(v)).encode())
    raise TypeError(f"cannot cache a value of type {type(v).__name__}")


def _unpack_ext(code: int, data: bytes) -> Any:
    if code == _DT:
        return dt.datetime.fromisoformat(data.decode())
    if code == _DATE:
        return dt.date.fromisoformat(data.decode())
    if code == _TIME:
        return dt.time.fromisoformat(data.decode())
    if code == _TD:
        d, s, us = msgpack.unpackb(data)
        return dt.timedelta(days=d, seconds=s, microseconds=us)
    if code == _DEC:
        return decimal.Decimal(data.decode())
    if code == _UUID:
        return uuid.UUID(bytes=data)
    if code == _BIGINT:
        return int(data.decode())
    return msgpack.ExtType(code, data)


class MsgpackCodec:
    __slots__ = ("_packer",)

    def __init__(self) -> None:
        self._packer = msgpack.Packer(default=_pack_ext, use_bin_type=True)

    def dumps(self, value: dict[str, Any] | None) -> bytes:
        return self._packer.pack(value)  # type: ignore[no-any-return]

    def loads(self, data: bytes) -> dict[str, Any] | None:
        return msgpack.unpackb(data, ext_hook=_unpack_ext, raw=False, strict_map_key=False)  # type: ignore[no-any-return]


def _json_default(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return {"$dt": v.isoformat()}
    if isinstance(v, dt.date):
        return {"$date": v.isoformat()}
    if isinstance(v, dt.time):
        return {"$time": v.isoformat()}
    if isinstance(v, dt.timedelta):
        return {"$td": [v.days, v.seconds, v.microseconds]}
    if isinstance(v, decimal.Decimal):
        return {"$dec": str(v)}
    if isinstance(v, uuid.UUID):
        return {"$uuid": str(v)}
    if isinstance(v, bytes | bytearray | memoryview):
        return {"$b64": base64.b64encode(bytes(v)).decode()}
    raise TypeError(f"cannot cache a value of type {type(v).__name__}")


_JSON_TAGS: dict[str, Callable[[Any], Any]] = {
    "$dt": dt.datetime.fromisoformat,
    "$date": dt.date.fromisoformat,
    "$time": dt.time.fromisoformat,
    "$td": lambda v: dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "$dec": decimal.Decimal,
    "$uuid": uuid.UUID,
    "$b64": base64.b64decode,
}


def _json_escape(v: Any) -> Any:
    """Make user dicts that look like tags unambiguous: a one-key dict whose key starts
    with ``$`` (a JSON column holding ``{"$dt": ...}``) gets one more ``$``, which
    :func:`_json_hook` strips again; without this it would decode as a datetime."""
    if isinstance(v, dict):
        if len(v) == 1:
            ((k, x),) = v.items()
            if isinstance(k, str) and k.startswith("$"):
                return {"$" + k: _json_escape(x)}
        return {k: _json_escape(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_escape(x) for x in v]
    return v


def _json_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        ((k, v),) = obj.items()
        conv = _JSON_TAGS.get(k)
        if conv is not None:
            return conv(v)
        if k.startswith("$$"):
            return {k[1:]: v}
    return obj


class JsonCodec:
    __slots__ = ()

    def dumps(self, value: dict[str, Any] | None) -> bytes:
        return json.dumps(_json_escape(value), default=_json_default, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> dict[str, Any] | None:
        return json.loads(data, object_hook=_json_hook)  # type: ignore[no-any-return]


def make_codec(name: str) -> Codec:
    return MsgpackCodec() if name == "msgpack" else JsonCodec()
