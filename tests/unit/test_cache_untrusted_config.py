"""The [cache] settings of invalidation messages: defaults, validation, the signing key as a secret."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from dal.config import CacheSettings, Config
from dal.errors import ConfigError


def config(cache: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return Config.from_dict({"databases": {"db0": {"primary": "sqlite+aiosqlite:///x.db"}}, "cache": cache}, env=env or {})


def test_defaults() -> None:
    s = config({}).cache
    assert (s.resync_interval, s.max_keys_per_message, s.signing_key) == (1.0, 1000, None)
    assert "signing_key=None" in repr(s)


def test_signing_key_from_config_and_env_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    c = config({"signing_key": "hunter2-from-file", "resync_interval": 0.5, "max_keys_per_message": 10})
    assert c.cache.signing_key == "hunter2-from-file"
    assert (c.cache.resync_interval, c.cache.max_keys_per_message) == (0.5, 10)
    e = config({"signing_key": "from-file"}, env={"DAL_CACHE_SIGNING_KEY": "hunter2-from-env"})
    assert e.cache.signing_key == "hunter2-from-env"
    assert config({}, env={"DAL_CACHE_SIGNING_KEY": "k"}).cache.signing_key == "k"
    for cfg in (c, e):
        for text in (repr(cfg), str(cfg), repr(cfg.cache), str(cfg.cache), f"{cfg.cache!r}"):
            assert "hunter2" not in text
            assert "signing_key=***" in text
    logging.getLogger("dal").info("config %s %r", c, e.cache)
    assert "hunter2" not in caplog.text


@pytest.mark.parametrize(
    ("cache", "field"),
    [
        ({"resync_interval": -1.0}, "cache.resync_interval"),
        ({"resync_interval": float("nan")}, "cache.resync_interval"),
        ({"max_keys_per_message": 0}, "cache.max_keys_per_message"),
        ({"signing_key": ""}, "cache.signing_key"),
        ({"signing_key": 12}, "cache.signing_key"),
    ],
)
def test_bad_values(cache: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        config(cache)


def test_a_bad_signing_key_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        config({"signing_key": ["hunter2"]})
    assert "hunter2" not in str(info.value)
    assert CacheSettings(signing_key="hunter2").signing_key == "hunter2"
