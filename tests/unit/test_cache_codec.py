"""Cache codecs: msgpack and JSON round-trip every value a row may hold; never pickle."""

from __future__ import annotations

import ast
import datetime as dt
import decimal
import enum
import math
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest

import dal.cache
from dal.cache.codec import JsonCodec, MsgpackCodec, enum_key, make_codec

CODECS = ["msgpack", "json"]

UTC = dt.UTC
PLUS_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))

VALUES: dict[str, Any] = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "int": 42,
    "neg": -7,
    "i64_max": 2**63 - 1,
    "i64_min": -(2**63),
    "u64_max": 2**64 - 1,
    "big": 2**100 + 17,
    "big_neg": -(2**90) - 3,
    "float": 3.141592653589793,
    "float_tiny": 5e-324,
    "float_neg_zero": -0.0,
    "float_inf": math.inf,
    "float_ninf": -math.inf,
    "str": "plain",
    "str_empty": "",
    "str_non_ascii": "Grüße, 世界 🌍 — ñ",
    "bytes": b"\x00\x01\xfe\xff binary",
    "bytes_empty": b"",
    "datetime_naive": dt.datetime(2024, 2, 29, 23, 59, 58, 123456),
    "datetime_utc": dt.datetime(2024, 1, 1, 0, 0, tzinfo=UTC),
    "datetime_aware": dt.datetime(1999, 12, 31, 18, 30, 1, 5, tzinfo=PLUS_0530),
    "date": dt.date(1970, 1, 1),
    "time": dt.time(13, 37, 0, 999),
    "time_aware": dt.time(1, 2, 3, tzinfo=PLUS_0530),
    "timedelta": dt.timedelta(days=3, seconds=7, microseconds=11),
    "timedelta_neg": dt.timedelta(days=-1, seconds=5),
    "decimal": decimal.Decimal("12345678901234567890.000123"),
    "decimal_exp": decimal.Decimal("1E+5"),
    "decimal_neg": decimal.Decimal("-0.10"),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "list": [1, "two", 3.0, None, [b"x", {"k": dt.date(2020, 5, 17)}]],
    "dict": {"a": 1, "nested": {"deep": [decimal.Decimal("1.5"), uuid.UUID(int=1)], "e": {}}},
    "empty_list": [],
    # JSON-column values that look like the JSON codec's own tags must come back as dicts.
    "tag_lookalike": {"$dt": "2020-01-01T00:00:00"},
    "tag_lookalike_b64": {"$b64": "aGk="},
    "tag_lookalike_nested": [{"$dec": "1.0"}, {"$$dt": "x"}, {"$uuid": "not-a-uuid"}],
    "dollar_keys": {"$dt": "x", "other": 1},
}


def _same(a: Any, b: Any) -> bool:
    """Equal, of the same type, recursively (so 1 != 1.0 and naive != aware)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a == 0:
        return math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dt.datetime | dt.time):
        return a == b and a.utcoffset() == b.utcoffset()
    return bool(a == b)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("field", list(VALUES))
def test_round_trip_each_type(name: str, field: str) -> None:
    codec = make_codec(name)
    row = {"id": 1, field: VALUES[field]}
    back = codec.loads(codec.dumps(row))
    assert _same(back, row), (field, back)


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_whole_row_and_absent(name: str) -> None:
    codec = make_codec(name)
    back = codec.loads(codec.dumps(VALUES))
    assert _same(back, VALUES)
    assert codec.loads(codec.dumps(None)) is None  # the negative-cache placeholder
    # the placeholder differs from an empty row
    assert codec.loads(codec.dumps({})) == {}
    assert codec.dumps(None) != codec.dumps({})


@pytest.mark.parametrize("name", CODECS)
def test_nan_round_trips(name: str) -> None:
    codec = make_codec(name)
    back = codec.loads(codec.dumps({"f": math.nan, "d": decimal.Decimal("NaN")}))
    assert back is not None
    assert math.isnan(back["f"])
    assert back["d"].is_nan()


@pytest.mark.parametrize("name", CODECS)
def test_unsupported_type_is_a_type_error(name: str) -> None:
    codec = make_codec(name)
    with pytest.raises(TypeError, match="cannot cache"):
        codec.dumps({"x": object()})


def test_make_codec_picks_the_implementation() -> None:
    assert isinstance(make_codec("msgpack"), MsgpackCodec)
    assert isinstance(make_codec("json"), JsonCodec)


# --------------------------------------------------------------------------- never pickle

_FORBIDDEN = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}


def test_no_cache_module_imports_pickle() -> None:
    pkg = Path(dal.cache.__file__).parent
    files = sorted(pkg.glob("*.py"))
    assert len(files) >= 9
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            assert not (set(names) & _FORBIDDEN), f"{f.name}:{getattr(node, 'lineno', '?')} imports {names}"
        assert "pickle" not in f.read_text().replace("never pickle", "").replace("Never pickle", ""), f.name


@pytest.mark.parametrize("name", CODECS)
def test_codecs_never_call_pickle(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("pickle used")

    for attr in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pickle, attr, boom)
    codec = make_codec(name)
    assert _same(codec.loads(codec.dumps(VALUES)), VALUES)


@pytest.mark.parametrize("name", CODECS)
def test_pickle_payload_is_not_unpickled(name: str) -> None:
    class Evil:
        def __reduce__(self) -> Any:
            return (eval, ("1/0",))

    payload = pickle.dumps(Evil())
    codec = make_codec(name)
    try:
        out = codec.loads(payload)
    except Exception:  # rejected: fine
        return
    assert not isinstance(out, Evil)


class Color(enum.Enum):
    RED = 1
    GREEN = "g"


class Size(enum.StrEnum):  # a str subclass: packed as a plain str unless tagged
    S = "s"
    L = "l"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


ENUMS = {enum_key(c): c for c in (Color, Size, Level)}


@pytest.mark.parametrize("name", CODECS)
def test_enum_members_of_declared_classes_round_trip(name: str) -> None:
    codec = make_codec(name, ENUMS)
    row = {"c": Color.GREEN, "s": Size.L, "l": Level.HIGH, "plain": "s", "n": 1, "none": None, "doc": {"$enum": 1}}
    back = codec.loads(codec.dumps(row))
    assert back == row
    assert back is not None
    assert back["c"] is Color.GREEN and back["s"] is Size.L and back["l"] is Level.HIGH
    assert type(back["plain"]) is str and type(back["n"]) is int  # equal values stay plain
    assert codec.loads(codec.dumps(None)) is None


@pytest.mark.parametrize("name", CODECS)
def test_enum_of_an_undeclared_class_is_not_looked_up(name: str) -> None:
    writer = make_codec(name, ENUMS)
    data = writer.dumps({"c": Color.RED})
    other = make_codec(name, {enum_key(Size): Size})  # Color not declared here
    with pytest.raises(ValueError, match="no column of this table declares"):
        other.loads(data)
    with pytest.raises(TypeError):  # a codec without enum columns does not cache members
        make_codec(name).dumps({"c": Color.RED})
