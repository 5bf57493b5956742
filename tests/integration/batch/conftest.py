"""Fixtures shared by the batch tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dal import DataLayer
from tests.batch_support import make_layer

# ``urls`` and ``raw``: tests/integration/conftest.py


@pytest.fixture
async def lay(urls: list[str]) -> AsyncIterator[DataLayer]:
    """A started layer with freshly created tables."""
    async with make_layer(urls) as layer:
        await layer.drop_all()
        await layer.create_all()
        yield layer
        await layer.drop_all()
