"""Topology configuration: frozen, validated once, from TOML, a dict, or code.

A topology is a set of *shard databases* (each one primary and any number of
weighted replicas, with pool settings per node) and a set of *logical tables*
(sharded by a key over ``table_shards`` physical tables, or global on one named
database). Everything is checked when the :class:`Config` is built; a problem
raises :class:`~dal.errors.ConfigError` naming the field, e.g.
``databases.db1.replicas[0].weight: must be > 0``.

TOML form (``dal.toml``)::

    [dal]
    balancing = "weighted"          # round_robin | weighted | least_connections | random
    max_rows_scanned = 100000       # cap on rows a fan-out query may read
    fanout_concurrency = 16         # physical tables queried at once
    metadata = "myapp.models:metadata"   # where the SQLAlchemy tables are declared

    [pool]                          # defaults for every node
    max_size = 20

    [databases.db0]
    primary = "postgresql+asyncpg://app:secret@10.0.0.1/app"
    replicas = ["postgresql+asyncpg://app:secret@10.0.0.2/app",
                { dsn = "postgresql+asyncpg://app:secret@10.0.0.3/app", weight = 3 }]
    pool = { min_size = 2 }         # overrides for this database's nodes

    [tables.users]
    shard_key = "id"
    table_shards = 8                # users_0 .. users_7, spread over every database
    # databases = ["db0", "db1"]    # restrict to some databases
    # slot_map = { db0 = [0, 1, 2, 3], db1 = [4, 5, 6, 7] }   # instead of contiguous ranges

    [tables.countries]
    database = "db0"                # global (unsharded) table

Environment variables override DSNs (``env=`` is injectable): for a database
named ``db0``, ``DAL_DB0_PRIMARY`` replaces the primary DSN and
``DAL_DB0_REPLICAS`` (comma-separated) replaces the replica list. Names are
upper-cased and characters other than letters and digits become ``_``.

A password in a DSN never appears in a message, ``repr`` or log line: DSNs are
held by :class:`~dal.dsn.DSN`, whose ``str``/``repr`` mask it (the rules of DSNs
and their query arguments are :mod:`dal.dsn`; its names are importable from here).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from dal.dsn import DSN as DSN  # (the DSN types are part of the configuration's API)
from dal.dsn import Backend as Backend
from dal.dsn import DSNText as DSNText
from dal.errors import ConfigError
from dal.routing.balancing import POLICIES
from dal.routing.sharding import explicit_slot_map


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Connection pool settings of one node.

    The equivalents of Go's ``database/sql`` knobs: ``max_size`` is
    ``SetMaxOpenConns``, ``min_size`` the connections kept open when idle
    (``SetMaxIdleConns`` keeps at most that many idle beyond ``max_idle_time``),
    ``max_lifetime`` is ``SetConnMaxLifetime`` and ``max_idle_time``
    ``SetConnMaxIdleTime``. Times are seconds; ``None`` disables the limit.

    ``query_timeout`` bounds every statement, COMMIT included (Go passes a
    ``context.WithTimeout`` to each ``QueryContext``/``ExecContext``; dal applies
    one per node). The default, 30 s, keeps one lock held elsewhere from hanging
    a request forever; ``None`` waits without limit. A statement past it is
    cancelled on the server and raises :class:`~dal.errors.QueryTimeoutError`.
    ``cancel_timeout`` is how long a cancelled or timed-out statement is waited
    for to end on the server before its session is ended from another
    connection (and the wait goes on in the background).
    """

    min_size: int = 1
    max_size: int = 10
    acquire_timeout: float = 10.0
    connect_timeout: float = 10.0
    max_lifetime: float | None = 3600.0
    max_idle_time: float | None = 600.0
    statement_cache_size: int = 256
    query_timeout: float | None = 30.0
    cancel_timeout: float = 5.0

    def validate(self, where: str) -> None:
        if self.min_size < 0:
            raise ConfigError(f"{where}.min_size", "must be >= 0")
        if self.max_size < 1:
            raise ConfigError(f"{where}.max_size", "must be >= 1")
        if self.min_size > self.max_size:
            raise ConfigError(f"{where}.min_size", f"must be <= max_size ({self.max_size})")
        for name in ("acquire_timeout", "connect_timeout", "cancel_timeout"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{where}.{name}", "must be a finite number > 0")
        for name in ("max_lifetime", "max_idle_time", "query_timeout"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{where}.{name}", "must be a finite number > 0 (or null)")
        if self.statement_cache_size < 0:
            raise ConfigError(f"{where}.statement_cache_size", "must be >= 0")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One server: the primary or a replica of a shard database."""

    name: str
    dsn: DSN
    role: Literal["primary", "replica"]
    weight: int = 1
    pool: PoolSettings = field(default_factory=PoolSettings)

    @property
    def backend(self) -> Backend:
        return self.dsn.backend


@dataclass(frozen=True, slots=True)
class DatabaseSpec:
    """A shard database: one primary, zero or more replicas."""

    name: str
    primary: NodeSpec
    replicas: tuple[NodeSpec, ...] = ()

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        return (self.primary, *self.replicas)

    @property
    def backend(self) -> Backend:
        return self.primary.backend


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How one table's rows are cached (see :mod:`dal.cache`). Times are seconds.

    Every TTL is drawn from ``ttl * (1 ± jitter)`` per entry, so entries filled
    together do not expire together. ``schema_version`` is part of every L2
    key: bumping it orphans the old entries (they expire by TTL).
    ``fresh_window`` is how long after a write of a key cache fills of that
    key read the primary instead of a replica that may not have replayed it.
    """

    enabled: bool = True
    l1_ttl: float = 10.0
    l1_max_size: int = 10_000
    l2_ttl: float = 300.0
    jitter: float = 0.1
    negative_ttl: float = 30.0
    serializer: str = "msgpack"
    namespace: str = "dal"
    schema_version: int = 1
    bloom: bool = True
    bloom_capacity: int = 1_000_000
    bloom_error_rate: float = 0.001
    bloom_source: str = "database"
    lease_ttl: float = 2.0
    lease_wait: float = 0.25
    fresh_window: float = 5.0
    version_ttl: float = 86_400.0

    def validate(self, where: str) -> None:
        # Written as "not (ok)" so NaN (which compares false) is rejected too; TTLs
        # become integer milliseconds, so they must also be finite.
        for name in ("l1_ttl", "l2_ttl", "negative_ttl", "lease_ttl", "version_ttl"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{where}.{name}", "must be a finite number > 0")
        for name in ("lease_wait", "fresh_window"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{where}.{name}", "must be a finite number >= 0")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"{where}.jitter", "must be in [0, 1)")
        if self.l1_max_size < 1:
            raise ConfigError(f"{where}.l1_max_size", "must be >= 1")
        if self.serializer not in ("msgpack", "json"):
            raise ConfigError(f"{where}.serializer", f"unknown serializer {self.serializer!r}; expected msgpack or json")
        if self.bloom_source not in ("database", "redis"):
            raise ConfigError(f"{where}.bloom_source", "expected database or redis")
        if not 0 < self.bloom_error_rate < 1:
            raise ConfigError(f"{where}.bloom_error_rate", "must be in (0, 1)")
        if self.bloom_capacity < 1:
            raise ConfigError(f"{where}.bloom_capacity", "must be >= 1")
        if not _IDENT.match(self.namespace.replace(".", "_").replace("-", "_")):
            raise ConfigError(f"{where}.namespace", "letters, digits, '_', '-', '.' only")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The shared L2 (Redis) and its failure handling; ``redis`` unset means L1 only.

    Invalidation messages: at most ``max_keys_per_message`` keys each (bigger
    invalidations are split); full resyncs after missed messages at most once per
    ``resync_interval`` seconds; with ``signing_key`` set, every message is signed
    (HMAC-SHA256) and unsigned or badly signed ones are dropped. The key is a
    secret: ``str``/``repr`` show ``***`` in its place.
    """

    redis: DSNText | None = None
    cluster: bool = False
    timeout: float = 0.25
    breaker_failures: int = 3
    breaker_reset: float = 1.0
    channel: str = "dal:invalidate"
    resync_interval: float = 1.0
    max_keys_per_message: int = 1000
    signing_key: str | None = None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={'***' if f.name == 'signing_key' and self.signing_key is not None else repr(getattr(self, f.name))}"
            for f in fields(self)
        )
        return f"CacheSettings({shown})"

    def validate(self) -> None:
        if not (math.isfinite(self.resync_interval) and self.resync_interval >= 0):
            raise ConfigError("cache.resync_interval", "must be a finite number >= 0")
        if self.max_keys_per_message < 1:
            raise ConfigError("cache.max_keys_per_message", "must be >= 1")
        if self.signing_key is not None and not self.signing_key:
            raise ConfigError("cache.signing_key", "must not be empty")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError("cache.timeout", "must be a finite number > 0")
        if self.breaker_failures < 1:
            raise ConfigError("cache.breaker_failures", "must be >= 1")
        if not (math.isfinite(self.breaker_reset) and self.breaker_reset > 0):
            raise ConfigError("cache.breaker_reset", "must be a finite number > 0")


@dataclass(frozen=True, slots=True)
class TableSpec:
    """How a logical table is placed.

    Sharded: ``shard_key`` set, ``table_shards`` physical tables spread over
    ``databases`` (default: all) by contiguous ranges, or by ``slot_map``.
    Global: ``database`` set, no shard key; one physical table named like the
    logical one.
    """

    name: str
    shard_key: str | None = None
    table_shards: int = 1
    databases: tuple[str, ...] | None = None
    slot_map: Mapping[str, tuple[int, ...]] | None = None
    database: str | None = None
    cache: CachePolicy | None = None

    @property
    def is_global(self) -> bool:
        return self.shard_key is None


@dataclass(frozen=True, slots=True)
class Config:
    """A validated topology. Build with :meth:`from_dict`, :meth:`from_toml` or directly."""

    databases: tuple[DatabaseSpec, ...]
    tables: tuple[TableSpec, ...] = ()
    balancing: str = "round_robin"
    max_rows_scanned: int = 100_000
    fanout_concurrency: int = 16
    metadata: str | None = None
    cache: CacheSettings = field(default_factory=CacheSettings)
    in_doubt_timeout: float = 30.0

    def __post_init__(self) -> None:
        self._validate()

    # -- lookup -----------------------------------------------------------------
    def database(self, name: str) -> DatabaseSpec:
        for db in self.databases:
            if db.name == name:
                return db
        raise KeyError(name)

    def table(self, name: str) -> TableSpec | None:
        for t in self.tables:
            if t.name == name:
                return t
        return None

    def with_tables(self, *specs: TableSpec) -> Config:
        """A copy with ``specs`` added (or replacing tables of the same name)."""
        names = {s.name for s in specs}
        return replace(self, tables=tuple(t for t in self.tables if t.name not in names) + specs)

    # -- validation -------------------------------------------------------------
    def _validate(self) -> None:
        if not self.databases:
            raise ConfigError("databases", "at least one shard database is required")
        seen: set[str] = set()
        node_names: set[str] = set()
        for db in self.databases:
            where = f"databases.{db.name}"
            if db.name in seen:
                raise ConfigError(where, "duplicate shard database name")
            seen.add(db.name)
            if db.primary is None:
                raise ConfigError(f"{where}.primary", "missing primary DSN")
            backends = {n.backend for n in db.nodes}
            if len(backends) > 1:
                raise ConfigError(where, f"primary and replicas use different backends: {sorted(backends)}")
            for i, node in enumerate(db.nodes):
                nwhere = f"{where}.primary" if i == 0 else f"{where}.replicas[{i - 1}]"
                if node.weight <= 0:
                    raise ConfigError(f"{nwhere}.weight", f"must be > 0, got {node.weight}")
                if node.name in node_names:
                    raise ConfigError(f"{nwhere}.name", f"duplicate node name {node.name!r}")
                node_names.add(node.name)
                node.pool.validate(f"{nwhere}.pool")
        if self.balancing not in POLICIES:
            raise ConfigError(
                "dal.balancing", f"unknown policy {self.balancing!r}; expected one of {list(POLICIES)}"
            )
        if self.max_rows_scanned < 1:
            raise ConfigError("dal.max_rows_scanned", "must be >= 1")
        if self.fanout_concurrency < 1:
            raise ConfigError("dal.fanout_concurrency", "must be >= 1")
        self.cache.validate()
        tnames: set[str] = set()
        for t in self.tables:
            where = f"tables.{t.name}"
            if t.name in tnames:
                raise ConfigError(where, "duplicate table name")
            tnames.add(t.name)
            if not _IDENT.match(t.name):
                raise ConfigError(where, "table names must be identifiers ([A-Za-z_][A-Za-z0-9_]*)")
            if t.is_global:
                if t.database is None:
                    raise ConfigError(where, "needs shard_key (sharded) or database (global)")
                if t.database not in seen:
                    raise ConfigError(f"{where}.database", f"unknown database {t.database!r}")
                if t.table_shards != 1 or t.slot_map or t.databases:
                    raise ConfigError(where, "a global table (no shard_key) cannot set table_shards, databases or slot_map")
                continue
            if t.database is not None:
                raise ConfigError(f"{where}.database", "only global tables (without shard_key) take database")
            if type(t.table_shards) is not int or t.table_shards < 1:
                raise ConfigError(f"{where}.table_shards", f"must be an integer >= 1, got {t.table_shards!r}")
            for d in t.databases or ():
                if d not in seen:
                    raise ConfigError(f"{where}.databases", f"unknown database {d!r}")
            if t.databases is not None and len(set(t.databases)) != len(t.databases):
                raise ConfigError(f"{where}.databases", "lists a database twice")
            if t.databases is not None and not t.databases:
                raise ConfigError(f"{where}.databases", "must not be empty")
            if t.slot_map is not None:
                explicit_slot_map(t.name, t.table_shards, t.slot_map, t.databases or tuple(seen))
        for t in self.tables:
            if t.cache is not None:
                t.cache.validate(f"tables.{t.name}.cache")
                if self.cache.signing_key is not None and t.cache.bloom_source == "redis":
                    # A signing key says others can write to this Redis; a Bloom snapshot
                    # there answers "absent" for keys that exist (a zeroed one, for all).
                    raise ConfigError(
                        f"tables.{t.name}.cache.bloom_source",
                        "a Bloom filter snapshot in a Redis that others can write cannot be trusted "
                        "(cache.signing_key is set): use bloom_source = \"database\"",
                    )

    # -- loaders ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> Config:
        """Build from the TOML-shaped mapping described in the module docstring.

        ``env`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.
        """
        env = os.environ if env is None else env
        data = dict(data)
        _only(data, {"dal", "pool", "databases", "tables", "cache"}, "")
        top = dict(data.get("dal") or {})
        _only(top, {"balancing", "max_rows_scanned", "fanout_concurrency", "metadata", "in_doubt_timeout"}, "dal")
        default_pool = _pool(data.get("pool") or {}, "pool", PoolSettings())
        items = _named_items(data.get("databases"), "databases")
        prefixes: dict[str, str] = {}
        for name, _ in items:
            other = prefixes.setdefault(_env_name(name), name)
            if other != name:
                raise ConfigError(
                    f"databases.{name}",
                    f"its environment overrides ({_env_name(name)}_*) collide with database {other!r}",
                )
        databases = tuple(_database(name, raw, default_pool, env) for name, raw in items)
        cache_raw = dict(data.get("cache") or {})
        cache_settings, cache_defaults = _cache(cache_raw, env)
        tables = tuple(
            _table(name, raw, cache_defaults) for name, raw in _named_items(data.get("tables"), "tables")
        )
        kwargs: dict[str, Any] = {}
        for key, typ in (("balancing", str), ("max_rows_scanned", int), ("fanout_concurrency", int), ("metadata", str), ("in_doubt_timeout", float)):
            if key in top:
                kwargs[key] = _typed(top[key], typ, f"dal.{key}")
        return cls(databases=databases, tables=tables, cache=cache_settings, **kwargs)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
        """Load ``path`` (a ``dal.toml``)."""
        try:
            with Path(path).open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(str(path), "file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"invalid TOML: {exc}") from None
        return cls.from_dict(data, env=env)


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _only(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"{prefix}{key}", f"unknown setting; expected one of {sorted(allowed)}")


def _typed(value: Any, typ: type, where: str) -> Any:
    if typ is float and type(value) is int:
        return float(value)
    if type(value) is not typ:
        raise ConfigError(where, f"expected {typ.__name__}, got {type(value).__name__}")
    return value


def _named_items(raw: Any, where: str) -> list[tuple[str, Mapping[str, Any]]]:
    """Accept ``{name: {...}}`` or ``[{name: ..., ...}]``; duplicates are caught by Config."""
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        items = []
        for i, entry in enumerate(raw):
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise ConfigError(f"{where}[{i}]", "each entry needs a name")
            rest = {k: v for k, v in entry.items() if k != "name"}
            items.append((entry["name"], rest))
    else:
        raise ConfigError(where, "expected a table of named entries")
    for name, body in items:
        if not isinstance(name, str) or not name:
            raise ConfigError(where, f"invalid name {name!r}")
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}.{name}", "expected a table")
    return items


_POOL_TYPES: dict[str, type] = {
    f.name: (float if "float" in str(f.type) else int) for f in fields(PoolSettings)
}


def _pool(raw: Mapping[str, Any], where: str, base: PoolSettings) -> PoolSettings:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, "expected a table")
    _only(raw, set(_POOL_TYPES), where)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if (value is None or value is False) and "None" in str(PoolSettings.__dataclass_fields__[key].type):
            values[key] = None  # TOML has no null: `query_timeout = false` turns the limit off
        else:
            values[key] = _typed(value, _POOL_TYPES[key], f"{where}.{key}")
    settings = replace(base, **values)
    settings.validate(where)
    return settings


def _env_name(db: str) -> str:
    return "DAL_" + re.sub(r"[^A-Za-z0-9]", "_", db).upper()


def _database(name: str, raw: Mapping[str, Any], default_pool: PoolSettings, env: Mapping[str, str]) -> DatabaseSpec:
    where = f"databases.{name}"
    _only(raw, {"primary", "replicas", "pool"}, where)
    pool = _pool(raw.get("pool") or {}, f"{where}.pool", default_pool)
    prefix = _env_name(name)
    primary_raw = env.get(f"{prefix}_PRIMARY", raw.get("primary"))
    if not primary_raw:
        raise ConfigError(f"{where}.primary", "missing primary DSN")
    primary = _node(f"{name}.primary", primary_raw, "primary", pool, f"{where}.primary")
    replicas_raw: Any = raw.get("replicas") or []
    if f"{prefix}_REPLICAS" in env:
        replicas_raw = [s.strip() for s in env[f"{prefix}_REPLICAS"].split(",") if s.strip()]
    if not isinstance(replicas_raw, list):
        raise ConfigError(f"{where}.replicas", "expected a list")
    replicas = tuple(
        _node(f"{name}.replica{i}", r, "replica", pool, f"{where}.replicas[{i}]")
        for i, r in enumerate(replicas_raw)
    )
    return DatabaseSpec(name=name, primary=primary, replicas=replicas)


def _node(default_name: str, raw: Any, role: Literal["primary", "replica"], pool: PoolSettings, where: str) -> NodeSpec:
    if isinstance(raw, str):
        return NodeSpec(default_name, DSN(raw, field_name=where), role, 1, pool)
    if not isinstance(raw, Mapping):
        raise ConfigError(where, "expected a DSN string or a table with dsn")
    _only(raw, {"dsn", "weight", "name", "pool"}, where)
    if "dsn" not in raw:
        raise ConfigError(f"{where}.dsn", "missing DSN")
    weight = _typed(raw.get("weight", 1), int, f"{where}.weight")
    if weight <= 0:
        raise ConfigError(f"{where}.weight", f"must be > 0, got {weight}")
    name = _typed(raw.get("name", default_name), str, f"{where}.name")
    node_pool = _pool(raw.get("pool") or {}, f"{where}.pool", pool)
    return NodeSpec(name, DSN(raw["dsn"], field_name=f"{where}.dsn"), role, weight, node_pool)


_CACHE_SETTINGS = {
    "redis": str, "cluster": bool, "timeout": float, "breaker_failures": int, "breaker_reset": float, "channel": str,
    "resync_interval": float, "max_keys_per_message": int, "signing_key": str,
}  # fmt: skip
_POLICY_TYPES: dict[str, type] = {
    f.name: {"bool": bool, "float": float, "int": int, "str": str}[str(f.type)] for f in fields(CachePolicy)
}


def _cache(raw: Mapping[str, Any], env: Mapping[str, str]) -> tuple[CacheSettings, CachePolicy]:
    """``[cache]``: the Redis settings plus defaults for every table's policy."""
    _only(raw, set(_CACHE_SETTINGS) | set(_POLICY_TYPES), "cache")
    settings: dict[str, Any] = {}
    for key, typ in _CACHE_SETTINGS.items():
        if key in raw:
            settings[key] = _typed(raw[key], typ, f"cache.{key}")
    url = env.get("DAL_REDIS_URL", settings.get("redis"))
    settings["redis"] = DSNText(url) if url else None
    if "DAL_CACHE_SIGNING_KEY" in env:
        settings["signing_key"] = env["DAL_CACHE_SIGNING_KEY"]
    defaults = _policy({k: v for k, v in raw.items() if k in _POLICY_TYPES}, "cache", CachePolicy(enabled=False))
    return CacheSettings(**settings), defaults


def _policy(raw: Mapping[str, Any], where: str, base: CachePolicy) -> CachePolicy:
    _only(raw, set(_POLICY_TYPES), where)
    values = {k: _typed(v, _POLICY_TYPES[k], f"{where}.{k}") for k, v in raw.items()}
    policy = replace(base, **values)
    policy.validate(where)
    return policy


def _table(name: str, raw: Mapping[str, Any], cache_defaults: CachePolicy | None = None) -> TableSpec:
    where = f"tables.{name}"
    _only(raw, {"shard_key", "table_shards", "databases", "slot_map", "database", "cache"}, where)
    cache: CachePolicy | None = None
    cache_raw = raw.get("cache")
    base = cache_defaults or CachePolicy(enabled=False)
    if cache_raw is True:
        cache = replace(base, enabled=True)
    elif isinstance(cache_raw, Mapping):
        cache = _policy(cache_raw, f"{where}.cache", replace(base, enabled=True))
    elif cache_raw is None or cache_raw is False:
        cache = base if base.enabled else None
    else:
        raise ConfigError(f"{where}.cache", "expected true, false or a table of cache settings")
    shard_key = raw.get("shard_key")
    if shard_key is not None:
        shard_key = _typed(shard_key, str, f"{where}.shard_key")
    shards = raw.get("table_shards", 1)
    if type(shards) is not int:
        raise ConfigError(f"{where}.table_shards", f"expected an integer, got {type(shards).__name__}")
    dbs = raw.get("databases")
    if dbs is not None:
        if not isinstance(dbs, list) or not all(isinstance(d, str) for d in dbs):
            raise ConfigError(f"{where}.databases", "expected a list of database names")
        dbs = tuple(dbs)
    slot_map = raw.get("slot_map")
    if slot_map is not None:
        if not isinstance(slot_map, Mapping):
            raise ConfigError(f"{where}.slot_map", "expected a table of database = [slots]")
        for db, owned in slot_map.items():
            if not isinstance(owned, list | tuple):
                raise ConfigError(f"{where}.slot_map.{db}", "expected a list of slot numbers")
        slot_map = {k: tuple(v) for k, v in slot_map.items()}
    database = raw.get("database")
    if database is not None:
        database = _typed(database, str, f"{where}.database")
    return TableSpec(name, shard_key, shards, dbs, slot_map, database, cache if cache and cache.enabled else None)


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | Config,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """A :class:`Config` from a path to TOML, a mapping, or a Config (returned as is)."""
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        return Config.from_dict(source, env=env)
    return Config.from_toml(source, env=env)
