"""L2: Redis (or Redis Cluster), shared by every process.

Per cached row there are three keys sharing one hash tag, so that they live in
one cluster slot and one Lua script may touch them together::

    {ns}:{schema_version}:{table}:{<key>}         the row (codec bytes; a placeholder for "absent")
    {ns}:{schema_version}:{table}:{<key>}:ver     "<n>:<ms>": the n-th write, at wall time ms
    {ns}:{schema_version}:{table}:{<key>}:lease   who is loading it now (SET NX PX)

``<key>`` is the hex of the encoded key (a SHA-1 for keys over 64 bytes), so
any key value is safe in a Redis key and in a hash tag.

Writers run :data:`_INVALIDATE`: bump the version and delete the row, in one
step. Readers note the version they saw with the miss and fill with
:data:`_FILL`, which writes only if the version is still the same: a fill
that raced a write (read the old row, write commits and deletes, fill puts the
old row back) is rejected atomically. The version key also says *when* the
last write was, so a reader knows to load that key from the primary while
replicas may lag, and that the key exists even if this process's Bloom filter
has not heard of it yet.

Redis contents are not trusted: anyone who can write to the server can put
any bytes under these keys. A version value that is not ``<n>:<ms>`` in ASCII
digits parses as unknown (:func:`parse_version`); what a row entry must be is
checked by the table cache, which deletes what fails with :meth:`RemoteCache.discard`.

No call carries more than about 1,000 keys: reads are one ``MGET`` per
chunk of :data:`READ_CHUNK` row keys (each with its version key), fills,
invalidations and discards one pipeline per chunk of :data:`FILL_CHUNK`, Bloom
bits one pipeline per :data:`BITS_CHUNK` positions. Each call has the timeout
to itself: a big call would outlive it and trip the breaker for everyone,
while a chunk that fails costs only its own keys.

Every call goes through a breaker: when Redis fails repeatedly, calls return
:data:`UNAVAILABLE` at once instead of each waiting out a timeout, and
failures are counted. At most ``max_inflight`` calls run at once (the rest
wait their turn): redis-py's pool refuses a command when all its connections
(100 by default, per node on a cluster) are busy, and a burst of misses must
queue, not fail and trip the breaker.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dal.breaker import Breaker

log = logging.getLogger("dal.cache")

FILL_CHUNK = 500
"""Fills per pipeline (each touches a row key and its version key)."""
READ_CHUNK = 500
"""Row keys per MGET, each with its version key: 1,000 Redis keys."""
BITS_CHUNK = 1000
"""SETBITs per pipeline (a key sets one bit per hash function)."""

UNAVAILABLE: Any = object()
"""Returned instead of a result when Redis could not be used."""

_FILL = """
local v = redis.call('GET', KEYS[2])
if (v == false and ARGV[1] == '') or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

_INVALIDATE = """
local v = redis.call('GET', KEYS[2])
local n = 0
if v then n = tonumber(string.match(v, '^(%d+)')) or 0 end
redis.call('SET', KEYS[2], (n + 1) .. ':' .. ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[1])
return n + 1
"""

_SAVE_BLOOM = """
local cap = redis.call('HGET', KEYS[2], 'capacity')
local rate = redis.call('HGET', KEYS[2], 'error_rate')
if (cap == false or (cap == ARGV[2] and rate == ARGV[3])) and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[3], ARGV[1])
  redis.call('BITOP', 'OR', KEYS[1], KEYS[1], KEYS[3])
  redis.call('DEL', KEYS[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[2], 'capacity', ARGV[2], 'error_rate', ARGV[3], 'count', ARGV[4], 'generation', ARGV[5])
return 1
"""
"""Save a Bloom filter snapshot (KEYS: bits, meta, scratch). Bits of the same geometry
already in Redis are OR-ed in, not replaced: writers SETBIT keys they insert while a
process scans the database, and that process's filter may not have heard of them yet."""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
"""Delete KEYS[1] if it holds ARGV[1]: a lease's release, a bad entry's discard."""


def key_token(encoded: bytes) -> str:
    """The Redis-safe form of an encoded key."""
    if len(encoded) <= 64:
        return encoded.hex()
    return "h" + hashlib.sha1(encoded, usedforsecurity=False).hexdigest()


_VERSION = re.compile(rb"[0-9]+:([0-9]+)")


