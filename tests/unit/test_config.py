"""Topology configuration: loading, validation (ConfigError.field), env overrides, secrets.

Pure: nothing here connects. ``DataLayer(...)`` is constructed (it does no I/O
before ``start()``) only to exercise the checks that need the declared tables.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dal import DataLayer
from dal.config import DSN, Config, DatabaseSpec, NodeSpec, PoolSettings, TableSpec, load_config
from dal.errors import ConfigError
from dal.schema import bind_tables

PW = "s3cr3t-PW"
SECRET_DSN = f"postgresql+asyncpg://app:{PW}@db.example/app"


def pg(host: str, pw: str = "pw") -> str:
    return f"postgresql+asyncpg://app:{pw}@{host}/app"


def full_topology() -> dict[str, Any]:
    """2 shard databases with weighted replicas, pool overrides, sharded and global tables."""
    return {
        "dal": {
            "balancing": "weighted",
            "max_rows_scanned": 5000,
            "fanout_concurrency": 4,
            "metadata": "myapp.models:metadata",
        },
        "pool": {"max_size": 20, "acquire_timeout": 2.5},
        "databases": {
            "db0": {
                "primary": pg("10.0.0.1"),
                "replicas": [
                    pg("10.0.0.2"),
                    {"dsn": pg("10.0.0.3"), "weight": 3, "name": "db0-big", "pool": {"max_size": 50}},
                ],
                "pool": {"min_size": 2},
            },
            "db1": {
                "primary": {"dsn": pg("10.0.1.1"), "pool": {"max_size": 40, "query_timeout": 30}},
                "replicas": [{"dsn": pg("10.0.1.2"), "weight": 2}, {"dsn": pg("10.0.1.3"), "weight": 5}],
            },
        },
        "tables": {
            "users": {"shard_key": "id", "table_shards": 8},
            "orders": {"shard_key": "user_id", "table_shards": 4, "slot_map": {"db0": [0, 3], "db1": [1, 2]}},
            "events": {"shard_key": "id", "table_shards": 2, "databases": ["db1"]},
            "countries": {"database": "db0"},
        },
    }


FULL_TOML = """
[dal]
balancing = "weighted"
max_rows_scanned = 5000
fanout_concurrency = 4
metadata = "myapp.models:metadata"

[pool]
max_size = 20
acquire_timeout = 2.5

[databases.db0]
primary = "postgresql+asyncpg://app:pw@10.0.0.1/app"
replicas = [
    "postgresql+asyncpg://app:pw@10.0.0.2/app",
    { dsn = "postgresql+asyncpg://app:pw@10.0.0.3/app", weight = 3, name = "db0-big", pool = { max_size = 50 } },
]
pool = { min_size = 2 }

[databases.db1]
primary = { dsn = "postgresql+asyncpg://app:pw@10.0.1.1/app", pool = { max_size = 40, query_timeout = 30 } }
replicas = [
    { dsn = "postgresql+asyncpg://app:pw@10.0.1.2/app", weight = 2 },
    { dsn = "postgresql+asyncpg://app:pw@10.0.1.3/app", weight = 5 },
]

[tables.users]
shard_key = "id"
table_shards = 8

[tables.orders]
shard_key = "user_id"
table_shards = 4
slot_map = { db0 = [0, 3], db1 = [1, 2] }

[tables.events]
shard_key = "id"
table_shards = 2
databases = ["db1"]

[tables.countries]
database = "db0"
"""


def metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.BigInteger, primary_key=True), sa.Column("name", sa.String(64)))
    sa.Table(
        "orders", md,
        sa.Column("user_id", sa.BigInteger, primary_key=True),
        sa.Column("order_id", sa.Integer, primary_key=True),
    )
    sa.Table("events", md, sa.Column("id", sa.String(36), primary_key=True))
    sa.Table("countries", md, sa.Column("code", sa.String(2), primary_key=True))
    return md


def sqlite_topology(tables: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Two SQLite shard databases (never opened: nothing here connects)."""
    return {
        "databases": {
            "db0": {"primary": "sqlite+aiosqlite:////nonexistent/db0.sqlite3"},
            "db1": {"primary": "sqlite+aiosqlite:////nonexistent/db1.sqlite3"},
        },
        "tables": tables,
        **extra,
    }


