"""Imports follow the layers of docs/architecture.md: nothing imports upward.

Every ``import``/``from ... import`` of every module under ``dal/`` is read from the
source (also those inside functions and under ``TYPE_CHECKING``: a lazy import that
runs upward is a circle all the same) and checked against the floor of each module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DAL = Path(__file__).resolve().parents[2] / "dal"

# Lower number = lower floor. A module may import modules of its own floor or below.
FLOORS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("dal.errors", "dal.clock", "dal.events")),
    (1, ("dal.breaker", "dal.routing.sharding", "dal.routing.balancing")),
    (2, ("dal.config", "dal.dsn", "dal.values")),
    (3, ("dal.routing.router", "dal.schema", "dal.sql", "dal.filters", "dal.backends", "dal.cache",
         "dal.query")),
    (4, ("dal.cluster",)),
    (5, ("dal.binding",)),
    (6, ("dal.batch",)),
    (7, ("dal.repository",)),
    (8, ("dal.layer", "dal.migrate")),
    (9, ("dal.demo", "dal.bench", "dal.cli", "dal.__main__", "dal")),
]


def floor_of(module: str) -> int:
    best: tuple[int, int] | None = None  # (prefix length, floor): the longest prefix wins
    for floor, prefixes in FLOORS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), floor)
    assert best is not None, f"{module} is on no floor: add it to FLOORS"
    return best[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(DAL.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("dal")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name == "dal" or name.startswith("dal."):
                out.append((node.lineno, name))
    return out


MODULES = sorted(p for p in DAL.rglob("*.py"))


def upward(me: str, imports: list[tuple[int, str]]) -> list[str]:
    """The imports of module ``me`` that run to a higher floor than its own."""
    mine = floor_of(me)
    return [
        f"line {line}: {name} (floor {floor_of(name)})"
        for line, name in imports
        if name != "dal" and floor_of(name) > mine and not name.startswith(me + ".")
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_runs_upward(path: Path) -> None:
    me = module_name(path)
    found = upward(me, imports_of(path))
    assert not found, f"{me} (floor {floor_of(me)}) imports upward: {found}"


def test_the_check_bites() -> None:
    """The circle this layout broke (batch -> repository, repository -> layer) is caught;
    the downward direction is allowed."""
    assert upward("dal.batch.running", [(1, "dal.repository")])
    assert upward("dal.repository", [(1, "dal.layer")])
    assert upward("dal.backends.postgres", [(1, "dal.cluster")])
    assert not upward("dal.repository", [(1, "dal.batch"), (2, "dal.binding"), (3, "dal.cache.local")])
    assert not upward("dal.batch", [(1, "dal.batch.writer")])
