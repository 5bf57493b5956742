"""Logical tables bound to their placement, and validation of caller values
(the per-column rules themselves are :mod:`dal.values`).

A :class:`LogicalTable` joins three things: the SQLAlchemy ``Table`` the app
declared (columns, types, primary key, indexes), the :class:`~dal.config.TableSpec`
that says how it is placed, and the :class:`~dal.routing.sharding.Sharder` that
computes placements. It also knows the physical tables (``users_0`` ...), which
share the logical table's columns, and checks every value a caller passes
against the declared column before anything is sent.

Identifiers in SQL come only from here: a column name a caller passes is looked
up in the declared table and rejected with
:class:`~dal.errors.UnknownColumnError` when absent.
"""

from __future__ import annotations

import collections
import decimal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, is_dataclass
from itertools import repeat
from typing import Any

import sqlalchemy as sa

from dal.config import Config, TableSpec
from dal.errors import ConfigError, ShardKeyError, UnknownColumnError, ValidationError
from dal.routing.sharding import (
    Placement,
    Sharder,
    contiguous_slot_map,
    encode_cache_key,
    encode_key,
    explicit_slot_map,
)
from dal.values import Backends, Checker, checker_for, fast_kind, python_type, utf8_ok


def sharder_for(spec: TableSpec, config: Config) -> Sharder | None:
    """The sharder of a sharded table (``None`` for a global one)."""
    if spec.shard_key is None:
        return None
    dbs = spec.databases or tuple(d.name for d in config.databases)
    if spec.slot_map is not None:
        slot_dbs = explicit_slot_map(spec.name, spec.table_shards, spec.slot_map, dbs)
    else:
        slot_dbs = contiguous_slot_map(spec.table_shards, dbs)
    return Sharder(spec.name, spec.table_shards, slot_dbs)


def placements_for(spec: TableSpec, config: Config) -> tuple[Placement, ...]:
    """Every physical table of a configured table (needs no declared columns)."""
    sharder = sharder_for(spec, config)
    if sharder is not None:
        return sharder.placements
    assert spec.database is not None
    return (Placement(0, spec.database, spec.name),)


def physical_table(logical: sa.Table, name: str, metadata: sa.MetaData) -> sa.Table:
    """A copy of ``logical`` named ``name`` in ``metadata``.

    Named indexes and constraints get the physical name as suffix, because
    PostgreSQL index names are unique per schema and several physical tables
    share one database.
    """
    if name == logical.name:
        copy = logical.to_metadata(metadata)
    else:
        copy = logical.to_metadata(metadata, name=name)
        suffix = name[len(logical.name) :]
        for idx in copy.indexes:
            if idx.name is not None and not str(idx.name).startswith("ix_" + name):
                idx.name = sa.sql.elements.quoted_name(f"{idx.name}{suffix}", None)
        for cons in copy.constraints:
            if isinstance(cons.name, str) and cons.name:
                cons.name = f"{cons.name}{suffix}"
    # MySQL's default collations compare 'a' = 'A' = 'a ': two keys CRC32 routes
    # apart would collide in one table. Compare as exactly as routing does,
    # unless the declaration chose a collation itself.
    declared = copy.dialect_kwargs  # (only the dialect arguments the declaration gave)
    if "mysql_collate" not in declared:
        mysql_opts = copy.dialect_options["mysql"]
        mysql_opts["charset"] = declared.get("mysql_charset", "utf8mb4")
        mysql_opts["collate"] = "utf8mb4_bin"
    return copy


class Key:
    """A caller's primary key, located once: its validated column ``values`` (in primary-key
    order), the ``slot`` of its physical table, and its ``cache_key`` bytes (computed on
    first use, or given when the caller had them already). Made by
    :meth:`LogicalTable.locate`; a read by key, its cache lookup, its load and a write by
    key all use the one object."""

    __slots__ = ("_cache_key", "slot", "values")

    def __init__(self, values: tuple[Any, ...], slot: int, cache_key: bytes | None = None) -> None:
        self.values = values
        self.slot = slot
        self._cache_key = cache_key

    @property
    def cache_key(self) -> bytes:
        enc = self._cache_key
        if enc is None:
            enc = self._cache_key = encode_cache_key(self.values)
        return enc

    def __repr__(self) -> str:
        return f"Key(slot={self.slot}, columns={len(self.values)})"  # (never the values)


