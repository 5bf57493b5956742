"""Cache configuration: CachePolicy / CacheSettings validation names the field; the Redis
password never shows in repr/str/errors; TTL jitter with an injected rng."""

from __future__ import annotations

import math
import random
import traceback
from typing import Any

import pytest
import sqlalchemy as sa

from dal import DataLayer
from dal.cache.tiered import CacheRuntime, TableCache
from dal.config import CachePolicy, CacheSettings, Config, DSNText, load_config
from dal.errors import ConfigError

PW = "Sup3r-s3cret_PW"


def topo(cache: dict[str, Any] | None = None, table_cache: Any = None, **extra_tables: Any) -> dict[str, Any]:
    users: dict[str, Any] = {"shard_key": "id", "table_shards": 2}
    if table_cache is not None:
        users["cache"] = table_cache
    data: dict[str, Any] = {
        "databases": {"db0": {"primary": "sqlite+aiosqlite:///:memory:"}},
        "tables": {"users": users, **extra_tables},
    }
    if cache is not None:
        data["cache"] = cache
    return data


def field_of(data: dict[str, Any], env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(data, env=env or {})
    return ei.value


# --------------------------------------------------------------------------- loading


def test_cache_true_takes_the_section_defaults() -> None:
    cfg = Config.from_dict(
        topo({"redis": "redis://127.0.0.1:6379/0", "l1_ttl": 3.0, "namespace": "app", "jitter": 0.2}, True),
        env={},
    )
    policy = cfg.table("users").cache  # type: ignore[union-attr]
    assert policy is not None and policy.enabled
    assert policy.l1_ttl == 3.0 and policy.namespace == "app" and policy.jitter == 0.2
    assert policy.l2_ttl == CachePolicy().l2_ttl
    assert cfg.cache.redis is not None and cfg.cache.redis.url == "redis://127.0.0.1:6379/0"


def test_table_overrides_and_disabling() -> None:
    cfg = Config.from_dict(
        topo({"l1_ttl": 3.0, "l2_ttl": 60}, {"l1_ttl": 1, "serializer": "json", "bloom": False},
             countries={"database": "db0", "cache": False}),
        env={},
    )  # fmt: skip
    p = cfg.table("users").cache  # type: ignore[union-attr]
    assert p is not None
    assert (p.l1_ttl, p.l2_ttl, p.serializer, p.bloom) == (1.0, 60.0, "json", False)
    assert isinstance(p.l1_ttl, float)
    assert cfg.table("countries").cache is None  # type: ignore[union-attr]


def test_no_cache_key_means_uncached_and_no_redis_means_l1_only() -> None:
    cfg = Config.from_dict(topo({"l1_ttl": 3.0}), env={})
    assert cfg.table("users").cache is None  # type: ignore[union-attr]
    assert cfg.cache.redis is None


def test_env_overrides_redis_url() -> None:
    cfg = Config.from_dict(topo({"redis": "redis://a:1/0"}, True), env={"DAL_REDIS_URL": f"redis://:{PW}@b:2/1"})
    assert cfg.cache.redis is not None and cfg.cache.redis.url == f"redis://:{PW}@b:2/1"


# --------------------------------------------------------------------------- validation

POLICY_ERRORS: list[tuple[str, Any]] = [
    ("l1_ttl", 0),
    ("l1_ttl", -1.0),
    ("l2_ttl", 0.0),
    ("negative_ttl", -5),
    ("lease_ttl", 0),
    ("version_ttl", 0),
    ("lease_wait", -0.1),
    ("fresh_window", -1),
    ("jitter", 1.0),
    ("jitter", -0.01),
    ("l1_max_size", 0),
    ("serializer", "pickle"),
    ("bloom_source", "memcached"),
    ("bloom_error_rate", 0.0),
    ("bloom_error_rate", 1.0),
    ("bloom_capacity", 0),
    ("namespace", "has space"),
    ("namespace", "a:b"),
    ("l1_ttl", "10"),  # wrong type
    ("bloom", "yes"),
    ("l1_max_size", 1.5),
    ("schema_version", "2"),
    ("l3_ttl", 1.0),  # unknown setting
    # NaN compares false with everything: "must be > 0" must still reject it
    ("l1_ttl", math.nan),
    ("l2_ttl", math.nan),
    ("negative_ttl", math.nan),
    ("lease_wait", math.nan),
    ("fresh_window", math.nan),
    ("version_ttl", math.inf),
    ("l2_ttl", math.inf),
]


@pytest.mark.parametrize(("name", "value"), POLICY_ERRORS, ids=[f"{n}={v!r}" for n, v in POLICY_ERRORS])
def test_table_policy_errors_name_the_field(name: str, value: Any) -> None:
    err = field_of(topo(None, {name: value}))
    assert err.field == f"tables.users.cache.{name}", err


@pytest.mark.parametrize(("name", "value"), POLICY_ERRORS, ids=[f"{n}={v!r}" for n, v in POLICY_ERRORS])
def test_section_default_errors_name_the_field(name: str, value: Any) -> None:
    err = field_of(topo({name: value}, True))
    assert err.field == f"cache.{name}", err


SETTINGS_ERRORS: list[tuple[str, Any]] = [
    ("timeout", 0),
    ("timeout", -1.0),
    ("timeout", math.nan),
    ("timeout", math.inf),
    ("breaker_failures", 0),
    ("breaker_failures", 1.5),
    ("breaker_reset", 0),
    ("breaker_reset", math.nan),
    ("cluster", "no"),
    ("channel", 5),
    ("redis", 6379),
    ("redis", "http://127.0.0.1:6379"),
    ("redis", "127.0.0.1:6379"),
    ("redis", "redis://127.0.0.1:notaport/0"),
    ("redis", "redis:///0"),
    ("memcached", "x"),  # unknown setting
]


@pytest.mark.parametrize(("name", "value"), SETTINGS_ERRORS, ids=[f"{n}={v!r}" for n, v in SETTINGS_ERRORS])
def test_settings_errors_name_the_field(name: str, value: Any) -> None:
    err = field_of(topo({name: value}, True))
    assert err.field == f"cache.{name}", err


def test_table_cache_of_the_wrong_type() -> None:
    assert field_of(topo(None, 3)).field == "tables.users.cache"
    assert field_of(topo(None, "true")).field == "tables.users.cache"


def test_dataclasses_validate_directly() -> None:
    with pytest.raises(ConfigError) as ei:
        CachePolicy(l2_ttl=-1).validate("x")
    assert ei.value.field == "x.l2_ttl"
    with pytest.raises(ConfigError) as ei:
        CacheSettings(breaker_reset=0).validate()
    assert ei.value.field == "cache.breaker_reset"
    CachePolicy().validate("ok")
    CacheSettings().validate()


# --------------------------------------------------------------------------- secrets

SECRET_URLS = [
    f"redis://:{PW}@127.0.0.1:6379/0",
    f"redis://app:{PW}@127.0.0.1:6379/0",
    f"rediss://:{PW}@cache.example:6380/1?ssl_cert_reqs=required",
    f"redis://:pa@{PW}@127.0.0.1:6379/0",  # '@' inside the password (redis-py splits at the last '@')
    f"redis://:{PW}:x@127.0.0.1:6379/0",  # ':' inside the password
    f"redis://127.0.0.1:6379/0?password={PW}",  # redis-py also takes it from the query
    f"unix://:{PW}@/tmp/redis.sock?db=0",
    f"unix:///tmp/redis.sock?db=0&password={PW}",
]


def _secret_parts() -> list[str]:
    return [PW, PW[:6], PW[-6:]]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_password_never_in_repr_or_str(url: str) -> None:
    d = DSNText(url)
    cfg = Config.from_dict(topo({"redis": url}, True), env={})
    texts = [repr(d), str(d), d.masked, repr(cfg), str(cfg), repr(cfg.cache), str(cfg.cache)]
    for t in texts:
        for part in _secret_parts():
            assert part not in t, t
    assert "***" in d.masked
    assert d.url == url  # the real URL is still there for the client


@pytest.mark.parametrize(
    "url",
    [
        f"http://:{PW}@127.0.0.1:6379/0",
        f"redis://:{PW}@127.0.0.1:notaport/0",
        f"redis://:{PW}@/0",
        f"{PW}",
        f"redis://:{PW}@127.0.0.1:99999999/0",
    ],
)
def test_password_never_in_errors(url: str) -> None:
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(topo({"redis": url}, True), env={})
    text = "".join(traceback.format_exception(ei.value))
    assert ei.value.field == "cache.redis"
    for part in _secret_parts():
        assert part not in text
    with pytest.raises(ConfigError) as ei2:
        Config.from_dict(topo({}, True), env={"DAL_REDIS_URL": url})
    assert PW not in "".join(traceback.format_exception(ei2.value))


def test_password_not_in_layer_repr() -> None:
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False))
    layer = DataLayer(topo({"redis": f"redis://:{PW}@127.0.0.1:1/0"}, True), md, env={})
    assert layer.cache is not None
    for obj in (layer.config, layer.cache._client, layer.cache.bus.client if layer.cache.bus else None):
        assert PW not in repr(obj)