def minimal(**db0: Any) -> dict[str, Any]:
    return {"databases": {"db0": {"primary": pg("h0"), **db0}}}


# -- valid topologies --------------------------------------------------------------------


def check_full(cfg: Config) -> None:
    assert cfg.balancing == "weighted"
    assert cfg.max_rows_scanned == 5000
    assert cfg.fanout_concurrency == 4
    assert cfg.metadata == "myapp.models:metadata"
    assert [d.name for d in cfg.databases] == ["db0", "db1"]

    db0 = cfg.database("db0")
    assert isinstance(db0, DatabaseSpec)
    assert db0.backend == "postgresql"
    assert [n.name for n in db0.nodes] == ["db0.primary", "db0.replica0", "db0-big"]
    assert [n.role for n in db0.nodes] == ["primary", "replica", "replica"]
    assert [n.weight for n in db0.nodes] == [1, 1, 3]
    assert db0.primary.dsn.url.host == "10.0.0.1"
    assert db0.replicas[1].dsn.url.host == "10.0.0.3"
    # pool: defaults <- [pool] <- database pool <- node pool
    assert db0.primary.pool == PoolSettings(min_size=2, max_size=20, acquire_timeout=2.5)
    assert db0.replicas[1].pool == PoolSettings(min_size=2, max_size=50, acquire_timeout=2.5)

    db1 = cfg.database("db1")
    assert [n.weight for n in db1.replicas] == [2, 5]
    assert [n.name for n in db1.replicas] == ["db1.replica0", "db1.replica1"]
    assert db1.primary.pool.max_size == 40
    assert db1.primary.pool.query_timeout == 30.0
    assert isinstance(db1.primary.pool.query_timeout, float)
    assert db1.replicas[0].pool == PoolSettings(max_size=20, acquire_timeout=2.5)

    users, orders, events, countries = (cfg.table(n) for n in ("users", "orders", "events", "countries"))
    assert users == TableSpec("users", shard_key="id", table_shards=8)
    assert orders is not None and orders.slot_map == {"db0": (0, 3), "db1": (1, 2)}
    assert events is not None and events.databases == ("db1",)
    assert countries is not None and countries.is_global and countries.database == "db0"
    assert cfg.table("nope") is None
    with pytest.raises(KeyError):
        cfg.database("nope")


def test_full_topology_from_dict() -> None:
    check_full(Config.from_dict(full_topology(), env={}))


def test_full_topology_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "dal.toml"
    path.write_text(FULL_TOML, encoding="utf-8")
    cfg = Config.from_toml(path, env={})
    check_full(cfg)
    assert cfg == Config.from_dict(full_topology(), env={})
    assert load_config(path, env={}) == cfg
    assert load_config(str(path), env={}) == cfg
    assert load_config(full_topology(), env={}) == cfg
    assert load_config(cfg) is cfg


def test_list_forms_are_accepted() -> None:
    data = full_topology()
    data["databases"] = [{"name": k, **v} for k, v in data["databases"].items()]
    data["tables"] = [{"name": k, **v} for k, v in data["tables"].items()]
    assert Config.from_dict(data, env={}) == Config.from_dict(full_topology(), env={})


def test_from_dict_does_not_mutate_its_input() -> None:
    data = full_topology()
    before = copy.deepcopy(data)
    Config.from_dict(data, env={"DAL_DB0_PRIMARY": pg("x")})
    assert data == before


