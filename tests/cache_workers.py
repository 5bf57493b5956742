"""Worker processes for the multi-process cache tests.

Each worker is a separate OS process (``multiprocessing`` with the *spawn*
start method, so nothing is inherited from pytest) that opens its own
:class:`~dal.DataLayer` and runs one *role* (an async function below). The
parent talks to it over a pipe: the worker sends ``{"ready": ...}`` once its
layer is started (Bloom filter warmed, subscription live), then follows the
role's script of messages. A worker that raises sends ``{"error": traceback}``
and exits; :meth:`Worker.recv` raises it in the parent.

Also runnable as ``python -m tests.cache_workers ROLE SPEC_JSON`` (the spec's
messages then come on stdin/stdout, one JSON per line) for debugging a role by
hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import random
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import sqlalchemy as sa

from dal import DataLayer
from dal.cache.codec import make_codec
from dal.cache.keys import encode_cache_key
from dal.cache.remote import key_token

WRITER_COLUMNS = 4  # w0..w3: one column per writer process (race harness)
LATENCY_BASE = 1_000_000  # the latency writer writes val = LATENCY_BASE + round


# --------------------------------------------------------------------------- shared helpers


def metadata(table: str) -> sa.MetaData:
    """``id`` primary key, ``val``, one counter column per writer process, ``note``."""
    md = sa.MetaData()
    sa.Table(
        table, md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("val", sa.BigInteger, nullable=False, default=0),
        *(sa.Column(f"w{i}", sa.BigInteger, nullable=False, default=0) for i in range(WRITER_COLUMNS)),
        sa.Column("note", sa.String(32)),
    )  # fmt: skip
    return md


def config(
    table: str,
    *,
    primary: str,
    redis: str,
    namespace: str,
    replicas: Iterable[str] = (),
    shards: int = 2,
    cluster: bool = False,
    pool_max: int = 8,
    cache: dict[str, Any] | None = None,
    **policy: Any,
) -> dict[str, Any]:
    """A one-database topology with ``table`` cached (``policy`` = CachePolicy fields)."""
    return {
        "pool": {"min_size": 0, "max_size": pool_max},
        "databases": {"db0": {"primary": primary, "replicas": list(replicas)}},
        "cache": {"redis": redis, "cluster": cluster, "namespace": namespace, "channel": f"{namespace}:inv", **(cache or {})},
        "tables": {table: {"shard_key": "id", "table_shards": shards, "cache": policy}},
    }


def l2_key(namespace: str, table: str, key: int, schema_version: int = 1) -> str:
    """The Redis key of the L2 entry of row ``key`` (see dal.cache.remote)."""
    return f"{namespace}:{schema_version}:{table}:" + "{" + key_token(encode_cache_key((key,))) + "}"


def decode_l2(raw: bytes) -> dict[str, Any] | None:
    return make_codec("msgpack").loads(raw)


def physical_tables(table: str, shards: int) -> list[str]:
    return [f"{table}_{i}" for i in range(shards)]


def _plain_dsn(dsn: str) -> str:
    return dsn.replace("postgresql+asyncpg://", "postgresql://", 1)


async def create_rows(dsn: str, table: str, shards: int, rows: Iterable[int]) -> None:
    """(Re)create the physical tables of ``table`` and insert rows ``id = val = k``, routed as dal does."""
    import asyncpg

    cfg = {
        "pool": {"min_size": 0, "max_size": 4},
        "databases": {"db0": {"primary": dsn}},
        "tables": {table: {"shard_key": "id", "table_shards": shards}},
    }
    async with DataLayer(cfg, metadata(table), env={}) as lay:
        await lay.drop_all()
        await lay.create_all()
        t = lay.tables[table]
        by_slot: dict[int, list[int]] = {}
        for k in rows:
            by_slot.setdefault(t.locate_key(k)[0], []).append(k)
    conn = await asyncpg.connect(_plain_dsn(dsn))
    try:
        for slot, ks in by_slot.items():
            await conn.execute(
                f"INSERT INTO {t.physical[slot].name} (id, val, w0, w1, w2, w3, note) "
                "SELECT k, k, 0, 0, 0, 0, 'seed' FROM unnest($1::bigint[]) AS k",
                ks,
            )
    finally:
        await conn.close()


async def read_rows(dsn: str, table: str, shards: int) -> dict[int, dict[str, Any]]:
    """Every row of ``table`` on the primary, by id."""
    import asyncpg

    conn = await asyncpg.connect(_plain_dsn(dsn))
    try:
        out: dict[int, dict[str, Any]] = {}
        for phys in physical_tables(table, shards):
            for rec in await conn.fetch(f"SELECT * FROM {phys}"):
                out[rec["id"]] = dict(rec)
        return out
    finally:
        await conn.close()


async def drop_tables(dsn: str, table: str, shards: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(_plain_dsn(dsn))
    try:
        for phys in physical_tables(table, shards):
            await conn.execute(f"DROP TABLE IF EXISTS {phys}")
    finally:
        await conn.close()


def seed_row(k: int) -> dict[str, Any]:
    """The row :func:`create_rows` inserts for ``k``."""
    return {"id": k, "val": k, "w0": 0, "w1": 0, "w2": 0, "w3": 0, "note": "seed"}


def node_queries(layer: DataLayer) -> dict[str, int]:
    return {name: n.queries for name, n in layer.cluster.nodes.items()}


def cache_counters(layer: DataLayer, table: str) -> dict[str, Any]:
    rt = layer.cache
    assert rt is not None and rt.remote is not None and rt.bus is not None
    t = rt.tables[table]
    return {
        "db_loads": t.db_loads,
        "bloom_rejections": t.bloom_rejections,
        "lease_waits": t.lease_waits,
        "flight_shared": t.flight.shared,
        "redis_errors": rt.remote.errors,
        "fills": rt.remote.fills,
        "rejected_fills": rt.remote.rejected_fills,
        "breaker_trips": rt.remote.breaker.trips,
        "breaker_state": rt.remote.breaker.state,
        "bus_subscribed": rt.bus.subscribed,
        "bus_last_delay_ms": rt.bus.last_delay_ms,
        "bus_received": rt.bus.received,
        "bus_gaps": rt.bus.gaps,
        "bus_reconnects": rt.bus.reconnects,
        "retry_failures": rt.retry.failures,
        "retry_pending": rt.retry.pending,
        "l1_rejected_fills": t.l1.rejected_fills,
        "queries": node_queries(layer),
    }


# --------------------------------------------------------------------------- parent side


class WorkerError(RuntimeError):
    pass


class Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, role: str, spec: dict[str, Any], peer: Connection | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.role = role
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_main, args=(child, role, spec, peer), name=f"cache-{role}", daemon=True)
        self.proc.start()
        child.close()

    def send(self, msg: Any) -> None:
        self.conn.send(msg)

    def poll(self) -> Any | None:
        """A message if one is waiting, else ``None``."""
        if self.conn.poll():
            return self._check(self.conn.recv())
        if not self.proc.is_alive():
            raise WorkerError(f"worker {self.role} died (exit {self.proc.exitcode})")
        return None

    def recv(self, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.05):
            if not self.proc.is_alive() and not self.conn.poll():
                raise WorkerError(f"worker {self.role} died (exit {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise WorkerError(f"worker {self.role}: no message after {timeout}s")
        return self._check(self.conn.recv())

    def _check(self, msg: Any) -> Any:
        if isinstance(msg, dict) and "error" in msg:
            raise WorkerError(f"worker {self.role} failed:\n{msg['error']}")
        return msg

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send({"cmd": "quit"})
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


@contextlib.contextmanager
def workers(role: str, specs: list[dict[str, Any]], *, ready_timeout: float = 60.0) -> Iterator[list[tuple[Worker, Any]]]:
    """Start one worker per spec, wait until all are ready; stop them all at exit.

    Yields (worker, its ready message) pairs.
    """
    started: list[Worker] = []
    try:
        for spec in specs:
            started.append(Worker(role, spec))
        readies = [w.recv(ready_timeout) for w in started]
        yield list(zip(started, readies, strict=True))
    finally:
        for w in started:
            w.stop()


def recv_all(ws: list[Worker], timeout: float = 60.0) -> list[Any]:
    return [w.recv(timeout) for w in ws]


# --------------------------------------------------------------------------- worker side


class Link:
    """The worker's end of the pipe, readable without blocking the event loop."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def send(self, msg: Any) -> None:
        self.conn.send(msg)

    async def recv(self) -> Any:
        loop = asyncio.get_running_loop()
        while not self.conn.poll():
            fut: asyncio.Future[None] = loop.create_future()

            def ready(f: asyncio.Future[None] = fut) -> None:
                if not f.done():
                    f.set_result(None)

            loop.add_reader(self.conn.fileno(), ready)
            try:
                await fut
            finally:
                loop.remove_reader(self.conn.fileno())
        return self.conn.recv()

    async def expect(self, *names: str) -> dict[str, Any]:
        msg = await self.recv()
        if msg.get("cmd") == "quit":
            raise _Quit
        if msg.get("cmd") not in names:
            raise RuntimeError(f"expected one of {names}, got {msg!r}")
        return msg  # type: ignore[no-any-return]


