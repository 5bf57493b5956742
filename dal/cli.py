"""The ``dal`` command: ``dal demo``, ``dal migrate``, ``dal bench``.

Exit codes: 0 success, 1 a dal error (message on stderr, no traceback),
2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from dal.errors import DalError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dal", description="dal: sharded, replicated data access")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what dal does")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the users-and-orders example end to end")
    demo.add_argument("--config", metavar="FILE", help="a dal.toml topology (default: 2 SQLite shard databases)")
    demo.add_argument("--dir", metavar="DIR", help="keep the SQLite files in DIR (default: a temp dir)")

    migrate = sub.add_parser("migrate", help="versioned schema migrations on every shard")
    from dal.migrate.cli import add_arguments as add_migrate_arguments

    add_migrate_arguments(migrate)

    bench = sub.add_parser("bench", help="benchmark dal against the raw drivers")
    from dal.bench import add_arguments

    add_arguments(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from dal.demo import run_demo

            asyncio.run(run_demo(args.config, directory=args.dir, out=sys.stdout))
            return 0
        if args.command == "migrate":
            from dal.migrate.cli import main_from_args as migrate_main

            return migrate_main(args)
        if args.command == "bench":
            from dal.bench import main_from_args

            return main_from_args(args)
    except DalError as exc:
        print(f"dal {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
