"""What the invalidation bus does with what it receives (pure logic: no Redis).

Messages are fed to ``InvalidationBus._apply`` as the subscriber would, and
time is a fake clock: resync coalescing is checked without sleeping. The same
behaviour on a real pub/sub channel is in tests/integration/test_cache_untrusted.py.
"""

from __future__ import annotations

import math
import os
from typing import Any

import msgpack
import pytest

from dal.cache.invalidation import MAX_ORIGINS, InvalidationBus


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, **kw: Any) -> None:
        self.clock = Clock()
        self.resyncs = 0
        self.applied: list[tuple[list[bytes], bool]] = []
        self.bus = InvalidationBus(object(), "chan", on_gap=self.on_gap, clock=self.clock, wall=lambda: 5.0, **kw)
        self.bus.register("users", lambda keys, inserted: self.applied.append((keys, inserted)))

    def on_gap(self) -> None:
        self.resyncs += 1


def packed(*fields: Any) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)  # type: ignore[no-any-return]


ORIGIN = os.urandom(8)


def good(seq: int, keys: list[bytes] | None = None, *, origin: bytes = ORIGIN, inserted: bool = False) -> bytes:
    return packed(origin, seq, "users", [b"1"] if keys is None else keys, inserted, 4.0)


MALFORMED: list[Any] = [
    b"",
    b"\xc1",  # never valid msgpack
    b"\x93\x01\x02",  # truncated
    good(1) + b"\x00",  # extra data
    packed(ORIGIN, 1, "users", [b"1"], False),  # arity 5
    packed(ORIGIN, 1, "users", [b"1"], False, 4.0, 7),  # arity 7
    msgpack.packb({"origin": ORIGIN}),
    msgpack.packb("just a string"),
    packed("origin-as-str", 1, "users", [b"1"], False, 4.0),
    packed(b"", 1, "users", [b"1"], False, 4.0),
    packed(ORIGIN, "1", "users", [b"1"], False, 4.0),
    packed(ORIGIN, -1, "users", [b"1"], False, 4.0),
    packed(ORIGIN, True, "users", [b"1"], False, 4.0),
    packed(ORIGIN, 1.5, "users", [b"1"], False, 4.0),
    packed(ORIGIN, 1, b"users", [b"1"], False, 4.0),
    packed(ORIGIN, 1, 7, [b"1"], False, 4.0),
    packed(ORIGIN, 1, "users", b"1", False, 4.0),
    packed(ORIGIN, 1, "users", ["1"], False, 4.0),  # keys must be bytes
    packed(ORIGIN, 1, "users", [1], False, 4.0),
    packed(ORIGIN, 1, "users", [[b"1"]], False, 4.0),
    packed(ORIGIN, 1, "users", [b"1"], 1, 4.0),
    packed(ORIGIN, 1, "users", [b"1"], None, 4.0),
    packed(ORIGIN, 1, "users", [b"1"], False, "now"),
    packed(ORIGIN, 1, "users", [b"1"], False, math.nan),
    packed(ORIGIN, 1, "users", [b"1"], False, math.inf),
    packed(ORIGIN, 1, "users", [b"1"], False, None),
    b"\x96" + packed(ORIGIN, 1)[1:] + b"\xa5us\xffrs" + packed([b"1"], False, 4.0)[1:],  # table not UTF-8
    "not bytes at all",
    None,
]


