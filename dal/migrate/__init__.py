"""Versioned schema migrations applied to every physical table of every shard database.

See :mod:`dal.migrate.ops` for what a migration can do, :mod:`dal.migrate.runner`
for how runs are locked, transactional (PostgreSQL, SQLite) or resumable
(MySQL/MariaDB), and :mod:`dal.migrate.cli` for ``dal migrate``.
"""

from dal.migrate.ops import MigrationError, Operations, Probe, Step
from dal.migrate.runner import (
    DatabaseResult,
    DatabaseStatus,
    LockTimeoutError,
    Migrator,
    ReadOnlyNodeError,
)
from dal.migrate.scripts import Migration, load_migrations, new_migration

__all__ = [
    "DatabaseResult",
    "DatabaseStatus",
    "LockTimeoutError",
    "Migration",
    "MigrationError",
    "Migrator",
    "Operations",
    "Probe",
    "ReadOnlyNodeError",
    "Step",
    "load_migrations",
    "new_migration",
]
