"""``dal migrate``: up, down, status, new.

Exit codes: 0 every shard database is where it was asked to be; 1 at least one
failed (unreachable, refused, locked, or a migration failed), each named on
stderr; 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dal.config import Config, load_config
from dal.migrate.runner import Direction, Migrator
from dal.migrate.scripts import load_migrations, new_migration, resolve_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="topology (default: $DAL_CONFIG or ./dal.toml)")
    parser.add_argument("--dir", metavar="DIR", default=None, help="migrations directory (default: ./migrations)")
    sub = parser.add_subparsers(dest="action", required=True)
    for name, help_text in (("up", "apply pending migrations"), ("down", "revert migrations (default: the latest one)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--to", metavar="V", help="stop at version V (down: V stays applied; 0 reverts all)")
        p.add_argument("--sql", action="store_true", help="print the DDL per node instead of running it")
        p.add_argument("--lock-timeout", type=float, default=60.0, metavar="S",
                       help="seconds to wait for another dal migrate to finish (default 60)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("status", help="per shard database: version, pending migrations, diverging tables")
    n = sub.add_parser("new", help="write a new migration skeleton with the next version")
    n.add_argument("name")


def _config(path: str | None) -> Config:
    return load_config(path or os.environ.get("DAL_CONFIG") or "dal.toml")


def main_from_args(args: argparse.Namespace, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    directory = args.dir or "migrations"
    if args.action == "new":
        print(new_migration(directory, args.name), file=out)
        return 0
    config = _config(args.config)
    migrations = load_migrations(directory)
    if args.action == "status":
        return asyncio.run(_status(config, migrations, out))
    return asyncio.run(_run(config, migrations, args, out, err))


async def _status(config: Config, migrations: list, out: TextIO) -> int:  # type: ignore[type-arg]
    code = 0
    for st in await Migrator(config, migrations).status():
        print(f"{st.database} ({st.node}):", file=out)
        if st.error is not None:
            print(f"  UNREACHABLE: {st.error}", file=out)
            code = 1
            continue
        print(f"  current: {st.current or 'none'} ({len(st.applied)} applied)", file=out)
        print(f"  pending: {', '.join(st.pending) if st.pending else 'none'}", file=out)
        for v in st.unknown:
            print(f"  applied but not in the migrations directory: {v}", file=out)
        for d in st.differences:
            print(f"  differs: {d}", file=out)
    return code


async def _run(config: Config, migrations: list, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:  # type: ignore[type-arg]
    direction: Direction = args.action
    to = resolve_target(migrations, args.to)
    if args.sql:
        migrator = Migrator(config, migrations)
        print("\n".join(await migrator.sql(direction, to)), file=out)
        return 0
    console = Console(file=err)
    started = time.monotonic()
    show = not args.no_progress and console.is_terminal
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not show) as progress:
        task = progress.add_task(f"migrate {direction}", total=None)
        migrator = Migrator(config, migrations, lock_timeout=args.lock_timeout,
                            progress=lambda db, what: progress.advance(task))
        if show:
            progress.update(task, total=await migrator.count_steps(direction, to))
        results = await migrator.run(direction, to)
    failed = [r for r in results if r.error is not None]
    for r in results:
        if r.error is not None:
            print(f"{r.database}: FAILED: {r.error}", file=err)
    labels = sorted({label for r in results for label in r.applied})
    statements = sum(r.statements for r in results)
    tables = sum(len(r.tables) for r in results)
    verb = "applied" if direction == "up" else "reverted"
    ok = len(results) - len(failed)
    what = f"{labels[0]}..{labels[-1]}" if len(labels) > 1 else (labels[0] if labels else "nothing")
    summary = (f"{verb} {what} on {ok}/{len(results)} shard databases ok "
               f"({statements} statements, {tables} physical tables) in {time.monotonic() - started:.1f}s")
    if failed:
        summary += "; failed: " + ", ".join(r.database for r in failed)
    print(summary, file=out)
    return 1 if failed else 0
