"""Fixtures shared by the batch tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dal import DataLayer
from tests.batch_support import Raw, batch_urls, make_layer


@pytest.fixture
def urls(backend: str, tmp_path: Path) -> list[str]:
    """Two shard databases of ``backend`` owned by this test process."""
    return batch_urls(backend, tmp_path)


@pytest.fixture
async def raw(urls: list[str]) -> AsyncIterator[Raw]:
    """Raw SQL on those databases, bypassing dal."""
    r = Raw(urls)
    yield r
    await r.aclose()


@pytest.fixture
async def lay(urls: list[str]) -> AsyncIterator[DataLayer]:
    """A started layer with freshly created tables."""
    async with make_layer(urls) as layer:
        await layer.drop_all()
        await layer.create_all()
        yield layer
        await layer.drop_all()