@pytest.mark.parametrize("data", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_messages_are_dropped_and_counted_never_raise(data: Any) -> None:
    h = Harness()
    h.bus._apply(good(1))  # the origin is known: a bad message must not count as its gap
    h.bus._apply(data)
    assert h.bus.malformed == 1
    assert h.resyncs == 0 and h.bus.gaps == 0
    assert h.applied == [([b"1"], False)]
    h.bus._apply(good(2))  # and the origin's next message is no gap either
    assert h.resyncs == 0 and len(h.applied) == 2


def test_unknown_table_is_counted_and_its_sequence_still_counts() -> None:
    h = Harness()
    h.bus._apply(good(1))
    h.bus._apply(packed(ORIGIN, 2, "orders", [b"1"], False, 4.0))
    assert h.bus.foreign == 1 and h.bus.malformed == 0 and len(h.applied) == 1
    h.bus._apply(good(3))
    assert h.bus.gaps == 0 and h.resyncs == 0 and len(h.applied) == 2


def test_per_origin_state_is_bounded_and_a_forgotten_origin_is_new() -> None:
    h = Harness()
    first = b"first-origin"
    h.bus._apply(good(1, origin=first))
    for i in range(3 * MAX_ORIGINS):
        h.bus._apply(good(1, origin=i.to_bytes(8, "big")))
    assert len(h.bus._last_seq) == MAX_ORIGINS
    assert first not in h.bus._last_seq
    h.bus._apply(good(50, origin=first))  # forgotten: a new origin, not a skip from 1 to 50
    assert h.bus.gaps == 0 and h.resyncs == 0
    # the most recently heard are kept: a skip of a tracked origin is still a gap
    h.bus._apply(good(3, origin=(3 * MAX_ORIGINS - 1).to_bytes(8, "big")))
    assert h.bus.gaps == 1 and h.resyncs == 1


def test_resyncs_are_coalesced_per_interval_and_never_skipped() -> None:
    h = Harness(resync_interval=1.0)
    bus = h.bus
    bus._apply(good(1))
    bus._apply(good(3))  # gap: the first resync runs at once
    assert h.resyncs == 1 and not bus.resync_pending
    h.clock.now += 0.1
    bus._apply(good(5))  # gap within the interval: deferred, but the message is applied
    assert h.resyncs == 1 and bus.resync_pending and bus.gaps == 2
    assert h.applied[-1] == ([b"1"], False)
    h.clock.now += 0.5
    bus._gap()  # a reconnect meanwhile: covered by the same deferred resync
    bus._apply(good(9))
    assert bus.gaps == 4
    assert bus._poll_timeout() == pytest.approx(0.4)
    h.clock.now += 0.39
    bus.poll()
    assert h.resyncs == 1 and bus.resync_pending
    h.clock.now += 0.01
    bus.poll()
    assert h.resyncs == 2 and not bus.resync_pending and bus.resyncs == 2
    bus.poll()
    assert h.resyncs == 2
    assert bus._poll_timeout() == 1.0
    # a whole interval later, a gap resyncs at once again
    h.clock.now += 1.0
    bus._apply(good(11))
    assert h.resyncs == 3 and not bus.resync_pending


def test_zero_interval_resyncs_every_gap() -> None:
    h = Harness(resync_interval=0.0)
    for seq in (1, 3, 5, 7):
        h.bus._apply(good(seq))
    assert h.resyncs == 3


def test_sender_splits_and_receiver_drops_oversized_messages_as_a_gap() -> None:
    sender = Harness(max_keys=1000)
    keys = [str(i).encode() for i in range(2500)]
    payloads = sender.bus.messages("users", keys, True)
    assert len(payloads) == 3
    bodies = [msgpack.unpackb(p, raw=False) for p in payloads]
    assert [b[1] for b in bodies] == [1, 2, 3]
    assert [len(b[3]) for b in bodies] == [1000, 1000, 500]
    receiver = Harness(max_keys=1000)
    for p in payloads:
        receiver.bus._apply(p)
    assert [k for ks, _ in receiver.applied for k in ks] == keys
    assert receiver.resyncs == 0 and receiver.bus.oversized == 0

    big = Harness(max_keys=5000).bus.messages("users", keys, True)
    assert len(big) == 1
    receiver.bus._apply(big[0])
    assert receiver.bus.oversized == 1
    assert receiver.resyncs == 1  # its keys were not applied: resync
    assert len(receiver.applied) == 3  # (and nothing reached the Bloom filter through the handler)


def test_signed_messages() -> None:
    sender = Harness(signing_key=b"secret")
    receiver = Harness(signing_key=b"secret")
    payload = sender.bus.messages("users", [b"7"], False)[0]
    receiver.bus._apply(payload)
    assert receiver.applied == [([b"7"], False)] and receiver.bus.bad_signature == 0

    unsigned = Harness().bus.messages("users", [b"8"], False)[0]
    other_key = Harness(signing_key=b"other").bus.messages("users", [b"8"], False)[0]
    other_channel = InvalidationBus(object(), "other-chan", on_gap=lambda: None, signing_key=b"secret").messages(
        "users", [b"8"], False
    )[0]
    tampered = bytearray(payload)
    tampered[-12] ^= 1
    for bad in (unsigned, other_key, other_channel, bytes(tampered), payload[:31], b""):
        receiver.bus._apply(bad)
    assert receiver.bus.bad_signature == 6
    assert receiver.applied == [([b"7"], False)] and receiver.resyncs == 0

    plain = Harness()  # no key: a signed message does not parse
    plain.bus._apply(payload)
    assert plain.bus.malformed == 1 and plain.applied == []


async def test_bloom_filters_are_not_trusted_while_a_resync_is_pending() -> None:
    from dal.cache.tiered import CacheRuntime

    clock = Clock()
    rt = CacheRuntime(redis_url="redis://127.0.0.1:1/0", clock=clock, resync_interval=1.0)  # never connected
    bus = rt.bus
    assert bus is not None
    try:
        bus._subscribed.set()
        assert rt.bus_live
        bus._gap()  # resyncs at once
        assert rt.bus_live
        clock.now += 0.5
        bus._gap()  # deferred
        assert not rt.bus_live
        clock.now += 0.5
        bus.poll()
        assert rt.bus_live and bus.resyncs == 2
    finally:
        await rt.bus.client.aclose()  # type: ignore[union-attr]
        await rt._client.aclose()