def test_full_topology_binds_to_tables() -> None:
    """Placement of the full table set, on SQLite URLs (nothing is opened)."""
    tables = full_topology()["tables"]
    layer = DataLayer(sqlite_topology(tables), metadata(), env={})
    users = layer.tables["users"]
    assert [p.database for p in users.placements] == ["db0"] * 4 + ["db1"] * 4
    assert [p.table for p in users.placements] == [f"users_{i}" for i in range(8)]
    assert [p.database for p in layer.tables["orders"].placements] == ["db0", "db1", "db1", "db0"]
    assert [p.database for p in layer.tables["events"].placements] == ["db1", "db1"]
    countries = layer.tables["countries"]
    assert countries.is_global
    assert [(p.database, p.table) for p in countries.placements] == [("db0", "countries")]
    assert set(layer.cluster.nodes) == {"db0.primary", "db1.primary"}


def test_direct_construction_validates() -> None:
    node = NodeSpec("n0", DSN(pg("h")), "primary")
    Config(databases=(DatabaseSpec("db0", node),))  # fine
    with pytest.raises(ConfigError) as ei:
        Config(databases=())
    assert ei.value.field == "databases"
    bad = NodeSpec("r0", DSN(pg("h", PW)), "replica", weight=0)
    with pytest.raises(ConfigError) as ei:
        Config(databases=(DatabaseSpec("db0", node, (bad,)),))
    assert ei.value.field == "databases.db0.replicas[0].weight"
    assert PW not in str(ei.value)


# -- invalid topologies: ConfigError.field names the setting -----------------------------------

