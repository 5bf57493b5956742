"""What ``dal bench`` measures: the scenarios, their data, and the baselines they are compared with.

* :mod:`~dal.bench.scenarios.catalog`: every scenario's name, backend,
  baselines and targets; ``--only`` selection; the shared data options.
* :mod:`~dal.bench.scenarios.reads`: ``pg.get.nocache[:c32]``,
  ``mysql.get.nocache[:c32]``.
* :mod:`~dal.bench.scenarios.cache`: ``get.l1_hit``, ``get.l2_hit``, ``stampede``.
* :mod:`~dal.bench.scenarios.batch`: ``pg.insert_many[:b1000]``,
  ``pg.upsert_many``, ``batchwriter.insert:c1000``, ``mysql.insert_many``.
* :mod:`~dal.bench.scenarios.suites`: per backend, setting them up and tearing them down.
* :mod:`~dal.bench.scenarios.tables`, :mod:`~dal.bench.scenarios.drivers`:
  the bench's tables and data; drivers and servers.
* :mod:`~dal.bench.scenarios.notes`: the report's notes on how they ran.

Each builds the harness's :class:`~dal.bench.harness.Comparison`,
:class:`~dal.bench.harness.Burst` or :class:`~dal.bench.harness.Bulk`
objects; none of them times anything itself.
"""

from dal.bench.scenarios.catalog import SCENARIOS, Scenario, ScenarioSpec, SuiteOptions, select
from dal.bench.scenarios.notes import notes_for
from dal.bench.scenarios.suites import SUITES

__all__ = ["SCENARIOS", "SUITES", "Scenario", "ScenarioSpec", "SuiteOptions", "notes_for", "select"]