def parse_version(raw: bytes | None) -> tuple[bytes, int | None] | None:
    """A version key's value: ``(the value as stored, b'' when there is none;
    the write time in ms, None when there is none)``, or ``None`` when the value
    is not a version (not ``<n>:<ms>`` in ASCII digits): the write time is then
    unknown, and a reader must take it as recent. The value as stored is what a
    fill compares against, whatever its bytes."""
    if raw is None:
        return b"", None
    m = _VERSION.fullmatch(raw)
    return None if m is None else (raw, int(m.group(1)))


class RemoteCache:
    """L2 operations on one Redis client, each guarded by the breaker."""

    def __init__(
        self,
        client: Any,
        breaker: Breaker,
        *,
        cluster: bool = False,
        max_inflight: int = 64,
        timeout: float | None = None,
    ) -> None:
        """``timeout``: the bound on each call (every command, pipeline or script of one
        operation), enforced here with ``asyncio.timeout`` rather than by the client's
        ``socket_timeout``, which would wrap every socket write in ``asyncio.wait_for`` (a
        task and an event-loop pass per command). A call cut off this way is a failure
        (the breaker counts it) and the client drops the connection it was using."""
        from redis.exceptions import RedisError

        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        self.client = client
        self.breaker = breaker
        self.cluster = cluster
        self._fill = client.register_script(_FILL)
        self._invalidate = client.register_script(_INVALIDATE)
        self._release = client.register_script(_RELEASE)
        self._save_bloom = client.register_script(_SAVE_BLOOM)
        self._inflight = asyncio.Semaphore(max_inflight)
        self.timeout = timeout
        # Bloom snapshots move the whole filter in one call: more time, still bounded.
        self.bulk_timeout = None if timeout is None else max(2.0, 8 * timeout)
        self.errors = 0
        self.fills = 0
        self.rejected_fills = 0

    async def call(self, fn: Callable[[], Awaitable[Any]], *, bulk: bool = False) -> Any:
        """``fn()`` within the call timeout (``bulk``: the longer one), or :data:`UNAVAILABLE`
        when Redis failed, timed out or its breaker is open."""
        if not self.breaker.allow():
            return UNAVAILABLE
        try:
            async with self._inflight, asyncio.timeout(self.bulk_timeout if bulk else self.timeout):
                result = await fn()
        except self._errors as exc:
            self.errors += 1
            self.breaker.failure()
            log.debug("redis call failed: %s", exc)
            return UNAVAILABLE
        except BaseException:
            # Cancelled (or a bug): no verdict on Redis, but a half-open trial
            # must not stay "in flight" forever.
            self.breaker.abandon()
            raise
        self.breaker.success()
        return result

    @property
    def available(self) -> bool:
        return self.breaker.state != "open"

    async def read(self, bases: Sequence[str]) -> list[tuple[bytes | None, bytes | None] | Any] | Any:
        """(row bytes, version bytes) per base key, in order, with one MGET per
        :data:`READ_CHUNK` base keys. A key whose chunk failed maps to
        :data:`UNAVAILABLE` (the other chunks' results stand); :data:`UNAVAILABLE`
        itself when every chunk failed."""
        out: list[tuple[bytes | None, bytes | None] | Any] = []
        failed = 0
        for i in range(0, len(bases), READ_CHUNK):
            chunk = bases[i : i + READ_CHUNK]
            keys: list[str] = []
            for b in chunk:
                keys += (b, b + ":ver")
            mget = self.client.mget_nonatomic if self.cluster and len(chunk) > 1 else self.client.mget
            res = await self.call(functools.partial(mget, keys))
            if res is UNAVAILABLE or len(res) != len(keys):
                failed += 1
                out += [UNAVAILABLE] * len(chunk)
            else:
                out += [(res[j], res[j + 1]) for j in range(0, len(res), 2)]
        if failed and failed == -(-len(bases) // READ_CHUNK):
            return UNAVAILABLE
        return out

    async def get_row(self, base: str) -> bytes | Any | None:
        return await self.call(lambda: self.client.get(base))

    async def get_version(self, base: str) -> bytes | Any | None:
        return await self.call(lambda: self.client.get(base + ":ver"))

    async def fill(self, base: str, payload: bytes, ttl_ms: int, version: bytes) -> bool | Any:
        """Store ``payload`` only if the version is still ``version`` (b'' = never written)."""
        res = await self.call(lambda: self._fill(keys=[base, base + ":ver"], args=[version, payload, ttl_ms]))
        if res is UNAVAILABLE:
            return UNAVAILABLE
        if res:
            self.fills += 1
        else:
            self.rejected_fills += 1
        return bool(res)

    async def fill_many(self, items: Sequence[tuple[str, bytes, int, bytes]]) -> None:
        """:meth:`fill` of many (base, payload, ttl_ms, version): pipelined in chunks of
        :data:`FILL_CHUNK` (one call per key on a cluster, where the keys live on
        different nodes). A failed chunk leaves the others' fills done."""
        if self.cluster:
            await asyncio.gather(*(self.fill(*item) for item in items))
            return
        for i in range(0, len(items), FILL_CHUNK):
            chunk = items[i : i + FILL_CHUNK]

            async def run(chunk: Sequence[tuple[str, bytes, int, bytes]] = chunk) -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for base, payload, ttl_ms, version in chunk:
                    await self._fill(keys=[base, base + ":ver"], args=[version, payload, ttl_ms], client=pipe)
                return await pipe.execute()  # type: ignore[no-any-return]

            res = await self.call(run)
            if res is UNAVAILABLE:
                continue  # (once the breaker is open, the rest skip Redis at once)
            done = sum(1 for r in res if r)
            self.fills += done
            self.rejected_fills += len(res) - done

    async def invalidate(self, bases: Sequence[str], now_ms: int, version_ttl_ms: int) -> bool:
        """Bump the version and delete the row of every base key, :data:`FILL_CHUNK` keys
        per call. False when a chunk failed (doing it all again is harmless: a version
        bumped twice is still newer than what any reader saw)."""
        ok = True
        for i in range(0, len(bases), FILL_CHUNK):
            chunk = bases[i : i + FILL_CHUNK]

            async def run(chunk: Sequence[str] = chunk) -> None:
                if self.cluster:  # keys live on different nodes: one script call each
                    await asyncio.gather(
                        *(self._invalidate(keys=[b, b + ":ver"], args=[now_ms, version_ttl_ms]) for b in chunk)
                    )
                    return
                pipe = self.client.pipeline(transaction=False)
                for b in chunk:
                    await self._invalidate(keys=[b, b + ":ver"], args=[now_ms, version_ttl_ms], client=pipe)
                await pipe.execute()

            ok = await self.call(run) is not UNAVAILABLE and ok
        return ok

    async def acquire_lease(self, base: str, token: bytes, ttl_ms: int) -> bool | Any:
        res = await self.call(lambda: self.client.set(base + ":lease", token, nx=True, px=ttl_ms))
        return res if res is UNAVAILABLE else bool(res)

    async def release_lease(self, base: str, token: bytes) -> None:
        await self.call(lambda: self._release(keys=[base + ":lease"], args=[token]))

    async def discard(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Delete each (key, value) whose key still holds exactly that value (a fill or a
        write since then is kept), in pipelines of :data:`FILL_CHUNK`."""
        if self.cluster:
            await asyncio.gather(*(self.call(functools.partial(self._release, keys=[k], args=[v])) for k, v in items))
            return
        for i in range(0, len(items), FILL_CHUNK):
            chunk = items[i : i + FILL_CHUNK]

            async def run(chunk: Sequence[tuple[str, bytes]] = chunk) -> None:
                pipe = self.client.pipeline(transaction=False)
                for key, value in chunk:
                    await self._release(keys=[key], args=[value], client=pipe)
                await pipe.execute()

            await self.call(run)

    async def save_bloom(
        self, bits_key: str, meta_key: str, data: bytes, capacity: int, error_rate: str, count: int, generation: int
    ) -> bool:
        """Store a Bloom snapshot, merged with the bits of the same geometry already there."""
        res = await self.call(
            lambda: self._save_bloom(
                keys=[bits_key, meta_key, bits_key + ":scratch"], args=[data, capacity, error_rate, count, generation]
            ),
            bulk=True,
        )
        return res is not UNAVAILABLE

    async def setbits(self, key: str, positions: Sequence[int]) -> bool:
        """Set the bits at ``positions``, :data:`BITS_CHUNK` per call; False when a chunk
        failed (setting them all again is harmless)."""
        ok = True
        for i in range(0, len(positions), BITS_CHUNK):
            chunk = positions[i : i + BITS_CHUNK]

            async def run(chunk: Sequence[int] = chunk) -> None:
                pipe = self.client.pipeline(transaction=False)
                for p in chunk:
                    pipe.setbit(key, p, 1)
                await pipe.execute()

            ok = await self.call(run) is not UNAVAILABLE and ok
        return ok