Mutator = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutator:
    """A mutator setting a dotted path (created as needed) in the full topology."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return mutate


def _del(path: str) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for p in parents:
            node = node[p]
        del node[last]

    return mutate


def _replica(db: str, i: int, value: Any) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        data["databases"][db]["replicas"][i] = value

    return mutate


def _list_databases_dup(data: dict[str, Any]) -> None:
    data["databases"] = [{"name": "db0", "primary": pg("a")}, {"name": "db0", "primary": pg("b")}]
    data["tables"] = {}


def _list_tables_dup(data: dict[str, Any]) -> None:
    data["tables"] = [{"name": "users", "shard_key": "id"}, {"name": "users", "database": "db0"}]


BAD: list[tuple[str, Mutator, str]] = [
    ("missing primary", _del("databases.db0.primary"), "databases.db0.primary"),
    ("empty primary", _set("databases.db0.primary", ""), "databases.db0.primary"),
    ("primary table without dsn", _set("databases.db0.primary", {"weight": 1}), "databases.db0.primary.dsn"),
    ("no databases", _set("databases", {}), "databases"),
    ("duplicate database (list form)", _list_databases_dup, "databases.db0"),
    ("duplicate table (list form)", _list_tables_dup, "tables.users"),
    ("list entry without name", _set("databases", [{"primary": pg("a")}]), "databases[0]"),
    ("scheme oracle", _set("databases.db0.primary", "oracle://app:pw@h/x"), "databases.db0.primary"),
    ("scheme psycopg2", _set("databases.db0.primary", "postgresql+psycopg2://app:pw@h/x"), "databases.db0.primary"),
    ("scheme in replica", _replica("db0", 0, "mysql+pymysql://u@h/x"), "databases.db0.replicas[0]"),
    ("scheme in replica table", _replica("db0", 1, {"dsn": "redis://h/0"}), "databases.db0.replicas[1].dsn"),
    ("mixed backends", _replica("db0", 0, "mysql+aiomysql://u@h/x"), "databases.db0"),
    ("replicas not a list", _set("databases.db0.replicas", pg("r")), "databases.db0.replicas"),
    ("unknown balancing", _set("dal.balancing", "fastest"), "dal.balancing"),
    ("balancing not a str", _set("dal.balancing", 1), "dal.balancing"),
    ("max_rows_scanned 0", _set("dal.max_rows_scanned", 0), "dal.max_rows_scanned"),
    ("fanout_concurrency 0", _set("dal.fanout_concurrency", 0), "dal.fanout_concurrency"),
    ("table_shards 0", _set("tables.users.table_shards", 0), "tables.users.table_shards"),
    ("table_shards -1", _set("tables.users.table_shards", -1), "tables.users.table_shards"),
    ("table_shards '4'", _set("tables.users.table_shards", "4"), "tables.users.table_shards"),
    ("table_shards 4.0", _set("tables.users.table_shards", 4.0), "tables.users.table_shards"),
    ("table_shards True", _set("tables.users.table_shards", True), "tables.users.table_shards"),
    ("weight 0", _replica("db1", 0, {"dsn": pg("r"), "weight": 0}), "databases.db1.replicas[0].weight"),
    ("weight -1", _replica("db1", 1, {"dsn": pg("r"), "weight": -1}), "databases.db1.replicas[1].weight"),
    ("weight '2'", _replica("db1", 0, {"dsn": pg("r"), "weight": "2"}), "databases.db1.replicas[0].weight"),
    ("weight True", _replica("db1", 0, {"dsn": pg("r"), "weight": True}), "databases.db1.replicas[0].weight"),
    ("primary weight 0", _set("databases.db0.primary", {"dsn": pg("p"), "weight": 0}), "databases.db0.primary.weight"),
    ("typo at top level", _set("databse", {}), "databse"),
    ("typo in [dal]", _set("dal.balance", "weighted"), "dal.balance"),
    ("typo in a database", _set("databases.db0.primray", pg("x")), "databases.db0.primray"),
    ("typo in a replica", _replica("db0", 1, {"dsn": pg("r"), "wieght": 2}), "databases.db0.replicas[1].wieght"),
    ("typo in a table", _set("tables.users.shardkey", "id"), "tables.users.shardkey"),
    ("typo in [pool]", _set("pool.max_sise", 3), "pool.max_sise"),
    ("typo in a database pool", _set("databases.db0.pool.max_sise", 3), "databases.db0.pool.max_sise"),
    ("typo in a node pool", _replica("db0", 1, {"dsn": pg("r"), "pool": {"min": 1}}), "databases.db0.replicas[1].pool.min"),
    ("min_size > max_size", _set("pool.min_size", 21), "pool.min_size"),
    ("min_size > max_size in a database", _set("databases.db0.pool.min_size", 30), "databases.db0.pool.min_size"),
    ("min_size > inherited max_size in a node", _replica("db0", 0, {"dsn": pg("r"), "pool": {"max_size": 1}}),
     "databases.db0.replicas[0].pool.min_size"),
    ("max_size 0", _set("pool.max_size", 0), "pool.max_size"),
    ("min_size -1", _set("pool.min_size", -1), "pool.min_size"),
    ("acquire_timeout 0", _set("pool.acquire_timeout", 0), "pool.acquire_timeout"),
    ("max_lifetime -5", _set("pool.max_lifetime", -5), "pool.max_lifetime"),
    ("max_size '10'", _set("pool.max_size", "10"), "pool.max_size"),
    ("pool not a table", _set("databases.db0.pool", [1]), "databases.db0.pool"),
    ("duplicate node name", _replica("db0", 1, {"dsn": pg("r"), "name": "db0.primary"}),
     "databases.db0.replicas[1].name"),
    ("global table with table_shards", _set("tables.countries.table_shards", 2), "tables.countries"),
    ("global table on unknown database", _set("tables.countries.database", "db9"), "tables.countries.database"),
    ("neither shard_key nor database", _del("tables.countries.database"), "tables.countries"),
    ("sharded table with database", _set("tables.users.database", "db0"), "tables.users.database"),
    ("unknown database in databases", _set("tables.events.databases", ["db9"]), "tables.events.databases"),
    ("database listed twice", _set("tables.events.databases", ["db1", "db1"]), "tables.events.databases"),
    ("empty databases", _set("tables.events.databases", []), "tables.events.databases"),
    ("table name not an identifier", _set("tables.bad-name", {"database": "db0"}), "tables.bad-name"),
    ("slot_map not a table", _set("tables.orders.slot_map", [0, 1]), "tables.orders.slot_map"),
    ("slot_map entry not a list", _set("tables.orders.slot_map", {"db0": 0, "db1": [1, 2, 3]}),
     "tables.orders.slot_map.db0"),
]


@pytest.mark.parametrize(("mutate", "field"), [pytest.param(m, f, id=i) for i, m, f in BAD])
def test_invalid_config(mutate: Mutator, field: str) -> None:
    data = full_topology()
    mutate(data)
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(data, env={})
    assert ei.value.field == field, str(ei.value)
    assert str(ei.value).startswith(f"{field}: ")


def test_toml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        Config.from_toml(tmp_path / "missing.toml", env={})
    assert ei.value.field.endswith("missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[databases.db0]\nprimary = "postgresql+asyncpg://app:' + PW + '@db/app\n', encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        Config.from_toml(bad, env={})
    assert "invalid TOML" in str(ei.value)
    assert PW not in str(ei.value)
    typo = tmp_path / "typo.toml"
    typo.write_text(FULL_TOML.replace("table_shards = 8", "table_shard = 8"), encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        Config.from_toml(typo, env={})
    assert ei.value.field == "tables.users.table_shard"


# -- checks that need the declared tables ------------------------------------------------------


def bind_error(tables: dict[str, Any], md: sa.MetaData) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        DataLayer(sqlite_topology(tables), md, env={})
    # bind_tables is the same check without the rest of the layer
    cfg = Config.from_dict(sqlite_topology(tables), env={})
    with pytest.raises(ConfigError) as ei2:
        bind_tables(cfg, md)
    assert ei2.value.field == ei.value.field
    return ei.value


def test_shard_key_not_a_column() -> None:
    err = bind_error({"users": {"shard_key": "user_id", "table_shards": 2}}, metadata())
    assert err.field == "tables.users.shard_key"
    assert "user_id" in err.problem


def test_shard_key_not_in_primary_key() -> None:
    err = bind_error({"users": {"shard_key": "name", "table_shards": 2}}, metadata())
    assert err.field == "tables.users.shard_key"
    assert "primary key" in err.problem


def test_configured_table_missing_from_metadata() -> None:
    err = bind_error({"payments": {"shard_key": "id", "table_shards": 2}}, metadata())
    assert err.field == "tables.payments"


def test_table_without_primary_key() -> None:
    md = metadata()
    sa.Table("logs", md, sa.Column("id", sa.Integer), sa.Column("line", sa.Text))
    err = bind_error({"logs": {"database": "db0"}}, md)
    assert err.field == "tables.logs"
    assert "primary key" in err.problem


@pytest.mark.parametrize(
    "slot_map",
    [{"db0": [0], "db9": [1]}, {"db0": [0], "db1": [2]}, {"db0": [0, 1], "db1": [1]}, {"db0": [0]}],
    ids=["unknown database", "out of range", "mapped twice", "unmapped"],
)
def test_bad_slot_map_is_reported_at_load_time(slot_map: dict[str, list[int]]) -> None:
    tables = {"users": {"shard_key": "id", "table_shards": 2, "slot_map": slot_map}}
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(sqlite_topology(tables), env={})
    assert ei.value.field.startswith("tables.users.slot_map"), ei.value.field


def test_slot_map_restricted_to_listed_databases() -> None:
    tables = {"users": {"shard_key": "id", "table_shards": 2, "databases": ["db1"], "slot_map": {"db0": [0, 1]}}}
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(sqlite_topology(tables), env={})
    assert ei.value.field == "tables.users.slot_map"


def test_env_override_names_must_not_collide() -> None:
    cfg = sqlite_topology({})
    cfg["databases"] = {"eu-west": {"primary": "sqlite+aiosqlite:///a.db"}, "eu_west": {"primary": "sqlite+aiosqlite:///b.db"}}
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(cfg, env={})
    assert ei.value.field == "databases.eu_west"
    assert "DAL_EU_WEST" in ei.value.problem


def test_tables_without_metadata() -> None:
    with pytest.raises(ConfigError) as ei:
        DataLayer(sqlite_topology({"users": {"shard_key": "id"}}), env={})
    assert ei.value.field == "dal.metadata"


# -- passwords never leak -------------------------------------------------------------------


def secret_topology() -> dict[str, Any]:
    return {
        "databases": {
            "db0": {
                "primary": SECRET_DSN,
                "replicas": [SECRET_DSN.replace("db.example", "r1.example"),
                             {"dsn": SECRET_DSN.replace("db.example", "r2.example"), "weight": 4}],
            }
        },
        "tables": {"users": {"shard_key": "id", "table_shards": 2}},
    }


def test_dsn_masks_password() -> None:
    dsn = DSN(SECRET_DSN)
    for text in (str(dsn), repr(dsn), dsn.masked, f"{dsn}", f"{dsn!r}"):
        assert PW not in text
        assert "***" in text and "db.example" in text
    assert dsn.url.password == PW  # still usable for connecting
    assert dsn == DSN(SECRET_DSN) and hash(dsn) == hash(DSN(SECRET_DSN))
    assert dsn.backend == "postgresql"


def test_specs_and_config_mask_password() -> None:
    cfg = Config.from_dict(secret_topology(), env={})
    db = cfg.databases[0]
    objs: list[object] = [cfg, db, *db.nodes, *(n.dsn for n in db.nodes)]
    for obj in objs:
        assert PW not in str(obj), type(obj)
        assert PW not in repr(obj), type(obj)
    assert all(n.dsn.url.password == PW for n in db.nodes)


def test_layer_nodes_mask_password() -> None:
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.BigInteger, primary_key=True))
    layer = DataLayer(secret_topology(), md, env={})
    assert len(layer.cluster.nodes) == 3
    for node in layer.cluster.nodes.values():
        assert PW not in repr(node)
        assert PW not in str(node)
        assert "***" in repr(node)


def _secret_errors() -> list[tuple[str, dict[str, Any]]]:
    def with_primary(value: Any) -> dict[str, Any]:
        return {"databases": {"db0": {"primary": value}}}

    def with_replica(value: Any) -> dict[str, Any]:
        return {"databases": {"db0": {"primary": SECRET_DSN, "replicas": [value]}}}

    return [
        ("unknown scheme", with_primary(f"oracle://app:{PW}@h/x")),
        ("unknown driver", with_primary(f"postgresql+psycopg2://app:{PW}@h/x")),
        ("garbage", with_primary(f"not a url app:{PW}@")),
        ("garbage with scheme", with_primary(f"://app:{PW}@h")),
        ("bad port", with_primary(f"postgresql+asyncpg://app:{PW}@db.example:port/app")),
        ("password only", with_primary(PW)),
        ("replica weight 0", with_replica({"dsn": SECRET_DSN, "weight": 0})),
        ("replica weight -1", with_replica({"dsn": SECRET_DSN, "weight": -1})),
        ("replica weight str", with_replica({"dsn": SECRET_DSN, "weight": "x"})),
        ("replica typo", with_replica({"dsn": SECRET_DSN, "wieght": 2})),
        ("replica pool", with_replica({"dsn": SECRET_DSN, "pool": {"min_size": 5, "max_size": 1}})),
        ("replica bad scheme", with_replica({"dsn": f"mssql://sa:{PW}@h/x"})),
        ("mixed backends", with_replica(f"mysql+aiomysql://app:{PW}@h/x")),
        ("duplicate node name", with_replica({"dsn": SECRET_DSN, "name": "db0.primary"})),
        ("not a DSN", with_replica(12345)),
    ]


@pytest.mark.parametrize(("data"), [pytest.param(d, id=i) for i, d in _secret_errors()])
def test_config_errors_never_show_the_password(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(data, env={})
    err = ei.value
    rendered = "".join(traceback.format_exception(err))
    for text in (str(err), repr(err), err.field, err.problem, rendered):
        assert PW not in text, text


def test_env_dsn_errors_never_show_the_password() -> None:
    env = {"DAL_DB0_PRIMARY": f"oracle://app:{PW}@h/x"}
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(minimal(), env=env)
    assert ei.value.field == "databases.db0.primary"
    assert PW not in str(ei.value)
    env = {"DAL_DB0_REPLICAS": f"{SECRET_DSN},garbage:{PW}@"}
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(minimal(), env=env)
    assert ei.value.field == "databases.db0.replicas[1]"
    assert PW not in "".join(traceback.format_exception(ei.value))


# -- environment overrides -------------------------------------------------------------------


def test_env_overrides_primary_and_replicas() -> None:
    data = full_topology()
    env = {
        "DAL_DB0_PRIMARY": pg("env-primary"),
        "DAL_DB0_REPLICAS": f"{pg('u1')}, {pg('u2')}",
        "DAL_DB2_PRIMARY": pg("unused"),  # no such database: ignored
    }
    cfg = Config.from_dict(data, env=env)
    db0, db1 = cfg.database("db0"), cfg.database("db1")
    assert db0.primary.dsn.url.host == "env-primary"
    assert [r.dsn.url.host for r in db0.replicas] == ["u1", "u2"]
    assert [r.weight for r in db0.replicas] == [1, 1]
    assert [r.role for r in db0.replicas] == ["replica", "replica"]
    assert db0.primary.pool.min_size == 2  # the database's pool still applies
    # db1 untouched
    assert db1 == Config.from_dict(full_topology(), env={}).database("db1")


def test_env_only_primary() -> None:
    cfg = Config.from_dict({"databases": {"db0": {}}}, env={"DAL_DB0_PRIMARY": pg("from-env")})
    assert cfg.databases[0].primary.dsn.url.host == "from-env"


def test_env_empty_replicas_clears_them() -> None:
    cfg = Config.from_dict(full_topology(), env={"DAL_DB1_REPLICAS": ""})
    assert cfg.database("db1").replicas == ()


def test_env_name_mangling() -> None:
    data = {"databases": {"eu-west": {"primary": pg("orig")}, "us.east-2": {"primary": pg("orig2")}}}
    env = {"DAL_EU_WEST_PRIMARY": pg("eu"), "DAL_US_EAST_2_REPLICAS": pg("us-r")}
    cfg = Config.from_dict(data, env=env)
    assert cfg.database("eu-west").primary.dsn.url.host == "eu"
    assert [r.dsn.url.host for r in cfg.database("us.east-2").replicas] == ["us-r"]
    # the exact (unmangled) or lower-case names are not consulted
    cfg = Config.from_dict(data, env={"DAL_eu-west_PRIMARY": pg("x"), "dal_eu_west_primary": pg("y")})
    assert cfg.database("eu-west").primary.dsn.url.host == "orig"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAL_DB0_PRIMARY", pg("from-os-environ"))
    assert Config.from_dict(minimal()).databases[0].primary.dsn.url.host == "from-os-environ"
    assert Config.from_dict(minimal(), env={}).databases[0].primary.dsn.url.host == "h0"


def test_env_applies_to_toml(tmp_path: Path) -> None:
    path = tmp_path / "dal.toml"
    path.write_text(FULL_TOML, encoding="utf-8")
    cfg = Config.from_toml(path, env={"DAL_DB1_PRIMARY": pg("toml-env")})
    assert cfg.database("db1").primary.dsn.url.host == "toml-env"
