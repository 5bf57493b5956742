"""The public surface of ``dal`` and what importing it does (nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import dal
from dal.errors import DalError


def isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps ``__all__`` in: CONSTANTS, then Classes, then functions."""
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def test_all_is_sorted_and_unique() -> None:
    assert dal.__all__ == sorted(dal.__all__, key=isort_key)
    assert len(set(dal.__all__)) == len(dal.__all__)


def test_every_name_in_all_resolves() -> None:
    missing = [name for name in dal.__all__ if not hasattr(dal, name)]
    assert missing == []
    ns: dict[str, object] = {}
    exec("from dal import *", ns)
    assert set(dal.__all__) <= set(ns)


def test_every_public_error_is_exported() -> None:
    import dal.errors as errors

    public = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, DalError) and not name.startswith("_")
    }
    assert public <= set(dal.__all__)
    for name in public:
        assert getattr(dal, name) is getattr(errors, name)


PROBE = textwrap.dedent(
    """
    import asyncio, json, os, socket, sys, threading

    events = []

    def spy(name, real):
        def wrapper(*a, **k):
            events.append(name)
            return real(*a, **k)
        return wrapper

    for mod, attrs in ((socket, ("socket", "create_connection", "getaddrinfo", "socketpair")),
                       (asyncio, ("new_event_loop", "set_event_loop", "create_task", "ensure_future",
                                  "get_event_loop", "run"))):
        for attr in attrs:
            setattr(mod, attr, spy(f"{mod.__name__}.{attr}", getattr(mod, attr)))
    real_thread_start = threading.Thread.start
    threading.Thread.start = spy("threading.Thread.start", real_thread_start)

    def sockets():
        fds = os.listdir("/proc/self/fd")
        out = 0
        for fd in fds:
            try:
                out += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
            except OSError:
                pass
        return out

    threads_before, sockets_before = threading.active_count(), sockets()
    modules_before = set(sys.modules)
    import dal, dal.errors, dal.routing.balancing, dal.routing.sharding, dal.schema, dal.config  # noqa
    print(json.dumps({
        "threads": [threads_before, threading.active_count()],
        "thread_names": [t.name for t in threading.enumerate()],
        "sockets": [sockets_before, sockets()],
        "events": events,
        "loop_running": asyncio._get_running_loop() is not None,
        "new_modules": sorted(set(sys.modules) - modules_before),
    }))
    """
)


def run_probe() -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_import_starts_nothing_and_opens_nothing() -> None:
    got = run_probe()
    before, after = got["threads"]  # type: ignore[misc]
    assert after == before == 1, got["thread_names"]
    assert got["sockets"][0] == got["sockets"][1]  # type: ignore[index]
    assert got["events"] == [], got["events"]
    assert got["loop_running"] is False
    # Database drivers load on first connect, not at import (a missing extra is
    # then reported by name instead of breaking ``import dal``).
    new = set(got["new_modules"])  # type: ignore[call-overload]
    for driver in ("asyncpg", "aiomysql", "pymysql", "aiosqlite", "redis"):
        assert driver not in new, driver
