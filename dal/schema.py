"""Logical tables bound to their placement, and validation of caller values.

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
import datetime as dt
import decimal
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, is_dataclass
from itertools import repeat
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import dialect as mysql_dialect

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

Checker = Callable[[Any], str | None]
"""Returns a problem description for a bad value, ``None`` for a good one."""

Backends = frozenset[str]
"""The backends (``"postgresql"``, ``"mysql"``, ``"sqlite"``) a table's physical tables live on."""

JSON_MAX_DEPTH = 100
"""Nested arrays/objects a JSON value may hold: MySQL's limit (and far below Python's
recursion limit, which decoding a stored value must stay under)."""
JSON_MAX_DEPTH_MYSQL = 31
"""The limit on MySQL/MariaDB tables: MariaDB's JSON_VALID() (the CHECK of its JSON
columns) refuses 32 nested levels."""

_UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1)
_MYSQL_DIALECT = mysql_dialect()
_JSON_INT_BITS = 14_000  # ~4,200 digits: Python refuses to print ints over 4,300 (json.dumps fails)


def _utf8_ok(s: str) -> bool:
    """Whether ``s`` is a sequence of Unicode scalar values (no lone surrogate)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SURROGATE = "holds a lone surrogate (not valid Unicode: no backend can store it)"
_NUL = "holds a NUL character, which PostgreSQL text cannot store"


def _str_problem(v: str, nul_ok: bool) -> str | None:
    """What no backend of the table can store of the str ``v`` (None when it can)."""
    if not v.isascii() and not _utf8_ok(v):
        return _SURROGATE
    if not nul_ok and "\x00" in v:
        return _NUL
    return None


def _json_problem(value: Any, max_depth: int) -> str | None:
    """Why ``value`` is no JSON value that reads back equal on every backend, or None.

    Only ``dict`` (str keys), ``list``, ``str``, ``int``, finite ``float``, ``bool``
    and ``None``, nested at most ``max_depth`` arrays/objects deep. Walked with an
    explicit stack, never by recursion, so no input can exhaust the call stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        v, depth = pop()
        t = type(v)
        if t is str:
            if not v.isascii() and not _utf8_ok(v):
                return f"a JSON string {_SURROGATE}"
        elif t is int:
            if v.bit_length() > _JSON_INT_BITS:
                return "a JSON number with more digits than json can write"
        elif t is float:
            if v - v != 0.0:  # NaN, +inf, -inf: not JSON
                return f"{v!r} is not a JSON number"
        elif t is dict or t is list:
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels of arrays/objects"
            if t is dict:
                for k, item in v.items():
                    if type(k) is not str:
                        # json.dumps would write 1 as "1": it would read back unequal
                        return f"a JSON object key of type {type(k).__name__} (keys must be str)"
                    if not k.isascii() and not _utf8_ok(k):
                        return f"a JSON object key {_SURROGATE}"
                    push((item, depth + 1))
            else:
                for item in v:
                    push((item, depth + 1))
        elif v is not None and t is not bool:
            return f"{t.__name__} has no JSON form that reads back equal"
    return None


def _mysql_ddl(type_: sa.types.TypeEngine[Any]) -> str:
    """The MySQL DDL of a column type (``DATETIME``, ``DATETIME(6)``, ``FLOAT``, ...)."""
    try:
        return str(type_.compile(dialect=_MYSQL_DIALECT)).upper()
    except Exception:  # a type MySQL cannot compile: no MySQL-specific rule applies
        return ""


def _mysql_fsp(type_: sa.types.TypeEngine[Any]) -> int:
    """Fractional-second digits MySQL keeps for a DATETIME/TIME column (0 without fsp)."""
    m = re.search(r"\((\d+)\)", _mysql_ddl(type_))
    return int(m.group(1)) if m else 0


def _mysql_single_float(type_: sa.types.TypeEngine[Any]) -> bool:
    """Whether MySQL stores the column as a 4-byte FLOAT (read back with 6 significant digits)."""
    m = re.fullmatch(r"FLOAT(?:\((\d+)\))?", _mysql_ddl(type_).split(" ")[0])
    return m is not None and (m.group(1) is None or int(m.group(1)) <= 24)


