#!/usr/bin/env python3
"""Make sure the servers the test suite needs are reachable.

Runs before anything else is known to work, so it uses the standard library
only.  For each of PostgreSQL, MariaDB and Redis it:

1. reads the URL from its environment variable (defaults on loopback),
2. probes the server at the protocol level,
3. if it is down and the URL is on loopback at the standard port, starts the
   locally installed server, or else, when a Docker engine is running, the
   matching service of ``docker/compose.yml``, and waits for it,
4. otherwise reports it as MISSING.

It prints one line per service (``ok`` / ``started`` / ``MISSING``) and exits 1
if any server is missing.  It never skips a server and never stops anything.
When a ``psql`` / ``mariadb`` client is installed it also creates the test
database named in the URL if it does not exist yet.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker" / "compose.yml"

CONNECT_TIMEOUT = 3.0
POLL_INTERVAL = 0.5
DOCKER_EXTRA_WAIT = 60.0  # a fresh container initialises its data dir first

_DB_NAME_RE = re.compile(r"^[A-Za-z0-9_$-]{1,63}$")


# --------------------------------------------------------------------------
# URLs


@dataclass(frozen=True)
class Target:
    name: str  # "postgresql" | "mariadb" | "redis"
    env_var: str
    url: str
    host: str
    port: int
    user: str | None
    password: str | None
    database: str | None
    standard_port: int
    compose_service: str

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user, _, _ = userinfo.partition(":")
    return SplitResult(
        parts.scheme, f"{user}:***@{hostinfo}", parts.path, parts.query, parts.fragment
    ).geturl()


def parse_target(
    name: str,
    env_var: str,
    default_url: str,
    standard_port: int,
    compose_service: str,
) -> Target:
    url = os.environ.get(env_var, "").strip() or default_url
    try:
        parts = urlsplit(url)
        port = parts.port or standard_port
    except ValueError as exc:
        raise SystemExit(f"error: {env_var}={mask_url(url)!r} is not a valid URL: {exc}") from None
    host = parts.hostname or ""
    if not host:
        # libpq style: postgresql:///test?host=/run/postgresql -> use the query.
        host = parse_qs(parts.query).get("host", ["127.0.0.1"])[0]
    database: str | None = unquote(parts.path.lstrip("/")) or None
    return Target(
        name=name,
        env_var=env_var,
        url=url,
        host=host,
        port=port,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        database=database,
        standard_port=standard_port,
        compose_service=compose_service,
    )


def targets() -> list[Target]:
    return [
        parse_target(
            "postgresql",
            "DAL_TEST_PG_URL",
            "postgresql://postgres@127.0.0.1:5432/test",
            5432,
            "postgres",
        ),
        parse_target(
            "mariadb",
            "DAL_TEST_MYSQL_URL",
            "mysql://root@127.0.0.1:3306/test",
            3306,
            "mariadb",
        ),
        parse_target(
            "redis",
            "DAL_TEST_REDIS_URL",
            "redis://127.0.0.1:6379/0",
            6379,
            "redis",
        ),
    ]


# --------------------------------------------------------------------------
# Probes
#
# A probe returns (state, detail):
#   "up"   - the server answers its protocol,
#   "down" - nothing accepts connections (or it is still starting up),
#   "bad"  - something answers but not as expected; starting a server would
#            not help (the port is taken or authentication is wrong).

Probe = tuple[str, str]


def _connect(target: Target) -> socket.socket:
    if target.host.startswith("/"):  # Unix socket directory (libpq style)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(os.path.join(target.host, f".s.PGSQL.{target.port}"))
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection((target.host, target.port), timeout=CONNECT_TIMEOUT)


def _talk(target: Target, what: str, conversation: Callable[[socket.socket], Probe]) -> Probe:
    """Connect, then run ``conversation``; classify network failures."""
    try:
        sock = _connect(target)
    except OSError as exc:
        return "down", str(exc) or type(exc).__name__
    with sock:
        try:
            return conversation(sock)
        except TimeoutError:
            return "bad", (
                f"it accepts connections, yet no {what} came within {CONNECT_TIMEOUT:.0f} s "
                "(another kind of server on this port?)"
            )
        except OSError as exc:  # includes ConnectionError: closed/reset mid-handshake
            return "down", f"connection dropped: {exc}"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by server")
        buf += chunk
    return buf


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n") and len(buf) < 4096:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("connection closed by server")
        buf += chunk
    return buf.rstrip(b"\r\n")


def probe_postgresql(target: Target) -> Probe:
    pg_isready = shutil.which("pg_isready")
    if pg_isready:
        cmd = [pg_isready, "-h", target.host, "-p", str(target.port), "-t", "3"]
        if target.user:
            cmd += ["-U", target.user]
        if target.database:
            cmd += ["-d", target.database]
        try:
            res = subprocess.run(
                cmd, capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return "down", "pg_isready timed out"
        detail = (res.stdout + res.stderr).strip()
        if res.returncode == 0:
            return "up", detail
        # 1 = rejecting connections (e.g. starting up), 2 = no response, 3 = bad args
        if res.returncode == 3:
            return "bad", detail
        return "down", detail

    # No pg_isready: send an SSLRequest; any PostgreSQL answers 'S' or 'N'.
    def conversation(sock: socket.socket) -> Probe:
        sock.sendall(struct.pack("!II", 8, 80877103))
        reply = _recv_exact(sock, 1)
        if reply in (b"S", b"N"):
            return "up", "answered SSLRequest"
        return "bad", f"unexpected reply to SSLRequest: {reply!r}"

    return _talk(target, "reply to an SSLRequest", conversation)


def probe_mariadb(target: Target) -> Probe:
    def conversation(sock: socket.socket) -> Probe:
        header = _recv_exact(sock, 4)
        length = header[0] | header[1] << 8 | header[2] << 16
        payload = _recv_exact(sock, min(length, 1024))
        if not payload:
            return "bad", "empty greeting packet"
        if payload[0] == 0x0A:  # protocol version 10 handshake
            version = payload[1:].split(b"\0", 1)[0].decode("latin-1", "replace")
            return "up", f"server {version}"
        if payload[0] == 0xFF:  # ERR packet, e.g. "Host ... is not allowed to connect"
            code = int.from_bytes(payload[1:3], "little") if len(payload) >= 3 else 0
            message = payload[3:].decode("utf-8", "replace")
            if code == 1040:  # too many connections: up, just busy
                return "up", message
            return "bad", f"server refused: error {code} {message}"
        return "bad", f"not a MySQL/MariaDB greeting (first byte {payload[0]:#x})"

    return _talk(target, "server greeting", conversation)


def _resp_command(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def probe_redis(target: Target) -> Probe:
    def conversation(sock: socket.socket) -> Probe:
        if target.password is not None:
            auth = ["AUTH", target.password]
            if target.user:
                auth.insert(1, target.user)
            sock.sendall(_resp_command(*auth))
            reply = _read_line(sock)
            if not reply.startswith(b"+OK"):
                return "bad", "AUTH failed: " + reply.decode("utf-8", "replace")
        sock.sendall(b"PING\r\n")
        reply = _read_line(sock)
        if reply == b"+PONG":
            return "up", "PONG"
        text = reply.decode("utf-8", "replace")
        if reply.startswith(b"-LOADING"):
            return "down", text  # still loading its dataset
        return "bad", f"unexpected reply to PING: {text!r}"

    return _talk(target, "reply to PING", conversation)


PROBES: dict[str, Callable[[Target], Probe]] = {
    "postgresql": probe_postgresql,
    "mariadb": probe_mariadb,
    "redis": probe_redis,
}


# --------------------------------------------------------------------------
# Starting servers


def run_logged(
    cmd: list[str] | str, *, shell: bool = False, timeout: float = 120
) -> tuple[int, str]:
    """Run a command; return (exit code, combined output).

    Output goes to a temporary file rather than a pipe so that a daemon which
    inherits the descriptors cannot keep us (or make, or CI) waiting for EOF.
    """
    with tempfile.TemporaryFile() as out:
        try:
            res = subprocess.run(
                cmd,
                shell=shell,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                start_new_session=True,
            )
            code = res.returncode
        except subprocess.TimeoutExpired:
            code = -1
        except OSError as exc:
            return 127, str(exc)
        out.seek(0)
        text = out.read().decode("utf-8", "replace").strip()
    if code == -1:
        text = (text + f"\n(timed out after {timeout:.0f} s)").strip()
    return code, text


def local_start_command(target: Target) -> tuple[list[str] | str, bool] | None:
    """The command that starts this machine's installed server (and whether it
    needs a shell), or None when the server is not installed here."""
    if target.name == "postgresql" and Path("/etc/postgresql").is_dir():
        if not shutil.which("pg_ctlcluster"):
            return None
        return "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start", True
    if target.name == "mariadb" and Path("/usr/sbin/mariadbd").exists():
        if not shutil.which("start-stop-daemon"):
            return None
        argv = ["start-stop-daemon", "--start", "--oknodo", "--background"]
        return [*argv, "--exec", "/usr/sbin/mariadbd"], False
    if target.name == "redis" and shutil.which("redis-server"):
        argv = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1"]
        argv += ["--port", str(target.port), "--save", "", "--appendonly", "no"]
        argv += ["--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]
        return argv, False
    return None


def prepare_local_start(target: Target) -> None:
    """Recreate runtime directories a reboot may have removed (best effort)."""
    try:
        if target.name == "mariadb":
            run_dir = Path("/run/mysqld")
            if not run_dir.exists():
                run_dir.mkdir(parents=True)
                shutil.chown(run_dir, "mysql", "mysql")
        elif target.name == "redis":
            Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
            Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    except (OSError, LookupError):
        pass


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    code, _ = run_logged(["docker", "info"], timeout=30)
    return code == 0


def wait_until_up(target: Target, timeout: float) -> Probe:
    deadline = time.monotonic() + timeout
    state, detail = PROBES[target.name](target)
    while state != "up" and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
        state, detail = PROBES[target.name](target)
    return state, detail


@dataclass
class Outcome:
    target: Target
    status: str  # "ok" | "started" | "MISSING"
    notes: list[str]


def ensure(target: Target, timeout: float) -> Outcome:
    notes: list[str] = []
    state, detail = PROBES[target.name](target)
    if state == "up":
        return Outcome(target, "ok", notes)
    if state == "bad":
        notes.append(f"{target.address} answers, but not as expected: {detail}")
        return Outcome(target, "MISSING", notes)
    notes.append(f"not reachable: {detail}" if detail else "not reachable")

    if not target.is_loopback:
        notes.append("not on loopback, so not started from here")
        return Outcome(target, "MISSING", notes)
    if target.port != target.standard_port:
        notes.append(
            f"only the standard port {target.standard_port} is started automatically; "
            f"start a server on port {target.port} yourself"
        )
        return Outcome(target, "MISSING", notes)

    local = local_start_command(target)
    if local is not None:
        cmd, shell = local
        shown = cmd if isinstance(cmd, str) else " ".join(a or '""' for a in cmd)
        print(f"{target.name} {target.address} starting: {shown}", flush=True)
        prepare_local_start(target)
        code, output = run_logged(cmd, shell=shell)
        if code != 0:
            notes.append(
                f"start command exited {code}: {output}"
                if output
                else f"start command exited {code}"
            )
        state, detail = wait_until_up(target, timeout)
        if state == "up":
            return Outcome(target, "started", notes)
        notes.append(f"still not reachable after {timeout:.0f} s: {detail}")
    else:
        notes.append("no local installation found to start")

    if docker_available():
        cmd_list = [
            "docker",
            "compose",
            "-f",
            str(COMPOSE_FILE),
            "up",
            "-d",
            target.compose_service,
        ]
        print(f"{target.name} {target.address} starting: {' '.join(cmd_list)}", flush=True)
        code, output = run_logged(cmd_list, timeout=600)
        if code != 0:
            notes.append(f"docker compose exited {code}: {output}")
        else:
            state, detail = wait_until_up(target, timeout + DOCKER_EXTRA_WAIT)
            if state == "up":
                return Outcome(target, "started", notes)
            notes.append(f"docker service still not reachable: {detail}")
    else:
        notes.append("no running Docker engine (`docker info` failed or docker is absent)")
    return Outcome(target, "MISSING", notes)


# --------------------------------------------------------------------------
# Test databases


def ensure_database(target: Target) -> str | None:
    """Create the URL's database if a CLI client is installed; return a status line."""
    db = target.database
    if target.name == "redis" or not db:
        return None
    if not _DB_NAME_RE.match(db):
        return f"WARNING: {target.name} database name {db!r} is unusual; not checked"
    if target.name == "postgresql":
        return _ensure_pg_database(target, db)
    return _ensure_mariadb_database(target, db)


