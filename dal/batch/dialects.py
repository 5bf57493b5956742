"""A batch's statements, in the fastest correct form per backend.

============  ==============================  ==================================
backend       insert                          upsert / update / delete
============  ==============================  ==================================
PostgreSQL    COPY: text format when every    COPY into a temporary staging table,
              value is an int, Decimal, bool  then one MERGE (15+; INSERT ... ON
              str or NULL, else binary        CONFLICT before, or when MERGE fails)
                                              / UPDATE ... FROM / DELETE ... USING
MySQL         multi-row INSERT (executemany)  multi-row INSERT ... ON DUPLICATE KEY
                                              UPDATE / UPDATE ... JOIN (rows) /
                                              DELETE ... IN
SQLite        executemany                     executemany
============  ==============================  ==================================

:class:`BatchSql` sends them on a connection in an open transaction (BEGIN and
COMMIT are the runner's, :mod:`dal.batch.running`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from dal.backends.base import Connection
from dal.batch.results import Batch, Op
from dal.errors import ConnectionUnavailableError, DalError
from dal.sql import CONVERT_ERRORS, Compiled, compile_statement, unconvertible

if TYPE_CHECKING:
    from dal.binding import TableBinding
    from dal.cluster import Node


class BatchSql:
    """The statements of one table's batches, per backend (compiled once per shape)."""

    def __init__(self, binding: TableBinding) -> None:
        self.table = binding.table
        self.stmts = binding.statements
        self._stmt_cache: dict[tuple[Any, ...], Compiled] = {}
        self._merge_cache: dict[tuple[Any, ...], str] = {}

    async def apply(self, op: Op, conn: Connection, node: Node, b: Batch) -> int:
        """Send batch ``b``'s statements on ``conn`` (in its transaction); the rows matched."""
        backend = node.backend
        if backend == "postgresql":
            return await self._apply_pg(op, conn, b)
        return await self._apply_generic(op, conn, b, mysql=backend == "mysql")

    def _stmts(self, b: Batch) -> Any:
        return self.stmts[b.target.slot]

    def _compiled(self, key: tuple[Any, ...], build: Callable[[], sa.ClauseElement], dialect: Any) -> Compiled:
        hit = self._stmt_cache.get(key)
        if hit is None:
            hit = self._stmt_cache[key] = compile_statement(build(), dialect)
        return hit

    def _processed(self, c: Compiled, b: Batch) -> list[tuple[Any, ...]]:
        """Rows as positional parameters of ``c`` (whose names are the batch's columns)."""
        procs = c.processors
        if self._native_bool(c):
            # SQLAlchemy's Boolean processor only re-checks what validation checked.
            phys = self.table.table
            procs = tuple(
                None if isinstance(phys.c[name].type, sa.Boolean) else p
                for name, p in zip(c.names, procs, strict=True)
            )
        if not any(procs):
            return b.rows
        try:
            return [tuple(v if p is None or v is None else p(v) for v, p in zip(r, procs, strict=True)) for r in b.rows]
        except CONVERT_ERRORS as exc:
            converted = [name for name, p in zip(c.names, procs, strict=True) if p is not None]
            raise unconvertible(" or ".join(converted), exc) from exc

    def _native_bool(self, c: Compiled) -> bool:
        # Values were validated as bool, which every driver sends as it should
        # (asyncpg natively, PyMySQL and sqlite3 as 1/0): the processor is redundant.
        return all(name in self.table.table.c for name in c.names)

    async def _copy(self, conn: Connection, table: str, b: Batch) -> None:
        """COPY the batch's rows into ``table``: as text when planned so, else binary records."""
        copy: Any = conn
        if b.text is not None:
            await copy.copy_text(table, b.columns, b.text)
            return
        c = self._stmts(b).insert(b.target.slot, b.columns)
        await copy.copy_records(table, b.columns, self._processed(c, b))

    async def _apply_pg(self, op: Op, conn: Connection, b: Batch) -> int:
        st = self._stmts(b)
        phys = self.table.physical[b.target.slot]
        if op == "insert":
            await self._copy(conn, phys.name, b)
            return b.inputs
        stage = f"dal_stage_{phys.name}"
        # The target's columns without its constraints (a key-only row must fit),
        # emptied at every commit; created once per connection. Emptied here too:
        # an atomic call stages several batches of one table in one transaction.
        # (One statement per call: the execution seam counts the statements it sends.)
        await conn.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" ON COMMIT DELETE ROWS AS SELECT * FROM "{phys.name}" WITH NO DATA',
            (),
        )
        await conn.execute(f'DELETE FROM "{stage}"', ())
        if op == "upsert" and b.text is None:
            # ON CONFLICT cannot touch one row twice: the last write of a key wins
            # (text lines are planned only for unique keys)
            rows = list({k: r for k, r in zip(b.keys, b.rows, strict=True)}.values())
            b = Batch(b.target, rows, b.keys, b.columns, b.overwrite)
        await self._copy(conn, stage, b)
        s = sa.table(stage, *(sa.column(col) for col in b.columns))
        pk = self.table.primary_key
        dialect = st.dialect
        if op == "upsert":
            from sqlalchemy.dialects import postgresql

            def build() -> sa.ClauseElement:
                ins = postgresql.insert(phys).from_select(list(b.columns), sa.select(*(s.c[col] for col in b.columns)))
                sets = [col for col in (b.columns if b.overwrite is None else b.overwrite) if col not in pk]
                if sets:
                    return ins.on_conflict_do_update(index_elements=[phys.c[k] for k in pk], set_={col: ins.excluded[col] for col in sets})
                return ins.on_conflict_do_nothing(index_elements=[phys.c[k] for k in pk])

            c = self._compiled(("pg-upsert", b.target.slot, b.columns, b.overwrite), build, dialect)
            if getattr(conn, "server_version", 0) >= 15:
                await self._merge(conn, b, stage, c.sql)
                return b.inputs
        elif op == "update":
            sets = [col for col in b.columns if col not in pk]
            c = self._compiled(
                ("pg-update", b.target.slot, b.columns),
                lambda: sa.update(phys).values({col: s.c[col] for col in sets}).where(*(phys.c[k] == s.c[k] for k in pk)),
                dialect,
            )
        else:
            c = self._compiled(
                ("pg-delete", b.target.slot),
                lambda: sa.delete(phys).where(*(phys.c[k] == s.c[k] for k in pk)),
                dialect,
            )
        affected = await conn.execute(c.sql, ())
        return b.inputs if op == "upsert" else affected

    async def _merge(self, conn: Connection, b: Batch, stage: str, on_conflict: str) -> None:
        """Upsert the staged rows with MERGE (PostgreSQL 15+), else with ``on_conflict``.

        MERGE joins the staged rows to the table once, where INSERT ... ON CONFLICT
        makes a speculative insertion per row: measured, 100,000 rows half of them
        existing, ~0.7x the time. But a key inserted concurrently by another
        transaction fails MERGE's insert, where ON CONFLICT takes it as a conflict: on
        any error but a lost connection the MERGE is rolled back to a savepoint and
        the batch upserted with ``on_conflict``, so the outcome is ON CONFLICT's.
        """
        sql = self._merge_sql(b, stage)
        await conn.execute("SAVEPOINT dal_merge", ())
        try:
            await conn.execute(sql, ())
        except DalError as exc:
            if isinstance(exc, ConnectionUnavailableError) or conn.broken:
                raise
            await conn.execute("ROLLBACK TO SAVEPOINT dal_merge", ())
            await conn.execute(on_conflict, ())

    def _merge_sql(self, b: Batch, stage: str) -> str:
        key = (b.target.slot, b.columns, b.overwrite)
        hit = self._merge_cache.get(key)
        if hit is None:
            # Identifiers only: the declared table and column names, quoted by the dialect.
            q = self._stmts(b).dialect.identifier_preparer.quote
            pk = self.table.primary_key
            phys = q(self.table.physical[b.target.slot].name)
            sets = [c for c in (b.columns if b.overwrite is None else b.overwrite) if c not in pk]
            on = " AND ".join(f"t.{q(k)} = s.{q(k)}" for k in pk)
            matched = (
                f" WHEN MATCHED THEN UPDATE SET {', '.join(f'{q(c)} = s.{q(c)}' for c in sets)}" if sets else ""
            )
            cols = ", ".join(q(c) for c in b.columns)
            values = ", ".join(f"s.{q(c)}" for c in b.columns)
            sql = (
                f"MERGE INTO {phys} AS t USING {q(stage)} AS s ON {on}{matched}"
                f" WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({values})"
            )
            hit = self._merge_cache[key] = sql
        return hit

    async def _apply_generic(self, op: Op, conn: Connection, b: Batch, *, mysql: bool) -> int:
        st = self._stmts(b)
        slot = b.target.slot
        if op == "insert":
            c = st.insert(slot, b.columns)
            await conn.execute_many(c.sql, self._processed(c, b))
            return b.inputs
        if op == "upsert":
            c = st.upsert(slot, b.columns, b.columns if b.overwrite is None else b.overwrite)
            await conn.execute_many(c.sql, self._processed(c, b))
            return b.inputs  # MySQL counts an updated row twice: report rows written
        pk = self.table.primary_key
        if op == "delete":
            c = st.delete_many(slot, len(b.rows))
            return await conn.execute(c.sql, c.params(st.get_many_params([tuple(r) for r in b.rows])))
        # update: one statement per row, all in this batch's transaction
        sets = tuple(col for col in b.columns if col not in pk)
        c = st.update(slot, sets)
        params = []
        for r in b.rows:
            values = dict(zip(b.columns, r, strict=True))
            p = st.key_params(tuple(values[k] for k in pk))
            p.update({f"v_{col}": values[col] for col in sets})
            params.append(c.params(p))
        return await conn.execute_many(c.sql, params)
