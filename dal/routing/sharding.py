"""Pure shard placement: key -> bytes -> CRC32 -> slot -> shard database.

The placement is the one a Go service computes with
``crc32.ChecksumIEEE([]byte(key)) % n``, so both place a row in the same
physical table. Key encoding is part of that contract and never changes:

=============  ==========================================================
key type       bytes hashed
=============  ==========================================================
``int``        decimal ASCII (``-42`` -> ``b"-42"``), as ``strconv.Itoa``
``str``        UTF-8
``bytes``      as is (also ``bytearray`` and ``memoryview``)
``uuid.UUID``  canonical lowercase hyphenated string, as ``uuid.String()``
=============  ==========================================================

Anything else (``None``, ``bool``, ``float``, ``Decimal``, containers, ...)
raises :class:`~dal.errors.ShardKeyError`: floats and decimals have several
textual forms, and booleans are ints in Python but not in Go.

Slots map to shard databases either by contiguous ranges (the default) or by an
explicit slot map. With ``n`` slots over databases ``d_0 .. d_{m-1}``, slot
``s`` lives on ``d_{s * m // n}``, so ``d_i`` owns the contiguous run of slots
``ceil(i*n/m) .. ceil((i+1)*n/m) - 1`` (with 4 slots on 2 databases: 0-1 and 2-3).
A Go service reproduces this with integer arithmetic: ``db := slot * m / n``.
"""

from __future__ import annotations

import collections
import operator
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dal.errors import ConfigError, ShardKeyError

ShardKey = int | str | bytes | bytearray | memoryview | uuid.UUID


def encode_cache_key(kv: tuple[Any, ...]) -> bytes:
    """Stable bytes of a whole primary key (its column values ``kv``): the row's identity
    in the cache, the Bloom filter and invalidation messages. A single-column key's bytes
    are :func:`encode_key`'s (so they are also what its CRC32 is taken of); a composite
    key's parts are length-prefixed."""
    if len(kv) == 1:
        return _encode_part(kv[0])
    return b"".join(len(p).to_bytes(4, "big") + p for p in map(_encode_part, kv))


def _encode_part(v: Any) -> bytes:
    try:
        return encode_key(v)
    except Exception:  # non-shard key columns may hold other types: a tagged repr
        return b"\x00" + type(v).__name__.encode() + b":" + repr(v).encode()


def encode_key(key: object, *, table: str = "?") -> bytes:
    """Return the bytes hashed for ``key`` (see the module docstring).

    Raises :class:`ShardKeyError` naming ``table`` and the type for any other type.
    """
    # Exact type checks first: they are the hot path and exclude bool (an int subclass).
    t = type(key)
    if t is int:
        return str(key).encode("ascii")
    if t is str:
        try:
            return key.encode("utf-8")  # type: ignore[attr-defined, no-any-return]
        except UnicodeEncodeError:
            raise _not_unicode(table) from None
    if t is bytes:
        return key  # type: ignore[return-value]
    if isinstance(key, bool) or key is None:
        raise ShardKeyError(f"shard key for table {table!r} must not be {type(key).__name__}")
    if isinstance(key, int):  # int subclasses such as IntEnum
        return str(int(key)).encode("ascii")
    if isinstance(key, str):
        # str.encode, not str(key): a (str, Enum) member's str() is "Cls.NAME", not its value.
        try:
            return str.encode(key, "utf-8")
        except UnicodeEncodeError:
            raise _not_unicode(table) from None
    if isinstance(key, bytearray | memoryview):
        return bytes(key)
    if isinstance(key, uuid.UUID):
        return str(key).encode("ascii")
    raise ShardKeyError(
        f"shard key for table {table!r} has unsupported type {type(key).__name__}; "
        "use int, str, bytes or uuid.UUID"
    )


def _not_unicode(table: str) -> ShardKeyError:
    return ShardKeyError(
        f"shard key for table {table!r} is a str with no UTF-8 encoding (lone surrogate)"
    )


def checksum(key: object, *, table: str = "?") -> int:
    """CRC-32 (IEEE 802.3, as Go's ``crc32.ChecksumIEEE``) of the encoded key."""
    return zlib.crc32(encode_key(key, table=table))


