"""Migration files: ``NNNN_name.py`` with ``upgrade(op)``, ``downgrade(op)`` and a docstring."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dal.migrate.ops import MigrationError

_FILE = re.compile(r"^(\d+)_([A-Za-z0-9_]+)\.py$")


@dataclass(frozen=True)
class Migration:
    """One migration file. ``version`` is its numeric prefix as written (``"0003"``)."""

    version: str
    name: str
    path: Path
    doc: str
    upgrade: Callable[[Any], None]
    downgrade: Callable[[Any], None]

    @property
    def number(self) -> int:
        return int(self.version)

    @property
    def label(self) -> str:
        return f"{self.version}_{self.name}"


def load_migrations(directory: str | Path) -> list[Migration]:
    """Every migration in ``directory``, ordered by version; duplicates and bad files raise."""
    d = Path(directory)
    if not d.is_dir():
        raise MigrationError(f"migrations directory {str(d)!r} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(d.glob("*.py")):
        m = _FILE.match(path.name)
        if m is None:
            if path.name != "__init__.py":
                raise MigrationError(f"{path}: migration files are named NNNN_name.py")
            continue
        version, name = m.group(1), m.group(2)
        spec = importlib.util.spec_from_file_location(f"dal_migration_{version}_{name}", path)
        if spec is None or spec.loader is None:
            raise MigrationError(f"{path}: cannot be loaded")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise MigrationError(f"{path}: {type(exc).__name__}: {exc}") from exc
        up, down = getattr(module, "upgrade", None), getattr(module, "downgrade", None)
        if not callable(up) or not callable(down):
            raise MigrationError(f"{path}: needs upgrade(op) and downgrade(op)")
        mig = Migration(version, name, path, (module.__doc__ or "").strip(), up, down)
        if mig.number in found:
            raise MigrationError(f"{path}: version {version} is also used by {found[mig.number].path.name}")
        found[mig.number] = mig
    return [found[k] for k in sorted(found)]


_SKELETON = '''"""{title}."""

import sqlalchemy as sa


def upgrade(op):
    pass


def downgrade(op):
    pass
'''


def new_migration(directory: str | Path, name: str) -> Path:
    """Write a skeleton with the next version number; returns its path."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise MigrationError(f"migration name {name!r}: use letters, digits and underscores")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in d.glob("*.py") if (m := _FILE.match(p.name))]
    path = d / f"{max(numbers, default=0) + 1:04d}_{name}.py"
    path.write_text(_SKELETON.format(title=name.replace("_", " ").capitalize()))
    return path


def resolve_target(migrations: list[Migration], to: str | None) -> int | None:
    """``--to V`` as a version number (``0`` = before the first); unknown versions raise."""
    if to is None:
        return None
    if not to.isdigit():
        raise MigrationError(f"--to {to!r}: expected a version number")
    n = int(to)
    if n != 0 and all(m.number != n for m in migrations):
        raise MigrationError(f"--to {to}: no migration has this version")
    return n