class _Quit(Exception):
    pass


def _main(conn: Connection, role: str, spec: dict[str, Any], peer: Connection | None) -> None:
    link = Link(conn)
    try:
        asyncio.run(ROLES[role](link, spec, Link(peer) if peer is not None else None))
    except _Quit:
        pass
    except BaseException:
        with contextlib.suppress(Exception):
            link.send({"error": traceback.format_exc()})
        raise SystemExit(1) from None


async def _layer(spec: dict[str, Any]) -> DataLayer:
    if spec.get("debug"):
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(process)d %(name)s %(message)s")
        logging.getLogger("dal.cache").setLevel(logging.DEBUG)
    layer = DataLayer(spec["config"], metadata(spec["table"]), env={})
    await layer.start()
    return layer


async def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _answer_checks(link: Link, layer: DataLayer, table: str) -> None:
    """Serve ``check`` (get + get_many of ``keys``) until ``quit``."""
    repo = layer.repository(table)
    while True:
        msg = await link.expect("check", "counters")
        if msg["cmd"] == "counters":
            link.send(cache_counters(layer, table))
            continue
        keys = msg["keys"]
        got = {k: await repo.get(k) for k in keys}
        many = await repo.get_many(keys)
        link.send({"get": got, "get_many": {k: many.get(k) for k in keys}, "counters": cache_counters(layer, table)})


