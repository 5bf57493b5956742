"""The membership filter against cache penetration (缓存穿透).

:class:`MembershipFilter` is the protocol the read path uses: ``key in f`` may
say "maybe" for a key that does not exist (a false positive, at the
configured rate) but never "no" for one that does. :class:`BloomMembership`
implements it with pybloom-live's *sized* ``BloomFilter``: its measured
false-positive rate matches ``error_rate`` (its ``ScalableBloomFilter``
applies ``error_rate`` to each internal filter, and measures several times
worse). When more keys arrive than ``capacity``, the filter cannot keep its
promise, so it answers "maybe" for everything until it is rebuilt larger
(a generation swap: a new filter is filled from the database while the old
one keeps serving, keys added meanwhile go to both, then the new one replaces
it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from bitarray import bitarray
from pybloom_live import BloomFilter


class MembershipFilter(Protocol):
    def add(self, key: bytes) -> None: ...

    def __contains__(self, key: bytes) -> bool: ...

    @property
    def count(self) -> int: ...


class BloomMembership:
    """A sized Bloom filter of encoded keys (see module docstring)."""

    __slots__ = ("_filter", "_pending", "capacity", "error_rate", "generation", "saturated")

    def __init__(self, capacity: int, error_rate: float, *, generation: int = 0) -> None:
        self.capacity = capacity
        self.error_rate = error_rate
        self.generation = generation
        self._filter = BloomFilter(capacity=capacity, error_rate=error_rate)
        self.saturated = False
        self._pending: list[bytes] | None = None  # keys added while a rebuild runs

    @property
    def count(self) -> int:
        return int(self._filter.count)

    def add(self, key: bytes) -> None:
        if self._pending is not None:
            self._pending.append(key)
        if self.saturated:
            return
        if self._filter.count >= self.capacity:
            self.saturated = True  # answers "maybe" for all until rebuilt
            return
        self._filter.add(key, skip_check=True)

    def add_many(self, keys: Iterable[bytes]) -> None:
        for k in keys:
            self.add(k)

    def __contains__(self, key: bytes) -> bool:
        return self.saturated or key in self._filter

    # -- rebuild (generation swap) ---------------------------------------------------
    def begin_rebuild(self) -> None:
        """Start remembering keys added from now on, for the replacement filter."""
        self._pending = []

    def finish_rebuild(self, replacement: BloomMembership) -> None:
        """Replace this filter's contents with ``replacement`` plus the keys added meanwhile."""
        pending, self._pending = self._pending or [], None
        replacement.add_many(pending)
        self._filter = replacement._filter
        self.capacity = replacement.capacity
        self.error_rate = replacement.error_rate
        self.saturated = replacement.saturated
        self.generation = replacement.generation

    def abort_rebuild(self) -> None:
        self._pending = None

    # -- snapshot (to share through Redis) ------------------------------------------------
    def positions(self, key: bytes) -> list[int]:
        """Bit offsets ``key`` sets, in the snapshot's bit order (Redis SETBIT offsets)."""
        f = self._filter
        return [i * f.bits_per_slice + k for i, k in enumerate(f.make_hashes(key))]

    @property
    def byte_size(self) -> int:
        """The length of :meth:`to_bytes`: what a snapshot of this geometry holds."""
        return (int(self._filter.num_bits) + 7) // 8

    def to_bytes(self) -> bytes:
        bits = bitarray(self._filter.bitarray, endian="big")
        return bits.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, capacity: int, error_rate: float, count: int, generation: int) -> BloomMembership:
        bf = cls(capacity, error_rate, generation=generation)
        bits = bitarray(endian="big")
        bits.frombytes(data)
        n = bf._filter.num_bits
        if len(bits) < n:
            bits.extend([False] * (n - len(bits)))
        bf._filter.bitarray = bits[:n]
        bf._filter.count = count
        bf.saturated = count >= capacity
        return bf
