"""Shard placement: key encoding, CRC-32, slots and slot -> database maps.

The vectors in tests/data/crc32_vectors.json are computed by an independent
pure-Python CRC-32/IEEE (tests/data/make_crc32_vectors.py), and are the contract
a Go service (``crc32.ChecksumIEEE([]byte(key)) % n``) shares with dal.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import random
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dal import checksum, encode_key
from dal.errors import ConfigError, InputError, ShardKeyError
from dal.routing.sharding import (
    Sharder,
    contiguous_slot_map,
    explicit_slot_map,
    physical_name,
)

DATA = Path(__file__).resolve().parent.parent / "data"
DOC: dict[str, Any] = json.loads((DATA / "crc32_vectors.json").read_text(encoding="utf-8"))
VECTORS: list[dict[str, Any]] = DOC["vectors"]
SLOT_COUNTS: list[int] = DOC["slot_counts"]


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_crc32_vectors", DATA / "make_crc32_vectors.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GEN = _load_generator()


def expand(value: Any, *, hex_unit: bool) -> Any:
    """Undo the ``{"repeat": X, "times": N}`` compaction of long values."""
    if isinstance(value, dict):
        assert set(value) == {"repeat", "times"}, value
        unit = bytes.fromhex(value["repeat"]) if hex_unit else value["repeat"]
        return unit * value["times"]
    return bytes.fromhex(value) if hex_unit else value


def key_of(v: dict[str, Any]) -> object:
    kind, raw = v["type"], v["key"]
    if kind == "int":
        assert type(raw) is int
        return raw
    if kind == "str":
        return expand(raw, hex_unit=False)
    if kind == "bytes":
        return expand(raw, hex_unit=True)
    if kind == "uuid":
        return uuid.UUID(raw)
    raise AssertionError(f"unknown vector type {kind!r}")


def vid(v: dict[str, Any]) -> str:
    text = json.dumps(v["key"], ensure_ascii=True)
    return f"{v['type']}:{text[:40]}"


# -- the vector file itself ------------------------------------------------------------


def test_vector_file_covers_the_required_kinds() -> None:
    assert len(VECTORS) >= 60
    assert SLOT_COUNTS == [1, 2, 4, 8, 16, 1024]
    kinds = Counter(v["type"] for v in VECTORS)
    assert set(kinds) == {"int", "str", "bytes", "uuid"}
    ints = {v["key"] for v in VECTORS if v["type"] == "int"}
    assert {0, 1, -1, 42, 2**31 - 1, 2**63 - 1, -(2**63), 10**30} <= ints
    strs = [key_of(v) for v in VECTORS if v["type"] == "str"]
    assert "" in strs
    assert any("用户" in s for s in strs)  # type: ignore[operator]
    assert any("🎉" in s for s in strs)  # type: ignore[operator]
    assert "e\u0301" in strs and "é" in strs
    assert sum(len(s) >= 10_000 for s in strs) >= 3  # type: ignore[arg-type]
    assert any(len(s) >= 10_000 and not s.isascii() for s in strs)  # type: ignore[union-attr, arg-type]


def test_vector_file_is_what_the_generator_writes() -> None:
    """The JSON is generated, not hand-edited, and matches the pure-Python CRC."""
    assert GEN.render(GEN.build()) == (DATA / "crc32_vectors.json").read_text(encoding="utf-8")


def test_reference_crc_check_values() -> None:
    assert GEN.crc32_ieee(b"123456789") == 0xCBF43926
    assert checksum(b"123456789") == 0xCBF43926
    assert checksum("123456789") == 0xCBF43926
    assert checksum(123456789) == 0xCBF43926


# -- every vector: encoding, checksum, slot, physical table -----------------------------


@pytest.mark.parametrize("v", VECTORS, ids=vid)
def test_vector(v: dict[str, Any]) -> None:
    key = key_of(v)
    encoded = expand(v["encoded_hex"], hex_unit=True)
    assert encode_key(key) == encoded
    assert checksum(key) == v["crc32"]
    assert 0 <= v["crc32"] < 2**32
    for n in SLOT_COUNTS:
        expected = v["slots"][str(n)]
        assert expected == v["crc32"] % n
        sharder = Sharder("users", n, ["db0"] * n)
        assert sharder.slot(key) == expected, n
        placement = sharder.place(key)
        assert placement.slot == expected
        assert placement.table == f"users_{expected}"
        assert placement.database == "db0"


@pytest.mark.parametrize("v", [v for v in VECTORS if v["type"] == "bytes"], ids=vid)
def test_bytes_like_keys_hash_like_bytes(v: dict[str, Any]) -> None:
    key = key_of(v)
    assert isinstance(key, bytes)
    assert checksum(bytearray(key)) == v["crc32"]
    assert checksum(memoryview(key)) == v["crc32"]


def test_int_and_its_decimal_string_share_a_slot() -> None:
    """Go hashes strconv.Itoa(id): the int 42 and the string "42" are one key."""
    for k in (0, 42, -42, 2**63 - 1, 10**30):
        assert encode_key(k) == encode_key(str(k))
        assert checksum(k) == checksum(str(k))


def test_uuid_forms_encode_canonically() -> None:
    canonical = "f47ac10b-58cc-4372-a567-0e02b2c3d479"
    for text in (canonical, canonical.upper(), "{" + canonical + "}", canonical.replace("-", "")):
        assert encode_key(uuid.UUID(text)) == canonical.encode("ascii")
    assert encode_key(uuid.UUID(int=0)) == b"00000000-0000-0000-0000-000000000000"


def test_nfc_and_nfd_are_different_keys() -> None:
    """No Unicode normalisation: Go does none either."""
    assert encode_key("é") == b"\xc3\xa9"
    assert encode_key("e\u0301") == b"e\xcc\x81"
    assert checksum("é") != checksum("e\u0301")


def random_char(rng: random.Random) -> str:
    """ASCII, BMP or astral, never a surrogate."""
    lo, hi = rng.choice([(32, 127), (0xA0, 0xD800), (0xE000, 0x110000)])
    return chr(rng.randrange(lo, hi))


def test_checksum_matches_reference_on_random_inputs() -> None:
    rng = random.Random(20240601)
    for _ in range(300):
        data = rng.randbytes(rng.randrange(0, 200))
        assert checksum(data) == GEN.crc32_ieee(data)
        n = rng.randrange(-(2**70), 2**70)
        assert checksum(n) == GEN.crc32_ieee(str(n).encode())
        text = "".join(random_char(rng) for _ in range(rng.randrange(0, 30)))
        assert checksum(text) == GEN.crc32_ieee(text.encode("utf-8"))


# -- key types ---------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 1
    BIG = 2**40


class Region(enum.StrEnum):
    EU = "eu-west"


class LegacyRegion(str, enum.Enum):  # noqa: UP042 -- the pre-3.11 spelling, on purpose
    EU = "eu-west"


class Tagged(str):
    def __str__(self) -> str:
        return "something else"


def test_int_enum_encodes_like_its_value() -> None:
    assert encode_key(Color.RED) == b"1"
    assert encode_key(Color.BIG) == str(2**40).encode()
    assert checksum(Color.RED) == checksum(1)
    s = Sharder("users", 16, ["db0"] * 16)
    assert s.place(Color.BIG) == s.place(2**40)


def test_str_subclasses_encode_their_value() -> None:
    # A (str, Enum) member's str() is "LegacyRegion.EU"; the value stored (and hashed
    # by a Go service) is "eu-west".
    for key in (Region.EU, LegacyRegion.EU, Tagged("eu-west")):
        assert encode_key(key) == b"eu-west", key
        assert checksum(key) == checksum("eu-west")


def test_uuid_subclass_encodes_canonically() -> None:
    class MyUUID(uuid.UUID):
        pass

    u = MyUUID("12345678-1234-5678-1234-567812345678")
    assert encode_key(u) == b"12345678-1234-5678-1234-567812345678"


class Opaque:
    pass


UNSUPPORTED = [None, True, False, 1.5, float("nan"), Decimal("42"), 3 + 0j, {"id": 1}, [1], (1,),
               {1}, frozenset(), Opaque(), object()]


@pytest.mark.parametrize("key", UNSUPPORTED, ids=lambda k: type(k).__name__)
def test_unsupported_key_types_raise_shard_key_error(key: object) -> None:
    tname = type(key).__name__
    with pytest.raises(ShardKeyError) as ei:
        encode_key(key, table="users")
    msg = str(ei.value)
    assert "users" in msg and tname in msg, msg
    assert isinstance(ei.value, InputError)
    assert isinstance(ei.value, TypeError)
    for call in (Sharder("users", 4, ["db0"] * 4).slot, Sharder("users", 4, ["db0"] * 4).place):
        with pytest.raises(ShardKeyError, match="users"):
            call(key)
    with pytest.raises(ShardKeyError, match="orders"):
        checksum(key, table="orders")


def test_lone_surrogate_str_is_a_shard_key_error() -> None:
    # Not UnicodeEncodeError escaping dal's error tree.
    for key in ("\ud800", Tagged("ok\udfff")):
        with pytest.raises(ShardKeyError, match="users") as ei:
            encode_key(key, table="users")
        assert "str" in str(ei.value)


# -- Sharder ------------------------------------------------------------------------------


def test_sharder_placements_and_names() -> None:
    s = Sharder("orders", 4, ["a", "a", "b", "b"])
    assert [p.table for p in s.placements] == ["orders_0", "orders_1", "orders_2", "orders_3"]
    assert [p.database for p in s.placements] == ["a", "a", "b", "b"]
    assert s.placement(3).database == "b"
    assert physical_name("orders", 12) == "orders_12"
    for k in range(200):
        p = s.place(k)
        assert p == s.placement(s.slot(k))
        assert p.database == ("a" if p.slot < 2 else "b")


def test_sharder_rejects_bad_shapes() -> None:
    with pytest.raises(ConfigError) as ei:
        Sharder("users", 0, [])
    assert ei.value.field == "tables.users.table_shards"
    with pytest.raises(ConfigError) as ei:
        Sharder("users", 4, ["db0"] * 3)
    assert ei.value.field == "tables.users.slot_map"


def test_slots_spread_evenly() -> None:
    s = Sharder("users", 16, ["db0"] * 16)
    counts = Counter(s.slot(k) for k in range(16_000))
    assert set(counts) == set(range(16))
    assert all(800 <= c <= 1200 for c in counts.values()), counts


# -- contiguous slot maps -------------------------------------------------------------------


def dbs(m: int) -> list[str]:
    return [f"d{i}" for i in range(m)]


def test_contiguous_examples() -> None:
    assert contiguous_slot_map(4, ["d0", "d1"]) == ("d0", "d0", "d1", "d1")
    assert contiguous_slot_map(8, dbs(3)) == ("d0", "d0", "d0", "d1", "d1", "d1", "d2", "d2")
    assert contiguous_slot_map(1, ["d0"]) == ("d0",)
    assert contiguous_slot_map(1, dbs(3)) == ("d0",)
    assert contiguous_slot_map(5, dbs(5)) == tuple(dbs(5))
    assert contiguous_slot_map(1024, ["d0", "d1"]) == ("d0",) * 512 + ("d1",) * 512


def check_contiguous(n: int, m: int) -> None:
    names = dbs(m)
    got = contiguous_slot_map(n, names)
    assert len(got) == n
    idx = [names.index(d) for d in got]
    # Contiguous runs in database order: the map never goes back to an earlier database.
    assert idx == sorted(idx)
    counts = [idx.count(i) for i in range(m)]
    assert max(counts) - min(counts) <= 1
    if n >= m:
        assert min(counts) >= 1  # every database owns a (non-empty) run
    # The documented closed form, which a Go service reproduces as slot*m/n.
    for i in range(m):
        lo, hi = -(-i * n // m), -(-(i + 1) * n // m)
        assert [s for s in range(n) if idx[s] == i] == list(range(lo, hi))


def test_contiguous_property_exhaustive() -> None:
    """Every (slots, databases) pair with slots <= 260 and databases <= 16.

    (Exhaustive over a bounded domain instead of hypothesis, which is not a
    declared test dependency.)
    """
    for n in range(1, 261):
        for m in range(1, 17):
            check_contiguous(n, m)


@pytest.mark.parametrize(("n", "m"), [(1024, 3), (1024, 7), (1000, 16), (4096, 10), (7, 7), (3, 7)])
def test_contiguous_property_large(n: int, m: int) -> None:
    check_contiguous(n, m)


# -- explicit slot maps ---------------------------------------------------------------------


def test_explicit_slot_map_ok() -> None:
    got = explicit_slot_map("users", 4, {"d1": [0, 3], "d0": [2, 1]}, ["d0", "d1"])
    assert got == ("d1", "d0", "d0", "d1")
    assert explicit_slot_map("users", 2, {"d0": (0, 1)}, ["d0", "d1"]) == ("d0", "d0")


@pytest.mark.parametrize(
    ("mapping", "problem"),
    [
        ({"d0": [0, 1], "dX": [2, 3]}, "dX"),  # unknown database
        ({"d0": [0, 1], "d1": [2, 4]}, "4"),  # slot out of range
        ({"d0": [0, 1], "d1": [2, -1]}, "-1"),  # negative slot
        ({"d0": [0, 1], "d1": [2, "3"]}, "'3'"),  # not an int
        ({"d0": [0, 1], "d1": [2, True]}, "True"),  # bool is not a slot
        ({"d0": [0, 1], "d1": [1, 2, 3]}, "1"),  # slot mapped twice
        ({"d0": [0, 1, 1], "d1": [2, 3]}, "1"),  # twice on the same database
        ({"d0": [0], "d1": [3]}, "[1, 2]"),  # slots unmapped
        ({}, "[0, 1, 2, 3]"),  # nothing mapped
    ],
)
def test_explicit_slot_map_errors(mapping: dict[str, list[Any]], problem: str) -> None:
    with pytest.raises(ConfigError) as ei:
        explicit_slot_map("users", 4, mapping, ["d0", "d1"])
    assert ei.value.field.startswith("tables.users.slot_map"), ei.value.field
    assert problem in str(ei.value)


# -- the batch helpers agree with Sharder.slot ----------------------------------------


@pytest.mark.parametrize("n", SLOT_COUNTS)
def test_vectorised_and_int_slots_agree_with_the_sharder(n: int) -> None:
    """slots_of (batches), int_slot (the writer's per-row path) and slot_of_encoded (a cached
    get's key bytes) place every vector key exactly where Sharder.slot does."""
    from dal.routing.sharding import Sharder, encode_key, int_slot, slots_of

    sharder = Sharder("t", n, ["db0"] * n)
    keys = [key_of(v) for v in VECTORS]
    want = [sharder.slot(k) for k in keys]
    assert slots_of([encode_key(k) for k in keys], n) == want
    assert [sharder.slot_of_encoded(encode_key(k)) for k in keys] == want
    ints = [(k, s) for k, s in zip(keys, want, strict=True) if type(k) is int]
    assert ints and all(int_slot(k, n) == s for k, s in ints)
