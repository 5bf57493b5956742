"""The one error tree of dal.

Every exception dal raises derives from :class:`DalError`. Driver exceptions
(asyncpg, PyMySQL/aiomysql, sqlite3) never escape: each backend maps them at
its boundary to the most specific class below and chains the original with
``raise ... from exc`` so the driver's detail stays available in
``__cause__``::

    DalError
    ├── ConfigError                  bad topology / table declaration (at load time)
    ├── InputError                   the caller passed something dal will not send
    │   ├── ShardKeyError            a shard key of an unsupported type, or missing
    │   ├── UnknownTableError        a logical table that was never declared
    │   ├── UnknownColumnError       a column the declared table does not have
    │   └── ValidationError          a value that does not fit its column
    ├── RoutingError                 no node can serve the request
    ├── ConnectionUnavailableError   cannot connect, connection lost, node marked down
    │   └── PoolTimeoutError         no pooled connection within acquire_timeout (also a DalTimeoutError)
    ├── DalTimeoutError              one base of dal's timeouts; also the builtin TimeoutError
    │   ├── PoolTimeoutError
    │   └── QueryTimeoutError        the statement ran past its timeout (``may_have_landed``)
    ├── CommitUnknownError           a write's outcome is unknown: it may have landed (``may_have_landed``)
    ├── QueryError                   the server rejected the statement
    │   ├── IntegrityError
    │   │   ├── DuplicateKeyError
    │   │   ├── ForeignKeyError
    │   │   └── NotNullError
    │   ├── DataError                value out of range / too long for the column
    │   ├── SchemaMismatchError      the physical table or column is missing on the server
    │   └── ReadOnlyError            a write reached a read-only node (replica, standby)
    ├── TransactionError             misuse of a transaction (closed, rolled back)
    │   └── CrossShardTransactionError
    ├── BatchError                   some batches of a batched write failed (``.result`` says which)
    ├── BenchError                   a benchmark could not run (``dal bench``: server, driver, precondition)
    └── ScanLimitExceededError       a fan-out query would read more rows than allowed

``InputError`` subclasses are raised before any I/O: nothing was sent, nothing
was written. :class:`ConnectionUnavailableError` means the request did not
take effect (nothing was sent, or a read was cut off), so it is safe to retry;
a write cut off after it was sent raises :class:`CommitUnknownError` instead,
which is *not* a ``ConnectionUnavailableError``: retrying it may apply the
write twice. :class:`QueryTimeoutError` and :class:`CommitUnknownError` carry
``node`` (the node's name) and ``may_have_landed``. Before either reaches the
caller, the statement was cancelled on the server and, for a write, its cache
keys were invalidated (see ``docs/architecture.md``, "Writes in doubt"). Messages name what was wrong (table, column, type) and never
contain a password from a DSN.
"""

from __future__ import annotations

from typing import Any


class DalError(Exception):
    """Base class of every error dal raises."""


class ConfigError(DalError):
    """The configuration is invalid. ``field`` names the offending setting."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class InputError(DalError, ValueError):
    """The caller's input was rejected before any I/O took place."""


class ShardKeyError(InputError, TypeError):
    """A shard key is missing or of a type dal cannot encode stably."""


class UnknownTableError(InputError, LookupError):
    """A logical table name that was never declared."""


class UnknownColumnError(InputError, LookupError):
    """A column name the declared table does not have."""


class ValidationError(InputError):
    """A value that does not fit its column (type, NULL, length)."""


class RoutingError(DalError):
    """No node is able to serve the request."""


class ConnectionUnavailableError(DalError):
    """A node cannot be reached, the connection was lost, or the node is marked down.

    The request did not take effect on the server: a write cut off after it was
    sent is a :class:`CommitUnknownError`, never this."""


class DalTimeoutError(DalError, TimeoutError):
    """A dal operation ran out of time (the one base of pool and query timeouts).

    Also the builtin :class:`TimeoutError`, as asyncio's and httpx's timeouts are,
    so ``except TimeoutError`` catches every timeout of a request."""