def _mysql_float_problem(f: float) -> str | None:
    """MySQL's FLOAT holds a float32 and returns it printed with 6 significant digits."""
    try:
        single = struct.unpack("f", struct.pack("f", f))[0]
    except OverflowError:
        return f"{f!r} is out of range for MySQL's FLOAT"
    if float(f"{single:.6g}") != f:
        return f"{f!r} does not read back equal from MySQL's FLOAT (6 significant digits)"
    return None


def _fraction_problem(d: decimal.Decimal, scale: int) -> bool:
    """Whether ``d`` (finite) has a non-zero digit beyond ``scale`` fractional digits."""
    _, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    cut = -scale - exp  # digits beyond the scale
    return cut > 0 and any(digits[-cut:])


def _checker_for(column: sa.Column[Any], backends: Backends = frozenset()) -> Checker:
    """The check of a value for ``column`` of a table on ``backends``: its type, its
    length or range, and that every one of those backends stores it so that it
    reads back equal (the strictest rule among them applies; see README.md,
    "Values: what is stored, what is refused"). Unknown types are accepted as is."""
    try:
        py = column.type.python_type
    except NotImplementedError:
        py = object
    length = getattr(column.type, "length", None)
    nullable = bool(column.nullable)
    tname = type(column.type).__name__
    on_pg, on_mysql, on_sqlite = "postgresql" in backends, "mysql" in backends, "sqlite" in backends
    nul_ok = not on_pg

    def need(kinds: tuple[type, ...], label: str, content: Checker | None = None) -> Checker:
        """Type (exact types first), then ``content`` of a value of the right type."""
        exact = frozenset(kinds)

        def check(v: Any) -> str | None:
            t = type(v)
            if t in exact:  # the common case: no isinstance() walk
                if t is str:
                    if length is not None and len(v) > length:
                        return f"value of length {len(v)} exceeds {tname}({length})"
                    if not v.isascii() and not _utf8_ok(v):
                        return _SURROGATE
                    if nul_ok or "\x00" not in v:
                        return None
                    return _NUL
                if length is not None and (t is bytes or t is bytearray) and len(v) > length:
                    return f"value of length {len(v)} exceeds {tname}({length})"
                return None if content is None else content(v)
            if v is None:
                return None if nullable else "must not be NULL"
            if t is bool and bool not in kinds:
                return f"expects {label}, got bool"
            if not isinstance(v, kinds):
                return f"expects {label}, got {type(v).__name__}"
            if length is not None and isinstance(v, str | bytes | bytearray) and len(v) > length:
                return f"value of length {len(v)} exceeds {tname}({length})"
            if isinstance(v, str):
                return _str_problem(v, nul_ok)
            return None if content is None else content(v)

        return check

    def ranged(inner: Checker, lo: Any, hi: Any, label: str, *, exclusive: bool = False) -> Checker:
        def check(v: Any) -> str | None:
            problem = inner(v)
            if problem is not None or v is None:
                return problem
            try:
                outside = (v <= lo or v >= hi) if exclusive else (v < lo or v > hi)
            except ArithmeticError:  # Decimal('NaN') does not compare
                return f"{v!r} is not a number {label} can hold"
            if outside or v != v:  # NaN
                return f"value out of range for {label}"
            return None

        return check

    if isinstance(column.type, sa.Enum):
        return _enum_checker(column.type, nullable)
    if isinstance(column.type, sa.JSON):
        max_depth = JSON_MAX_DEPTH_MYSQL if on_mysql else JSON_MAX_DEPTH

        def json_value(v: Any) -> str | None:
            if v is None:
                # SQL NULL or JSON null (per none_as_null): None reads back either way
                return None if nullable else "must not be NULL"
            return _json_problem(v, max_depth)

        return json_value
    if py is bool:
        return need((bool,), "bool")
    if py is int:
        bits = 16 if isinstance(column.type, sa.SmallInteger) else 64 if isinstance(column.type, sa.BigInteger) else 32
        return ranged(need((int,), "int"), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, f"{bits}-bit {tname}")
    if py is float:
        single = on_mysql and _mysql_single_float(column.type)

        def float_value(v: Any) -> str | None:
            if type(v) is float:
                if v - v != 0.0:  # NaN, +inf, -inf
                    return f"{v!r} is not stored on every backend (MySQL refuses it, SQLite reads NaN as NULL)"
                f = v
            else:  # int or Decimal: stored as the float nearest to it
                if isinstance(v, decimal.Decimal) and not v.is_finite():
                    return f"{v!r} is not stored on every backend (MySQL refuses it, SQLite reads NaN as NULL)"
                try:
                    f = float(v)
                except OverflowError:
                    return f"{v!r} is out of range for a float"
                if f != v:
                    return f"{v!r} has no exact float: it would read back as {f!r}"
            return _mysql_float_problem(f) if single else None

        return need((float, int, decimal.Decimal), "a number", float_value)
    if py is decimal.Decimal:
        precision, scale = getattr(column.type, "precision", None), getattr(column.type, "scale", None)
        if precision is None and on_mysql:
            precision, scale = 10, 0  # MySQL's DECIMAL without precision is DECIMAL(10, 0)
        # SQLite stores a float and reads it back formatted with this many fractional digits
        lite_scale = scale if scale is not None else (getattr(column.type, "decimal_return_scale", None) or 10)

        def numeric_value(v: Any) -> str | None:
            if type(v) is decimal.Decimal:
                if not v.is_finite():
                    return f"{v!r} is not a number every backend stores (MySQL and SQLite have no NaN or infinity)"
                d = v
            elif type(v) is float or isinstance(v, float):
                if v - v != 0.0:
                    return f"{v!r} is not a number every backend stores (MySQL and SQLite have no NaN or infinity)"
                d = decimal.Decimal(v)
            elif isinstance(v, decimal.Decimal):
                return numeric_value(decimal.Decimal(v)) if v.is_finite() else f"{v!r} is not a finite number"
            else:
                d = decimal.Decimal(v)
            if scale is not None and _fraction_problem(d, scale):
                return f"{v!r} has more than {scale} fractional digits: {tname}({precision}, {scale}) would round it"
            if on_sqlite:
                try:
                    back = decimal.Decimal(f"{float(d):.{lite_scale}f}")
                except OverflowError:
                    back = None
                if back != d:
                    return f"{v!r} does not read back equal from SQLite, which keeps a NUMERIC as a float (15 significant digits)"
            return None

        check = need((decimal.Decimal, int, float), "a number", numeric_value)
        if precision is None:
            return check
        bound = decimal.Decimal(10) ** (precision - (scale or 0))
        return ranged(check, -bound, bound, f"{tname}({precision}, {scale or 0})", exclusive=True)
    if py is str:
        return need((str,), "str")
    if py is bytes:
        # bytes only: PyMySQL would send a bytearray or memoryview as the text of its repr
        return need((bytes,), "bytes")
    fsp = _mysql_fsp(column.type) if on_mysql else 6
    lost = 10 ** (6 - fsp)  # a microsecond value MySQL keeps is a multiple of this
    with_tz = bool(getattr(column.type, "timezone", False))
    tz_where = "only PostgreSQL keeps an offset" if on_pg else "MySQL and SQLite drop the offset"
    if py is dt.datetime:

        def datetime_value(v: dt.datetime) -> str | None:
            if v.microsecond % lost:
                return f"MySQL's {_mysql_ddl(column.type)} keeps {fsp} fractional digits of a second: {v!r} would be cut"
            if v.utcoffset() is None:
                if with_tz and on_pg:
                    return "a naive datetime in a DateTime(timezone=True) column on PostgreSQL (pass an aware one)"
                return None
            if not with_tz:
                return "an aware datetime in a DateTime column without time zone (its offset would be lost)"
            if backends - {"postgresql"}:
                return f"an aware datetime: {tz_where}"
            try:
                utc = v.astimezone(_UTC).replace(tzinfo=None)
            except OverflowError:
                return f"{v!r} is out of range in UTC"
            if utc in (dt.datetime.max, dt.datetime.min):
                return f"{v!r} is sent to PostgreSQL as infinity and read back naive"
            return None

        return need((dt.datetime,), "datetime", datetime_value)
    if py is dt.date:

        def date_value(v: dt.date) -> str | None:
            # (a datetime is a date too, but its time would be dropped)
            return "expects date, got datetime" if isinstance(v, dt.datetime) else None

        return need((dt.date,), "date", date_value)
    if py is dt.time:

        def time_value(v: dt.time) -> str | None:
            if v.microsecond % lost:
                return f"MySQL's {_mysql_ddl(column.type)} keeps {fsp} fractional digits of a second: {v!r} would be cut"
            if v.utcoffset() is None:
                if with_tz and on_pg:
                    return "a naive time in a Time(timezone=True) column on PostgreSQL"
                return None
            if not with_tz or backends - {"postgresql"}:
                return f"an aware time ({tz_where})"
            return None

        return need((dt.time,), "time", time_value)
    if py is dt.timedelta:
        # Without a native interval (MySQL, SQLite) SQLAlchemy stores 1970-01-01 + the interval
        native = backends <= {"postgresql"}

        def interval_value(v: dt.timedelta) -> str | None:
            if v.microseconds % lost:
                return f"MySQL keeps {fsp} fractional digits of a second: {v!r} would be cut"
            if not native:
                try:
                    _EPOCH + v
                except OverflowError:
                    return f"{v!r} is out of range: MySQL and SQLite store it as a datetime 1970-01-01 + the interval"
            return None

        return need((dt.timedelta,), "timedelta", interval_value)
    if py is uuid.UUID:
        # uuid.UUID only: where a UUID is stored as CHAR(32) (MySQL, SQLite), SQLAlchemy's
        # bind processor takes value.hex, which a str does not have
        return need((uuid.UUID,), "UUID")

    def anything(v: Any) -> str | None:
        if v is None and not nullable:
            return "must not be NULL"
        return None

    return anything


