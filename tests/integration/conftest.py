"""Session-wide replicated servers owned by the test run (see tests/replication.py)."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.batch_support import Raw, batch_urls
from tests.replication import MariaDBReplicaSet, MissingBinaryError, PgReplicaSet


@pytest.fixture
def urls(backend: str, tmp_path: Path) -> list[str]:
    """Two shard databases of ``backend`` owned by this test process (tests/batch_support.py)."""
    return batch_urls(backend, tmp_path)


@pytest.fixture
async def raw(urls: list[str]) -> AsyncIterator[Raw]:
    """Raw SQL on those databases, bypassing dal."""
    r = Raw(urls)
    yield r
    await r.aclose()


@pytest.fixture(scope="session")
def pg_replica_set() -> Iterator[PgReplicaSet]:
    """PostgreSQL primary + streaming hot standby, database ``test``, trust auth."""
    rs = PgReplicaSet()
    try:
        try:
            rs.start()
        except MissingBinaryError as exc:
            # Missing servers must fail the run loudly, never skip.
            pytest.fail(f"cannot start PostgreSQL replica set: {exc}", pytrace=False)
        yield rs
    finally:
        rs.stop()


@pytest.fixture(scope="session")
def mariadb_replica_set() -> Iterator[MariaDBReplicaSet]:
    """MariaDB primary + read-only GTID replica, database ``test``, root without password."""
    rs = MariaDBReplicaSet()
    try:
        try:
            rs.start()
        except MissingBinaryError as exc:
            pytest.fail(f"cannot start MariaDB replica set: {exc}", pytrace=False)
        yield rs
    finally:
        rs.stop()
