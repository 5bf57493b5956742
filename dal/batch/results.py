"""What a batched call reports (:class:`BatchResult`, :class:`BatchFailure`) and the
unit it is sent in (:class:`Batch`: one transaction's rows of one physical table)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from dal.errors import DalError
from dal.routing.router import Target

if TYPE_CHECKING:
    from dal.backends.pg_copy import TextFeed

Op = Literal["insert", "upsert", "update", "delete"]


@dataclass
class BatchFailure:
    """One batch that did not commit (it was rolled back as a whole)."""

    table: str
    database: str
    keys: list[Any]
    error: DalError
    failed_keys: list[Any] = field(default_factory=list)  # the keys that caused it, when known


@dataclass
class BatchResult:
    """What a batched call did."""

    rows: int = 0
    batches: int = 0
    committed_batches: int = 0
    written: dict[str, int] = field(default_factory=dict)  # rows committed per shard database
    affected: int = 0  # rows the statements matched (update/delete), else rows written
    failures: list[BatchFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def committed(self) -> int:
        return sum(self.written.values())

    @property
    def failed_keys(self) -> list[Any]:
        return [k for f in self.failures for k in (f.failed_keys or f.keys)]


@dataclass
class Batch:
    """Rows of one physical table sent in one transaction (with one statement, or one COPY)."""

    target: Target
    rows: list[tuple[Any, ...]]  # values in `columns` order
    keys: list[Any]  # primary keys (scalars or tuples), parallel to rows
    columns: tuple[str, ...]
    # upsert: the non-key columns the caller gave, the only ones an existing row gets
    # (the others in `columns` are Python-side defaults, for a new row only)
    overwrite: tuple[str, ...] | None = None
    # input rows each row stands for (repeated keys of an upsert/update are folded into one)
    weights: list[int] | None = None
    # PostgreSQL, instead of ``rows``: the rows as COPY text, rendered as it is sent
    text: TextFeed | None = None

    @property
    def inputs(self) -> int:
        return len(self.keys) if self.weights is None else sum(self.weights)