# -- race harness -------------------------------------------------------------------------------


async def race(link: Link, spec: dict[str, Any], _peer: Link | None) -> None:
    """Writers and readers on a few hot (and a few warm) keys, ``tasks`` at a time, until ``ops`` operations
    were done and ``min_seconds`` passed.

    Writes set this process's own column ``w<index>`` to the next value of a
    per-key counter, so in this column the database only ever grows: after an
    update returns, reading the key back through this layer must show at least
    that value (else a read-your-writes violation is recorded).
    """
    table, hot, warm, col = spec["table"], spec["keys"], spec["warm"], f"w{spec['index']}"
    keys = hot + warm
    rng = random.Random(spec["seed"])
    layer = await _layer(spec)
    repo = layer.repository(table)
    counters = dict.fromkeys(keys, 0)
    locks = {k: asyncio.Lock() for k in keys}
    stats = {"ops": 0, "updates": 0, "gets": 0, "get_many": 0, "readbacks": 0}
    violations: list[str] = []
    errors: list[str] = []
    missing: list[str] = []
    stop = asyncio.Event()

    async def one() -> None:
        # Hot keys are written all the time (their loads go to the primary: fresh_window);
        # warm keys rarely, so most of their loads go to the replica, which lags.
        k = rng.choice(hot) if rng.random() < 0.8 else rng.choice(warm)
        r = rng.random()
        if r < 0.35 and (k in hot or rng.random() < 0.01):
            async with locks[k]:  # the counter order is the commit order of this column
                counters[k] += 1
                n = counters[k]
                await repo.update(k, {col: n})
            stats["updates"] += 1
            stats["ops"] += 1
            if rng.random() < 0.7:
                row = await repo.get(k)
            else:
                row = (await repo.get_many([k, rng.choice(keys)])).get(k)
            stats["readbacks"] += 1
            stats["ops"] += 1
            if row is None:
                missing.append(f"readback of {k} found no row")
            elif row[col] < n:
                violations.append(f"key {k}: wrote {col}={n}, read back {row[col]}")
        elif r < 0.75:
            row = await repo.get(k)
            stats["gets"] += 1
            stats["ops"] += 1
            if row is None:
                missing.append(f"get({k}) found no row")
        else:
            some = rng.sample(keys, rng.randint(2, 6))
            rows = await repo.get_many(some)
            stats["get_many"] += 1
            stats["ops"] += 1
            if set(rows) != set(some):
                missing.append(f"get_many({some}) returned {sorted(rows)}")

    async def loop() -> None:
        while not stop.is_set():
            try:
                await one()
            except Exception:
                errors.append(traceback.format_exc())
            # Run until this process did its share of operations and min_seconds passed.
            if stats["ops"] >= spec["ops"] and time.monotonic() - t0 >= spec["min_seconds"]:
                stop.set()
            await asyncio.sleep(rng.uniform(0, 0.002))

    link.send({"ready": True})
    await link.expect("go")
    t0 = time.monotonic()
    tasks = [asyncio.create_task(loop()) for _ in range(spec["tasks"])]
    await stop.wait()
    await asyncio.gather(*tasks)
    link.send({
        "stats": stats, "seconds": time.monotonic() - t0, "violations": violations,
        "errors": errors[:5], "error_count": len(errors), "missing": missing[:5],
        "missing_count": len(missing), "counters": cache_counters(layer, table),
    })  # fmt: skip
    try:
        await _answer_checks(link, layer, table)
    finally:
        await layer.aclose()