def slots_of(encoded: Iterable[bytes], slots: int) -> list[int]:
    """``crc32(e) % slots`` of each key already encoded by :func:`encode_key`: the
    vectorised :meth:`Sharder.slot` of batches (C-level loops, no call per key)."""
    return list(map(slots.__rmod__, map(zlib.crc32, encoded)))


def int_slot(key: int, slots: int) -> int:
    """:meth:`Sharder.slot` of an ``int`` key (not a bool), without the type dispatch: its
    bytes are its decimal digits, as :func:`encode_key` encodes it."""
    return zlib.crc32(b"%d" % key) % slots


def by_slot(slots: list[int], n: int, values: Iterable[Any]) -> list[list[Any]]:
    """``values`` split into ``n`` lists by their slot, in order (a C-level loop: no per-row bytecode)."""
    out: list[list[Any]] = [[] for _ in range(n)]
    collections.deque(map(operator.call, map([o.append for o in out].__getitem__, slots), values), maxlen=0)
    return out


def contiguous_slot_map(slots: int, databases: Sequence[str]) -> tuple[str, ...]:
    """Slot -> database by contiguous ranges: slot ``s`` goes to ``databases[s * m // n]``."""
    m = len(databases)
    return tuple(databases[s * m // slots] for s in range(slots))


def explicit_slot_map(
    table: str, slots: int, mapping: Mapping[str, Sequence[int]], known: Sequence[str]
) -> tuple[str, ...]:
    """Build slot -> database from ``{database: [slot, ...]}``; every slot exactly once."""
    owner: dict[int, str] = {}
    for db, owned in mapping.items():
        if db not in known:
            raise ConfigError(f"tables.{table}.slot_map", f"unknown database {db!r}")
        for s in owned:
            if type(s) is not int or not 0 <= s < slots:
                raise ConfigError(
                    f"tables.{table}.slot_map.{db}", f"slot {s!r} is not in 0..{slots - 1}"
                )
            if s in owner:
                raise ConfigError(
                    f"tables.{table}.slot_map",
                    f"slot {s} is mapped to both {owner[s]!r} and {db!r}",
                )
            owner[s] = db
    missing = [s for s in range(slots) if s not in owner]
    if missing:
        raise ConfigError(f"tables.{table}.slot_map", f"slots {missing} are not mapped")
    return tuple(owner[s] for s in range(slots))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one key lives: its slot, shard database and physical table."""

    slot: int
    database: str
    table: str


class Sharder:
    """Places keys of one logical table. Pure: no I/O, no state beyond its map."""

    __slots__ = ("_placements", "name", "slot_databases", "slots")

    def __init__(self, name: str, slots: int, slot_databases: Sequence[str]) -> None:
        if slots < 1:
            raise ConfigError(f"tables.{name}.table_shards", f"must be >= 1, got {slots}")
        if len(slot_databases) != slots:
            raise ConfigError(f"tables.{name}.slot_map", "must map every slot")
        self.name = name
        self.slots = slots
        self.slot_databases = tuple(slot_databases)
        self._placements = tuple(
            Placement(s, db, physical_name(name, s)) for s, db in enumerate(self.slot_databases)
        )

    def slot(self, key: object) -> int:
        """``crc32(encode(key)) % slots``."""
        return zlib.crc32(encode_key(key, table=self.name)) % self.slots

    def slot_of_encoded(self, encoded: bytes) -> int:
        """The slot of a key already encoded by :func:`encode_key`."""
        return zlib.crc32(encoded) % self.slots

    def place(self, key: object) -> Placement:
        return self._placements[zlib.crc32(encode_key(key, table=self.name)) % self.slots]

    def placement(self, slot: int) -> Placement:
        return self._placements[slot]

    @property
    def placements(self) -> tuple[Placement, ...]:
        """Every physical table of the logical table, in slot order."""
        return self._placements


def physical_name(table: str, slot: int) -> str:
    """The physical table holding ``slot`` of ``table``: ``{table}_{slot}``."""
    return f"{table}_{slot}"