class LogicalTable:
    """A declared table, its placement, its physical tables and its value checks."""

    def __init__(self, spec: TableSpec, table: sa.Table, config: Config) -> None:
        self.name = spec.name
        self.spec = spec
        self.table = table
        where = f"tables.{spec.name}"
        self.columns: tuple[str, ...] = tuple(c.name for c in table.columns)
        pk = tuple(c.name for c in table.primary_key.columns)
        if not pk:
            raise ConfigError(where, "the declared table needs a primary key")
        self.primary_key = pk
        if spec.shard_key is not None:
            if spec.shard_key not in table.c:
                raise ConfigError(
                    f"{where}.shard_key",
                    f"{spec.shard_key!r} is not a column of {spec.name!r} (columns: {list(self.columns)})",
                )
            if spec.shard_key not in pk:
                # Uniqueness is only enforceable inside one physical table, and a
                # lookup by primary key must be able to route.
                raise ConfigError(
                    f"{where}.shard_key",
                    f"the primary key {list(pk)} must include the shard key {spec.shard_key!r}",
                )
        self.sharder: Sharder | None = sharder_for(spec, config)
        self.shard_key: str | None = spec.shard_key
        self.placements: tuple[Placement, ...] = placements_for(spec, config)
        self.shard_key_index = pk.index(self.shard_key) if self.shard_key in pk else 0
        # Value rules depend on where the rows are stored: the strictest rule among
        # the backends of the table's physical tables applies.
        self.backends: Backends = frozenset(config.database(p.database).backend for p in self.placements)
        self.checkers: dict[str, Checker] = {c.name: checker_for(c, self.backends) for c in table.columns}
        self._single_pk = len(pk) == 1
        self._nullable = {c.name: bool(c.nullable) for c in table.columns}
        self._fast_kinds = {c.name: k for c in table.columns if (k := fast_kind(c, self.backends)) is not None}
        # 10 ** -scale of each fast Decimal column: values must quantize to it unchanged
        self._quanta = {
            n: decimal.Decimal(1).scaleb(-(getattr(table.c[n].type, "scale", None) or 0))
            for n, k in self._fast_kinds.items()
            if k[0] is decimal.Decimal
        }
        self._nul_ok = "postgresql" not in self.backends
        kind = self._fast_kinds.get(pk[0]) if self._single_pk else None
        self.pk_kind: type | None = kind[0] if kind is not None else None
        # Values that callers could mutate in place (JSON, arrays): cached rows are deep-copied.
        self.mutable_values = any(python_type(c) in (dict, list, object) for c in table.columns)
        self._pk_checker = self.checkers[pk[0]]
        auto = table.autoincrement_column
        self.required = tuple(
            c.name
            for c in table.columns
            if not c.nullable and c.default is None and c.server_default is None and c is not auto
        )
        # Python-side defaults (Column(default=...)/onupdate=...) that SQLAlchemy would
        # apply at execution time; dal executes itself, so it applies them here.
        self.defaults = tuple(
            (c.name, c.default) for c in table.columns if isinstance(c.default, sa.ColumnDefault)
        )
        self.onupdate = tuple(
            (c.name, c.onupdate) for c in table.columns if isinstance(c.onupdate, sa.ColumnDefault)
        )
        self._physical_md = sa.MetaData()
        self.physical: tuple[sa.Table, ...] = tuple(
            physical_table(table, p.table, self._physical_md) for p in self.placements
        )

    # -- placement -------------------------------------------------------------
    @property
    def is_global(self) -> bool:
        return self.sharder is None

    @property
    def databases(self) -> tuple[str, ...]:
        """The shard databases holding at least one physical table, in slot order."""
        return tuple(dict.fromkeys(p.database for p in self.placements))

    def place(self, shard_value: object) -> Placement:
        """Placement of a row whose shard key is ``shard_value``."""
        if self.sharder is None:
            return self.placements[0]
        return self.sharder.place(shard_value)

    # -- validation --------------------------------------------------------------
    def column(self, name: object) -> str:
        """``name`` if it is a declared column, else :class:`UnknownColumnError`."""
        if type(name) is str and name in self.checkers:
            return name
        raise UnknownColumnError(f"table {self.name!r} has no column {name!r}")

    def check_value(self, column: str, value: object) -> None:
        problem = self.checkers[column](value)
        if problem is not None:
            raise ValidationError(f"{self.name}.{column}: {problem}")

    def locate_key(self, key: object) -> tuple[int, tuple[Any, ...]]:
        """Validate a primary key; return its slot and its column values.

        The hot path of every lookup by key: one encode + CRC32 and one type
        check for the common single-column key.
        """
        if self._single_pk:
            if key is None:
                # as key_values(): ShardKeyError only when the key is the shard key
                raise (ShardKeyError if self.sharder is not None else ValidationError)(
                    f"{self.name}.{self.primary_key[0]}: key value must not be None"
                )
            try:
                slot = 0 if self.sharder is None else self.sharder.slot(key)
            except ShardKeyError:
                # a str without UTF-8 (a lone surrogate) is a bad value of the column
                if isinstance(key, str) and (problem := self._pk_checker(key)) is not None:
                    raise ValidationError(f"{self.name}.{self.primary_key[0]}: {problem}") from None
                raise
            problem = self._pk_checker(key)
            if problem is not None:
                raise ValidationError(f"{self.name}.{self.primary_key[0]}: {problem}")
            return slot, (key,)
        values = self.key_values(key)
        if self.sharder is None:
            return 0, values
        return self.sharder.slot(values[self.shard_key_index]), values

    def locate(self, key: object) -> Key:
        """Validate a primary key (scalar, or tuple for a composite key) and locate it."""
        slot, values = self.locate_key(key)
        return Key(values, slot)

    def cache_key(self, key: object) -> tuple[bytes, tuple[Any, ...]]:
        """Validate a primary key; return its cache key bytes and its column values."""
        if self._single_pk:
            if key is None:
                raise (ShardKeyError if self.sharder is not None else ValidationError)(
                    f"{self.name}.{self.primary_key[0]}: key value must not be None"
                )
            problem = self._pk_checker(key)
            if problem is not None:
                raise ValidationError(f"{self.name}.{self.primary_key[0]}: {problem}")
            try:
                return encode_key(key, table=self.name), (key,)
            except ShardKeyError:
                if self.sharder is not None:
                    raise
        values = self.key_values(key)
        return encode_cache_key(values), values

    def locate_cached(self, key: object, encoded: bytes | None = None) -> Key:
        """:meth:`locate` with the cache key bytes computed at once, each part once (a
        single-column shard key's cache bytes are the bytes its CRC32 is taken of).
        ``encoded``: the cache bytes when the caller has them already (an int key,
        encoded to probe L1 before validation)."""
        if encoded is not None and self._single_pk:
            problem = self._pk_checker(key)
            if problem is not None:
                raise ValidationError(f"{self.name}.{self.primary_key[0]}: {problem}")
            enc, kv = encoded, (key,)
        else:
            enc, kv = self.cache_key(key)
        sharder = self.sharder
        if sharder is None:
            return Key(kv, 0, enc)
        if self._single_pk:
            return Key(kv, sharder.slot_of_encoded(enc), enc)
        return Key(kv, sharder.slot(kv[self.shard_key_index]), enc)

    def key_values(self, key: object) -> tuple[Any, ...]:
        """Validate a primary key (scalar or tuple) and return its column values."""
        pk = self.primary_key
        if len(pk) == 1:
            values: tuple[Any, ...] = (key,)
        elif isinstance(key, tuple) and len(key) == len(pk):
            values = key
        else:
            raise ValidationError(
                f"{self.name}: the key must be a tuple of {len(pk)} values {list(pk)}, got {type(key).__name__}"
            )
        for col, v in zip(pk, values, strict=True):
            if v is None:
                raise (ShardKeyError if col == self.shard_key else ValidationError)(
                    f"{self.name}.{col}: key value must not be None"
                )
            if isinstance(v, str):  # (a lone surrogate: a bad value of the column, not of the key)
                self.check_value(col, v)
            if col == self.shard_key:
                encode_key(v, table=self.name)
            self.check_value(col, v)
        return values

    def checked_values(self, row: object, *, index: int | None = None) -> dict[str, Any]:
        """The given columns of ``row``, each checked against its declaration (no defaults)."""
        data = as_mapping(row, self.name)
        at = f" (row {index})" if index is not None else ""
        out: dict[str, Any] = {}
        for name, value in data.items():
            if type(name) is not str or name not in self.checkers:
                raise UnknownColumnError(f"table {self.name!r} has no column {name!r}{at}")
            problem = self.checkers[name](value)
            if problem is not None:
                raise ValidationError(f"{self.name}.{name}: {problem}{at}")
            out[name] = value
        return out

    def row_values(self, row: object, *, index: int | None = None) -> dict[str, Any]:
        """Validate a full row for insert; returns a new dict of declared columns."""
        out = self.checked_values(row, index=index)
        at = f" (row {index})" if index is not None else ""
        for name, default in self.defaults:
            if name not in out:
                out[name] = default_value(default)
        for name in self.required:
            if name not in out:
                raise ValidationError(f"{self.name}.{name}: required column missing{at}")
        if self.shard_key is not None:
            encode_key(out[self.shard_key], table=self.name)
        return out

    def column_ok(self, name: str, values: list[Any], kinds: set[type] | None = None) -> bool:
        """Whether every value fits column ``name`` (a fast check over a whole column).

        ``kinds``: the set of the values' types, when the caller has it already.
        False says only that some value is bad; validate row by row to learn which.
        """
        kind = self._fast_kinds.get(name)
        nullable = self._nullable[name]
        if kinds is None:
            kinds = set(map(type, values))  # C-speed loop over the column
        if nullable and type(None) in kinds:
            values = [v for v in values if v is not None]
            kinds = kinds - {type(None)}
        if kind is not None and values:
            typ, lo, hi = kind
            if kinds != {typ}:
                return False
            if typ is str:
                if hi is not None and max(map(len, values)) > hi:
                    return False
                # one string, one scan (joining cannot pair two lone surrogates into a valid one)
                whole = "".join(values)
                if not whole.isascii() and not utf8_ok(whole):
                    return False  # a lone surrogate
                return self._nul_ok or "\x00" not in whole
            if typ is int:
                return bool(lo <= min(values) and max(values) <= hi)
            if typ is decimal.Decimal:
                try:
                    if not (lo < min(values) and max(values) < hi):
                        return False
                    # No non-zero digit beyond the scale: quantizing any such value is Inexact.
                    # (A context's own quantize and one flag check: no result compared.)
                    ctx = decimal.Context(prec=decimal.MAX_PREC, traps=[decimal.InvalidOperation])
                    collections.deque(map(ctx.quantize, values, repeat(self._quanta[name])), maxlen=0)
                    return not ctx.flags[decimal.Inexact]
                except ArithmeticError:  # NaN
                    return False
            return True
        check = self.checkers[name]
        return all(check(v) is None for v in values)

    def row_reader(self, columns: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...] | None]:
        """A fast read of one row's values of ``columns``, checked: the fast path of
        single-row writes, where validating each row is per-row overhead.

        The returned function takes a mapping holding every one of ``columns``
        and returns its values as a tuple in that order when each passes its
        column's checker (as :meth:`checked_values` checks it), else ``None``:
        some value is bad, or of a kind tested only by its checker here; check
        the row with :meth:`checked_values` to learn which. Columns with a fast
        kind are tested inline (exact type, then the same bounds as their
        checker, as :meth:`column_ok` does for a whole column); the others call
        their checker.

        The function is generated (one Python frame per row, where a call per
        column costs several times as much). Its source holds only positions and
        names bound in its namespace, never a column name or a value.
        """
        ns: dict[str, Any] = {"type": type, "len": len, "utf8": utf8_ok}
        reads, tests = [], []
        for i, name in enumerate(columns):
            v = f"v{i}"
            ns[f"k{i}"] = name
            reads.append(f"    {v} = row[k{i}]\n")
            kind = self._fast_kinds.get(name)
            if kind is None:
                ns[f"c{i}"] = self.checkers[name]
                tests.append(f"c{i}({v}) is None")
                continue
            typ, lo, hi = kind
            ns[f"t{i}"], ns[f"lo{i}"], ns[f"hi{i}"] = typ, lo, hi
            test = f"type({v}) is t{i}"
            if typ is int:
                test += f" and lo{i} <= {v} <= hi{i}"
            elif typ is str:
                if hi is not None:
                    test += f" and len({v}) <= hi{i}"
                test += f" and ({v}.isascii() or utf8({v}))"  # no lone surrogate
                if not self._nul_ok:
                    test += f" and '\\x00' not in {v}"
            elif typ is decimal.Decimal:  # bounds exclusive; NaN does not compare (caught below)
                ns[f"q{i}"] = self._quanta[name]
                # quantize: no digit beyond the scale (it raises past 28 digits: caught below)
                test += f" and lo{i} < {v} < hi{i} and {v}.quantize(q{i}) == {v}"
            if self._nullable[name]:
                test = f"{v} is None or {test}"
            tests.append(f"({test})")
        src = (
            "def read(row):\n"
            + "".join(reads)
            + "    try:\n"
            + f"        if {' and '.join(tests) or 'True'}:\n"
            + f"            return ({''.join(f'v{i}, ' for i in range(len(columns)))})\n"
            + "    except ArithmeticError:\n"
            + "        pass\n"
            + "    return None\n"
        )
        exec(src, ns)
        fn: Callable[[Mapping[str, Any]], tuple[Any, ...] | None] = ns["read"]
        return fn

    def update_values(self, values: object) -> dict[str, Any]:
        """Validate a partial row for update; the primary key cannot change."""
        data = as_mapping(values, self.name)
        if not data:
            raise ValidationError(f"{self.name}: update needs at least one column")
        out: dict[str, Any] = {}
        for name, value in data.items():
            col = self.column(name)
            if col in self.primary_key:
                raise ValidationError(f"{self.name}.{col}: primary key columns cannot be updated")
            self.check_value(col, value)
            out[col] = value
        for name, default in self.onupdate:
            if name not in out:
                out[name] = default_value(default)
        return out

    def key_of(self, row: Mapping[str, Any]) -> Any:
        """The primary key of a row: a scalar, or a tuple for composite keys."""
        if len(self.primary_key) == 1:
            return row[self.primary_key[0]]
        return tuple(row[c] for c in self.primary_key)


