"""Applying migrations to every shard database's primary, safely and resumably.

Per shard database, on one dedicated connection to its primary:

1. refuse a node that is read-only or in recovery (a replica given as a primary);
2. take the migration lock for the whole run: ``pg_advisory_lock`` on
   PostgreSQL, ``GET_LOCK('dal_migrate:<schema>')`` on MySQL/MariaDB, an
   exclusive ``flock`` beside the file on SQLite. A second ``dal migrate``
   waits up to ``lock_timeout`` seconds, then exits saying who holds it;
3. read the applied versions from ``dal_schema_migrations`` (created if missing);
4. apply each pending migration. On PostgreSQL and SQLite a migration's DDL and
   its bookkeeping row commit in one transaction. MySQL DDL commits as it goes,
   so every step (one statement) is recorded in ``dal_schema_migration_steps``
   as it completes, after a row marking the migration's run as started; a
   rerun skips recorded steps and, for the step that was running when the
   process died (the first unrecorded one, while the marker is there), asks its
   probe (does the table/column/index exist?) whether it already took effect.
   A statement the server rejects clears the marker: it had no effect, so the
   next run executes it again rather than trusting a probe.

``status`` and ``--sql`` only read: they create no table (and no SQLite file).

Shard databases are migrated concurrently and independently: one that is
unreachable or fails does not stop the others; the run reports it and exits
non-zero, and a later run brings it up to date.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import os
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from dal.backends import Connection, connector_for
from dal.config import Config, DatabaseSpec
from dal.errors import ConnectionUnavailableError, DalError
from dal.migrate.ops import MigrationError, Probe, Step, expand
from dal.migrate.scripts import Migration
from dal.schema import placements_for
from dal.sql import Compiled, compile_statement, make_dialect

VERSIONS_TABLE = "dal_schema_migrations"
STEPS_TABLE = "dal_schema_migration_steps"

_md = sa.MetaData()
_versions = sa.Table(
    VERSIONS_TABLE, _md,
    sa.Column("version", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("applied_at", sa.String(32), nullable=False),
)
_steps = sa.Table(
    STEPS_TABLE, _md,
    sa.Column("version", sa.String(32), primary_key=True),
    sa.Column("direction", sa.String(8), primary_key=True),
    sa.Column("step", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(255), nullable=False),
)

_RUNNING = -1
"""Step number of the row marking that a run of a migration started (MySQL)."""

Direction = Literal["up", "down"]
ProgressFn = Callable[[str, str], None]
"""Called with (database, step description) after each step."""


class LockTimeoutError(MigrationError):
    """Another ``dal migrate`` holds the lock of a shard database."""


class ReadOnlyNodeError(MigrationError):
    """The configured primary is read-only or a standby in recovery."""


@dataclass
class DatabaseResult:
    database: str
    node: str
    applied: list[str] = field(default_factory=list)
    statements: int = 0
    tables: set[str] = field(default_factory=set)
    error: str | None = None


@dataclass
class DatabaseStatus:
    database: str
    node: str
    current: str | None = None
    applied: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # applied here, no such file
    differences: list[str] = field(default_factory=list)
    error: str | None = None


class _Session:
    """One dedicated connection to a primary, with its dialect's statements."""

    def __init__(self, db: DatabaseSpec, conn: Connection) -> None:
        self.db = db
        self.conn = conn
        self.backend = db.backend
        self.dialect = make_dialect(db.backend)
        self.node = db.primary.name

    def compile(self, stmt: sa.ClauseElement) -> Compiled:
        return compile_statement(stmt, self.dialect)

    async def scalar(self, stmt: sa.ClauseElement | str, values: dict[str, Any] | None = None) -> Any:
        if isinstance(stmt, str):
            row = await self.conn.fetch_one(stmt, ())
        else:
            c = self.compile(stmt)
            row = await self.conn.fetch_one(c.sql, c.params(values or {}))
        return None if row is None else row[0]

    async def run(self, stmt: sa.ClauseElement, values: dict[str, Any] | None = None) -> None:
        c = self.compile(stmt)
        await self.conn.execute(c.sql, c.params(values or {}))

    async def ensure_tables(self) -> None:
        for t in (_versions, _steps):
            ddl = str(sa.schema.CreateTable(t, if_not_exists=True).compile(dialect=self.dialect))
            await self.conn.execute(ddl, ())

    async def applied(self) -> list[str]:
        c = self.compile(sa.select(_versions.c.version))
        rows = await self.conn.fetch_all(c.sql, ())
        return sorted((str(r[0]) for r in rows), key=int)

    async def done_steps(self, version: str, direction: Direction) -> set[int]:
        c = self.compile(
            sa.select(_steps.c.step).where(
                _steps.c.version == sa.bindparam("v"), _steps.c.direction == sa.bindparam("d")
            )
        )
        rows = await self.conn.fetch_all(c.sql, c.params({"v": version, "d": direction}))
        return {int(r[0]) for r in rows}

    async def check_writable(self) -> None:
        if self.backend == "postgresql":
            if await self.scalar("SELECT pg_is_in_recovery()"):
                raise ReadOnlyNodeError(f"{self.node} is a standby in recovery; migrations run on primaries only")
            if await self.scalar("SELECT current_setting('transaction_read_only')") == "on":
                raise ReadOnlyNodeError(f"{self.node} is read-only (default_transaction_read_only)")
        elif self.backend == "mysql":
            if int(await self.scalar("SELECT @@global.read_only")):
                raise ReadOnlyNodeError(f"{self.node} has read_only=ON (a replica?); migrations run on primaries only")
        else:
            path = self.db.primary.dsn.url.database or ""
            if path not in ("", ":memory:") and Path(path).exists() and not os.access(path, os.W_OK):
                raise ReadOnlyNodeError(f"{self.node}: {path} is not writable")

    async def probe(self, p: Probe) -> bool:
        """Whether the object the probe names exists."""
        if self.backend == "sqlite":
            if p.kind == "table":
                sql = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
                params: tuple[Any, ...] = (p.table,)
            elif p.kind == "column":
                sql, params = "SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = ?", (p.table, p.name)
            else:
                sql, params = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = ?", (p.name,)
        else:
            ph = ["$1", "$2"] if self.backend == "postgresql" else ["%s", "%s"]
            schema = "current_schema()" if self.backend == "postgresql" else "DATABASE()"
            if p.kind == "table":
                sql = f"SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = {schema} AND table_name = {ph[0]}"
                params = (p.table,)
            elif p.kind == "column":
                sql = (f"SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = {schema} "
                       f"AND table_name = {ph[0]} AND column_name = {ph[1]}")
                params = (p.table, p.name)
            elif self.backend == "postgresql":
                sql, params = "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = current_schema() AND indexname = $1", (p.name,)
            else:
                sql = "SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE() AND table_name = %s AND index_name = %s"
                params = (p.table, p.name)
        row = await self.conn.fetch_one(sql, params)
        return bool(row and int(row[0]) > 0)

    async def columns(self, table: str) -> list[str] | None:
        """Column names of a physical table, or ``None`` when it does not exist."""
        if self.backend == "sqlite":
            rows = await self.conn.fetch_all("SELECT name FROM pragma_table_info(?)", (table,))
        elif self.backend == "postgresql":
            rows = await self.conn.fetch_all(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = $1 ORDER BY ordinal_position", (table,))
        else:
            rows = await self.conn.fetch_all(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = DATABASE() "
                "AND table_name = %s ORDER BY ordinal_position", (table,))
        return [str(r[0]) for r in rows] or None

    # -- locking ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def locked(self, timeout: float) -> AsyncIterator[None]:
        deadline = time.monotonic() + timeout
        if self.backend == "sqlite":
            path = (self.db.primary.dsn.url.database or "memory") + ".dal-migrate.lock"
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await self._wait_or_fail(deadline, timeout, f"file lock {path}")
                yield
            finally:
                os.close(fd)  # closing releases the flock
            return
        if self.backend == "postgresql":
            key = zlib.crc32(b"dal_migrate")
            acquire, release = f"SELECT pg_try_advisory_lock({key})", f"SELECT pg_advisory_unlock({key})"
        else:
            name = "dal_migrate:" + (self.db.primary.dsn.url.database or "")
            acquire = "SELECT GET_LOCK(%s, 0)"
            release = "SELECT RELEASE_LOCK(%s)"
        args: tuple[Any, ...] = () if self.backend == "postgresql" else (name,)
        while True:
            row = await self.conn.fetch_one(acquire, args)
            if row and row[0] in (True, 1):
                break
            await self._wait_or_fail(deadline, timeout, "the migration lock")
        try:
            yield
        finally:
            with contextlib.suppress(DalError):
                await self.conn.fetch_one(release, args)

    async def _wait_or_fail(self, deadline: float, timeout: float, what: str) -> None:
        if time.monotonic() >= deadline:
            raise LockTimeoutError(
                f"{self.db.name}: another dal migrate holds {what} on {self.node}; "
                f"gave up after {timeout:g}s (it is still running, or its connection has not closed yet)"
            )
        await asyncio.sleep(0.1)


class Migrator:
    """Plans and applies migrations over every shard database of a topology."""

    def __init__(
        self,
        config: Config,
        migrations: Sequence[Migration],
        *,
        lock_timeout: float = 60.0,
        progress: ProgressFn | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.migrations = list(migrations)
        self.lock_timeout = lock_timeout
        self.progress = progress
        self.clock = clock
        self._expanded: dict[tuple[str, Direction], list[Step]] = {}

    def steps(self, migration: Migration, direction: Direction, database: str) -> list[Step]:
        """The steps of ``migration`` for one shard database (expanded once, cached)."""
        key = (migration.version, direction)
        if key not in self._expanded:
            fn = migration.upgrade if direction == "up" else migration.downgrade
            try:
                self._expanded[key] = expand(self.config, fn)
            except MigrationError as exc:
                raise MigrationError(f"migration {migration.label}: {exc}") from exc
        return [s for s in self._expanded[key] if s.database == database]

    def plan(self, applied: Sequence[str], direction: Direction, to: int | None) -> list[Migration]:
        """The migrations to run, in order, for a database with ``applied`` versions."""
        done = {int(v) for v in applied}
        if direction == "up":
            return [m for m in self.migrations if m.number not in done and (to is None or m.number <= to)]
        applied_here = [m for m in reversed(self.migrations) if m.number in done]
        if to is None:
            return applied_here[:1]
        return [m for m in applied_here if m.number > to]

    @contextlib.asynccontextmanager
    async def _session(self, db: DatabaseSpec) -> AsyncIterator[_Session]:
        # No query_timeout: building an index on a large table may take longer than any
        # request should (the operator stops a migration; a timeout would cut it mid-way).
        spec = replace(db.primary, pool=replace(db.primary.pool, query_timeout=None))
        conn = await connector_for(spec)()
        try:
            yield _Session(db, conn)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    # -- status -------------------------------------------------------------------------
    async def status(self) -> list[DatabaseStatus]:
        return list(await asyncio.gather(*(self._status(db) for db in self.config.databases)))

    async def _status(self, db: DatabaseSpec) -> DatabaseStatus:
        # Read-only: ``status`` and ``--sql`` create nothing, not even the
        # bookkeeping tables (or, on SQLite, the database file).
        st = DatabaseStatus(db.name, db.primary.name)
        st.pending = [m.label for m in self.plan([], "up", None)]
        path = db.primary.dsn.url.database or ""
        if db.backend == "sqlite" and path not in ("", ":memory:") and not Path(path).exists():
            return st
        try:
            async with self._session(db) as s:
                if await s.probe(Probe("table", VERSIONS_TABLE, None, True)):
                    st.applied = await s.applied()
                known = {m.number for m in self.migrations}
                st.unknown = [v for v in st.applied if int(v) not in known]
                st.current = st.applied[-1] if st.applied else None
                st.pending = [m.label for m in self.plan(st.applied, "up", None)]
                st.differences = await self._differences(s)
        except DalError as exc:
            st.pending = []
            st.error = str(exc)
        return st

    async def _differences(self, s: _Session) -> list[str]:
        """Physical tables of one logical table whose columns differ from their siblings'."""
        out = []
        for spec in self.config.tables:
            placements = [p for p in placements_for(spec, self.config) if p.database == s.db.name]
            cols = {p.table: await s.columns(p.table) for p in placements}
            present = [c for c in cols.values() if c is not None]
            if not present:
                continue
            union = sorted({c for cs in present for c in cs})
            for table, cs in cols.items():
                if cs is None:
                    out.append(f"{table}: missing (other physical tables of {spec.name} exist)")
                elif set(cs) != set(union):
                    out.append(f"{table}: lacks columns {sorted(set(union) - set(cs))}")
        return out

    # -- up / down ------------------------------------------------------------------------
    async def run(self, direction: Direction, to: int | None = None) -> list[DatabaseResult]:
        return list(await asyncio.gather(*(self._run_db(db, direction, to) for db in self.config.databases)))

    async def count_steps(self, direction: Direction, to: int | None) -> int:
        """Steps a run would take, assuming current versions are readable (for progress bars)."""
        total = 0
        for st in await self.status():
            if st.error is None:
                for m in self.plan(st.applied, direction, to):
                    total += len(self.steps(m, direction, st.database))
        return total

    async def _run_db(self, db: DatabaseSpec, direction: Direction, to: int | None) -> DatabaseResult:
        res = DatabaseResult(db.name, db.primary.name)
        current: Migration | None = None
        try:
            async with self._session(db) as s:
                await s.check_writable()
                async with s.locked(self.lock_timeout):
                    await s.ensure_tables()
                    for current in self.plan(await s.applied(), direction, to):
                        await self._apply(s, current, direction, res)
                        res.applied.append(current.label)
        except Exception as exc:  # report per database; the others go on
            if current is not None and not str(exc).startswith("migration "):
                res.error = f"migration {current.label} on {db.primary.name}: {exc}"
            else:
                res.error = str(exc)
        return res

    async def _apply(self, s: _Session, m: Migration, direction: Direction, res: DatabaseResult) -> None:
        steps = self.steps(m, direction, s.db.name)
        if s.backend == "mysql":
            await self._apply_stepwise(s, m, direction, steps, res)
            return
        await s.conn.begin()
        try:
            for step in steps:
                await self._execute(s, m, step, res)
            await self._record(s, m, direction)
            await s.conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                await s.conn.rollback()
            raise

    async def _apply_stepwise(
        self, s: _Session, m: Migration, direction: Direction, steps: list[Step], res: DatabaseResult
    ) -> None:
        insert = sa.insert(_steps).values(version=sa.bindparam("v"), direction=sa.bindparam("d"),
                                          step=sa.bindparam("i"), description=sa.bindparam("desc"))
        done = await s.done_steps(m.version, direction)
        # Only the step a previous run was executing when it died can have taken
        # effect without its record: the first unrecorded one, and only if a run
        # of this migration started and did not stop on an error the server
        # reported (the RUNNING marker). Any other step runs: a probe must never
        # adopt a same-named object that this migration did not create.
        resume = None
        if _RUNNING in done:
            resume = next((i for i in range(len(steps)) if i not in done), None)
        else:
            await s.run(insert, {"v": m.version, "d": direction, "i": _RUNNING, "desc": "run started"})
        for i, step in enumerate(steps):
            if i in done:
                continue
            if i == resume and step.probe is not None and await s.probe(step.probe) == step.probe.present:
                # It ran before a kill cut its bookkeeping short: record it, do not run it again.
                self._tick(s, step)
            else:
                try:
                    await self._execute(s, m, step, res)
                except MigrationError as exc:
                    if not isinstance(exc.__cause__, ConnectionUnavailableError):
                        # Rejected by the server, so without effect: the next run
                        # runs it again instead of asking its probe.
                        with contextlib.suppress(DalError):
                            await s.run(sa.delete(_steps).where(
                                _steps.c.version == sa.bindparam("v"), _steps.c.direction == sa.bindparam("d"),
                                _steps.c.step == sa.bindparam("i")), {"v": m.version, "d": direction, "i": _RUNNING})
                    raise
            await s.run(insert, {"v": m.version, "d": direction, "i": i, "desc": step.description[:255]})
        await s.conn.begin()
        try:
            await self._record(s, m, direction)
            await s.run(
                sa.delete(_steps).where(_steps.c.version == sa.bindparam("v"), _steps.c.direction == sa.bindparam("d")),
                {"v": m.version, "d": direction},
            )
            await s.conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                await s.conn.rollback()
            raise

    async def _execute(self, s: _Session, m: Migration, step: Step, res: DatabaseResult) -> None:
        for sql in step.sql:
            try:
                await s.conn.execute(sql, ())
            except DalError as exc:
                raise MigrationError(
                    f"migration {m.label} failed on {s.node} ({step.description}): {exc}\n    statement: {sql}"
                ) from exc
            res.statements += 1
        if step.table is not None:
            res.tables.add(step.table)
        self._tick(s, step)

    def _tick(self, s: _Session, step: Step) -> None:
        if self.progress is not None:
            self.progress(s.db.name, step.description)

    async def _record(self, s: _Session, m: Migration, direction: Direction) -> None:
        if direction == "up":
            await s.run(
                sa.insert(_versions).values(version=sa.bindparam("v"), name=sa.bindparam("n"), applied_at=sa.bindparam("t")),
                {"v": m.version, "n": m.name, "t": self.clock().isoformat(timespec="seconds")},
            )
        else:
            await s.run(sa.delete(_versions).where(_versions.c.version == sa.bindparam("v")), {"v": m.version})

    # -- offline SQL ------------------------------------------------------------------------
    async def sql(self, direction: Direction, to: int | None) -> list[str]:
        """The statements a run would execute, per shard database, as commented SQL text."""
        lines: list[str] = []
        for db, st in zip(self.config.databases, await self.status(), strict=True):
            applied = st.applied
            lines.append(f"-- shard database {db.name}: {db.primary.name} {db.primary.dsn.masked}")
            if st.error is not None:
                lines.append(f"-- (could not read its version: {st.error}; assuming none applied)")
                applied = []
            for m in self.plan(applied, direction, to):
                lines.append(f"-- {direction} {m.label}")
                transactional = db.backend != "mysql"
                if transactional:
                    lines.append("BEGIN;")
                for step in self.steps(m, direction, db.name):
                    lines.extend(f"{sql};" for sql in step.sql)
                verb = "INSERT INTO" if direction == "up" else "DELETE FROM"
                lines.append(f"-- {verb} {VERSIONS_TABLE} ({m.version})")
                if transactional:
                    lines.append("COMMIT;")
            lines.append("")
        return lines