def test_rediss_url_is_accepted() -> None:
    cfg = load_config(topo({"redis": "rediss://127.0.0.1:6380/0"}, True), env={})
    assert cfg.cache.redis is not None and cfg.cache.redis.url.startswith("rediss://")


# --------------------------------------------------------------------------- jitter


class EdgeRng(random.Random):
    """uniform() returns the low end, then the high end, alternately."""

    def __init__(self) -> None:
        super().__init__(0)
        self.flip = False

    def uniform(self, a: float, b: float) -> float:
        self.flip = not self.flip
        return a if self.flip else b


def table_cache(rng: random.Random, **policy: Any) -> TableCache:
    rt = CacheRuntime(redis_url=None, rng=rng)
    return TableCache("users", CachePolicy(**policy), rt, deep_copy=False, scan_keys=None)


def test_ttls_cover_the_jitter_window() -> None:
    tc = table_cache(random.Random(12345), l1_ttl=10.0, l2_ttl=100.0, negative_ttl=30.0, jitter=0.1)
    l2 = [tc._l2_ttl_ms({"id": 1}) / 1000 for _ in range(20_000)]
    assert min(l2) >= 90.0 and max(l2) <= 110.0
    assert min(l2) < 90.1 and max(l2) > 109.9  # reaches both ends
    buckets = {int(x) for x in l2}  # every 1-second slice of 90..110 is used
    assert buckets == set(range(90, 110))
    l1 = [tc._l1_ttl({"id": 1}) for _ in range(5000)]
    assert 9.0 <= min(l1) < 9.05 and 10.95 < max(l1) <= 11.0
    neg = [tc._l2_ttl_ms(None) / 1000 for _ in range(5000)]
    assert 27.0 <= min(neg) < 27.1 and 32.9 < max(neg) <= 33.0
    # L1 holds "absent" no longer than the negative TTL either
    l1_neg = [tc._l1_ttl(None) for _ in range(1000)]
    assert max(l1_neg) <= 11.0
    tc2 = table_cache(random.Random(1), l1_ttl=60.0, negative_ttl=5.0, jitter=0.1)
    assert max(tc2._l1_ttl(None) for _ in range(1000)) <= 5.5


