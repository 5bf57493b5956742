"""``python -m dal.bench [--json PATH] [--quick] [--only NAME ...] [--config FILE]``."""

import argparse
import sys

from dal.bench.runner import add_arguments, main_from_args


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dal.bench", description="dal benchmarks against plain drivers")
    add_arguments(parser)
    return main_from_args(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
