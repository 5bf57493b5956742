"""L1 (LocalCache): per-entry TTL on an injected clock, size bound, copies, guarded fills."""

from __future__ import annotations

import pytest

import dal.cache.local as local_mod
from dal.cache.local import MISS, LocalCache


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def tick(self, dt: float) -> None:
        self.t += dt


def make(maxsize: int = 100, *, deep_copy: bool = False) -> tuple[LocalCache, FakeClock]:
    clock = FakeClock()
    return LocalCache(maxsize, clock=clock, deep_copy=deep_copy), clock


def test_ttl_is_per_entry() -> None:
    c, clock = make()
    g = c.generation()
    assert c.put(b"a", {"v": "a"}, 5.0, g)
    assert c.put(b"b", {"v": "b"}, 10.0, g)
    assert c.put(b"absent", None, 2.0, g)
    assert c.get(b"absent") is None  # cached "no such row"
    clock.tick(1.999)
    assert c.get(b"absent") is None
    clock.tick(0.002)
    assert c.get(b"absent") is MISS
    clock.tick(2.99)  # t = 4.991
    assert c.get(b"a") == {"v": "a"}
    clock.tick(0.01)  # t = 5.001
    assert c.get(b"a") is MISS
    assert c.get(b"b") == {"v": "b"}
    clock.tick(5.0)  # t = 10.001
    assert c.get(b"b") is MISS
    assert len(c) == 0
    assert c.hits == 4 and c.misses == 3


def test_ttl_refilled_entry_gets_its_new_expiry() -> None:
    c, clock = make()
    c.put(b"k", {"v": 1}, 1.0, c.generation())
    clock.tick(0.5)
    c.put(b"k", {"v": 2}, 1.0, c.generation())
    clock.tick(0.9)
    assert c.get(b"k") == {"v": 2}
    clock.tick(0.2)
    assert c.get(b"k") is MISS


def test_maxsize_bounds_the_cache() -> None:
    c, _ = make(maxsize=50)
    g = c.generation()
    for i in range(500):
        c.put(str(i).encode(), {"i": i}, 60.0, g)
        assert len(c) <= 50
    assert len(c) == 50
    # the most recent entries survive (LRU)
    assert c.get(b"499") == {"i": 499}
    assert c.get(b"0") is MISS


def test_returned_rows_are_copies() -> None:
    c, _ = make()
    row = {"id": 1, "name": "Ada"}
    c.put(b"1", row, 60.0, c.generation())
    got = c.get(b"1")
    assert got == row
    assert got is not row
    got["name"] = "changed"
    got["extra"] = True
    assert c.get(b"1") == {"id": 1, "name": "Ada"}


def test_shallow_copy_by_default_shares_nested_values() -> None:
    # Documents why tables with JSON/array columns use deep_copy=True.
    c, _ = make()
    c.put(b"1", {"tags": ["a"]}, 60.0, c.generation())
    c.get(b"1")["tags"].append("b")  # type: ignore[index]
    assert c.get(b"1") == {"tags": ["a", "b"]}


def test_deep_copy_protects_nested_values() -> None:
    c, _ = make(deep_copy=True)
    c.put(b"1", {"doc": {"a": {"b": [1, 2]}}, "tags": ["x"]}, 60.0, c.generation())
    got = c.get(b"1")
    assert got is not None
    got["doc"]["a"]["b"].append(3)
    got["doc"]["new"] = 1
    got["tags"].clear()
    assert c.get(b"1") == {"doc": {"a": {"b": [1, 2]}}, "tags": ["x"]}


def test_guarded_put_rejected_after_invalidate_of_that_key() -> None:
    c, _ = make()
    since = c.generation()  # a reader starts (L2 / database read in flight)
    c.invalidate([b"k"])  # a write of k commits and evicts
    assert not c.put(b"k", {"v": "old"}, 60.0, since)
    assert c.get(b"k") is MISS
    assert c.rejected_fills == 1
    # another key's fill from the same reader generation is fine
    assert c.put(b"other", {"v": 1}, 60.0, since)
    # a reader that started after the invalidation may fill
    assert c.put(b"k", {"v": "new"}, 60.0, c.generation())
    assert c.get(b"k") == {"v": "new"}


def test_invalidate_evicts_and_later_invalidations_keep_rejecting() -> None:
    c, _ = make()
    c.put(b"k", {"v": 1}, 60.0, c.generation())
    since = c.generation()
    c.invalidate([b"x"])
    assert c.get(b"k") == {"v": 1}  # other keys untouched
    c.invalidate([b"k", b"y"])
    assert c.get(b"k") is MISS
    assert not c.put(b"k", {"v": "stale"}, 60.0, since)
    assert not c.put(b"y", {"v": "stale"}, 60.0, since)
    assert c.put(b"z", {"v": "fine"}, 60.0, since)


def test_flush_drops_everything_and_fills_in_flight() -> None:
    c, _ = make()
    c.put(b"a", {"v": 1}, 60.0, c.generation())
    since = c.generation()
    c.flush()
    assert len(c) == 0
    assert c.get(b"a") is MISS
    # every fill that started before the flush is dropped, whatever its key
    assert not c.put(b"a", {"v": 1}, 60.0, since)
    assert not c.put(b"never-touched", {"v": 1}, 60.0, since)
    assert c.put(b"a", {"v": 2}, 60.0, c.generation())


def test_touched_history_overflow_drops_all_older_fills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_mod, "_MAX_TOUCHED", 3)
    c, _ = make()
    old = c.generation()
    c.invalidate([b"a", b"b"])
    assert len(c._touched) == 2
    mid = c.generation()
    c.invalidate([b"c", b"d"])  # 4 remembered keys > 3: history forgotten
    assert len(c._touched) == 0
    # conservatively, every fill that started before the overflow is rejected,
    # including keys that were never invalidated
    assert not c.put(b"a", {"v": 1}, 60.0, old)
    assert not c.put(b"untouched", {"v": 1}, 60.0, old)
    assert not c.put(b"untouched", {"v": 1}, 60.0, mid)
    now = c.generation()
    assert c.put(b"a", {"v": 2}, 60.0, now)
    assert c.put(b"untouched", {"v": 2}, 60.0, now)
    # per-key history resumes after the overflow
    c.invalidate([b"a"])
    assert not c.put(b"a", {"v": 3}, 60.0, now)
    assert c.put(b"other", {"v": 3}, 60.0, now)