def test_ttl_bounds_exact_with_a_scripted_rng() -> None:
    tc = table_cache(EdgeRng(), l2_ttl=100.0, jitter=0.25)
    assert tc._l2_ttl_ms({"a": 1}) == 75_000
    assert tc._l2_ttl_ms({"a": 1}) == 125_000


def test_same_seed_same_ttls_and_no_jitter_is_exact() -> None:
    a = table_cache(random.Random(7), l2_ttl=100.0)
    b = table_cache(random.Random(7), l2_ttl=100.0)
    assert [a._l2_ttl_ms({}) for _ in range(50)] == [b._l2_ttl_ms({}) for _ in range(50)]
    exact = table_cache(random.Random(7), l2_ttl=100.0, jitter=0.0, negative_ttl=3.0)
    assert {exact._l2_ttl_ms({}) for _ in range(50)} == {100_000}
    assert exact._l2_ttl_ms(None) == 3000


def test_layer_passes_its_rng_to_the_cache() -> None:
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False))
    rng = random.Random(99)
    layer = DataLayer(topo({"l2_ttl": 100.0, "jitter": 0.1}, True), md, env={}, rng=rng)
    tc = layer.cache_of("users")
    assert tc is not None and tc.runtime.rng is rng
    assert layer.cache_of("nope") is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://app:pw@h:1/2", "redis://app:***@h:1/2"),
        ("redis://h:1/0?password=pw&db=1", "redis://h:1/0?password=***&db=1"),
        ("rediss://h:6380/0?ssl_ca_certs=/etc/ca.crt", "rediss://h:6380/0?ssl_ca_certs=/etc/ca.crt"),
        ("unix:///tmp/redis.sock?db=0", "unix:///tmp/redis.sock?db=0"),
        ("redis://[::1]:6379", "redis://[::1]:6379"),
    ],
)
def test_masked_form_keeps_everything_but_the_password(url: str, shown: str) -> None:
    assert str(DSNText(url)) == shown
