"""dal: an async data-access layer.

Declare logical tables as SQLAlchemy ``Table`` objects, describe the topology
(shard databases with a primary and replicas, and how each table is sharded),
and get repositories whose reads go to replicas and writes to primaries, with
rows placed by CRC32 of a shard key. See the README for a tour.
"""

from dal.batch import BatchFailure, BatchResult, BatchWriter
from dal.config import (
    DSN,
    Config,
    DatabaseSpec,
    NodeSpec,
    PoolSettings,
    TableSpec,
    load_config,
)
from dal.errors import (
    BatchError,
    CommitUnknownError,
    ConfigError,
    ConnectionUnavailableError,
    CrossShardTransactionError,
    DalError,
    DataError,
    DuplicateKeyError,
    ForeignKeyError,
    InputError,
    IntegrityError,
    NotNullError,
    PoolTimeoutError,
    QueryError,
    QueryTimeoutError,
    ReadOnlyError,
    RoutingError,
    ScanLimitExceededError,
    SchemaMismatchError,
    ShardKeyError,
    TransactionError,
    UnknownColumnError,
    UnknownTableError,
    ValidationError,
)
from dal.filters import eq, ge, gt, in_, is_null, le, like, lt, ne, not_null
from dal.layer import DataLayer
from dal.repository import Repository
from dal.routing.router import Role, Target
from dal.routing.sharding import checksum, encode_key

__all__ = [
    "DSN",
    "BatchError",
    "BatchFailure",
    "BatchResult",
    "BatchWriter",
    "CommitUnknownError",
    "Config",
    "ConfigError",
    "ConnectionUnavailableError",
    "CrossShardTransactionError",
    "DalError",
    "DataError",
    "DataLayer",
    "DatabaseSpec",
    "DuplicateKeyError",
    "ForeignKeyError",
    "InputError",
    "IntegrityError",
    "NodeSpec",
    "NotNullError",
    "PoolSettings",
    "PoolTimeoutError",
    "QueryError",
    "QueryTimeoutError",
    "ReadOnlyError",
    "Repository",
    "Role",
    "RoutingError",
    "ScanLimitExceededError",
    "SchemaMismatchError",
    "ShardKeyError",
    "TableSpec",
    "Target",
    "TransactionError",
    "UnknownColumnError",
    "UnknownTableError",
    "ValidationError",
    "checksum",
    "encode_key",
    "eq",
    "ge",
    "gt",
    "in_",
    "is_null",
    "le",
    "like",
    "load_config",
    "lt",
    "ne",
    "not_null",
]
