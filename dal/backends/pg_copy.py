"""PostgreSQL COPY text, rendered while it is sent: the feeds of a bulk load's batches.

A batched insert (or the staging COPY of an upsert) to PostgreSQL sends its rows
as COPY text (:mod:`dal.backends.copytext`) when every value has a text form.
The text is rendered a chunk of rows at a time while the first batches are
sent, so the client's work overlaps the server's: a :class:`TextSource` renders
a call's rows in the caller's order and hands each batch's :class:`TextFeed`
the lines of its rows; a feed with nothing buffered has the source render the
next chunk, so rendering is driven by the COPYs that are sending.

With int shard keys, :class:`LiveTextSource` also works out the physical table
of each row (its CRC32) from the row's text, so only validation comes before
the first byte is sent: it opens a batch for every ``batch_size`` rows of a
table as they come (through a callback of the batch code, which sits above
this module and hands back what :class:`LiveBatch` describes).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any, Protocol

from dal.backends.copytext import Form, join_lines, text_columns, text_lines, text_payload
from dal.routing.sharding import by_slot, slots_of


class TextFeed:
    """One batch's COPY text: an async iterable of chunks for asyncpg's ``copy_to_table``.

    When it has no chunk ready it has its :class:`TextSource` render the next rows
    (synchronously): rendering is driven by the COPYs that are sending, and the
    batches still queued collect their chunks meanwhile. It ends once ``closed`` (its
    batch has all its rows) and every chunk is taken.
    """

    __slots__ = ("chunks", "closed", "missing", "source")

    def __init__(self, rows: int) -> None:
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.missing = rows  # rows not rendered yet (a live batch: unknown, 0)
        self.closed = rows == 0
        self.source: TextSource | None = None

    def __aiter__(self) -> TextFeed:
        return self

    async def __anext__(self) -> memoryview:
        while not self.chunks:
            if self.closed or self.source is None:
                raise StopAsyncIteration
            if not self.source.step():
                raise RuntimeError("COPY text source ended before a batch had its rows")  # a bug, not bad input
            # Let the other COPYs send what this chunk gave them (and start): asyncpg
            # writes to a socket that takes all, so without this, the first COPY would
            # render every chunk before any other stream began.
            await asyncio.sleep(0)
        return self.chunks.popleft()

    def finish(self) -> None:
        """Render until this batch has all its rows (and keys)."""
        while not self.closed and self.source is not None and self.source.step():
            pass


class TextSource:
    """Renders a call's rows as COPY text ``CHUNK`` rows at a time, in the caller's
    order (where the values lie in memory: rendered after grouping by slot, the same
    work costs twice), handing each batch the lines of its rows as they come."""

    CHUNK = 8192

    def __init__(
        self, columns: list[list[Any]], forms: list[Form], slots: list[int], batch_size: int,
        feeds: dict[int, list[TextFeed]],
    ) -> None:
        self.columns = columns
        self.forms = forms
        self.slots = slots
        self.batch_size = batch_size
        self.feeds = feeds
        self.filled = dict.fromkeys(feeds, 0)  # rows of each slot rendered so far
        self.pos = 0
        self.total = len(columns[0])
        for fs in feeds.values():
            for f in fs:
                f.source = self

    def step(self) -> bool:
        """Render the next chunk of rows; ``False`` when every row is rendered already."""
        start, end = self.pos, min(self.pos + self.CHUNK, self.total)
        if start >= end:
            return False
        self.pos = end
        self._hand_out(start, end, text_lines([c[start:end] for c in self.columns], self.forms))
        return True

    def _hand_out(self, start: int, end: int, lines: list[str]) -> None:
        size = self.batch_size
        lines_by = by_slot(self.slots[start:end], max(self.feeds) + 1, lines)
        for slot, feeds in self.feeds.items():
            ls = lines_by[slot]
            done = self.filled[slot]
            i = 0
            while i < len(ls):
                feed = feeds[done // size]
                part = ls[i : i + size - done % size]
                feed.chunks.append(text_payload(part))
                feed.missing -= len(part)
                feed.closed = feed.missing == 0
                done += len(part)
                i += len(part)
            self.filled[slot] = done

    def run(self) -> None:
        """Render every row now."""
        while self.step():
            pass


class LiveBatch(Protocol):
    """What :class:`LiveTextSource` fills of a batch it opened: its keys (extended as
    its rows are rendered) and its feed."""

    keys: list[Any]
    text: TextFeed | None


class LiveTextSource(TextSource):
    """A :class:`TextSource` that also works out which physical table each row goes
    to, a chunk at a time (the CRC32 of its int shard key), opening a batch for every
    ``batch_size`` rows of a table as they come (``open_batch``) and filling its keys.
    """

    def __init__(
        self, columns: list[list[Any]], forms: list[Form], batch_size: int, shard_at: int, keys: list[Any],
        slots: int,
    ) -> None:
        super().__init__(columns, forms, [], batch_size, {})
        self.shard_at = shard_at  # the shard key's column, ints
        self.keys = keys
        self.n = slots
        self.open: dict[int, LiveBatch] = {}  # per slot, its batch still taking rows
        self.open_batch: Callable[[int], LiveBatch] = _no_batch

    def step(self) -> bool:
        start, end = self.pos, min(self.pos + self.CHUNK, self.total)
        if start >= end:
            return False
        self.pos = end
        texts = text_columns([c[start:end] for c in self.columns], self.forms)
        # = the sharder's slot of each key (str(key).encode(), CRC32 IEEE, mod n), from
        # the key's COPY text (int.__repr__), which is rendered anyway
        n = self.n
        slots = slots_of(map(str.encode, texts[self.shard_at]), n)
        self._place(start, end, join_lines(texts), slots)
        return True

    def _place(self, start: int, end: int, lines: list[str], slots: list[int]) -> None:
        """Hand rows ``start:end`` (their lines and slots) to their tables' open batches."""
        n = self.n
        lines_by = by_slot(slots, n, lines)
        keys_by = by_slot(slots, n, self.keys[start:end])
        size = self.batch_size
        for slot in range(n):
            ls, ks = lines_by[slot], keys_by[slot]
            i = 0
            while i < len(ls):
                b = self.open.get(slot)
                if b is None:
                    b = self.open[slot] = self.open_batch(slot)
                feed = b.text
                assert feed is not None
                room = size - len(b.keys)
                feed.chunks.append(text_payload(ls[i : i + room]))
                b.keys.extend(ks[i : i + room])
                i += room
                if len(b.keys) == size:
                    feed.closed = True
                    del self.open[slot]
        if end == self.total:
            for b in self.open.values():
                b.text.closed = True  # type: ignore[union-attr]
            self.open.clear()


def _no_batch(slot: int) -> LiveBatch:
    raise RuntimeError("a live COPY text source was stepped before its batches were wired")