def default_value(default: sa.ColumnDefault) -> Any:
    # SQLAlchemy wraps every callable default to take an execution context.
    return default.arg(None) if default.is_callable else default.arg


def as_mapping(row: object, table: str) -> Mapping[str, Any]:
    """Accept a mapping or a dataclass instance as a row."""
    if type(row) is dict or isinstance(row, Mapping):  # the exact check skips the ABC machinery
        return row
    if is_dataclass(row) and not isinstance(row, type):
        return {f.name: getattr(row, f.name) for f in fields(row)}
    raise ValidationError(f"{table}: a row must be a mapping or a dataclass, got {type(row).__name__}")


def not_a_collection(items: object, argument: str, table: str) -> None:
    """ValidationError when ``items`` is a str, bytes, bytearray or Mapping: iterable,
    but not a collection of keys or rows (``get_many("abc")`` would be three keys)."""
    if isinstance(items, str | bytes | bytearray | memoryview | Mapping):
        raise ValidationError(
            f"{table}: {argument} must be a collection of {argument} (a list, tuple, set, ...), "
            f"got a {type(items).__name__}"
        )


def bind_tables(
    config: Config, metadata: sa.MetaData | Iterable[sa.Table]
) -> dict[str, LogicalTable]:
    """Join every configured table with its declaration; ConfigError when one is missing."""
    if isinstance(metadata, sa.MetaData):
        declared = dict(metadata.tables)
    else:
        declared = {t.name: t for t in metadata}
    out: dict[str, LogicalTable] = {}
    for spec in config.tables:
        table = declared.get(spec.name)
        if table is None:
            raise ConfigError(f"tables.{spec.name}", "no such table in the declared MetaData")
        out[spec.name] = LogicalTable(spec, table, config)
    return out
