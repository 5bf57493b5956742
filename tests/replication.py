"""Throw-away replicated database servers for integration tests.

``PgReplicaSet`` (PostgreSQL primary + streaming hot standby) and
``MariaDBReplicaSet`` (MariaDB primary + GTID replica) start real servers on
free loopback ports, as children of the test process, with all state in one
temp dir that ``stop()`` removes.

Every server runs under a small "reaper" wrapper (this file executed as a
script): the wrapper is a child subreaper, so when a server is SIGKILLed its
orphaned worker processes are reaped by the wrapper instead of becoming zombies
under PID 1. Its stdin is a lifeline: if the test process dies without
cleaning up, the wrapper sees EOF and shuts the server down.

No pytest import here; fixtures live in ``tests/integration/conftest.py``.
"""

import atexit
import contextlib
import ctypes
import os
import pwd
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "MariaDBReplicaSet",
    "MissingBinaryError",
    "PgReplicaSet",
    "ReplicaSetError",
    "free_port",
]

_THIS_FILE = str(Path(__file__).resolve())
_POLL = 0.02
_LOG_TAIL_LINES = 60
_KEEP_ENV = "DAL_TEST_KEEP_TMPDIR"


class ReplicaSetError(RuntimeError):
    """A test server failed to start or misbehaved."""


class MissingBinaryError(ReplicaSetError):
    """A required server binary is not installed."""


# --------------------------------------------------------------------------- ports

_handed_out: set[int] = set()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1, never the same one twice per process.

    Picked below the kernel's ephemeral range when possible: a killed server is
    restarted on the same port, and an outgoing connection must not grab that
    port as its source port in between.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low > 11000:
        for _ in range(200):
            port = random.randint(10000, low - 1)
            if port not in _handed_out and _port_is_free(port):
                _handed_out.add(port)
                return port
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise ReplicaSetError("could not find a free TCP port on 127.0.0.1")


# --------------------------------------------------------------------------- helpers

_RunAs = tuple[int, int] | None  # (uid, gid) to drop to, None = stay as we are