# -- stampede -----------------------------------------------------------------------------------


async def stampede(link: Link, spec: dict[str, Any], _peer: Link | None) -> None:
    """``n`` concurrent gets of one cold key, all released at a shared wall-clock instant."""
    layer = await _layer(spec)
    try:
        repo = layer.repository(spec["table"])
        before = cache_counters(layer, spec["table"])
        link.send({"ready": True})
        msg = await link.expect("go")
        await _sleep_until(msg["at"])
        t0 = time.monotonic()
        rows = await asyncio.gather(*(repo.get(spec["key"]) for _ in range(spec["n"])), return_exceptions=True)
        elapsed = time.monotonic() - t0
        errors = [repr(r) for r in rows if isinstance(r, BaseException)]
        wrong = sum(1 for r in rows if not isinstance(r, BaseException) and r != spec["expect"])
        link.send({
            "started": t0, "seconds": elapsed, "errors": errors[:5], "error_count": len(errors), "wrong": wrong,
            "before": before, "after": cache_counters(layer, spec["table"]),
        })  # fmt: skip
        await link.expect("done")
    finally:
        await layer.aclose()


# -- penetration --------------------------------------------------------------------------------


async def penetration(link: Link, spec: dict[str, Any], _peer: Link | None) -> None:
    """Gets of keys that do not exist (and a few that do), ``concurrency`` at a time."""
    layer = await _layer(spec)
    try:
        repo = layer.repository(spec["table"])
        before = cache_counters(layer, spec["table"])
        link.send({"ready": True, "bloom_ready": layer.cache.tables[spec["table"]].bloom_ready})  # type: ignore[union-attr]
        await link.expect("go")
        absent = list(range(spec["absent"][0], spec["absent"][1]))
        present = list(range(spec["present"][0], spec["present"][1]))
        found_absent = 0
        missing_present = 0
        errors: list[str] = []
        sem = asyncio.Semaphore(spec["concurrency"])

        async def get(k: int, exists: bool) -> None:
            nonlocal found_absent, missing_present
            async with sem:
                try:
                    row = await repo.get(k)
                except Exception as exc:
                    errors.append(repr(exc))
                    return
            if exists and row is None:
                missing_present += 1
            if not exists and row is not None:
                found_absent += 1

        t0 = time.monotonic()
        await asyncio.gather(*(get(k, False) for k in absent), *(get(k, True) for k in present))
        link.send({
            "seconds": time.monotonic() - t0, "gets": len(absent) + len(present), "absent_gets": len(absent),
            "found_absent": found_absent, "missing_present": missing_present, "errors": errors[:5],
            "error_count": len(errors), "before": before, "after": cache_counters(layer, spec["table"]),
        })  # fmt: skip
        await link.expect("done")
    finally:
        await layer.aclose()


# -- avalanche ----------------------------------------------------------------------------------