def _enum_checker(typ: sa.Enum, nullable: bool) -> Checker:
    """Members of the enum class and the labels SQLAlchemy accepts for them; nothing else
    (a SQLite or non-native enum column would store any string, then fail every read)."""
    lookup = getattr(typ, "_valid_lookup", None) or dict.fromkeys(typ.enums)
    allowed = frozenset(k for k in lookup if k is not None)
    labels = list(typ.enums)

    def check(v: Any) -> str | None:
        if v is None:
            return None if nullable else "must not be NULL"
        try:
            if v in allowed and type(v) is not bool:
                return None
        except TypeError:  # unhashable
            pass
        return f"{v!r} is not one of {labels}"

    return check


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


def _fast_kind(column: sa.Column[Any], backends: Backends = frozenset()) -> tuple[type, Any, Any] | None:
    """(exact type, min, max) for columns a whole list can be checked at C speed.

    A str column's values are also tested for lone surrogates (and, on
    PostgreSQL, NUL) and a Decimal column's for digits beyond the scale, as their
    checker tests them; Decimals on SQLite (whose rule is a float round trip) have
    no fast kind."""
    if isinstance(column.type, sa.Enum):
        return None  # a value set, not a type: its checker tests membership
    py = _python_type(column)
    if py is int:
        t = column.type
        bits = 16 if isinstance(t, sa.SmallInteger) else 64 if isinstance(t, sa.BigInteger) else 32
        return int, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if py is str:
        return str, None, getattr(column.type, "length", None)
    if py is bool:
        return bool, None, None
    if py is decimal.Decimal and getattr(column.type, "precision", None) is not None and "sqlite" not in backends:
        bound = decimal.Decimal(10) ** (column.type.precision - (getattr(column.type, "scale", None) or 0))  # type: ignore[attr-defined]
        return decimal.Decimal, -bound, bound
    return None


def _python_type(column: sa.Column[Any]) -> type:
    try:
        return column.type.python_type
    except NotImplementedError:
        return object


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
        self.checkers: dict[str, Checker] = {c.name: _checker_for(c, self.backends) for c in table.columns}
        self._single_pk = len(pk) == 1
        self._nullable = {c.name: bool(c.nullable) for c in table.columns}
        self._fast_kinds = {c.name: k for c in table.columns if (k := _fast_kind(c, self.backends)) is not None}
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
        self.mutable_values = any(_python_type(c) in (dict, list, object) for c in table.columns)
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
                out[name] = _default_value(default)
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
                if not whole.isascii() and not _utf8_ok(whole):
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
        ns: dict[str, Any] = {"type": type, "len": len, "utf8": _utf8_ok}
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
                out[name] = _default_value(default)
        return out

    def key_of(self, row: Mapping[str, Any]) -> Any:
        """The primary key of a row: a scalar, or a tuple for composite keys."""
        if len(self.primary_key) == 1:
            return row[self.primary_key[0]]
        return tuple(row[c] for c in self.primary_key)


def _default_value(default: sa.ColumnDefault) -> Any:
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
