"""Serializers for cached rows: msgpack (default) or JSON. Never pickle.

Both round-trip the values rows hold: ``None``, bool, int (any size), float,
str, bytes, lists/dicts (JSON columns), and, through explicit tags,
``datetime``, ``date``, ``time``, ``timedelta``, ``Decimal`` and ``UUID``, and
members of the enum classes of the table's ``sa.Enum`` columns (by class and
member name; only those classes are ever looked up on decoding, nothing is
imported). A row is a dict; ``None`` encodes "no such row" (a negative-cache
placeholder).
In JSON, user dicts that look like a tag (one key starting with ``$``) are
escaped, so a JSON column holding ``{"$dt": "..."}`` comes back as that dict.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import enum
import functools
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgpack


class Codec(Protocol):
    def dumps(self, value: dict[str, Any] | None) -> bytes: ...

    def loads(self, data: bytes) -> dict[str, Any] | None: ...


_DT, _DATE, _TIME, _TD, _DEC, _UUID, _BIGINT, _ENUM = 1, 2, 3, 4, 5, 6, 7, 8

Enums = Mapping[str, type[enum.Enum]]
"""The enum classes a table's rows may hold, by :func:`enum_key`."""


def enum_key(cls: type[enum.Enum]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _enum_member(enums: Enums, key: str, name: str) -> enum.Enum:
    cls = enums.get(key)
    if cls is None:
        raise ValueError(f"cached value of enum {key}, which no column of this table declares")
    return cls[name]


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


def _unpack_ext(code: int, data: bytes, enums: Enums | None = None) -> Any:
    if code == _ENUM and enums is not None:
        key, name = msgpack.unpackb(data)
        return _enum_member(enums, key, name)
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
    __slots__ = ("_enums", "_ext", "_packer")

    def __init__(self, enums: Enums | None = None) -> None:
        self._packer = msgpack.Packer(default=_pack_ext, use_bin_type=True)
        self._enums = dict(enums or {})
        self._ext = functools.partial(_unpack_ext, enums=self._enums) if self._enums else _unpack_ext

    def dumps(self, value: dict[str, Any] | None) -> bytes:
        if self._enums and value is not None:
            # Tagged before packing: a str or int enum member would pack as a plain str/int.
            # Enum values are column values, so only the row's top level holds them.
            value = {
                k: msgpack.ExtType(_ENUM, msgpack.packb([enum_key(type(v)), v.name])) if isinstance(v, enum.Enum) else v
                for k, v in value.items()
            }
        return self._packer.pack(value)  # type: ignore[no-any-return]

    def loads(self, data: bytes) -> dict[str, Any] | None:
        return msgpack.unpackb(data, ext_hook=self._ext, raw=False, strict_map_key=False)  # type: ignore[no-any-return]


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


def _json_hook(obj: dict[str, Any], enums: Enums | None = None) -> Any:
    if len(obj) == 1:
        ((k, v),) = obj.items()
        if k == "$enum" and enums is not None:
            return _enum_member(enums, v[0], v[1])
        conv = _JSON_TAGS.get(k)
        if conv is not None:
            return conv(v)
        if k.startswith("$$"):
            return {k[1:]: v}
    return obj


class JsonCodec:
    __slots__ = ("_enums", "_hook")

    def __init__(self, enums: Enums | None = None) -> None:
        self._enums = dict(enums or {})
        self._hook = functools.partial(_json_hook, enums=self._enums) if self._enums else _json_hook

    def dumps(self, value: dict[str, Any] | None) -> bytes:
        value = _json_escape(value)
        if self._enums and value is not None:  # (tagged first: a str enum member would dump as a str)
            value = {k: {"$enum": [enum_key(type(v)), v.name]} if isinstance(v, enum.Enum) else v for k, v in value.items()}
        return json.dumps(value, default=_json_default, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> dict[str, Any] | None:
        return json.loads(data, object_hook=self._hook)  # type: ignore[no-any-return]


def make_codec(name: str, enums: Enums | None = None) -> Codec:
    """The codec named ``name``; ``enums``: the enum classes of the table's columns."""
    return MsgpackCodec(enums) if name == "msgpack" else JsonCodec(enums)
