"""Value rules: what a value of a declared column must be before anything is sent.

:func:`checker_for` builds, per column, a function that returns a problem description
for a bad value (``None`` for a good one): the exact Python type of the column's
SQLAlchemy type, integer and numeric ranges and scale, string length, UTF-8 (no lone
surrogates), PostgreSQL's NUL, JSON nesting depth and finite numbers, timezone rules
per backend, MySQL's fractional seconds and single-precision floats, enum members.
The strictest rule among the backends a table's physical tables live on applies
(``backends``). :func:`fast_kind` gives the columns whose values a whole list can
be checked at C speed (batches). The README's "Values" table says the same for users.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
import struct
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import dialect as mysql_dialect

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


def utf8_ok(s: str) -> bool:
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
    if not v.isascii() and not utf8_ok(v):
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
            if not v.isascii() and not utf8_ok(v):
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
                    if not k.isascii() and not utf8_ok(k):
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


def checker_for(column: sa.Column[Any], backends: Backends = frozenset()) -> Checker:
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
                    if not v.isascii() and not utf8_ok(v):
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


def fast_kind(column: sa.Column[Any], backends: Backends = frozenset()) -> tuple[type, Any, Any] | None:
    """(exact type, min, max) for columns a whole list can be checked at C speed.

    A str column's values are also tested for lone surrogates (and, on
    PostgreSQL, NUL) and a Decimal column's for digits beyond the scale, as their
    checker tests them; Decimals on SQLite (whose rule is a float round trip) have
    no fast kind."""
    if isinstance(column.type, sa.Enum):
        return None  # a value set, not a type: its checker tests membership
    py = python_type(column)
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


def python_type(column: sa.Column[Any]) -> type:
    try:
        return column.type.python_type
    except NotImplementedError:
        return object
