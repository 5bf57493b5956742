"""What importing dal loads: nothing of the cache until a layer with a cached table is built."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

CACHE_MODULES = ("msgpack", "pybloom_live", "bitarray", "redis", "dal.cache.tiered")

PROBE = textwrap.dedent(
    f"""
    import json, sys

    CACHE_MODULES = {CACHE_MODULES!r}

    def loaded():
        return [m for m in CACHE_MODULES if m in sys.modules]

    import dal
    at_import = loaded()

    import sqlalchemy as sa

    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False))
    uncached = dal.DataLayer(
        {{"databases": {{"db0": {{"primary": "sqlite+aiosqlite:///:memory:"}}}},
          "tables": {{"users": {{"shard_key": "id", "table_shards": 2}}}}}},
        md, env={{}},
    )
    without_cache = loaded()

    layer = dal.DataLayer(
        {{"databases": {{"db0": {{"primary": "sqlite+aiosqlite:///:memory:"}}}},
          "tables": {{"users": {{"shard_key": "id", "table_shards": 2, "cache": True}}}}}},
        md, env={{}},
    )
    assert layer.cache is not None and layer.cache.remote is None  # no Redis URL: L1 only
    print(json.dumps({{"import": at_import, "uncached": without_cache, "cached": loaded()}}))
    """
)


def run_probe() -> dict[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_import_loads_no_cache_dependency() -> None:
    got = run_probe()
    assert got["import"] == []
    assert got["uncached"] == []  # a layer without cached tables needs none either


def test_a_layer_with_a_cached_table_loads_what_the_cache_needs() -> None:
    got = run_probe()
    # L1 only: the serializers and the Bloom filter, but no Redis client.
    assert got["cached"] == ["msgpack", "pybloom_live", "bitarray", "dal.cache.tiered"]
