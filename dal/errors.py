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
    │   ├── PoolTimeoutError         no pooled connection within acquire_timeout
    │   └── CommitUnknownError       lost during COMMIT; the outcome could not be checked
    ├── QueryTimeoutError            the statement ran past its timeout
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
    └── ScanLimitExceededError       a fan-out query would read more rows than allowed

``InputError`` subclasses are raised before any I/O: nothing was sent, nothing
was written. Messages name what was wrong (table, column, type) and never
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
    """A node cannot be reached, the connection was lost, or the node is marked down."""


class PoolTimeoutError(ConnectionUnavailableError):
    """No pooled connection became free within ``acquire_timeout``."""


class CommitUnknownError(ConnectionUnavailableError):
    """The connection was lost while COMMIT was in flight and the outcome could not be checked."""


class QueryTimeoutError(DalError):
    """The statement did not finish within its timeout."""


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