def _ensure_pg_database(target: Target, db: str) -> str | None:
    psql = shutil.which("psql")
    if not psql:
        return None
    env = dict(os.environ)
    if target.password is not None:
        env["PGPASSWORD"] = target.password
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    base = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", target.host, "-p", str(target.port)]
    if target.user:
        base += ["-U", target.user]
    check = f"SELECT 1 FROM pg_database WHERE datname = '{db}'"
    last_error = ""
    for maintenance_db in ("postgres", "template1"):
        cmd = [*base, "-d", maintenance_db, "-tAc", check]
        res = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL
        )
        if res.returncode != 0:
            last_error = res.stderr.strip()
            continue
        if res.stdout.strip() == "1":
            return f"postgresql database {db} ok"
        res = subprocess.run(
            [*base, "-d", maintenance_db, "-c", f'CREATE DATABASE "{db}"'],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode == 0:
            return f"postgresql database {db} created"
        return f"WARNING: could not create postgresql database {db}: {res.stderr.strip()}"
    return f"WARNING: could not check postgresql database {db} with psql: {last_error}"


def _ensure_mariadb_database(target: Target, db: str) -> str | None:
    client = shutil.which("mariadb") or shutil.which("mysql")
    if not client:
        return None
    env = dict(os.environ)
    if target.password is not None:
        env["MYSQL_PWD"] = target.password
    cmd = [
        client,
        "--no-defaults",
        "--protocol=TCP",
        "--connect-timeout=10",
        "-h", target.host,
        "-P", str(target.port),
        "-u", target.user or "root",
        "-N", "-B",
        "-e", f"SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{db}'",
    ]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL
    )
    if res.returncode != 0:
        return f"WARNING: could not check mariadb database {db}: {res.stderr.strip()}"
    if res.stdout.strip() not in ("", "0"):
        return f"mariadb database {db} ok"
    cmd[-1] = f"CREATE DATABASE IF NOT EXISTS `{db}`"
    res = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL
    )
    if res.returncode == 0:
        return f"mariadb database {db} created"
    return f"WARNING: could not create mariadb database {db}: {res.stderr.strip()}"


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a server after starting it (default: 60)",
    )
    args = parser.parse_args(argv)

    outcomes: list[Outcome] = []
    for target in targets():
        outcome = ensure(target, args.timeout)
        outcomes.append(outcome)
        print(f"{target.name} {target.address} {outcome.status}", flush=True)
        if outcome.status != "MISSING":
            try:
                line = ensure_database(target)
            except (OSError, subprocess.SubprocessError) as exc:
                line = f"WARNING: could not check the {target.name} database: {exc}"
            if line:
                print(line, flush=True)

    missing = [o for o in outcomes if o.status == "MISSING"]
    if not missing:
        return 0
    print("", file=sys.stderr)
    print("error: the tests need these servers, which are not reachable:", file=sys.stderr)
    for o in missing:
        t = o.target
        print(f"  - {t.name} at {t.masked_url}", file=sys.stderr)
        for note in o.notes:
            print(f"      {note}", file=sys.stderr)
        print(
            f"    start it, or set {t.env_var} to the URL of a running {t.name} server",
            file=sys.stderr,
        )
    print(
        f"  (where Docker is available: docker compose -f {COMPOSE_FILE.relative_to(REPO_ROOT)} up -d)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
