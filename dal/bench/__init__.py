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

The parts, each importing only those after it:

* :mod:`dal.bench.runner`: the command line and the run;
* :mod:`dal.bench.settings`: URLs, timing and data from arguments, ``--config``, environment;
* :mod:`dal.bench.scenarios`: what is measured, against which baselines;
* :mod:`dal.bench.report`: JSON entries, the tables, the JSON file;
* :mod:`dal.bench.harness`: how it is measured (warm-up, alternating rounds, statistics).

Errors that keep the bench from running are :class:`dal.errors.BenchError`.
"""

from dal.bench.harness import Timing
from dal.bench.runner import add_arguments, main_from_args, run_bench
from dal.bench.scenarios import SCENARIOS, SuiteOptions
from dal.errors import BenchError

__all__ = ["SCENARIOS", "BenchError", "SuiteOptions", "Timing", "add_arguments", "main_from_args", "run_bench"]