async def fill(link: Link, spec: dict[str, Any], _peer: Link | None) -> None:
    """One ``get_many`` of ``ids`` at a shared instant: fills L2 with all of them at once."""
    layer = await _layer(spec)
    try:
        repo = layer.repository(spec["table"])
        link.send({"ready": True})
        msg = await link.expect("go")
        await _sleep_until(msg["at"])
        ids = list(range(spec["ids"][0], spec["ids"][1]))
        t0 = time.monotonic()
        rows = await repo.get_many(ids)
        link.send({"seconds": time.monotonic() - t0, "rows": len(rows), "counters": cache_counters(layer, spec["table"])})
        await link.expect("done")
    finally:
        await layer.aclose()


# -- invalidation latency -----------------------------------------------------------------------


async def latency_writer(link: Link, spec: dict[str, Any], peer: Link | None) -> None:
    """Write ``val = LATENCY_BASE + i`` for i = 1..rounds; after each, wait for the reader's ack.

    Meanwhile reader tasks of this process read the key continuously: a read
    that starts after a write returned must see that write (or a later one).
    """
    assert peer is not None
    table, key = spec["table"], spec["key"]
    layer = await _layer(spec)
    try:
        repo = layer.repository(table)
        committed = 0
        stale: list[str] = []
        local_reads = 0
        stop = asyncio.Event()

        async def reader() -> None:
            nonlocal local_reads
            while not stop.is_set():
                floor = committed
                row = await repo.get(key)
                local_reads += 1
                if row is None or row["val"] < floor:
                    stale.append(f"read {None if row is None else row['val']} after write {floor} returned")
                await asyncio.sleep(0.001)  # leave the CPU to the measured reader (2 cores)

        link.send({"ready": True})
        await link.expect("go")
        readers = [asyncio.create_task(reader()) for _ in range(spec["local_readers"])]
        written: list[float] = []
        for i in range(1, spec["rounds"] + 1):
            await repo.update(key, {"val": LATENCY_BASE + i})
            t = time.time()
            committed = LATENCY_BASE + i
            written.append(t)
            # Readers started right after the write returned.
            for row in await asyncio.gather(*(repo.get(key) for _ in range(3))):
                local_reads += 1
                if row is None or row["val"] < LATENCY_BASE + i:
                    stale.append(f"read {None if row is None else row['val']} right after write {i} returned")
            ack = await peer.recv()
            assert ack == i, (ack, i)
            await asyncio.sleep(spec["pause"])
        stop.set()
        await asyncio.gather(*readers)
        link.send({"written": written, "stale": stale[:10], "stale_count": len(stale), "local_reads": local_reads,
                   "counters": cache_counters(layer, table)})
        await link.expect("done")
    finally:
        await layer.aclose()


async def latency_reader(link: Link, spec: dict[str, Any], peer: Link | None) -> None:
    """Poll ``get`` in a tight loop; note the wall time each new value is first seen; ack it."""
    assert peer is not None
    table, key = spec["table"], spec["key"]
    layer = await _layer(spec)
    try:
        repo = layer.repository(table)
        assert await repo.get(key) is not None  # cached in L1 (long L1 TTL): only an invalidation evicts it
        link.send({"ready": True})
        await link.expect("go")
        seen: list[float] = []
        polls = 0
        expect = 1
        while expect <= spec["rounds"]:
            row = await repo.get(key)
            polls += 1
            if row is not None and row["val"] >= LATENCY_BASE + expect:
                seen.append(time.time())
                if row["val"] != LATENCY_BASE + expect:
                    raise AssertionError(f"saw {row['val']} while waiting for {expect}")
                peer.send(expect)
                expect += 1
            await asyncio.sleep(0)  # let the subscription task run
        link.send({"seen": seen, "polls": polls, "counters": cache_counters(layer, table)})
        await link.expect("done")
    finally:
        await layer.aclose()


# -- Redis killed under load --------------------------------------------------------------------


