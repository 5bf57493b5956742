"""Batched writes: many rows per round trip, grouped per physical table.

``insert_many``, ``upsert_many``, ``update_many`` and ``delete_many`` validate
every row before any I/O (an error names the row index and the field), group
rows by physical table, and send each group in batches of ``batch_size``
rows. Each batch is one transaction on its shard database's primary, in the
fastest correct form per backend (PostgreSQL: COPY, and a staging table for
upserts, updates and deletes; MySQL: multi-row statements; SQLite:
executemany). Batches on different shard databases run concurrently, at most
``STREAMS_PER_DATABASE`` at a time on one database. A failed batch is rolled
back as a whole and reported with the keys it held (for duplicates, exactly
which keys already existed); batches that committed are reported as committed,
and a COMMIT cut off by a lost connection is checked on the primary before it
is reported. With ``atomic=True`` the whole call is one transaction, allowed
only when every row lands on one shard database.

:class:`BatchWriter` coalesces single-row writes from many coroutines
(write-behind): each caller's ``await`` returns when its row is committed or
raises its own error.

The modules, each importing only those listed before it:

- :mod:`~dal.batch.results`: what a call reports (:class:`BatchResult`,
  :class:`BatchFailure`) and the unit it sends (``Batch``);
- :mod:`~dal.batch.planning`: validation and grouping into batches, no I/O
  (:class:`BatchPlanner`);
- :mod:`~dal.batch.dialects`: a batch's statements per backend;
- :mod:`~dal.batch.in_doubt`: lookups on the primary after a failure (a COMMIT
  in doubt, the keys of a duplicate);
- :mod:`~dal.batch.running`: a call's batches run as transactions, streams per
  database (:class:`BatchRunner`, :func:`run_many`);
- :mod:`~dal.batch.writer`: :class:`BatchWriter`.

PostgreSQL's COPY text, rendered while it is sent, is :mod:`dal.backends.pg_copy`.
"""

from __future__ import annotations

from dal.batch.planning import BatchPlanner
from dal.batch.results import BatchFailure, BatchResult, Op
from dal.batch.running import STREAMS_PER_DATABASE, BatchRunner, run_many
from dal.batch.writer import BatchWriter
from dal.errors import BatchError, CommitUnknownError

__all__ = [
    "STREAMS_PER_DATABASE",
    "BatchError",
    "BatchFailure",
    "BatchPlanner",
    "BatchResult",
    "BatchRunner",
    "BatchWriter",
    "CommitUnknownError",
    "Op",
    "run_many",
]
