"""Helpers for the cache tests (tests/unit/test_cache_*.py, tests/integration/test_cache_single.py).

- :class:`RedisServer`: a test-owned ``redis-server`` child process on a free
  loopback port (no persistence), with :meth:`~RedisServer.kill`,
  :meth:`~RedisServer.restart` on the same port, :meth:`~RedisServer.pause`
  (SIGSTOP: the port accepts connections, nothing answers) and
  :meth:`~RedisServer.resume`. Optional ``requirepass`` and TLS. It runs under
  the reaper wrapper of :mod:`tests.replication`, so it dies with the test
  process.
- :func:`cache_topology`: a topology dict with a ``[cache]`` section.
- :func:`bulk_insert`: rows straight into the physical tables (no cache
  involvement), for pre-filling thousands of rows quickly.
- :class:`Queries`: counts statements a layer sends (``cluster.observe``).
- :func:`ns_keys` / :func:`delete_ns`: the Redis keys of one test's namespace
  (the shared Redis is never flushed).
- :func:`wait_until`: poll an async or sync condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from dal import DataLayer
from tests.replication import _make_tmpdir, _Server, free_port

# --------------------------------------------------------------------------- redis-server


def make_tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (also its own CA) and its key."""
    cert, key = directory / "redis.crt", directory / "redis.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


class RedisServer:
    """A redis-server owned by one test: ``with RedisServer() as r: r.url``."""

    def __init__(self, *, password: str | None = None, tls: bool = False) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH")
        self.exe = exe
        self.password = password
        self.tls = tls
        self.port = free_port()
        self.tmpdir = _make_tmpdir("dal-redis-")
        self.cert: Path | None = None
        self.key: Path | None = None
        if tls:
            self.cert, self.key = make_tls_files(self.tmpdir)
        self._server: _Server | None = None
        self.starts = 0

    # -- URLs ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The URL dal uses (password and CA file included)."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        args = [self.exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.tmpdir), "--protected-mode", "no"]  # fmt: skip
        if self.tls:
            assert self.cert is not None and self.key is not None
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.cert),
                     "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.cert),
                     "--tls-auth-clients", "no"]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> Self:
        if self._server is not None and self._server.running:
            raise RuntimeError("redis-server is already running")
        self._server = _Server(
            "redis-server", self.argv(), log_path=self.tmpdir / "redis.log", cwd=self.tmpdir,
            run_as=None, env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, lifeline_signal="KILL",
        )  # fmt: skip
        self._server.spawn()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if not self._server.running:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not ready on {self.port}: {self.log_tail()}")
            time.sleep(0.02)
        self.starts += 1
        return self

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.tmpdir / "redis.log").read_text()[-2000:]
        return ""

    def ping(self) -> bool:
        """A raw RESP PING (AUTH first when a password is set)."""
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        except OSError:
            return False
        try:
            sock: socket.socket = raw
            if self.tls:
                ctx = ssl.create_default_context(cafile=str(self.cert))
                sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            if self.password:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False
        finally:
            raw.close()

    def kill(self) -> None:
        """SIGKILL: the port refuses connections until :meth:`restart`."""
        if self._server is not None:
            self._server.kill()
        deadline = time.monotonic() + 10
        while self.ping() and time.monotonic() < deadline:
            time.sleep(0.02)

    def restart(self) -> None:
        """Start again on the same port (empty: nothing is persisted)."""
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers (a black hole)."""
        assert self._server is not None
        self._server.send("STOP")
        time.sleep(0.05)

    def resume(self) -> None:
        assert self._server is not None
        self._server.send("CONT")

    def stop(self) -> None:
        if self._server is not None:
            self._server.send("CONT")
            self._server.kill()
            self._server = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- layers


def unique_namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


def cache_topology(
    urls: list[str],
    tables: Mapping[str, Any],
    *,
    redis: str | None,
    namespace: str,
    channel: str | None = None,
    settings: Mapping[str, Any] | None = None,
    pool_max: int = 8,
) -> dict[str, Any]:
    """A topology over ``urls`` with a ``[cache]`` section (Redis ``redis``; ``None`` = L1 only)."""
    cache: dict[str, Any] = {"namespace": namespace, "channel": channel or f"dal:test:{namespace}"}
    if redis is not None:
        cache["redis"] = redis
    cache.update(settings or {})
    return {
        "databases": {f"db{i}": {"primary": u} for i, u in enumerate(urls)},
        "tables": dict(tables),
        "pool": {"min_size": 0, "max_size": pool_max},
        "cache": cache,
    }


async def bulk_insert(layer: DataLayer, table: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert ``rows`` directly into the physical tables (one executemany per table, in a
    transaction on its primary). The cache is not told: use it to pre-fill."""
    repo = layer.repository(table)
    t = layer.tables[table]
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        target, values = repo._row_target(row)
        groups.setdefault((target.database, target.slot), []).append(values)
    n = 0
    for (database, slot), values in groups.items():
        st = layer.statements(t, database)
        c = st.insert(slot, tuple(values[0]))
        async with layer.cluster.primary(database).transaction() as conn:
            for i in range(0, len(values), 1000):
                await conn.execute_many(c.sql, [c.params(v) for v in values[i : i + 1000]])
        n += len(values)
    return n


_FROM = re.compile(r"""\bFROM\s+[`"]?(\w+)""", re.IGNORECASE)


class Queries:
    """Statements a layer sends to its nodes (outside transactions), while active."""

    def __init__(self, *layers: DataLayer) -> None:
        self.layers = layers
        self.log: list[tuple[str, str, str]] = []  # (node name, role, sql)

    def __enter__(self) -> Self:
        for lay in self.layers:
            lay.cluster.observe(lambda node, sql: self.log.append((node.name, node.role.value, sql)))
        return self

    def __exit__(self, *exc: object) -> None:
        for lay in self.layers:
            lay.cluster.observe(None)

    def clear(self) -> None:
        self.log.clear()

    @property
    def selects(self) -> list[tuple[str, str, str]]:
        return [q for q in self.log if q[2].lstrip().upper().startswith("SELECT")]

    def __len__(self) -> int:
        return len(self.log)

    def per_table(self) -> Counter[str]:
        """SELECT statements per physical table."""
        out: Counter[str] = Counter()
        for _, _, sql in self.selects:
            m = _FROM.search(sql)
            out[m.group(1) if m else "?"] += 1
        return out

    def roles(self) -> Counter[str]:
        return Counter(role for _, role, _ in self.selects)


# --------------------------------------------------------------------------- redis keys


async def ns_keys(client: Any, namespace: str) -> list[bytes]:
    """Every key of ``namespace`` (rows, versions, leases, Bloom snapshots), by SCAN."""
    out: list[bytes] = []
    for pattern in (f"{namespace}:*", "{" + namespace + ":*"):
        async for k in client.scan_iter(match=pattern, count=1000):
            out.append(k)
    return out


async def delete_ns(client: Any, namespace: str) -> None:
    keys = await ns_keys(client, namespace)
    for i in range(0, len(keys), 1000):
        await client.delete(*keys[i : i + 1000])


# --------------------------------------------------------------------------- polling


async def wait_until(
    cond: Callable[[], Any] | Callable[[], Awaitable[Any]], timeout: float = 3.0, interval: float = 0.002
) -> float:
    """Poll ``cond`` until truthy; return the seconds it took (raise TimeoutError after ``timeout``)."""
    t0 = time.monotonic()
    while True:
        res = cond()
        if inspect.isawaitable(res):
            res = await res
        if res:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
