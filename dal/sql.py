"""SQL text for one logical table on one dialect, compiled once and cached.

SQLAlchemy is the dialect layer: every statement is built as a Core construct
over a physical table and compiled for the backend's dialect (``$n`` for
asyncpg, ``%s`` for aiomysql, ``?`` for aiosqlite). The result is a
:class:`Compiled`: the SQL string, the order of its parameters, and the
dialect's bind processors for them. Statements of fixed shape (get, insert,
update, delete, ...) are cached per physical table; find/count are cached by
their shape (columns, operators, order, which of limit/offset are set), so a
repeated query costs a dict lookup, and the driver's per-connection prepared
statement cache sees one text per shape.

Values never become SQL text: they are always bound parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler

from dal.config import Backend
from dal.errors import DataError, ValidationError
from dal.schema import LogicalTable


def make_dialect(backend: Backend) -> Dialect:
    """A fresh SQLAlchemy dialect for ``backend`` (compile-only; it never connects)."""
    if backend == "postgresql":
        from sqlalchemy.dialects.postgresql.asyncpg import dialect as pg

        return pg()  # type: ignore[no-untyped-call]
    if backend == "mysql":
        from sqlalchemy.dialects.mysql.aiomysql import dialect as my

        return my()
    from sqlalchemy.dialects.sqlite.aiosqlite import dialect as lite

    return lite()


Processor = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Compiled:
    """A compiled statement: SQL text plus how to order and convert its parameters."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]
    processors: tuple[Processor | None, ...]

    def params(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """Positional parameters from ``values`` (falling back to compile-time defaults)."""
        out = []
        name = ""
        try:
            for name, proc in zip(self.names, self.processors, strict=True):
                v = values[name] if name in values else self.defaults[name]
                out.append(v if proc is None or v is None else proc(v))
        except CONVERT_ERRORS as exc:
            raise unconvertible(name, exc) from exc
        return tuple(out)


# What a column's bind processor raises for a value it cannot take (a set for JSON, ...).
CONVERT_ERRORS = (TypeError, ValueError, AttributeError, ArithmeticError, LookupError)


def unconvertible(name: str, exc: BaseException) -> DataError:
    """The DataError for a value of column ``name`` its bind processor rejected with ``exc``."""
    return DataError(f"{name}: cannot send the value: {type(exc).__name__}: {exc}")


def compile_statement(stmt: sa.ClauseElement, dialect: Dialect) -> Compiled:
    c = stmt.compile(dialect=dialect)
    assert isinstance(c, SQLCompiler)
    names = tuple(c.positiontup or ())
    procs = tuple(c.binds[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names)
    defaults = {n: c.binds[n].value for n in names if c.binds[n].value is not None}
    return Compiled(str(c), names, defaults, procs)


def _result_processor(type_: Any, dialect: Dialect) -> Processor | None:
    """The dialect's result processor for a column of ``type_``.

    SQLAlchemy passes the driver's type code of the result column; dal has
    none, which every type ignores except asyncpg's numerics (they key on the
    PostgreSQL OID and raise on ``None``). A table column of a Numeric type
    comes back as ``numeric`` (OID 1700), of a Float type as ``float8`` (701).
    """
    coltype = None
    if dialect.name == "postgresql":
        # (SQLAlchemy 2.1's Float is no longer a Numeric: test it first, on its own)
        if isinstance(type_, sa.Float):
            coltype = 701
        elif isinstance(type_, sa.Numeric):
            coltype = 1700
    proc: Processor | None = type_.dialect_impl(dialect).result_processor(dialect, coltype)
    return proc


# Filter operators accepted by find()/count(): name -> (SQL builder, arity).
_OPS: dict[str, Callable[[sa.ColumnElement[Any], Any], sa.ColumnElement[bool]]] = {
    "eq": lambda c, p: c == p,
    "ne": lambda c, p: c != p,
    "lt": lambda c, p: c < p,
    "le": lambda c, p: c <= p,
    "gt": lambda c, p: c > p,
    "ge": lambda c, p: c >= p,
    "like": lambda c, p: c.like(p),
}


@dataclass(frozen=True, slots=True)
class Filter:
    """One condition on one column; build with :func:`dal.filters` helpers."""

    op: str
    value: Any = None

    def __post_init__(self) -> None:
        if self.op not in _OPS and self.op not in ("in", "is_null", "not_null"):
            raise ValidationError(f"unknown filter operator {self.op!r}")
        if self.op == "in":
            if isinstance(self.value, str | bytes) or not isinstance(self.value, Sequence | set | frozenset):
                raise ValidationError("in_() takes a list of values")
            object.__setattr__(self, "value", tuple(self.value))


@dataclass(frozen=True, slots=True)
class Query:
    """A validated find/count request: conditions, order, window."""

    conditions: tuple[tuple[str, Filter], ...]
    order: tuple[tuple[str, bool], ...]  # (column, descending)
    limit: int | None
    offset: int
    after: tuple[Any, ...] | None  # keyset values, one per order column

    def shape(self) -> tuple[Any, ...]:
        conds = tuple(
            (col, f.op, len(f.value) if f.op == "in" else 0) for col, f in self.conditions
        )
        return (conds, self.order, self.limit is not None, self.offset > 0, self.after is not None)

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, (_, f) in enumerate(self.conditions):
            if f.op == "in":
                for j, v in enumerate(f.value):
                    out[f"w{i}_{j}"] = v
            elif f.op not in ("is_null", "not_null"):
                out[f"w{i}"] = f.value
        if self.after is not None:
            for i, v in enumerate(self.after):
                out[f"a{i}"] = v
        return out


class Statements:
    """Compiled statements of one logical table for one dialect."""

    _MAX_SHAPES = 256

    def __init__(self, table: LogicalTable, dialect: Dialect) -> None:
        self.table = table
        self.dialect = dialect
        self._postgres = dialect.name == "postgresql"
        pk = table.primary_key
        self._pk_params = tuple(f"k_{c}" for c in pk)
        get_many: list[OrderedDict[int, Compiled]] = [OrderedDict() for _ in table.physical]
        self._get_many = get_many
        self._delete_many: list[OrderedDict[int, Compiled]] = [OrderedDict() for _ in table.physical]
        self._shapes: OrderedDict[tuple[Any, ...], Compiled] = OrderedDict()
        self._inserts: dict[tuple[int, tuple[str, ...]], Compiled] = {}
        self._upserts: dict[tuple[int, tuple[str, ...], tuple[str, ...] | None], Compiled] = {}
        self._updates: dict[tuple[int, tuple[str, ...]], Compiled] = {}
        self.get = tuple(self._compile_get(t) for t in table.physical)
        self.delete = tuple(
            compile_statement(sa.delete(t).where(self._pk_clause(t)), dialect) for t in table.physical
        )
        # Key-only statements whose parameters are exactly the key values, unconverted:
        # the caller can pass the key tuple as is.
        self.key_direct = all(
            c.names == self._pk_params and not any(c.processors) for c in (*self.get, *self.delete)
        )
        procs = [(i, _result_processor(c.type, dialect)) for i, c in enumerate(table.table.columns)]
        self._result_procs = tuple((i, p) for i, p in procs if p is not None)

    # -- rows ------------------------------------------------------------------
    def row(self, record: Sequence[Any]) -> dict[str, Any]:
        """A plain dict from a driver row selected with every column in declared order."""
        if self._result_procs:
            values = list(record)
            for i, proc in self._result_procs:
                if values[i] is not None:
                    values[i] = proc(values[i])
            return dict(zip(self.table.columns, values))  # noqa: B905 - the SELECT fixes the width
        return dict(zip(self.table.columns, record))  # noqa: B905

    # -- fixed shapes ----------------------------------------------------------
    def _pk_clause(self, t: sa.Table) -> sa.ColumnElement[bool]:
        return sa.and_(*(t.c[c] == sa.bindparam(p) for c, p in zip(self.table.primary_key, self._pk_params, strict=True)))

    def _compile_get(self, t: sa.Table) -> Compiled:
        return compile_statement(sa.select(*t.c).where(self._pk_clause(t)), self.dialect)

    def key_params(self, key_values: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(self._pk_params, key_values, strict=True))

    def key_only(self, c: Compiled, key_values: tuple[Any, ...]) -> tuple[Any, ...]:
        """Parameters of a get/delete statement from the key values."""
        if self.key_direct:
            return key_values
        return c.params(self.key_params(key_values))

    def _keys_in(self, t: sa.Table, n: int) -> sa.ColumnElement[bool]:
        """``pk IN (:m0_0, ...)`` for ``n`` keys (an OR of ANDs for composite keys)."""
        pk = self.table.primary_key
        if len(pk) == 1:
            return t.c[pk[0]].in_([sa.bindparam(f"m{i}_0") for i in range(n)])
        return sa.or_(
            *(sa.and_(*(t.c[c] == sa.bindparam(f"m{i}_{j}") for j, c in enumerate(pk))) for i in range(n))
        )

    def _by_keys(self, cache: OrderedDict[int, Compiled], n: int, build: Callable[[], sa.ClauseElement]) -> Compiled:
        hit = cache.get(n)
        if hit is not None:
            cache.move_to_end(n)
            return hit
        compiled = cache[n] = compile_statement(build(), self.dialect)
        if len(cache) > 64:
            cache.popitem(last=False)
        return compiled

    def get_many(self, slot: int, n: int) -> Compiled:
        """SELECT of ``n`` primary keys from one physical table (cached per ``n``)."""
        t = self.table.physical[slot]
        return self._by_keys(self._get_many[slot], n, lambda: sa.select(*t.c).where(self._keys_in(t, n)))

    def delete_many(self, slot: int, n: int) -> Compiled:
        """DELETE of ``n`` primary keys from one physical table; parameters as :meth:`get_many`."""
        t = self.table.physical[slot]
        return self._by_keys(self._delete_many[slot], n, lambda: sa.delete(t).where(self._keys_in(t, n)))

    @staticmethod
    def get_many_params(keys: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
        return {f"m{i}_{j}": v for i, kv in enumerate(keys) for j, v in enumerate(kv)}

    def insert(self, slot: int, columns: tuple[str, ...]) -> Compiled:
        key = (slot, columns)
        hit = self._inserts.get(key)
        if hit is None:
            t = self.table.physical[slot]
            stmt = sa.insert(t).values({c: sa.bindparam(c, type_=t.c[c].type) for c in columns})
            hit = self._inserts[key] = compile_statement(stmt, self.dialect)
        return hit

    def upsert(
        self, slot: int, columns: tuple[str, ...], overwrite: tuple[str, ...] | None = None
    ) -> Compiled:
        """INSERT of ``columns`` that overwrites the non-key columns of ``overwrite``
        (default: all of ``columns``) when the primary key exists."""
        key = (slot, columns, overwrite)
        hit = self._upserts.get(key)
        if hit is None:
            t = self.table.physical[slot]
            values = {c: sa.bindparam(c, type_=t.c[c].type) for c in columns}
            pk = self.table.primary_key
            updates = [c for c in (columns if overwrite is None else overwrite) if c not in pk]
            name = self.dialect.name
            stmt: Any
            if name == "mysql":
                from sqlalchemy.dialects import mysql

                stmt = mysql.insert(t).values(values)
                target = updates or [pk[0]]  # no-op update keeps the row: MySQL's "do nothing"
                stmt = stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in target})
            else:
                if name == "postgresql":
                    from sqlalchemy.dialects import postgresql

                    stmt = postgresql.insert(t).values(values)
                else:
                    from sqlalchemy.dialects import sqlite

                    stmt = sqlite.insert(t).values(values)
                if updates:
                    stmt = stmt.on_conflict_do_update(
                        index_elements=[t.c[c] for c in pk],
                        set_={c: stmt.excluded[c] for c in updates},
                    )
                else:
                    stmt = stmt.on_conflict_do_nothing(index_elements=[t.c[c] for c in pk])
            hit = self._upserts[key] = compile_statement(stmt, self.dialect)
        return hit

    def update(self, slot: int, columns: tuple[str, ...]) -> Compiled:
        key = (slot, columns)
        hit = self._updates.get(key)
        if hit is None:
            t = self.table.physical[slot]
            stmt = (
                sa.update(t)
                .where(self._pk_clause(t))
                .values({c: sa.bindparam(f"v_{c}", type_=t.c[c].type) for c in columns})
            )
            hit = self._updates[key] = compile_statement(stmt, self.dialect)
        return hit

    def scan_keys(self, slot: int, *, after: bool) -> Compiled:
        """Primary keys of one physical table in key order, ``LIMIT :lim``, after ``a0..``."""
        key = (slot, "scan", after)
        hit = self._shapes.get(key)
        if hit is None:
            t = self.table.physical[slot]
            order = tuple((c, False) for c in self.table.primary_key)
            stmt = sa.select(*(t.c[c] for c in self.table.primary_key)).order_by(
                *(t.c[c] for c in self.table.primary_key)
            )
            if after:
                stmt = stmt.where(self._keyset(t, order))
            hit = self._shapes[key] = compile_statement(stmt.limit(sa.bindparam("lim", type_=sa.Integer())), self.dialect)
        return hit

    # -- find / count ----------------------------------------------------------
    def select(self, slot: int, query: Query, *, count: bool = False, fanout: bool = False) -> Compiled:
        """SELECT (or COUNT) for ``query`` on one physical table.

        A SELECT always carries ``LIMIT :lim`` (the caller bounds every read).
        With ``fanout`` it has no OFFSET: each table returns its first
        ``limit + offset`` rows and the caller cuts after merging.
        """
        key = (slot, query.shape(), count, fanout)
        hit = self._shapes.get(key)
        if hit is not None:
            self._shapes.move_to_end(key)
            return hit
        t = self.table.physical[slot]
        clauses: list[sa.ColumnElement[bool]] = []
        for i, (col, f) in enumerate(query.conditions):
            c = t.c[col]
            if f.op == "in":
                if not f.value:
                    clauses.append(sa.false())
                else:
                    clauses.append(c.in_([sa.bindparam(f"w{i}_{j}", type_=c.type) for j in range(len(f.value))]))
            elif f.op == "is_null":
                clauses.append(c.is_(None))
            elif f.op == "not_null":
                clauses.append(c.is_not(None))
            else:
                clauses.append(_OPS[f.op](c, sa.bindparam(f"w{i}", type_=c.type)))
        if query.after is not None:
            clauses.append(self._keyset(t, query.order))
        if count:
            stmt: Any = sa.select(sa.func.count()).select_from(t)
        else:
            stmt = sa.select(*t.c)
        if clauses:
            stmt = stmt.where(*clauses)
        if not count:
            stmt = stmt.order_by(*(self._order_term(t.c[col], desc) for col, desc in query.order))
            stmt = stmt.limit(sa.bindparam("lim", type_=sa.Integer()))
            if query.offset and not fanout:
                stmt = stmt.offset(sa.bindparam("off", type_=sa.Integer()))
        compiled = compile_statement(stmt, self.dialect)
        self._shapes[key] = compiled
        if len(self._shapes) > self._MAX_SHAPES:
            self._shapes.popitem(last=False)
        return compiled

    def _order_term(self, col: sa.ColumnElement[Any], desc: bool) -> sa.ColumnElement[Any]:
        # dal's order puts NULLs first ascending and last descending, which MySQL
        # and SQLite do by default; PostgreSQL needs it said.
        if desc:
            return col.desc().nulls_last() if self._postgres else col.desc()
        return col.asc().nulls_first() if self._postgres else col.asc()

    @staticmethod
    def _keyset(t: sa.Table, order: tuple[tuple[str, bool], ...]) -> sa.ColumnElement[bool]:
        """Rows strictly after the cursor: (a > x) OR (a = x AND b > y) ..., per direction."""
        ors = []
        for i, (col, desc) in enumerate(order):
            terms = [t.c[order[j][0]] == sa.bindparam(f"a{j}", type_=t.c[order[j][0]].type) for j in range(i)]
            p = sa.bindparam(f"a{i}", type_=t.c[col].type)
            terms.append(t.c[col] < p if desc else t.c[col] > p)
            ors.append(sa.and_(*terms))
        return sa.or_(*ors)
