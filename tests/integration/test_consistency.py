"""A read must see every write committed before it started, on every backend.

The writer and the reader are two DataLayer instances (separate pools). The
reader's connections are opened and kept warm by earlier reads, so a driver
that kept a snapshot open across pool checkouts (aiomysql's default
``autocommit=False`` under REPEATABLE READ) would return stale rows here.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from dal import DataLayer, Role, Target, in_

SHARDS = 4


def db_of(key: int) -> str:
    return "db0" if zlib.crc32(str(key).encode()) % SHARDS < 2 else "db1"


async def test_second_layer_sees_every_committed_write(
    layer: DataLayer, make_layer: Callable[..., DataLayer]
) -> None:
    writer = layer.repository("users")
    ids = list(range(1, 9))
    assert {db_of(i) for i in ids} == {"db0", "db1"}
    for i in ids:
        await writer.insert({"id": i, "name": f"u{i}", "age": -1})
    async with make_layer() as other:
        reader = other.repository("users")
        # warm every pooled connection of the reader (max_size 8 per node)
        for _ in range(3):
            rows = await asyncio.gather(*(reader.get(i) for i in ids for _ in range(4)))
            assert all(r is not None and r["age"] == -1 for r in rows)
        assert max(n.pool.size for n in other.cluster.nodes.values()) > 1

        for it in range(50):
            uid = ids[it % len(ids)]
            assert await writer.update(uid, {"age": it}) is True
            got = await asyncio.gather(*(reader.get(uid) for _ in range(8)))
            assert [r["age"] for r in got] == [it] * 8, it  # type: ignore[index]
            found = await reader.find({"id": uid})
            assert [r["age"] for r in found] == [it], it
            assert (await reader.get_many([uid]))[uid]["age"] == it
            assert await reader.count({"age": it}) == 1

        # inserts and deletes become visible too
        for it in range(10):
            new = 1000 + it
            await writer.insert({"id": new, "name": "new"})
            assert await reader.get(new) is not None
            assert await reader.count() == len(ids) + 1
            assert await writer.delete(new) is True
            assert await reader.get(new) is None
            assert await reader.count() == len(ids)

        # a committed transaction is visible at once
        uid = ids[0]
        async with writer.transaction(uid) as tx:
            await tx.update(uid, {"name": "txname"})
            await tx.repository("orders").insert({"user_id": uid, "order_id": 1, "amount": Decimal("1.00")})
        assert (await reader.get(uid))["name"] == "txname"  # type: ignore[index]
        assert await other.repository("orders").get((uid, 1)) is not None

        # and the reverse direction
        assert await reader.update(ids[1], {"name": "from-other"}) is True
        assert (await writer.get(ids[1]))["name"] == "from-other"  # type: ignore[index]


async def test_rollback_is_never_visible_to_another_layer(
    layer: DataLayer, make_layer: Callable[..., DataLayer]
) -> None:
    writer = layer.repository("users")
    await writer.insert({"id": 5, "name": "orig"})
    async with make_layer() as other:
        reader = other.repository("users")
        for it in range(10):
            with pytest.raises(RuntimeError):
                async with writer.transaction(5) as tx:
                    await tx.update(5, {"name": f"never{it}"})
                    assert (await reader.get(5))["name"] == "orig"  # type: ignore[index]
                    raise RuntimeError
            assert (await reader.get(5))["name"] == "orig"  # type: ignore[index]


@pytest.fixture
def roles(layer: DataLayer, monkeypatch: pytest.MonkeyPatch) -> list[Role]:
    """The role of every target the layer's cluster resolved (outside transactions)."""
    seen: list[Role] = []
    original = layer.cluster.node

    def spy(target: Target) -> Any:
        seen.append(target.role)
        return original(target)

    monkeypatch.setattr(layer.cluster, "node", spy)
    return seen


async def test_read_primary_scope_and_primary_flag(layer: DataLayer, roles: list[Role]) -> None:
    users = layer.repository("users")
    await users.insert({"id": 1, "name": "a"})
    assert roles == [Role.PRIMARY]  # writes go to the primary

    async def reads() -> list[Any]:
        return [
            await users.get(1),
            await users.get_many([1, 2]),
            await users.find({"name": "a"}),
            await users.find({"id": in_([1])}),
            await users.count(),
        ]

    roles.clear()
    plain = await reads()
    assert plain[0] == {"id": 1, "name": "a", "email": None, "age": None, "active": True}
    assert set(roles) == {Role.REPLICA}

    roles.clear()
    assert await users.get(1, primary=True) == plain[0]
    assert await users.get_many([1], primary=True) == {1: plain[0]}
    assert await users.find({"name": "a"}, primary=True) == [plain[0]]
    assert await users.count(primary=True) == 1
    assert set(roles) == {Role.PRIMARY}

    roles.clear()
    with layer.read_primary():
        assert await reads() == plain
    assert set(roles) == {Role.PRIMARY}

    roles.clear()
    async with layer.read_primary():
        assert await reads() == plain
        with layer.read_primary():  # nesting
            await users.get(1)
        await users.get(1)  # still inside the outer scope
    assert set(roles) == {Role.PRIMARY}

    # the scope ends with the block, also on error
    with pytest.raises(ZeroDivisionError):
        async with layer.read_primary():
            raise ZeroDivisionError
    roles.clear()
    assert await reads() == plain
    assert set(roles) == {Role.REPLICA}


async def test_read_primary_scope_is_per_task_and_per_layer(
    layer: DataLayer, roles: list[Role], make_layer: Callable[..., DataLayer]
) -> None:
    users = layer.repository("users")
    await users.insert({"id": 2, "name": "b"})
    inside = asyncio.Event()
    release = asyncio.Event()

    async def scoped() -> None:
        async with layer.read_primary():
            inside.set()
            await release.wait()

    task = asyncio.create_task(scoped())
    await inside.wait()
    roles.clear()
    await users.get(2)  # another task: not in the scope
    assert roles == [Role.REPLICA]
    release.set()
    await task

    async with make_layer() as other:
        other_roles: list[Role] = []
        original = other.cluster.node

        def spy(target: Target) -> Any:
            other_roles.append(target.role)
            return original(target)

        other.cluster.node = spy  # type: ignore[method-assign]
        with layer.read_primary():
            assert await other.repository("users").get(2) is not None
        assert other_roles == [Role.REPLICA]
