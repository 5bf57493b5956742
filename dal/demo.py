"""``dal demo``: a small users-and-orders app, end to end, with an account of the routing.

On the embedded default it needs no server: two SQLite files (one per shard
database), each holding 2 of the 4 table shards of ``demo_users`` and
``demo_orders``. The demo creates and drops only those two tables, so pointing
it at a real topology never touches the application's own tables.
``--config FILE`` runs the same against any topology (the demo adds its two
tables to the configuration when the file does not declare them).
"""

from __future__ import annotations

import re
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import TextIO

import sqlalchemy as sa

from dal.cluster import Node
from dal.config import Config, TableSpec, load_config
from dal.filters import ge
from dal.layer import DataLayer


def demo_metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "demo_users",
        md,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("email", sa.String(128)),
    )
    sa.Table(
        "demo_orders",
        md,
        sa.Column("user_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("order_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        sa.Column("item", sa.String(64), nullable=False),
    )
    return md


def demo_config(directory: Path) -> Config:
    """The embedded default: 2 SQLite shard databases x 4 table shards."""
    return Config.from_dict(
        {
            "databases": {
                "db0": {"primary": f"sqlite+aiosqlite:///{directory / 'shard0.sqlite3'}"},
                "db1": {"primary": f"sqlite+aiosqlite:///{directory / 'shard1.sqlite3'}"},
            },
            "tables": {
                "demo_users": {"shard_key": "id", "table_shards": 4},
                "demo_orders": {"shard_key": "user_id", "table_shards": 4},
            },
        },
        env={},
    )


DEMO_TABLES = ("demo_users", "demo_orders")

_TABLE = re.compile(
    r"\b(?:FROM|INTO|UPDATE|TABLE(?:\s+IF(?:\s+NOT)?\s+EXISTS)?)\s+[`\"]?(\w+)", re.IGNORECASE
)


class _Trace:
    """Collects where each statement of one step ran."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str]] = []

    def __call__(self, node: Node, sql: str) -> None:
        m = _TABLE.search(sql)
        self.hits.append((node.name, m.group(1) if m else sql.split()[0]))

    def take(self) -> str:
        seen: dict[tuple[str, str], int] = {}
        for hit in self.hits:
            seen[hit] = seen.get(hit, 0) + 1
        self.hits.clear()
        parts = [f"{table}@{node}" + (f" x{n}" if n > 1 else "") for (node, table), n in seen.items()]
        return ", ".join(parts) if parts else "-"


async def run_demo(config: str | None = None, *, directory: str | None = None, out: TextIO) -> None:
    """Run the demo and write a readable account to ``out``."""
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if config is None:
        if directory is None:
            tmp = tempfile.TemporaryDirectory(prefix="dal-demo-")
            directory = tmp.name
        cfg = demo_config(Path(directory))
    else:
        cfg = load_config(config)
        cfg = cfg.with_tables(
            *(
                TableSpec(name, shard_key=key, table_shards=4)
                for name, key in (("demo_users", "id"), ("demo_orders", "user_id"))
                if cfg.table(name) is None
            )
        )
    say = out.write
    try:
        async with DataLayer(cfg, demo_metadata()) as layer:
            trace = _Trace()
            layer.cluster.observe(trace)
            say("dal demo: users and orders\n")
            for db in cfg.databases:
                replicas = f", {len(db.replicas)} replica(s)" if db.replicas else ""
                say(f"  shard database {db.name}: {db.primary.dsn.masked}{replicas}\n")
            for t in layer.tables.values():
                spread = {db: [p.table for p in t.placements if p.database == db] for db in t.databases}
                say(f"  {t.name}: shard key {t.shard_key!r}, " + "; ".join(f"{db}: {', '.join(ts)}" for db, ts in spread.items()) + "\n")

            await layer.drop_all(DEMO_TABLES)
            trace.take()
            await layer.create_all(DEMO_TABLES)
            say(f"\n1. schema created, one physical table per slot: {trace.take()}\n")

            users = layer.repository("demo_users")
            orders = layer.repository("demo_orders")
            people = ["Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances"]
            for uid, name in enumerate(people, start=1):
                await users.insert({"id": uid, "name": name, "email": f"{name.lower()}@example.com"})
            say(f"\n2. inserted 8 users, each on the primary of its shard: {trace.take()}\n")
            for uid in range(1, 9):
                t = layer.tables["demo_users"]
                p = t.place(uid)
                say(f"     user {uid}: crc32('{uid}') % 4 = slot {p.slot} -> {p.table} on {p.database}\n")
            trace.take()

            n = 0
            for uid in range(1, 9):
                for k in range(uid % 3 + 1):
                    n += 1
                    await orders.insert(
                        {"user_id": uid, "order_id": k, "amount": Decimal(10 * uid + k) + Decimal("0.99"), "item": f"item-{k}"}
                    )
            say(f"\n3. inserted {n} orders next to their users (sharded by user_id): {trace.take()}\n")

            row = await users.get(3)
            say(f"\n4. get(3) -> {row}\n   routed to {trace.take()} (a read: replica if any, else primary)\n")

            many = await users.get_many([1, 2, 3, 4, 5, 6, 99])
            say(f"\n5. get_many([1..6, 99]) -> {len(many)} rows (99 does not exist)\n   one query per physical table: {trace.take()}\n")

            await users.update(2, {"email": "grace@navy.mil"})
            say(f"\n6. update(2) -> {trace.take()}; now {await users.get(2)}\n")
            trace.take()

            await users.delete(8)
            say(f"\n7. delete(8) -> {trace.take()}; get(8) -> {await users.get(8)}\n")
            trace.take()

            big = await orders.find({"amount": ge(Decimal("40"))}, order_by="-amount", limit=5)
            say("\n8. cross-shard query: orders with amount >= 40, largest first, limit 5\n")
            say(f"   fanned out to every physical table: {trace.take()}\n")
            for o in big:
                say(f"     user {o['user_id']} order {o['order_id']}: {o['amount']}\n")
            total = await orders.count()
            say(f"   count() over all shards -> {total}  ({trace.take()})\n")

            async with users.transaction(5) as tx:
                await tx.update(5, {"name": "Ken Thompson"})
                await tx.repository("demo_orders").insert({"user_id": 5, "order_id": 9, "amount": Decimal("1.00"), "item": "unix"})
            shard_db = layer.tables["demo_users"].place(5).database
            say(f"\n9. transaction on user 5's shard database ({shard_db}): user renamed and order added, committed together\n")
            user5 = await users.get(5)
            say(f"   {user5} with {await orders.count({'user_id': 5})} orders ({trace.take()})\n")

            say("\nstatements per node: " + ", ".join(f"{n.name}={n.queries}" for n in layer.cluster.nodes.values()) + "\n")
            await layer.drop_all(DEMO_TABLES)
    finally:
        if tmp is not None:
            tmp.cleanup()