def _run_as(os_user: str) -> _RunAs:
    """Servers refuse to run as root; when we are root, drop to ``os_user``."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(os_user)
    except KeyError as exc:
        raise MissingBinaryError(f"running as root but OS user {os_user!r} does not exist") from exc
    return pw.pw_uid, pw.pw_gid


def _chown(path: Path, run_as: _RunAs) -> None:
    if run_as is not None:
        os.chown(path, run_as[0], run_as[1])


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:])


def _with_log(msg: str, log: Path) -> str:
    return (
        f"{msg}\n--- last {_LOG_TAIL_LINES} lines of {log} "
        f"(set {_KEEP_ENV}=1 to keep the temp dir) ---\n{_tail(log)}\n--- end of log ---"
    )


def _run(
    argv: Sequence[str],
    *,
    run_as: _RunAs = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    what: str = "",
) -> str:
    """Run a short-lived tool; raise with its output on failure."""
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=run_as[0] if run_as else None,
            group=run_as[1] if run_as else None,
            extra_groups=[] if run_as else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise ReplicaSetError(f"{what or argv[0]} timed out after {timeout}s: {argv}") from exc
    if proc.returncode != 0:
        raise ReplicaSetError(
            f"{what or argv[0]} failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return str(proc.stdout)


def _base_env(home: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG": "C",
        "LC_ALL": "C",
        "HOME": str(home),  # keep the caller's ~/.pgpass, ~/.my.cnf etc. out of it
        "TZ": "UTC",
    }


_OWNER_FILE = "owner.pid"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_tmpdir(prefix: str) -> Path:
    """A fresh temp dir; also removes ones left by test runs that were SIGKILLed.

    (Their servers are already gone: the reaper's lifeline shuts them down.)
    """
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{prefix}*"):
        try:
            owner = int((old / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(owner) and not _pids_mentioning(str(old)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    (tmp / _OWNER_FILE).write_text(f"{os.getpid()}\n")
    return tmp


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
    return pids


def _keep_tmpdir_default() -> bool:
    return os.environ.get(_KEEP_ENV, "") not in ("", "0", "false", "no")


# --------------------------------------------------------------------------- processes


class _Server:
    """One server process, run (as a grandchild) under the reaper wrapper."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path,
        run_as: _RunAs,
        env: Mapping[str, str],
        lifeline_signal: str,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.run_as = run_as
        self.env = dict(env)
        self.lifeline_signal = lifeline_signal
        self.pid: int | None = None
        self._wrapper: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._wrapper is not None and self._wrapper.poll() is None

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def spawn(self) -> None:
        if self.running:
            raise ReplicaSetError(f"{self.name} is already running")
        uid, gid = self.run_as if self.run_as is not None else (-1, -1)
        cmd = [
            sys.executable, "-I", "-S", _THIS_FILE, "--reap",
            str(uid), str(gid), str(self.cwd), str(self.log_path), self.lifeline_signal,
            "--", *self.argv,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            wrapper = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                # Own session: Ctrl-C on pytest must not kill servers before teardown.
                start_new_session=True,
            )
        assert wrapper.stdout is not None
        line = wrapper.stdout.readline()
        wrapper.stdout.close()
        if not line.strip().isdigit():
            if wrapper.stdin is not None:
                wrapper.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                wrapper.wait(5)
            raise ReplicaSetError(
                _with_log(f"could not launch {self.name}: {self.argv}", self.log_path)
            )
        self._wrapper = wrapper
        self.pid = int(line)

    def send(self, sig: str) -> None:
        """Ask the wrapper to signal the server (race-free against pid reuse)."""
        w = self._wrapper
        if w is None or w.poll() is not None or w.stdin is None:
            return
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            w.stdin.write(f"{sig}\n".encode())
            w.stdin.flush()

    def wait(self, timeout: float) -> bool:
        """Wait until the server and all its descendants are gone."""
        w = self._wrapper
        if w is None:
            return True
        try:
            w.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    @property
    def returncode(self) -> int | None:
        return None if self._wrapper is None else self._wrapper.returncode

    def stop(self, sig: str, timeout: float) -> None:
        """Signal, wait, escalate to SIGKILL; always leaves nothing running."""
        w = self._wrapper
        if w is None:
            return
        if w.poll() is None:
            self.send(sig)
            if not self.wait(timeout):
                self.send("KILL")
                if not self.wait(15):
                    w.kill()  # wrapper itself is wedged; should never happen
                    w.wait(5)
        if w.stdin is not None:
            with contextlib.suppress(OSError):
                w.stdin.close()
        self._wrapper = None
        self.pid = None

    def kill(self, timeout: float = 30.0) -> None:
        self.stop("KILL", timeout)


# --------------------------------------------------------------------------- PostgreSQL


def _find_pg_bindir(explicit: str | None) -> Path:
    need = ("initdb", "postgres", "pg_basebackup", "psql")
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if env_dir := os.environ.get("DAL_PG_BINDIR"):
        candidates.append(Path(env_dir))

    def _ver(p: Path) -> float:
        try:
            return float(p.parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_ver, reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for d in candidates:
        if all((d / b).is_file() and os.access(d / b, os.X_OK) for b in need):
            return d
    raise MissingBinaryError(
        "PostgreSQL server binaries not found (need initdb, postgres, pg_basebackup, psql; "
        f"looked in {[str(c) for c in candidates] or '/usr/lib/postgresql/*/bin'}). "
        "Install postgresql (Debian: apt-get install postgresql) or set DAL_PG_BINDIR."
    )


def _pg_status(datadir: Path) -> str:
    """Postmaster status from postmaster.pid; a hot standby also reports "ready"."""
    try:
        lines = (datadir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return ""
    return lines[7].strip() if len(lines) >= 8 else ""


def _drop_stale_pg_state(datadir: Path, sockdir: Path, port: int) -> None:
    """After a SIGKILL: remove the lock files and the leaked SysV segment.

    Postgres would reuse postmaster.pid itself, but refuses to start if the
    recorded pid has been reused by an unrelated process.
    """
    pidfile = datadir / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        key, shmid = (int(x) for x in pidfile.read_text().splitlines()[6].split())
        for row in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
            f = row.split()
            # columns: key shmid perms size cpid lpid nattch ...; key_t is printed signed
            # here but unsigned in postmaster.pid.
            same_key = int(f[0]) & 0xFFFFFFFF == key & 0xFFFFFFFF
            if same_key and int(f[1]) == shmid and int(f[6]) == 0:
                ctypes.CDLL(None, use_errno=True).shmctl(shmid, 0, None)  # IPC_RMID
    for p in (pidfile, sockdir / f".s.PGSQL.{port}", sockdir / f".s.PGSQL.{port}.lock"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


class PgReplicaSet:
    """PostgreSQL primary + streaming hot standby on free loopback ports."""

    database = "test"
    user = "postgres"
    standby_name = "dal_standby"

    def __init__(
        self,
        *,
        bindir: str | None = None,
        startup_timeout: float = 60.0,
        keep_tmpdir: bool | None = None,
        extra_conf: Mapping[str, str] | None = None,
    ) -> None:
        self._bindir_arg = bindir
        self.startup_timeout = startup_timeout
        self.keep_tmpdir = _keep_tmpdir_default() if keep_tmpdir is None else keep_tmpdir
        self.extra_conf = dict(extra_conf or {})
        self.tmpdir: Path | None = None
        self.primary_port = 0
        self.standby_port = 0
        self.startup_seconds: float | None = None
        self._bindir: Path | None = None
        self._run_as: _RunAs = None
        self._primary: _Server | None = None
        self._standby: _Server | None = None
        self._env: dict[str, str] = {}
        self._pgss: bool | None = None

    # ---- URLs

    def _url(self, port: int, scheme: str) -> str:
        return f"{scheme}://{self.user}@127.0.0.1:{port}/{self.database}"

    @property
    def primary_dsn(self) -> str:
        return self._url(self.primary_port, "postgresql+asyncpg")

    @property
    def standby_dsn(self) -> str:
        return self._url(self.standby_port, "postgresql+asyncpg")

    @property
    def primary_url(self) -> str:
        return self._url(self.primary_port, "postgresql")

    @property
    def standby_url(self) -> str:
        return self._url(self.standby_port, "postgresql")

    # ---- paths

    def _tmp(self) -> Path:
        if self.tmpdir is None:
            raise ReplicaSetError("PgReplicaSet is not started")
        return self.tmpdir

    @property
    def primary_datadir(self) -> Path:
        return self._tmp() / "primary"

    @property
    def standby_datadir(self) -> Path:
        return self._tmp() / "standby"

    @property
    def primary_log(self) -> Path:
        return self._tmp() / "primary.log"

    @property
    def standby_log(self) -> Path:
        return self._tmp() / "standby.log"

    def _bin(self, name: str) -> str:
        assert self._bindir is not None
        return str(self._bindir / name)

    # ---- lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        if self.tmpdir is not None:
            return self
        t0 = time.monotonic()
        self._bindir = _find_pg_bindir(self._bindir_arg)
        self._run_as = _run_as("postgres")
        self.tmpdir = _make_tmpdir("dal-pg-")
        atexit.register(self.stop)
        try:
            self._start_all()
        except BaseException:
            self._teardown(keep=self.keep_tmpdir)
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _start_all(self) -> None:
        tmp = self._tmp()
        _chown(tmp, self._run_as)
        self._env = _base_env(tmp)
        self.primary_port = free_port()
        self.standby_port = free_port()

        _run(
            [
                self._bin("initdb"), "-D", str(self.primary_datadir), "-U", self.user,
                "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            ],
            run_as=self._run_as, cwd=tmp, env=self._env, what="initdb",
        )  # fmt: skip
        self._write_primary_conf()
        self._primary = self._make_server("primary", self.primary_datadir, self.primary_port)
        self._spawn_pg(self._primary, self.primary_datadir, self.primary_port, "ready")

        self.primary_sql(f"CREATE DATABASE {self.database}", dbname="postgres")
        if self._has_pg_stat_statements():
            self.primary_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

        _run(
            [
                self._bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary_port),
                "-U", self.user, "-D", str(self.standby_datadir),
                "-R", "-X", "stream", "-c", "fast", "--no-sync", "--no-manifest",
                "-C", "-S", self.standby_name,  # slot: primary keeps WAL while standby is down
            ],
            run_as=self._run_as, cwd=tmp, env=self._env, what="pg_basebackup",
            timeout=self.startup_timeout,
        )  # fmt: skip
        self._standby = self._make_server("standby", self.standby_datadir, self.standby_port)
        self._spawn_pg(self._standby, self.standby_datadir, self.standby_port, "ready")
        self._wait_streaming()

    def _has_pg_stat_statements(self) -> bool:
        if self._pgss is None:
            self._pgss = self._find_pg_stat_statements()
        return self._pgss

    def _find_pg_stat_statements(self) -> bool:
        assert self._bindir is not None
        libdirs = [self._bindir.parent / "lib"]
        with contextlib.suppress(ReplicaSetError, OSError):
            libdirs.append(Path(_run([self._bin("pg_config"), "--pkglibdir"]).strip()))
        return any((d / "pg_stat_statements.so").is_file() for d in libdirs)

    def _write_primary_conf(self) -> None:
        conf: dict[str, str] = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self._tmp()}'",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "wal_keep_size": "128MB",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            # Default 5s: how long a standby waits before reconnecting to a restarted primary.
            "wal_retrieve_retry_interval": "100ms",
            "wal_receiver_status_interval": "1s",
            # Safe against a process kill (the page cache survives), just not an OS crash.
            # synchronous_commit stays on: an async commit could be lost on SIGKILL and
            # would not be covered by pg_current_wal_lsn() in wait_for_standby_catchup().
            "fsync": "off",
            "full_page_writes": "off",
            "jit": "off",
            # Keep DSM segments inside the data dir, so a SIGKILL cannot leak /dev/shm files.
            "dynamic_shared_memory_type": "mmap",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] %q%a@%d '",
            "timezone": "'UTC'",
        }
        if self._has_pg_stat_statements():
            conf["shared_preload_libraries"] = "'pg_stat_statements'"
        conf.update(self.extra_conf)
        lines = ["", "# dal test replica set"] + [f"{k} = {v}" for k, v in conf.items()]
        with open(self.primary_datadir / "postgresql.conf", "a") as fh:
            fh.write("\n".join(lines) + "\n")
        (self.primary_datadir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "local replication all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )

    def _make_server(self, role: str, datadir: Path, port: int) -> _Server:
        # On the standby cluster_name is also the walreceiver's application_name,
        # which _wait_streaming looks for in pg_stat_replication.
        cluster_name = self.standby_name if role == "standby" else "dal_primary"
        argv = [
            self._bin("postgres"), "-D", str(datadir), "-p", str(port),
            "-c", f"cluster_name={cluster_name}",
        ]  # fmt: skip
        return _Server(
            f"postgres {role}",
            argv,
            log_path=self._tmp() / f"{role}.log",
            cwd=self._tmp(),
            run_as=self._run_as,
            env=self._env,
            lifeline_signal="INT",  # fast shutdown (SIGTERM would be "smart")
        )

    def _spawn_pg(self, server: _Server, datadir: Path, port: int, want: str) -> None:
        if server.running:
            raise ReplicaSetError(f"{server.name} is already running")
        _drop_stale_pg_state(datadir, self._tmp(), port)
        server.spawn()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not server.running:
                raise ReplicaSetError(
                    _with_log(
                        f"{server.name} exited during startup (exit {server.returncode})",
                        server.log_path,
                    )
                )
            if _pg_status(datadir) == want:
                with contextlib.suppress(ReplicaSetError):
                    self._psql(port, "SELECT 1", dbname="postgres", timeout=5)
                    return
            if time.monotonic() > deadline:
                raise ReplicaSetError(
                    _with_log(
                        f"{server.name} on port {port} not {want!r} after "
                        f"{self.startup_timeout}s (status {_pg_status(datadir)!r})",
                        server.log_path,
                    )
                )
            time.sleep(_POLL)

    def _wait_streaming(self, timeout: float | None = None) -> None:
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if self.standby_sql("SELECT pg_is_in_recovery()", dbname="postgres") != "t":
            raise ReplicaSetError(_with_log("standby is not in recovery", self.standby_log))
        sql = (
            f"SELECT state FROM pg_stat_replication WHERE application_name = '{self.standby_name}'"
        )
        state = ""
        while True:
            with contextlib.suppress(ReplicaSetError):
                state = self.primary_sql(sql, dbname="postgres")
                if state == "streaming":
                    return
            if self._standby is None or not self._standby.running:
                raise ReplicaSetError("standby is not running")
            if time.monotonic() > deadline:
                raise ReplicaSetError(
                    _with_log(
                        f"standby not streaming after {timeout}s (state {state!r})",
                        self.standby_log,
                    )
                    + "\n"
                    + _with_log("primary log:", self.primary_log)
                )
            time.sleep(_POLL)

    def stop(self) -> None:
        """Stop both servers and remove the temp dir. Idempotent."""
        self._teardown(keep=self.keep_tmpdir)

    def _teardown(self, *, keep: bool) -> None:
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        servers = [s for s in (self._standby, self._primary) if s is not None]
        # Immediate shutdown: the data is thrown away anyway.
        for s in servers:
            s.send("QUIT")
        for s in servers:
            s.stop("QUIT", 30)
        tmp = self.tmpdir
        if tmp is not None:
            for datadir, port in (
                (tmp / "primary", self.primary_port),
                (tmp / "standby", self.standby_port),
            ):
                _drop_stale_pg_state(datadir, tmp, port)
            if keep:
                print(f"[PgReplicaSet] keeping {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        self._primary = self._standby = None
        self.tmpdir = None

    # ---- SQL

    def _psql(self, port: int, sql: str, *, dbname: str | None = None, timeout: float = 30) -> str:
        env = dict(self._env)
        env.update(PGCONNECT_TIMEOUT="5", PGSSLMODE="disable", PGAPPNAME="dal-test-admin")
        out = _run(
            [
                self._bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", "127.0.0.1", "-p", str(port), "-U", self.user,
                "-d", dbname or self.database, "-c", sql,
            ],
            env=env, timeout=timeout, what=f"psql on port {port}",
        )  # fmt: skip
        return out.strip()

    def primary_sql(self, sql: str, *, dbname: str | None = None) -> str:
        """Run SQL on the primary with psql; rows on lines, columns split by '|'."""
        return self._psql(self.primary_port, sql, dbname=dbname)

    def standby_sql(self, sql: str, *, dbname: str | None = None) -> str:
        return self._psql(self.standby_port, sql, dbname=dbname)

    # ---- fault injection

    def _node(self, which: str) -> tuple[_Server, Path, int]:
        if which == "primary":
            server, datadir, port = self._primary, self.primary_datadir, self.primary_port
        else:
            server, datadir, port = self._standby, self.standby_datadir, self.standby_port
        if server is None:
            raise ReplicaSetError("PgReplicaSet is not started")
        return server, datadir, port

    def kill_primary(self) -> None:
        """SIGKILL the primary postmaster (its backends die with it)."""
        server, datadir, port = self._node("primary")
        server.kill()
        _drop_stale_pg_state(datadir, self._tmp(), port)

    def start_primary(self, *, wait_for_standby: bool = True) -> None:
        """Restart the primary on the same port (crash recovery if it was killed)."""
        server, datadir, port = self._node("primary")
        self._spawn_pg(server, datadir, port, "ready")
        if wait_for_standby and self._standby is not None and self._standby.running:
            self._wait_streaming()

    def kill_standby(self) -> None:
        server, datadir, port = self._node("standby")
        server.kill()
        _drop_stale_pg_state(datadir, self._tmp(), port)

    def start_standby(self, *, wait_streaming: bool = True) -> None:
        server, datadir, port = self._node("standby")
        self._spawn_pg(server, datadir, port, "ready")
        if wait_streaming and self._primary is not None and self._primary.running:
            self._wait_streaming()

    def pause_replay(self, timeout: float = 10.0) -> None:
        """Stop applying WAL on the standby (WAL keeps streaming in)."""
        self.standby_sql("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + timeout
        while self.standby_sql("SELECT pg_get_wal_replay_pause_state()") != "paused":
            if time.monotonic() > deadline:
                raise ReplicaSetError(f"standby replay not paused after {timeout}s")
            time.sleep(_POLL)

    def resume_replay(self) -> None:
        self.standby_sql("SELECT pg_wal_replay_resume()")

    def wait_for_standby_catchup(self, timeout: float = 30.0) -> None:
        """Block until the standby has replayed everything written on the primary so far."""
        target = self.primary_sql("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        replayed = ""
        while True:
            with contextlib.suppress(ReplicaSetError):
                replayed = self.standby_sql("SELECT pg_last_wal_replay_lsn()")
                if (
                    replayed
                    and self.standby_sql(f"SELECT '{replayed}'::pg_lsn >= '{target}'::pg_lsn")
                    == "t"
                ):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"standby replayed up to {replayed or '?'}, primary is at {target} "
                    f"after {timeout}s"
                )
            time.sleep(_POLL)


# --------------------------------------------------------------------------- MariaDB


def _find_mariadb() -> tuple[str, str, str]:
    def first(*names: str) -> str | None:
        for n in names:
            if os.path.isabs(n):
                if os.access(n, os.X_OK):
                    return n
            elif found := shutil.which(
                n,
                path="/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin:"
                + os.environ.get("PATH", ""),
            ):
                return found
        return None

    server = first(os.environ.get("DAL_MARIADBD", "") or "mariadbd", "mysqld")
    install = first("mariadb-install-db", "mysql_install_db")
    client = first("mariadb", "mysql")
    missing = [
        n
        for n, p in (("mariadbd", server), ("mariadb-install-db", install), ("mariadb", client))
        if p is None
    ]
    if missing or server is None or install is None or client is None:
        raise MissingBinaryError(
            f"MariaDB binaries not found: {', '.join(missing)}. Install mariadb-server and "
            "mariadb-client (Debian: apt-get install mariadb-server) or set DAL_MARIADBD."
        )
    return server, install, client


def _parse_gtid_pos(pos: str) -> dict[int, int]:
    """'0-1-42,1-2-7' -> {domain: seq_no}."""
    out: dict[int, int] = {}
    for part in pos.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        domain, _server, seq = part.split("-")
        out[int(domain)] = max(out.get(int(domain), 0), int(seq))
    return out


class MariaDBReplicaSet:
    """MariaDB primary + read-only GTID replica on free loopback ports."""

    database = "test"
    user = "root"

    def __init__(
        self,
        *,
        startup_timeout: float = 60.0,
        keep_tmpdir: bool | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.startup_timeout = startup_timeout
        self.keep_tmpdir = _keep_tmpdir_default() if keep_tmpdir is None else keep_tmpdir
        self.extra_args = list(extra_args)
        self.tmpdir: Path | None = None
        self.primary_port = 0
        self.replica_port = 0
        self.startup_seconds: float | None = None
        self._mariadbd = self._install_db = self._client = ""
        self._run_as: _RunAs = None
        self._primary: _Server | None = None
        self._replica: _Server | None = None
        self._env: dict[str, str] = {}

    # ---- URLs

    def _url(self, port: int, scheme: str) -> str:
        return f"{scheme}://{self.user}@127.0.0.1:{port}/{self.database}"

    @property
    def primary_dsn(self) -> str:
        return self._url(self.primary_port, "mysql+aiomysql")

    @property
    def replica_dsn(self) -> str:
        return self._url(self.replica_port, "mysql+aiomysql")

    @property
    def primary_url(self) -> str:
        return self._url(self.primary_port, "mysql")

    @property
    def replica_url(self) -> str:
        return self._url(self.replica_port, "mysql")

    # ---- paths

    def _tmp(self) -> Path:
        if self.tmpdir is None:
            raise ReplicaSetError("MariaDBReplicaSet is not started")
        return self.tmpdir

    @property
    def primary_log(self) -> Path:
        return self._tmp() / "primary.log"

    @property
    def replica_log(self) -> Path:
        return self._tmp() / "replica.log"

    # ---- lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        if self.tmpdir is not None:
            return self
        t0 = time.monotonic()
        self._mariadbd, self._install_db, self._client = _find_mariadb()
        self._run_as = _run_as("mysql")
        self.tmpdir = _make_tmpdir("dal-mariadb-")
        atexit.register(self.stop)
        try:
            self._start_all()
        except BaseException:
            self._teardown(keep=self.keep_tmpdir)
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    _INNODB_ARGS = ("--innodb-log-file-size=16M", "--innodb-buffer-pool-size=64M")

    def _start_all(self) -> None:
        tmp = self._tmp()
        _chown(tmp, self._run_as)
        self._env = _base_env(tmp)
        self.primary_port = free_port()
        self.replica_port = free_port()

        primary_dir = tmp / "primary"
        user_args = ["--user=" + pwd.getpwuid(self._run_as[0]).pw_name] if self._run_as else []
        _run(
            [
                self._install_db, "--no-defaults", f"--datadir={primary_dir}", *user_args,
                "--auth-root-authentication-method=normal",  # root@127.0.0.1 without password
                "--skip-test-db", "--skip-name-resolve", *self._INNODB_ARGS,
            ],
            cwd=tmp, env=self._env, what="mariadb-install-db", timeout=self.startup_timeout,
        )  # fmt: skip
        # Cloning the freshly installed datadir is faster than a second install, and
        # MariaDB has no per-server UUID that would clash.
        _run(["cp", "-a", str(primary_dir), str(tmp / "replica")], what="cp datadir")

        self._primary = self._make_server("primary", server_id=1, port=self.primary_port)
        self._replica = self._make_server("replica", server_id=2, port=self.replica_port)
        offsets = {s.name: s.log_offset() for s in (self._primary, self._replica)}
        for s in (self._primary, self._replica):
            self._prepare_spawn(s)
            s.spawn()
        for s, port in ((self._primary, self.primary_port), (self._replica, self.replica_port)):
            self._wait_ready(s, port, offsets[s.name])

        self.replica_sql(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', "
            f"MASTER_PORT={self.primary_port}, MASTER_USER='root', MASTER_PASSWORD='', "
            "MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1; START SLAVE;",
            database=None,
        )
        self.primary_sql(
            f"CREATE DATABASE IF NOT EXISTS `{self.database}` "
            "CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci",
            database=None,
        )
        self.wait_for_replica_catchup(self.startup_timeout)
        if self.replica_sql(f"SHOW DATABASES LIKE '{self.database}'", database=None) != (
            self.database
        ):
            raise ReplicaSetError(f"database {self.database!r} did not replicate")

    def _make_server(self, role: str, *, server_id: int, port: int) -> _Server:
        tmp = self._tmp()
        argv = [
            self._mariadbd, "--no-defaults",
            f"--datadir={tmp / role}", f"--tmpdir={tmp}",
            f"--port={port}", "--bind-address=127.0.0.1",
            f"--socket={tmp / role}.sock", f"--pid-file={tmp / role}.pid",
            f"--server-id={server_id}",
            "--log-bin=mysql-bin", "--relay-log=relay-bin", "--binlog-format=ROW",
            "--gtid-strict-mode=ON", "--log-slave-updates",
            "--skip-name-resolve", *self._INNODB_ARGS,
            # Durable against a process kill (data sits in the page cache), not an OS crash.
            "--innodb-flush-log-at-trx-commit=2", "--sync-binlog=0",
            "--performance-schema=OFF",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            "--max-connections=200",
        ]  # fmt: skip
        if role == "replica":
            # (replication is started by hand: at set-up, and after a restart once the
            # applied position is checked, see start_replica)
            argv += ["--read-only=ON", "--skip-slave-start"]
        argv += self.extra_args
        return _Server(
            f"mariadbd {role}",
            argv,
            log_path=tmp / f"{role}.log",
            cwd=tmp,
            run_as=self._run_as,
            env=self._env,
            lifeline_signal="TERM",
        )

    def _prepare_spawn(self, server: _Server) -> None:
        sock = Path(next(a for a in server.argv if a.startswith("--socket=")).split("=", 1)[1])
        for p in (sock, Path(f"{sock}.lock")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _wait_ready(self, server: _Server, port: int, log_offset: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not server.running:
                raise ReplicaSetError(
                    _with_log(
                        f"{server.name} exited during startup (exit {server.returncode})",
                        server.log_path,
                    )
                )
            try:
                with open(server.log_path, "rb") as fh:
                    fh.seek(log_offset)
                    ready = b"ready for connections" in fh.read()
            except OSError:
                ready = False
            if ready:
                with contextlib.suppress(ReplicaSetError):
                    self._sql(port, "SELECT 1", database=None, timeout=5)
                    return
            if time.monotonic() > deadline:
                raise ReplicaSetError(
                    _with_log(
                        f"{server.name} on port {port} not ready after {self.startup_timeout}s",
                        server.log_path,
                    )
                )
            time.sleep(_POLL)

    def stop(self) -> None:
        """Stop both servers and remove the temp dir. Idempotent."""
        self._teardown(keep=self.keep_tmpdir)

    def _teardown(self, *, keep: bool) -> None:
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        servers = [s for s in (self._replica, self._primary) if s is not None]
        if keep:
            for s in servers:
                s.send("TERM")
            for s in servers:
                s.stop("TERM", 30)
        else:
            # The data is thrown away, so skip InnoDB's shutdown work.
            for s in servers:
                s.kill()
        tmp = self.tmpdir
        if tmp is not None:
            if keep:
                print(f"[MariaDBReplicaSet] keeping {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        self._primary = self._replica = None
        self.tmpdir = None

    # ---- SQL

    def _sql(
        self,
        port: int,
        sql: str,
        *,
        database: str | None = "",
        timeout: float = 30,
        column_names: bool = False,
    ) -> str:
        db = self.database if database == "" else database
        argv = [
            self._client, "--no-defaults", "--protocol=TCP", "-h127.0.0.1", f"-P{port}",
            f"-u{self.user}", "--batch", "--connect-timeout=5", "-e", sql,
        ]  # fmt: skip
        if not column_names:
            argv.insert(-2, "--skip-column-names")
        if db:
            argv.append(db)
        return _run(argv, env=self._env, timeout=timeout, what=f"mariadb on port {port}").strip()

    def primary_sql(self, sql: str, *, database: str | None = "") -> str:
        """Run SQL on the primary with the mariadb CLI; rows on lines, columns tab-split.

        ``database=""`` means the ``test`` database, ``None`` means none selected.
        """
        return self._sql(self.primary_port, sql, database=database)

    def replica_sql(self, sql: str, *, database: str | None = "") -> str:
        return self._sql(self.replica_port, sql, database=database)

    def replica_status(self) -> dict[str, str]:
        """SHOW SLAVE STATUS on the replica as a dict (empty if not configured)."""
        out = self._sql(
            self.replica_port, "SHOW SLAVE STATUS", database=None, column_names=True
        ).splitlines()
        if len(out) < 2:
            return {}
        return dict(zip(out[0].split("\t"), out[1].split("\t"), strict=False))

    # ---- fault injection

    def _node(self, which: str) -> tuple[_Server, int]:
        if which == "primary":
            server, port = self._primary, self.primary_port
        else:
            server, port = self._replica, self.replica_port
        if server is None:
            raise ReplicaSetError("MariaDBReplicaSet is not started")
        return server, port

    def _restart(self, which: str) -> None:
        server, port = self._node(which)
        if server.running:
            raise ReplicaSetError(f"{server.name} is already running")
        offset = server.log_offset()
        self._prepare_spawn(server)
        server.spawn()
        self._wait_ready(server, port, offset)

    def _wait_io_running(self, timeout: float | None = None) -> None:
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        status: dict[str, str] = {}
        while True:
            with contextlib.suppress(ReplicaSetError):
                status = self.replica_status()
                if status.get("Slave_IO_Running") == "Yes":
                    return
            if time.monotonic() > deadline:
                raise ReplicaSetError(
                    f"replica IO thread not running after {timeout}s: "
                    f"{status.get('Slave_IO_State')!r} {status.get('Last_IO_Error')!r}"
                )
            time.sleep(_POLL)

    def kill_primary(self) -> None:
        server, _ = self._node("primary")
        server.kill()

    def start_primary(self, *, wait_for_replica: bool = True) -> None:
        """Restart the primary on the same port; the replica reconnects within ~1s."""
        self._restart("primary")
        if wait_for_replica and self._replica is not None and self._replica.running:
            self._wait_io_running()

    def kill_replica(self) -> None:
        server, _ = self._node("replica")
        server.kill()

    def start_replica(self, *, wait_io_running: bool = True) -> None:
        """Restart the replica on the same port, and replication with it."""
        self._restart("replica")
        # A replica killed between applying a transaction (a DDL, whose position is
        # recorded in a step of its own) and recording its position has it in its own
        # binlog (log_slave_updates) but not in gtid_slave_pos: it would apply it
        # again, which gtid strict mode refuses ("out-of-order sequence number"),
        # and replication would stop. Its binlog says what it applied.
        binlog = self.replica_sql("SELECT @@gtid_binlog_pos", database=None)
        applied = _parse_gtid_pos(self.replica_sql("SELECT @@gtid_slave_pos", database=None))
        logged = _parse_gtid_pos(binlog)
        if logged != applied and all(logged.get(d, -1) >= n for d, n in applied.items()):
            self.replica_sql(f"SET GLOBAL gtid_slave_pos = '{binlog}'", database=None)
        self.replica_sql("START SLAVE", database=None)
        if wait_io_running and self._primary is not None and self._primary.running:
            self._wait_io_running()

    def pause_replication(self) -> None:
        """Stop applying events on the replica (the IO thread keeps fetching)."""
        self.replica_sql("STOP SLAVE SQL_THREAD", database=None)

    def resume_replication(self) -> None:
        self.replica_sql("START SLAVE SQL_THREAD", database=None)

    def wait_for_replica_catchup(self, timeout: float = 30.0) -> None:
        """Block until the replica has applied every GTID the primary has binlogged so far."""
        target = _parse_gtid_pos(self.primary_sql("SELECT @@gtid_binlog_pos", database=None))
        deadline = time.monotonic() + timeout
        current: dict[int, int] = {}
        while True:
            with contextlib.suppress(ReplicaSetError):
                current = _parse_gtid_pos(
                    self.replica_sql("SELECT @@gtid_slave_pos", database=None)
                )
                if all(current.get(d, -1) >= seq for d, seq in target.items()):
                    return
            if time.monotonic() > deadline:
                status: dict[str, str] = {}
                with contextlib.suppress(ReplicaSetError):
                    status = self.replica_status()
                details = {
                    k: status.get(k)
                    for k in (
                        "Slave_IO_Running", "Slave_SQL_Running", "Last_IO_Error",
                        "Last_SQL_Error", "Slave_SQL_Running_State",
                    )
                }  # fmt: skip
                raise TimeoutError(
                    f"replica at {current}, primary at {target} after {timeout}s; {details}\n"
                    + _with_log("replica log:", self.replica_log)
                )
            time.sleep(_POLL)


# --------------------------------------------------------------------------- reaper


def _children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the comm field may contain spaces/parens; ppid follows the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def _reaper_main(argv: list[str]) -> int:
    """Run ``cmd`` and reap it plus every orphan it leaves behind.

    argv: UID GID CWD LOG LIFELINE_SIGNAL -- CMD...   (UID -1 = don't switch user)
    stdin: lines naming a signal to forward to CMD (e.g. "KILL"); EOF = our parent
    died, so stop CMD with LIFELINE_SIGNAL (SIGKILL after 20s).
    """
    sep = argv.index("--")
    uid, gid, cwd, log_path, lifeline = argv[:sep]
    cmd = argv[sep + 1 :]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)

    pid = os.fork()
    if pid == 0:
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.dup2(null_fd, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            if int(uid) >= 0:
                os.setgroups([])
                os.setgid(int(gid))
                os.setuid(int(uid))
            os.chdir(cwd)
            os.execv(cmd[0], cmd)
        except BaseException as exc:
            os.write(2, f"reaper: cannot exec {cmd}: {exc!r}\n".encode())
        os._exit(127)

    os.close(null_fd)
    os.close(log_fd)
    sys.stdout.write(f"{pid}\n")
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)

    status: int | None = None
    stdin_open = True
    buf = b""
    kill_at: float | None = None
    while True:
        try:
            while True:
                done, st = os.waitpid(-1, os.WNOHANG)
                if done == 0:
                    break
                if done == pid:
                    status = st
        except ChildProcessError:
            break  # the server and every orphan it left are gone
        if status is not None:
            # The server is gone; whatever it left behind is now ours. Finish it off.
            for kid in _children_of(os.getpid()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)
        elif kill_at is not None and time.monotonic() > kill_at:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        fds = [wake_r, 0] if stdin_open else [wake_r]
        ready, _, _ = select.select(fds, [], [], 0.5)
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
        if 0 in ready:
            data = os.read(0, 512)
            if not data:
                stdin_open = False
                names = [lifeline]
                kill_at = time.monotonic() + 20
            else:
                buf += data
                *lines, rest = buf.split(b"\n")
                buf = rest
                names = [ln.decode().strip() for ln in lines if ln.strip()]
            for name in names:
                if status is None:
                    with contextlib.suppress(ProcessLookupError, KeyError):
                        os.kill(pid, signal.Signals["SIG" + name.upper()])
    if status is None:
        return 1
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # shell convention for "killed by signal"


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--reap":
    sys.exit(_reaper_main(sys.argv[2:]))
