"""Planning a batched call (no I/O): every row validated, then grouped into batches.

Every row is validated before anything is sent (an error names the row index and
the field). Rows are grouped by physical table, and each group is cut into
batches of ``batch_size`` rows. Upserts and updates of a key that repeats are
folded into one row, later values winning column by column.

Bulk loads are dominated by per-row Python work: a list of dicts with one set of
keys is planned a column at a time (:meth:`BatchPlanner._plan_columns`), with
C-level loops. Rows bound for PostgreSQL go as COPY text when every value has a
text form (:mod:`dal.backends.pg_copy`); with int shard keys a load planned with
:meth:`BatchPlanner.plan_load` becomes :class:`LiveBatches`, whose rows are
assigned to physical tables as their text is rendered, while the first batches
are sent.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from dal.backends.copytext import Form, text_forms, text_lines, text_payload
from dal.backends.pg_copy import LiveTextSource, TextFeed, TextSource
from dal.batch.results import Batch, Op
from dal.errors import InputError, ShardKeyError, ValidationError
from dal.routing.router import Target
from dal.routing.sharding import by_slot, slots_of
from dal.schema import as_mapping, default_value, not_a_collection

if TYPE_CHECKING:
    from dal.binding import TableBinding
    from dal.schema import LogicalTable


class BatchPlanner:
    """Validates rows and groups them into batches by physical table, for one table."""

    def __init__(self, binding: TableBinding) -> None:
        self.binding = binding
        self.table = binding.table
        self.stmts = binding.statements

    def plan(self, op: Op, items: Iterable[Any], batch_size: int, *, stream: bool = False) -> list[Batch]:
        """Validate every row, then group them into batches (no I/O).

        ``stream``: PostgreSQL COPY text is rendered as the batches are sent, a chunk
        of rows at a time, instead of here.
        """
        out = self._plan(op, items, batch_size, stream=stream, live=False)
        assert isinstance(out, list)
        return out

    def plan_load(self, op: Op, items: Iterable[Any], batch_size: int) -> list[Batch] | LiveBatches:
        """:meth:`plan` with ``stream``, for a run without ``atomic``: a load that goes
        to PostgreSQL as COPY text with int shard keys gets :class:`LiveBatches`, whose
        rows are assigned to physical tables as they are rendered."""
        return self._plan(op, items, batch_size, stream=True, live=True)

    def _plan(self, op: Op, items: Iterable[Any], batch_size: int, *, stream: bool, live: bool) -> list[Batch] | LiveBatches:
        if type(batch_size) is not int or batch_size < 1:
            raise ValidationError(f"batch_size must be an int >= 1, got {batch_size!r}")
        not_a_collection(items, "keys" if op == "delete" else "rows", self.table.name)
        if op in ("insert", "upsert") and isinstance(items, list) and len(items) > 1:
            fast = self._plan_columns(items, batch_size, op, stream, live)
            if fast is not None:
                return fast
        t = self.table
        pk = t.primary_key
        # One entry per row to send: [slot, key, values by column, columns given, input rows].
        # Upserts and updates of a key that repeats are folded into its first entry, later
        # values winning column by column: what applying them one after another leaves.
        # (Run as separate rows they could land in different batches, which run
        # concurrently, or in one PostgreSQL statement, which may apply either.)
        entries: list[list[Any]] = []
        by_key: dict[Any, list[Any]] = {}
        merge = op in ("upsert", "update")
        for i, item in enumerate(items):
            try:
                slot, key, data, given = self.plan_row(op, item, i)
            except InputError as exc:
                located = _at_row(exc, i, t)
                if located is exc:
                    raise
                raise located from exc
            if merge:
                e = by_key.get(key)
                if e is not None:
                    e[2].update({c: data[c] for c in given})
                    e[3].update(given)
                    e[4] += 1
                    continue
                e = by_key[key] = [slot, key, data, set(given), 1]
            else:
                e = [slot, key, data, given, 1]
            entries.append(e)
        groups: dict[tuple[Any, ...], Batch] = {}
        targets = self.binding.primary_targets
        for slot, key, data, given, n in entries:
            columns = pk if op == "delete" else tuple(c for c in t.columns if c in data)
            overwrite = tuple(c for c in columns if c in given and c not in pk) if op == "upsert" else None
            gk = (slot, columns, overwrite)
            b = groups.get(gk)
            if b is None:
                b = groups[gk] = Batch(targets[slot], [], [], columns, overwrite, [])
            b.rows.append(tuple(data[c] for c in columns))
            b.keys.append(key)
            b.weights.append(n)  # type: ignore[union-attr]
        out: list[Batch] = []
        for b in groups.values():
            w = b.weights or []
            for s in range(0, len(b.rows), batch_size):
                out.append(
                    Batch(b.target, b.rows[s : s + batch_size], b.keys[s : s + batch_size], b.columns,
                          b.overwrite, w[s : s + batch_size])
                )
        return out

    def plan_row(self, op: Op, item: Any, index: int) -> tuple[int, Any, dict[str, Any], Iterable[str]]:
        """Validate one row: its slot, key, values by column, and the columns the caller gave."""
        t = self.table
        pk = t.primary_key
        if op == "delete":
            slot, kv = t.locate_key(item)
            return slot, item, dict(zip(pk, kv, strict=True)), pk
        data: dict[str, Any]
        if op == "update":
            data = self._update_row(item, index)
            given: Iterable[str] = data.keys()
        else:
            data = t.row_values(item, index=index)
            given = as_mapping(item, t.name).keys() if op == "upsert" else data.keys()
        if not all(c in data for c in pk):
            raise ValidationError(f"{t.name}: row {index} lacks primary key columns {list(pk)}")
        kv = tuple(data[c] for c in pk)
        slot = 0 if t.sharder is None else t.sharder.slot(kv[t.shard_key_index])
        return slot, (kv[0] if len(kv) == 1 else kv), data, given

    def _plan_columns(
        self, rows: list[Any], batch_size: int, op: Op, stream: bool, live: bool
    ) -> list[Batch] | LiveBatches | None:
        """The same plan as row by row, a column at a time: for lists of dicts with one
        set of keys whose values all pass the fast column checks. ``None`` sends the
        caller down the row-by-row path, which also names the bad row and field.

        Bulk loads are dominated by per-row Python work, so every loop here is a
        ``map``/``zip``/``compress`` that runs in C."""
        t = self.table
        if t.sharder is None or set(map(type, rows)) != {dict}:
            return None
        keys = rows[0].keys()
        width = len(keys)
        if sum(map(len, rows)) != width * len(rows):
            return None  # (every column found below, so no row is shorter: same keys)
        names = list(keys)
        if any(type(n) is not str or n not in t.checkers for n in names):
            return None
        try:
            cols = {n: list(map(operator.itemgetter(n), rows)) for n in names}
        except KeyError:
            return None
        kinds = {n: set(map(type, cols[n])) for n in names}
        if not all(t.column_ok(n, cols[n], kinds[n]) for n in names):
            return None
        for name, default in t.defaults:
            if name not in cols:
                cols[name] = [default_value(default) for _ in rows]
        if any(name not in cols for name in t.required) or not all(c in cols for c in t.primary_key):
            return None
        shard = cols[t.shard_key]
        shard_kinds = kinds.get(t.shard_key) or set(map(type, shard))  # (a default fills it: not in kinds)
        if shard_kinds == {int}:
            encoded: Iterable[bytes] = map(b"%d".__mod__, shard)  # = str(key).encode()
        elif shard_kinds == {str}:
            encoded = map(str.encode, shard)
        else:
            return None
        n = t.sharder.slots
        # In declared order, the order of the compiled INSERT's parameters (the rows
        # are positional: in the caller's key order, values would land in other columns).
        columns = tuple(c for c in t.columns if c in cols)
        pk = [cols[c] for c in t.primary_key]
        keys_list: list[Any] = pk[0] if len(pk) == 1 else list(zip(*pk, strict=True))
        overwrite = None
        if op == "upsert":
            if len(set(keys_list)) != len(keys_list):
                return None  # repeated keys: folded row by row
            # the columns given; the defaults filled in above are for new rows only
            overwrite = tuple(c for c in names if c not in t.primary_key)
        # COPY text when every physical table is on PostgreSQL (else decided below,
        # for the tables the rows land in), worked out once.
        all_pg = self._on_postgres(range(n))
        forms = self._text_forms(0, columns, cols, kinds) if all_pg else None
        if live and forms is not None and shard_kinds == {int}:
            # Every row is valid by now; which physical table each goes to is grouping,
            # not validation: the CRC32s are computed a chunk at a time while the first
            # COPYs are sending (a str key's UTF-8 encoding can fail: computed here).
            at = columns.index(t.shard_key)
            if forms[at] is int.__repr__:  # (no NULLs: a shard key never is)
                return LiveBatches(
                    self.binding.primary_targets, columns, overwrite,
                    LiveTextSource([cols[c] for c in columns], forms, batch_size, at, keys_list, n),
                )
        try:
            slots = slots_of(encoded, n)
        except UnicodeEncodeError:
            return None  # a lone surrogate: the row-by-row path names the row
        used = sorted(set(slots))
        keys_by_slot = by_slot(slots, n, keys_list)
        targets = self.binding.primary_targets
        if not all_pg and self._on_postgres(used):
            forms = self._text_forms(used[0], columns, cols, kinds)
        if forms is not None:
            # PostgreSQL: COPY text, rendered while the first batches are on the wire.
            feeds: dict[int, list[TextFeed]] = {}
            out = []
            for slot in used:
                ks = keys_by_slot[slot]
                for s in range(0, len(ks), batch_size):
                    feed = TextFeed(len(ks[s : s + batch_size]))
                    feeds.setdefault(slot, []).append(feed)
                    out.append(Batch(targets[slot], [], ks[s : s + batch_size], columns, overwrite, text=feed))
            source = TextSource([cols[c] for c in columns], forms, slots, batch_size, feeds)
            if not stream:
                source.run()
            return out
        records = by_slot(slots, n, zip(*(cols[c] for c in columns)))  # noqa: B905 - columns of one length
        out = []
        for slot in used:
            recs, ks = records[slot], keys_by_slot[slot]
            for s in range(0, len(recs), batch_size):
                out.append(Batch(targets[slot], recs[s : s + batch_size], ks[s : s + batch_size], columns, overwrite))
        return out

    def _on_postgres(self, slots: Iterable[int]) -> bool:
        stmts = self.stmts
        return all(stmts[s].dialect.name == "postgresql" for s in slots)

    def _text_forms(
        self, slot: int, columns: tuple[str, ...], cols: dict[str, list[Any]], kinds: dict[str, set[type]]
    ) -> list[Form] | None:
        """How to render rows bound for PostgreSQL (``slot``: one of their tables) as
        COPY text, when every column is sent as is (no bind processor but the redundant
        Boolean one) and every value has a text form; else ``None`` (binary records)."""
        c = self.stmts[slot].insert(slot, columns)
        phys = self.table.table
        if not all(
            p is None or isinstance(phys.c[name].type, sa.Boolean)
            for name, p in zip(c.names, c.processors, strict=True)
        ):
            return None
        return text_forms(
            [cols[name] for name in columns],
            [kinds.get(name) or set(map(type, cols[name])) for name in columns],  # (defaults: not in kinds)
        )

    def as_text(self, b: Batch) -> None:
        """Give a PostgreSQL insert batch its rows as COPY text when every value has a
        text form (as :meth:`plan` does for bulk loads): asyncpg's binary encoder
        spends about 1 µs on each Decimal, its text about 0.15 µs."""
        if not self._on_postgres([b.target.slot]):
            return
        cols = list(map(list, zip(*b.rows)))  # noqa: B905 - rows of one shape
        forms = self._text_forms(b.target.slot, b.columns, dict(zip(b.columns, cols, strict=True)), {})
        if forms is not None:
            feed = TextFeed(0)
            feed.chunks.append(text_payload(text_lines(cols, forms)))
            b.text = feed

    def _update_row(self, item: Any, index: int) -> dict[str, Any]:
        t = self.table
        out = t.checked_values(item, index=index)
        if not all(c in out for c in t.primary_key):
            raise ValidationError(f"{t.name}: row {index} lacks primary key columns {list(t.primary_key)}")
        if len(out) == len(t.primary_key):
            raise ValidationError(f"{t.name}: row {index} has no column to update")
        for name, default in t.onupdate:  # Column(onupdate=...), as Repository.update applies them
            if name not in out:
                out[name] = default_value(default)
        # key columns first, then the columns to set, in a stable order
        return {**{c: out[c] for c in t.primary_key}, **{c: v for c, v in out.items() if c not in t.primary_key}}


def _no_start(b: Batch) -> None:
    raise RuntimeError("a live batch was opened before anything would run it")  # (it would be lost)


class LiveBatches:
    """A bulk load planned before its rows' physical tables are known: its
    :class:`~dal.backends.pg_copy.LiveTextSource` opens the batches as it renders the
    rows, and each is handed to ``started`` (the runner runs it)."""

    def __init__(
        self, targets: Sequence[Target], columns: tuple[str, ...], overwrite: tuple[str, ...] | None,
        source: LiveTextSource,
    ) -> None:
        self.targets = targets
        self.columns = columns
        self.overwrite = overwrite
        self.source = source
        self.started: Callable[[Batch], None] = _no_start
        source.open_batch = self._open

    def _open(self, slot: int) -> Batch:
        feed = TextFeed(0)
        feed.closed = False
        feed.source = self.source
        b = Batch(self.targets[slot], [], [], self.columns, self.overwrite, text=feed)
        self.started(b)
        return b


def _at_row(exc: InputError, index: int, table: LogicalTable) -> InputError:
    """``exc`` naming the row index (and, for a shard key, the column) when it does not yet."""
    msg = str(exc)
    if f"(row {index})" in msg or f"row {index} " in msg:
        return exc
    if isinstance(exc, ShardKeyError) and not msg.startswith(f"{table.name}."):
        msg = f"{table.name}.{table.shard_key}: {msg}"
    return type(exc)(f"{msg} (row {index})")
