"""The read and write paths of the two-level cache.

Read (``get``): L1 -> singleflight -> L2 -> Bloom filter -> database, then fill
L2 and L1.

- L1 hit: a copy of the row (or ``None`` for a cached "absent").
- L2 hit: decode and check that it is a row of this table for this key (an
  entry that is not is a miss: see :class:`TableCache`), fill L1 (guarded by
  the L1 generation taken before the L2 read), return.
- L2 miss and no version key: nobody wrote this key recently. If the Bloom
  filter is trustworthy (warmed, subscription live, L2 answered) and says the
  key was never inserted, the answer is ``None`` without touching the database
  (penetration, 穿透), cached in L1 only so Redis does not fill with
  placeholders for keys that do not exist.
- Otherwise one L2 read and one load per key per process (singleflight: all
  concurrent misses of a key share them), and across processes
  a short Redis lease: the holder looks at L2 once more (a previous holder may
  have filled it since the miss) and loads, the others wait up to
  ``lease_wait`` for its fill, then load themselves (stampede, 击穿). A key written within
  ``fresh_window`` is loaded from the primary, since a replica may not have
  replayed the write yet.
- Fills: L2 by compare-and-set on the version read with the miss (a fill that
  raced a write is rejected), with a jittered TTL (avalanche, 雪崩); a
  not-found result as a short-lived placeholder. Then L1, guarded.

Write (``invalidate``, after the commit): evict L1 and forget in-flight loads
of the keys, add inserted keys to the Bloom filter, bump the version and
delete the row in L2, evict L1 and forget in-flight loads again (a read that
raced the L2 delete may have put the old row back; so no reader of this
process that starts after the write returns can see the old row), publish one
invalidation message. Failed Redis steps go to the
retry queue; nothing raises to the caller. While a key's L2 delete waits in
the retry queue, this process reads that key from the primary and neither
reads nor fills L2 (which may still hold the old row once Redis is back, and
has no version key to say the write is recent); when the retried delete
succeeds, L1 is evicted once more.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from dal.backends.base import unsettled
from dal.cache.bloom import BloomMembership
from dal.cache.codec import Codec, Enums, make_codec
from dal.cache.flight import SingleFlight
from dal.cache.keys import encode_cache_key
from dal.cache.local import MISS, LocalCache
from dal.cache.remote import UNAVAILABLE, RemoteCache, key_token, parse_version
from dal.cache.runtime import CacheRuntime
from dal.clock import Backoff
from dal.config import CachePolicy
from dal.events import (
    CacheLevel,
    CacheLookup,
    CacheResult,
    FlightShared,
    InvalidationFailed,
    InvalidationPublished,
)

__all__ = ["CacheRuntime", "LoadMany", "LoadOne", "RowCheck", "ScanKeys", "TableCache"]

log = logging.getLogger("dal.cache")

T = TypeVar("T")

Row = dict[str, Any]
LoadOne = Callable[[bool], Awaitable[Row | None]]
"""Load one row from the database; the flag asks for the primary."""
LoadMany = Callable[[Sequence[tuple[Any, ...]], bool], Awaitable[dict[bytes, Row]]]
"""Load rows by key values from the database, keyed by encoded key; the flag asks for the primary."""
ScanKeys = Callable[[], AsyncIterator[tuple[Any, ...]]]
RowCheck = Callable[[bytes, Any], bool]
"""Whether a value decoded from L2 is a row of the table stored under the encoded key
given: a dict with exactly the table's columns, each value passing its column's
check, whose primary-key values encode to that key. It must not raise, whatever the value."""

_CORRUPT: Any = object()
"""An L2 entry that does not decode or does not pass the row check."""

_FILL_POLL_INITIAL, _FILL_POLL_MAXIMUM = 0.002, 0.02
"""How often a lease waiter looks for the holder's fill: doubling from the first
(seconds) to the second, until ``lease_wait`` has passed."""


def _is_dict(enc: bytes, value: Any) -> bool:
    return type(value) is dict


class TableCache:
    """The cache of one logical table in one process.

    An L2 entry is untrusted input: one that does not decode, or that
    ``check_row`` (see :data:`RowCheck`; by default: any dict) rejects, is a
    miss on every read path. It is deleted from L2 (unless rewritten
    meanwhile), counted in :attr:`corrupt_entries`, logged once per table, and
    the row is loaded from the database (and filled again).
    """

    def __init__(
        self,
        table: str,
        policy: CachePolicy,
        runtime: CacheRuntime,
        *,
        deep_copy: bool,
        scan_keys: ScanKeys | None,
        enums: Enums | None = None,
        check_row: RowCheck = _is_dict,
    ) -> None:
        self.table = table
        self.policy = policy
        self.runtime = runtime
        self.codec: Codec = make_codec(policy.serializer, enums)
        self._check_row = check_row
        self._corrupt_logged = False
        # The time source itself, not a wrapper: L1 reads it on every lookup.
        self.l1 = LocalCache(policy.l1_max_size, clock=runtime.clock.monotonic, deep_copy=deep_copy)
        self._copy = self.l1.copy
        self._events = runtime.events
        self.flight: SingleFlight[Row | None] = SingleFlight(on_shared=self._flight_shared)
        self.prefix = f"{policy.namespace}:{policy.schema_version}:{table}:"
        self.bloom: BloomMembership | None = (
            BloomMembership(policy.bloom_capacity, policy.bloom_error_rate) if policy.bloom else None
        )
        self.bloom_ready = False
        self._scan_keys = scan_keys
        self._rebuilding: asyncio.Task[None] | None = None
        # Keys this process wrote whose L2 delete has not gone through yet (Redis
        # down): L2 may still hold the old row, and there is no version key saying
        # the write is recent. Until the retried delete succeeds, reads of these
        # keys skip L2 and load from the primary. Key -> writes still pending.
        self._unsynced: dict[bytes, int] = {}
        # Counters (metrics are fed from these).
        self.db_loads = 0
        self.bloom_rejections = 0
        self.lease_waits = 0
        self.corrupt_entries = 0  # L2 entries that failed to decode or to match the table

    # -- keys and TTLs --------------------------------------------------------------------
    def base(self, enc: bytes) -> str:
        return self.prefix + "{" + key_token(enc) + "}"

    def _ttl(self, seconds: float) -> float:
        j = self.policy.jitter
        return seconds * (1 + self.runtime.rng.uniform(-j, j)) if j else seconds

    def _l1_ttl(self, row: Row | None) -> float:
        p = self.policy
        return self._ttl(p.l1_ttl if row is not None else min(p.l1_ttl, p.negative_ttl))

    def _l2_ttl_ms(self, row: Row | None) -> int:
        p = self.policy
        return max(1, int(self._ttl(p.l2_ttl if row is not None else p.negative_ttl) * 1000))

    def _bloom_says_absent(self, enc: bytes) -> bool:
        b = self.bloom
        if b is None or not self.bloom_ready or not self.runtime.bus_live:
            return False
        if enc in b:
            return False
        self.bloom_rejections += 1
        if self._events.cache:
            self._events.emit(CacheLookup(self.table, "bloom", "absent"))
        return True

    def _flight_shared(self) -> None:
        if self._events.cache:
            self._events.emit(FlightShared(self.table))

    def _seen_many(
        self, todo: list[bytes], res: list[Any], out: dict[bytes, Row | None], versions: dict[bytes, bytes],
        corrupt: int,
    ) -> None:
        """Report a get_many's L2 results: rows, placeholders, failed chunks, the rest misses."""
        hits = negative = 0
        for e in todo:
            if e in out and e not in versions:  # (a Bloom "absent" has its version read)
                if out[e] is None:
                    negative += 1
                else:
                    hits += 1
        failed = sum(1 for item in res if item is UNAVAILABLE)
        counts: tuple[tuple[CacheResult, int], ...] = (
            ("hit", hits), ("negative", negative), ("error", failed),
            ("miss", len(todo) - hits - negative - failed - corrupt),
        )  # fmt: skip
        for result, n in counts:
            if n:
                self._seen("l2", result, n)

    def _seen(self, level: CacheLevel, result: CacheResult, keys: int = 1) -> None:
        """Report a read-path decision (the caller tested ``self._events.cache``)."""
        self._events.emit(CacheLookup(self.table, level, result, keys))

    def _fresh(self, written_ms: int | None) -> bool:
        return written_ms is not None and self.runtime.wall_ms() - written_ms < self.policy.fresh_window * 1000

    def _version(self, ver: bytes | None) -> tuple[bytes, bool]:
        """(the version a fill compares against, whether loads must read the primary)."""
        parsed = parse_version(ver)
        if parsed is None:  # not a version this code writes: when it was written is unknown
            return ver or b"", True
        return parsed[0], self._fresh(parsed[1])

    def _decode(self, enc: bytes, raw: bytes) -> Any:
        """The row (``None``: the "absent" placeholder) an L2 entry of ``enc`` holds, or
        :data:`_CORRUPT`."""
        try:
            value = self.codec.loads(raw)
        except Exception:  # anything Redis holds may be garbage: msgpack, UTF-8, tag errors
            return _CORRUPT
        if value is None or self._check_row(enc, value):
            return value
        return _CORRUPT

    async def _discard(self, remote: RemoteCache, entries: list[tuple[str, bytes]]) -> None:
        """Count and delete L2 entries (base key, bytes read) that :meth:`_decode` rejected."""
        self.corrupt_entries += len(entries)
        if self._events.cache:
            self._seen("l2", "corrupt", len(entries))
        if not self._corrupt_logged:
            # Once per table: whoever wrote one bad entry may write many.
            self._corrupt_logged = True
            log.warning(
                "discarding cached entries of %s that do not decode or do not match the table "
                "(counted in corrupt_entries; this is logged once)", self.table
            )
        await remote.discard(entries)

    # -- read path ------------------------------------------------------------------------
    def cached(self, enc: bytes) -> Row | None:
        """L1 lookup: a copy, ``None`` for cached-absent, or :data:`MISS`."""
        return self.l1.get(enc)

    async def get(self, enc: bytes, load: LoadOne) -> Row | None:
        """The row for ``enc`` after an L1 miss.

        An L2 hit costs one GET, read inline when no flight for the key is under
        way. Otherwise concurrent misses of one key in this process share one
        flight (the version read, the Bloom check, at most one load); a flight
        started before a write of the key is not joined after it: the write
        forgets it.
        """
        gen = self.l1.generation()
        remote = self.runtime.remote
        checked = False
        if remote is not None and enc not in self.flight and enc not in self._unsynced:
            base = self.base(enc)
            raw = await remote.get_row(base)
            if raw is not UNAVAILABLE:
                if raw is not None:
                    row = self._decode(enc, raw)
                    if row is not _CORRUPT:
                        if self._events.cache:
                            self._seen("l2", "hit" if row is not None else "negative")
                        self.l1.put(enc, row, self._l1_ttl(row), gen)
                        return None if row is None else self._copy(row)
                    await self._discard(remote, [(base, raw)])
                elif self._events.cache:
                    self._seen("l2", "miss")
                checked = True
            elif self._events.cache:
                self._seen("l2", "error")
        row = await self.flight.do(enc, lambda: self._miss(enc, gen, load, row_checked=checked))
        return None if row is None else self._copy(row)

    async def _miss(self, enc: bytes, gen: int, load: LoadOne, *, row_checked: bool = False) -> Row | None:
        remote = self.runtime.remote
        version = b""
        fresh = False
        if enc in self._unsynced:
            return await self._load(enc, b"", True, gen, load, use_l2=False)
        if remote is not None:
            # The row first, its version only on a miss. A write landing between
            # the two shows as a newer version, which the fill is checked against.
            base = self.base(enc)
            raw = None if row_checked else await remote.get_row(base)
            if raw is not UNAVAILABLE:
                if raw is not None:
                    row = self._decode(enc, raw)
                    if row is not _CORRUPT:
                        if self._events.cache:
                            self._seen("l2", "hit" if row is not None else "negative")
                        self.l1.put(enc, row, self._l1_ttl(row), gen)
                        return row  # type: ignore[no-any-return]
                    await self._discard(remote, [(base, raw)])
                elif not row_checked and self._events.cache:
                    self._seen("l2", "miss")
                ver = await remote.get_version(base)
                if ver is UNAVAILABLE:
                    if self._events.cache:
                        self._seen("l2", "error")
                    fresh = True  # unknown: take the primary, trust no Bloom filter
                else:
                    version, fresh = self._version(ver)
                    if ver is None and self._bloom_says_absent(enc):
                        self.l1.put(enc, None, self._l1_ttl(None), gen)
                        return None
        return await self._load(enc, version, fresh, gen, load)

    async def _load(
        self, enc: bytes, version: bytes, fresh: bool, gen: int, load: LoadOne, *, use_l2: bool = True
    ) -> Row | None:
        remote = self.runtime.remote if use_l2 else None
        base = self.base(enc)
        token: bytes | None = None
        if remote is not None and remote.available:
            token = os.urandom(8)
            got = await remote.acquire_lease(base, token, int(self.policy.lease_ttl * 1000))
            if got is False:
                self.lease_waits += 1
                if self._events.cache:
                    self._seen("db", "lease_wait")
                waited = await self._await_fill(remote, enc, base)
                if waited is not MISS:
                    self.l1.put(enc, waited, self._l1_ttl(waited), gen)
                    return waited  # type: ignore[no-any-return]
                token = None
            elif got is UNAVAILABLE:
                token = None
            else:
                # Won the lease, but a previous holder may have filled L2 and released
                # the lease between our miss and now: look once more before loading.
                raw = await remote.get_row(base)
                if raw is not UNAVAILABLE and raw is not None:
                    filled = self._decode(enc, raw)
                    if filled is _CORRUPT:
                        await self._discard(remote, [(base, raw)])  # and load, holding the lease
                    else:
                        await asyncio.shield(remote.release_lease(base, token))
                        self.l1.put(enc, filled, self._l1_ttl(filled), gen)
                        return filled  # type: ignore[no-any-return]
        try:
            self.db_loads += 1
            if self._events.cache:
                self._seen("db", "loaded")
            row = await load(fresh)
            if remote is not None:
                await remote.fill(base, self.codec.dumps(row), self._l2_ttl_ms(row), version)
        finally:
            if token is not None:
                await asyncio.shield(remote.release_lease(base, token))  # type: ignore[union-attr]
        self.l1.put(enc, row, self._l1_ttl(row), gen)
        return row

    async def _await_fill(self, remote: RemoteCache, enc: bytes, base: str) -> Any:
        """Wait for the lease holder's fill, looking at L2 after each wait of a backoff,
        until ``lease_wait`` of the runtime's clock has passed; :data:`MISS` when it does
        not come (or L2 cannot be read)."""
        clock = self.runtime.clock
        deadline = clock.monotonic() + self.policy.lease_wait
        backoff = Backoff(_FILL_POLL_INITIAL, _FILL_POLL_MAXIMUM)
        while clock.monotonic() < deadline:
            await clock.sleep(backoff.next())
            raw = await remote.get_row(base)
            if raw is UNAVAILABLE:
                return MISS
            if raw is not None:
                row = self._decode(enc, raw)
                if row is not _CORRUPT:
                    return row
                await self._discard(remote, [(base, raw)])  # the holder's fill may still come
        return MISS

    async def get_many(
        self, encs: dict[bytes, tuple[Any, ...]], load: LoadMany
    ) -> dict[bytes, Row | None]:
        """Rows for ``encs`` (encoded key -> key values) after L1; absent keys map to ``None``.

        L2 is read in chunks (:meth:`RemoteCache.read`); the keys of a chunk that
        failed are loaded from the database like the misses, but nothing is filled
        into L2 for them (neither a row nor an "absent" placeholder): without
        their version, a fill could not be checked against a concurrent write.
        """
        gen = self.l1.generation()
        out: dict[bytes, Row | None] = {}
        remote = self.runtime.remote
        # Keys to fill L2 for, with the version read with their miss.
        versions: dict[bytes, bytes] = {}
        # Keys with an L2 delete pending (see _unsynced): no L2 read or fill, primary.
        unsynced = {e for e in encs if e in self._unsynced}
        fresh: list[bytes] = list(unsynced)
        stale_ok: list[bytes] = []
        todo = [e for e in encs if e not in unsynced]
        if remote is not None and todo:
            bases = [self.base(e) for e in todo]
            res = await remote.read(bases)
            if res is not UNAVAILABLE:
                corrupt: list[tuple[str, bytes]] = []
                for enc, base, item in zip(todo, bases, res, strict=True):
                    if item is UNAVAILABLE:
                        stale_ok.append(enc)
                        continue
                    raw, ver = item
                    if raw is not None:
                        row = self._decode(enc, raw)
                        if row is not _CORRUPT:
                            self.l1.put(enc, row, self._l1_ttl(row), gen)
                            out[enc] = row
                            continue
                        corrupt.append((base, raw))
                    versions[enc], primary = self._version(ver)
                    if ver is None and self._bloom_says_absent(enc):
                        self.l1.put(enc, None, self._l1_ttl(None), gen)
                        out[enc] = None
                    elif primary:
                        fresh.append(enc)
                    else:
                        stale_ok.append(enc)
                if corrupt:
                    await self._discard(remote, corrupt)
                if self._events.cache:
                    self._seen_many(todo, res, out, versions, len(corrupt))
            else:
                stale_ok = todo
                if self._events.cache:
                    self._seen("l2", "error", len(todo))
        else:
            stale_ok = todo
        for group, primary in ((stale_ok, False), (fresh, True)):
            if not group:
                continue
            self.db_loads += 1
            if self._events.cache:
                self._seen("db", "loaded", len(group))
            rows = await load([encs[e] for e in group], primary)
            fills = []
            for enc in group:
                row = rows.get(enc)
                out[enc] = row
                version = versions.get(enc)
                if remote is not None and version is not None:
                    fills.append((self.base(enc), self.codec.dumps(row), self._l2_ttl_ms(row), version))
                self.l1.put(enc, row, self._l1_ttl(row), gen)
            if fills:
                await remote.fill_many(fills)  # type: ignore[union-attr]
        return {e: (None if r is None else self._copy(r)) for e, r in out.items()}

    # -- write path -----------------------------------------------------------------------
    def evict_local(self, encs: Sequence[bytes], inserted: bool) -> None:
        """Apply an invalidation in this process: L1, in-flight loads, Bloom filter."""
        self.l1.invalidate(list(encs))
        for enc in encs:
            self.flight.forget(enc)
        if inserted and self.bloom is not None:
            self.bloom.add_many(encs)

    async def invalidate(self, encs: Sequence[bytes], *, inserted: bool) -> None:
        """After a commit of writes to ``encs``. Never raises; failed Redis steps are retried.

        Runs to the end even when the caller is cancelled meanwhile (a request
        timeout right after the commit): stopping halfway would leave L2 and other
        processes' L1 with the old row until their TTLs.
        """
        if not encs:
            return
        await self.runtime.shielded(self._invalidate(list(encs), inserted))

    async def invalidate_in_doubt(self, encs: Sequence[bytes], *, inserted: bool, exc: BaseException) -> None:
        """After a write whose outcome ``exc`` left unknown: invalidate as if it committed,
        and once more when the server confirms the interrupted statement over, if that is
        still under way (:func:`dal.backends.base.unsettled`): a statement still running
        when the first invalidation ran may commit after it."""
        encs = list(encs)
        await self.invalidate(encs, inserted=inserted)
        pending = unsettled(exc)
        if pending is not None:
            pending.add_done_callback(lambda _: self.runtime.spawn(self.invalidate(encs, inserted=inserted)))

    async def _invalidate(self, encs: Sequence[bytes], inserted: bool) -> None:
        self.evict_local(encs, inserted)
        rt = self.runtime
        if rt.remote is None:
            return
        bases = [self.base(e) for e in encs]
        version_ttl_ms = int(self.policy.version_ttl * 1000)
        remote = rt.remote

        async def delete() -> bool:
            return await remote.invalidate(bases, rt.wall_ms(), version_ttl_ms)

        if not await asyncio.shield(delete()):
            self._mark_unsynced(encs)
            self._failed(len(encs), "delete")

            async def retry_delete() -> bool:
                if not await delete():
                    return False
                self._mark_synced(encs)
                # Readers of this process may have put the old row from L2 into L1
                # since Redis came back: evict once more, now that L2 is clean.
                self.evict_local(encs, False)
                return True

            rt.retry.put(retry_delete)
        # A reader of this process that started between the eviction above and
        # the L2 delete may have read the old row (from L2, or from a replica
        # with the old version in hand) and filled L1 with it, guarded by a
        # generation newer than that eviction; or a later caller may join its
        # flight. Evict again, so nothing read before the delete outlives it.
        self.evict_local(encs, False)
        if inserted and self.bloom is not None and self.policy.bloom_source == "redis":
            # Keep the shared snapshot complete: a process that loads it later
            # must know every key inserted before.
            bloom = self.bloom
            positions = [p for e in encs for p in bloom.positions(e)]
            bits_key = self._snapshot_keys[0]

            async def setbits() -> bool:
                return await remote.setbits(bits_key, positions)

            if not await asyncio.shield(setbits()):
                self._failed(len(encs), "bloom")
                rt.retry.put(setbits)
        if rt.bus is not None:
            bus = rt.bus
            if remote.available:
                failed = await asyncio.shield(bus.send(self.table, list(encs), inserted))
            else:
                # The breaker is open: do not make this write wait out a publish
                # timeout; number the message now and let the retry queue send it.
                failed = bus.messages(self.table, list(encs), inserted)
            for payload in failed:  # queued in sequence order, retried in that order

                async def publish(payload: bytes = payload) -> bool:
                    return await bus.publish(payload)

                rt.retry.put(publish)
            if failed:
                self._failed(len(encs), "publish")
            elif self._events.invalidation:
                self._events.emit(InvalidationPublished(self.table, len(encs)))

    def _failed(self, keys: int, stage: str) -> None:
        """A step of an invalidation failed and went to the retry queue."""
        if self._events.invalidation:
            self._events.emit(InvalidationFailed(self.table, keys, stage, "Redis unavailable", retrying=True))

    def _mark_unsynced(self, encs: Sequence[bytes]) -> None:
        for e in encs:
            self._unsynced[e] = self._unsynced.get(e, 0) + 1

    def _mark_synced(self, encs: Sequence[bytes]) -> None:
        for e in encs:
            n = self._unsynced.get(e, 0) - 1
            if n > 0:
                self._unsynced[e] = n
            else:
                self._unsynced.pop(e, None)

    def on_message(self, encs: list[bytes], inserted: bool) -> None:
        self.evict_local(encs, inserted)

    # -- bloom filter --------------------------------------------------------------------------
    @property
    def _snapshot_keys(self) -> tuple[str, str]:
        # One hash tag for both, so a cluster keeps them on one node.
        tag = "{" + self.prefix + "bloom}"
        return tag + ":bits", tag + ":meta"

    async def _load_snapshot(self) -> bool:
        """Take the filter from Redis when a snapshot of the same geometry is there."""
        remote, bloom = self.runtime.remote, self.bloom
        if remote is None or bloom is None:
            return False
        bits_key, meta_key = self._snapshot_keys
        res = await remote.call(lambda: remote.client.hgetall(meta_key), bulk=True)
        if res is UNAVAILABLE or not res:
            return False
        # Redis contents are untrusted: a snapshot that does not parse, or whose bits are not
        # exactly the filter's size (a short one would read as zeros: "absent" for keys that
        # exist), is no snapshot; the filter is then built from the database.
        try:
            meta = {k.decode(): v.decode() for k, v in res.items()}
            capacity, error_rate = int(meta["capacity"]), float(meta["error_rate"])
            count, generation = int(meta.get("count", 0)), int(meta.get("generation", 0))
        except (KeyError, ValueError, UnicodeDecodeError, AttributeError):
            self._discard_snapshot("its metadata does not parse")
            return False
        if capacity != bloom.capacity or error_rate != bloom.error_rate:
            return False
        data = await remote.call(lambda: remote.client.get(bits_key), bulk=True)
        if data is UNAVAILABLE or data is None:
            return False
        if type(data) is not bytes or len(data) != bloom.byte_size or not count >= 0 or generation < 0:
            self._discard_snapshot("its bits are not the filter's size")
            return False
        snap = BloomMembership.from_bytes(data, bloom.capacity, bloom.error_rate, count, generation)
        bloom.finish_rebuild(snap)
        self.bloom_ready = True
        return True

    def _discard_snapshot(self, why: str) -> None:
        self.corrupt_entries += 1
        log.warning("ignoring the Bloom filter snapshot of %s in Redis: %s", self.table, why)

    async def _save_snapshot(self) -> None:
        remote, bloom = self.runtime.remote, self.bloom
        if remote is None or bloom is None:
            return
        bits_key, meta_key = self._snapshot_keys
        # Merged into the bits already there (same geometry), never a plain SET: a key
        # inserted by another process during the scan has its bits SETBIT there, and
        # this filter may not have its message yet.
        await remote.save_bloom(
            bits_key, meta_key, bloom.to_bytes(), bloom.capacity, repr(bloom.error_rate), bloom.count, bloom.generation
        )

    async def warm_bloom(self) -> None:
        """Fill the Bloom filter: from the Redis snapshot (``bloom_source = "redis"``) if
        there is one, else from the database (every physical table's keys)."""
        if self.bloom is None or self._scan_keys is None:
            return
        bloom = self.bloom
        if self.policy.bloom_source == "redis":
            bloom.begin_rebuild()
            if await self._load_snapshot():
                return
            bloom.abort_rebuild()
        fresh = BloomMembership(
            max(self.policy.bloom_capacity, bloom.count * 2 if bloom.saturated else 0),
            self.policy.bloom_error_rate,
            generation=bloom.generation + 1,
        )
        bloom.begin_rebuild()
        try:
            async for kv in self._scan_keys():
                fresh.add(encode_cache_key(kv))
        except BaseException:
            bloom.abort_rebuild()
            raise
        bloom.finish_rebuild(fresh)
        self.bloom_ready = True
        if self.policy.bloom_source == "redis":
            await self._save_snapshot()

    def resync_bloom(self) -> None:
        """Distrust the filter until it is rebuilt (after missed messages)."""
        if self.bloom is None:
            return
        self.bloom_ready = False
        if self._rebuilding is None or self._rebuilding.done():
            self._rebuilding = asyncio.ensure_future(self.rebuild())

    async def rebuild(self) -> None:
        try:
            await self.warm_bloom()
        except Exception as exc:  # the filter stays distrusted: reads go to the database
            log.warning("bloom rebuild of %s failed: %s", self.table, exc)

    async def aclose(self) -> None:
        if self._rebuilding is not None:
            self._rebuilding.cancel()
            await asyncio.gather(self._rebuilding, return_exceptions=True)