async def mixed(link: Link, spec: dict[str, Any], _peer: Link | None) -> None:
    """Gets, get_many, updates, inserts and deletes until told to stop; every exception is a failed call."""
    table, keys, col = spec["table"], list(spec["keys"]), f"w{spec['index']}"
    rng = random.Random(spec["seed"])
    layer = await _layer(spec)
    repo = layer.repository(table)
    counters: dict[int, int] = {}
    locks: dict[int, asyncio.Lock] = {}
    next_id = spec["insert_from"]
    inserted: list[int] = []
    deleted: list[int] = []
    stats = {"ops": 0, "gets": 0, "get_many": 0, "updates": 0, "inserts": 0, "deletes": 0}
    errors: list[str] = []
    violations: list[str] = []
    slowest = 0.0
    stop = asyncio.Event()

    async def one() -> None:
        nonlocal next_id
        r = rng.random()
        if r < 0.25:
            k = rng.choice(keys)
            lock = locks.setdefault(k, asyncio.Lock())
            async with lock:
                counters[k] = n = counters.get(k, 0) + 1
                await repo.update(k, {col: n})
            stats["updates"] += 1
            row = await repo.get(k)
            if row is not None and row[col] < n:
                violations.append(f"key {k}: wrote {col}={n}, read back {row[col]}")
        elif r < 0.30:
            k = next_id
            next_id += 1
            await repo.insert({"id": k, "val": k, "note": "new"})
            stats["inserts"] += 1
            if await repo.get(k) is None:
                violations.append(f"inserted {k}, read back None; {_diagnose(layer, table, k)}")
            inserted.append(k)  # only now may another task delete it
        elif r < 0.32 and inserted:
            k = inserted.pop(rng.randrange(len(inserted)))
            await repo.delete(k)
            deleted.append(k)
            stats["deletes"] += 1
            if await repo.get(k) is not None:
                violations.append(f"deleted {k}, read back a row")
        elif r < 0.80:
            await repo.get(rng.choice(keys + inserted[-20:]))
            stats["gets"] += 1
        else:
            await repo.get_many(rng.sample(keys, 4))
            stats["get_many"] += 1

    async def loop() -> None:
        nonlocal slowest
        while not stop.is_set():
            t = time.monotonic()
            try:
                await one()
            except Exception:
                errors.append(traceback.format_exc())
            stats["ops"] += 1
            slowest = max(slowest, time.monotonic() - t)
            await asyncio.sleep(rng.uniform(0, 0.003))

    link.send({"ready": True})
    await link.expect("go")
    tasks = [asyncio.create_task(loop()) for _ in range(spec["tasks"])]
    await link.expect("stop")
    stop.set()
    await asyncio.gather(*tasks)
    link.send({
        "stats": stats, "errors": errors[:5], "error_count": len(errors), "violations": violations[:10],
        "violation_count": len(violations), "slowest": slowest, "inserted": inserted, "deleted": deleted,
        "counters": cache_counters(layer, table),
    })  # fmt: skip
    try:
        await _answer_checks(link, layer, table)
    finally:
        await layer.aclose()


def _diagnose(layer: DataLayer, table: str, key: int) -> str:
    """The cache's state for ``key`` (to explain a violation)."""
    rt = layer.cache
    assert rt is not None and rt.remote is not None
    t = rt.tables[table]
    enc = encode_cache_key((key,))
    return (
        f"in_bloom={t.bloom is not None and enc in t.bloom} bloom_ready={t.bloom_ready} bus_live={rt.bus_live} "
        f"breaker={rt.remote.breaker.state} l1={t.l1.get(enc)!r} retry_pending={rt.retry.pending}"
    )


ROLES: dict[str, Callable[[Link, dict[str, Any], Link | None], Awaitable[None]]] = {
    "race": race,
    "stampede": stampede,
    "penetration": penetration,
    "fill": fill,
    "latency_writer": latency_writer,
    "latency_reader": latency_reader,
    "mixed": mixed,
}


class _StdioConn:
    """Messages as JSON lines on stdin/stdout (``python -m tests.cache_workers``)."""

    def send(self, msg: Any) -> None:
        print(json.dumps(msg, default=repr), flush=True)

    def poll(self) -> bool:
        return True

    def recv(self) -> Any:
        line = sys.stdin.readline()
        return json.loads(line) if line else {"cmd": "quit"}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ROLES:
        sys.exit(f"usage: python -m tests.cache_workers {{{','.join(ROLES)}}} SPEC_JSON")
    _link = Link(_StdioConn())  # type: ignore[arg-type]
    with contextlib.suppress(_Quit):
        asyncio.run(ROLES[sys.argv[1]](_link, json.loads(sys.argv[2]), None))
