"""``dal bench``: how much dal costs per operation against the drivers it wraps.

Each scenario times a dal operation and, in the same run, on the same rows and
keys, the plain-driver (and ORM) code an application would write instead;
rounds alternate between them so machine noise hits both. The result is a
table on stdout and, with ``--json PATH``, a JSON report whose ratios are
dal's time per operation / the baseline's (below 1: dal is faster).

Wire it into a CLI with::

    sub = subparsers.add_parser("bench")
    dal.bench.add_arguments(sub)
    ...
    return dal.bench.main_from_args(args)

See :mod:`dal.bench.scenarios` (what is measured) and :mod:`dal.bench.measure`
(how).
"""

from dal.bench.measure import Timing
from dal.bench.runner import BenchError, add_arguments, main_from_args, run_bench
from dal.bench.scenarios import SCENARIOS, SuiteOptions

__all__ = ["SCENARIOS", "BenchError", "SuiteOptions", "Timing", "add_arguments", "main_from_args", "run_bench"]
