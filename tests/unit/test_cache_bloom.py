"""BloomMembership: measured false-positive rate, no false negatives, saturation,
generation swap, snapshot bytes, and bit positions that match Redis SETBIT."""

from __future__ import annotations

from bitarray import bitarray

from dal.cache.bloom import BloomMembership, MembershipFilter
from dal.cache.keys import encode_cache_key


def key(i: int) -> bytes:
    return encode_cache_key((i,))


def test_false_positive_rate_at_capacity_and_no_false_negatives() -> None:
    n = 100_000
    bf = BloomMembership(n, 0.001)
    members = [key(i) for i in range(n)]
    bf.add_many(members)
    assert bf.count == n
    assert not bf.saturated
    assert all(k in bf for k in members), "a false negative"
    non_members = [key(i) for i in range(10_000_000, 10_000_000 + n)]
    fp = sum(1 for k in non_members if k in bf)
    rate = fp / n
    print(f"bloom false-positive rate at capacity {n}, error_rate 0.001: {rate:.5f} ({fp}/{n})")
    assert rate <= 0.0015, rate


def test_false_positive_rate_other_key_shapes() -> None:
    # composite and string keys encode differently; the rate holds for them too
    n = 20_000
    bf = BloomMembership(n, 0.01)
    bf.add_many(encode_cache_key((i, f"user-{i}")) for i in range(n))
    assert all(encode_cache_key((i, f"user-{i}")) in bf for i in range(n))
    fp = sum(1 for i in range(n) if encode_cache_key((i, f"user-{i}x")) in bf)
    assert fp / n <= 0.015


def test_saturation_answers_maybe_for_everything() -> None:
    bf = BloomMembership(10, 0.01)
    for i in range(10):
        bf.add(key(i))
    assert not bf.saturated
    assert key(999) not in bf  # (with 10 keys at 1%, this one is a true negative)
    bf.add(key(10))  # one more than capacity
    assert bf.saturated
    assert all(key(i) in bf for i in range(10_000, 10_100))
    assert all(key(i) in bf for i in range(11))
    bf.add(key(11))  # adding more neither raises nor un-saturates
    assert bf.saturated


def test_rebuild_keeps_keys_added_during_the_rebuild() -> None:
    bf = BloomMembership(1000, 0.001)
    bf.add(key(1))
    bf.begin_rebuild()
    # the rebuild scans the database (sees 1 and 2) while writers insert 3 and 4
    replacement = BloomMembership(2000, 0.001, generation=1)
    replacement.add(key(1))
    bf.add(key(3))
    replacement.add(key(2))
    bf.add(key(4))
    # the old filter keeps serving meanwhile, and already knows the new keys
    assert key(1) in bf and key(3) in bf and key(4) in bf
    bf.finish_rebuild(replacement)
    for i in (1, 2, 3, 4):
        assert key(i) in bf, i
    assert bf.generation == 1
    assert bf.capacity == 2000
    assert bf.count == 4
    # after the swap, adds go to the new filter only; no leftover pending list
    bf.add(key(5))
    assert key(5) in bf
    assert bf._pending is None


def test_rebuild_of_a_saturated_filter_unsaturates_with_a_larger_one() -> None:
    bf = BloomMembership(5, 0.01)
    bf.add_many(key(i) for i in range(6))
    assert bf.saturated
    bf.begin_rebuild()
    bigger = BloomMembership(100, 0.01, generation=bf.generation + 1)
    bigger.add_many(key(i) for i in range(6))
    bf.add(key(6))  # during the rebuild, while saturated
    bf.finish_rebuild(bigger)
    assert not bf.saturated
    assert all(key(i) in bf for i in range(7))
    assert key(12345) not in bf


def test_abort_rebuild_drops_the_pending_list() -> None:
    bf = BloomMembership(100, 0.01)
    bf.begin_rebuild()
    bf.add(key(1))
    bf.abort_rebuild()
    assert bf._pending is None
    assert key(1) in bf  # the live filter still has it


def test_snapshot_round_trip() -> None:
    bf = BloomMembership(5000, 0.001, generation=7)
    bf.add_many(key(i) for i in range(3000))
    data = bf.to_bytes()
    assert len(data) == (bf._filter.num_bits + 7) // 8
    back = BloomMembership.from_bytes(data, 5000, 0.001, bf.count, bf.generation)
    assert back.count == 3000
    assert back.generation == 7
    assert not back.saturated
    assert all(key(i) in back for i in range(3000))
    probes = [key(i) for i in range(1_000_000, 1_020_000)]
    assert [k in back for k in probes] == [k in bf for k in probes]
    assert back.to_bytes() == data
    # still a working filter: adds after loading
    back.add(key(-1))
    assert key(-1) in back
    # a full snapshot loads as saturated
    full = BloomMembership.from_bytes(data, 5000, 0.001, 5000, 0)
    assert full.saturated


def test_snapshot_from_shorter_bytes_pads_with_zeros() -> None:
    # Redis returns a string only as long as the highest bit SETBIT touched.
    bf = BloomMembership(1000, 0.01)
    bf.add(key(1))
    data = bf.to_bytes()
    last = max(bf.positions(key(1)))
    short = data[: last // 8 + 1]
    back = BloomMembership.from_bytes(short, 1000, 0.01, 1, 0)
    assert key(1) in back
    assert back.to_bytes() == data


def _redis_setbit(buf: bytearray, offset: int) -> None:
    """Redis SETBIT semantics: the string grows as needed; bit 0 is the MSB of byte 0."""
    byte = offset >> 3
    if byte >= len(buf):
        buf.extend(b"\x00" * (byte + 1 - len(buf)))
    buf[byte] |= 1 << (7 - (offset & 7))


def test_positions_match_redis_setbit() -> None:
    bf = BloomMembership(10_000, 0.001)
    keys = [key(i) for i in range(500)] + [encode_cache_key((i, "x")) for i in range(500)]
    redis_string = bytearray()
    expected = bitarray(bf._filter.num_bits, endian="big")
    expected.setall(0)
    for k in keys:
        positions = bf.positions(k)
        assert len(positions) == bf._filter.num_slices
        assert all(0 <= p < bf._filter.num_bits for p in positions)
        bf.add(k)
        for p in positions:
            _redis_setbit(redis_string, p)
            expected[p] = 1
    snap = bf.to_bytes()
    assert snap == expected.tobytes()
    assert snap[: len(redis_string)] == bytes(redis_string)
    assert not any(snap[len(redis_string) :])
    # positions are exactly the bits the filter sets for the key
    one = BloomMembership(10_000, 0.001)
    one.add(key(42))
    assert sorted(one._filter.bitarray.search(1)) == sorted(one.positions(key(42)))


def test_a_filter_built_from_setbits_alone_knows_the_keys() -> None:
    # What a process that loads the snapshot sees: the bits writers SETBIT since.
    bf = BloomMembership(10_000, 0.001)
    redis_string = bytearray()
    for i in range(100):
        for p in bf.positions(key(i)):
            _redis_setbit(redis_string, p)
    loaded = BloomMembership.from_bytes(bytes(redis_string), 10_000, 0.001, 100, 0)
    assert all(key(i) in loaded for i in range(100))
    assert sum(key(i) in loaded for i in range(1000, 11_000)) <= 20


def test_satisfies_the_membership_protocol() -> None:
    f: MembershipFilter = BloomMembership(10, 0.1)
    f.add(b"x")
    assert b"x" in f
    assert f.count == 1