class PoolTimeoutError(ConnectionUnavailableError, DalTimeoutError):
    """No pooled connection became free within ``acquire_timeout`` (nothing was sent)."""


class _Outcome:
    """Where a statement went and whether its write may have taken effect."""

    node: str | None
    may_have_landed: bool

    def _outcome(self, node: str | None, may_have_landed: bool) -> None:
        self.node = node
        self.may_have_landed = may_have_landed


class QueryTimeoutError(_Outcome, DalTimeoutError):
    """The statement did not finish within its timeout; it was cancelled on the server.

    ``node``: the node it ran on. ``may_have_landed``: True for a write whose
    outcome is unknown (its cache keys were invalidated before this was raised);
    False for a read, or when the server confirmed the cancellation."""

    def __init__(self, message: str, *, node: str | None = None, may_have_landed: bool = False) -> None:
        super().__init__(message)
        self._outcome(node, may_have_landed)


class CommitUnknownError(_Outcome, DalError):
    """A write was sent (a COMMIT, or a statement outside a transaction) and its
    outcome could not be learned: the connection was lost or the wait was cut off.

    The write may have landed (``may_have_landed`` is True) or not; retry only
    what is idempotent. Its cache keys were invalidated before this was raised.
    ``node``: the node it was sent to."""

    def __init__(self, message: str, *, node: str | None = None, may_have_landed: bool = True) -> None:
        super().__init__(message)
        self._outcome(node, may_have_landed)


class QueryError(DalError):
    """The server rejected a statement."""


class IntegrityError(QueryError):
    """A constraint was violated."""


class DuplicateKeyError(IntegrityError):
    """A unique or primary key constraint was violated."""


class ForeignKeyError(IntegrityError):
    """A foreign key constraint was violated."""


class NotNullError(IntegrityError):
    """A NOT NULL column was given no value."""


class DataError(QueryError):
    """A value is out of range or too long for its column."""


class SchemaMismatchError(QueryError):
    """The server lacks a table or column the declared schema has (not migrated?)."""


class ReadOnlyError(QueryError):
    """A write reached a node that only accepts reads."""


class TransactionError(DalError):
    """A transaction was used after it ended, or could not complete."""


class CrossShardTransactionError(TransactionError):
    """An operation inside a single-shard transaction routed to another shard database."""


class BatchError(DalError):
    """Some batches failed; ``result`` says which rows committed and which did not."""

    def __init__(self, result: Any) -> None:
        self.result = result  # a dal.batch.BatchResult
        first = result.failures[0]
        super().__init__(
            f"{len(result.failures)} of {result.batches} batches failed "
            f"({result.committed} of {result.rows} rows committed); first: {first.table} on "
            f"{first.database}: {type(first.error).__name__}: {first.error}"
        )


class ScanLimitExceededError(DalError):
    """A fan-out query read more rows than ``max_rows_scanned`` allows."""

    def __init__(self, table: str, limit: int) -> None:
        self.table = table
        self.limit = limit
        super().__init__(
            f"query on {table!r} would scan more than max_rows_scanned={limit} rows "
            "across shards; add a shard key, a tighter filter, a smaller limit/offset, "
            "or use a keyset cursor (after=)"
        )


class BenchError(DalError):
    """A benchmark could not run: a missing server, driver, or a scenario precondition.

    Also a bad ``dal bench`` invocation (an unknown ``--only`` name, a bad
    ``--config`` file). The message says what to fix."""


def outcome_unknown(exc: BaseException) -> bool:
    """Whether a write that failed with ``exc`` may have taken effect all the same.

    True for :class:`CommitUnknownError`, a :class:`QueryTimeoutError` whose
    ``may_have_landed`` is set, the caller's own cancellation (the statement
    may have run before it was cancelled) and anything outside the tree (a
    bug: nothing is known). False for every other dal error: the server
    answered (the write was rolled back), or nothing was sent. Callers treat a
    write in doubt as possibly committed: they invalidate its cache keys.
    """
    if isinstance(exc, CommitUnknownError):
        return True
    if isinstance(exc, QueryTimeoutError):
        return exc.may_have_landed
    return not isinstance(exc, DalError)
