"""Generate crc32_vectors.json: shard-placement vectors shared with non-Python services.

Go reproduces every vector with ``crc32.ChecksumIEEE([]byte(key)) % n`` (int keys
via ``strconv.FormatInt``, UUIDs via ``uuid.String()``); or simply hash the bytes
given in ``encoded_hex``.

The CRC here is an independent, pure-Python, table-driven CRC-32/IEEE (reflected
polynomial 0xEDB88320, init 0xFFFFFFFF, final xor 0xFFFFFFFF, as Go's
``crc32.ChecksumIEEE``); it deliberately does not use zlib or binascii, which dal
itself uses. The key encoding is written out here again from the contract in
``dal/routing/sharding.py`` (this script does not import dal):

    int   -> decimal ASCII        str  -> UTF-8
    bytes -> as is                UUID -> canonical lowercase hyphenated string

Long values are stored compactly: ``{"repeat": X, "times": N}`` stands for X
repeated N times (X is text for a str key, hex for a bytes key and for
``encoded_hex``).

Usage::

    python tests/data/make_crc32_vectors.py          # (re)write crc32_vectors.json
    python tests/data/make_crc32_vectors.py --check  # exit 1 if the file is stale
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("crc32_vectors.json")
SLOT_COUNTS = (1, 2, 4, 8, 16, 1024)


def _make_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _make_table()


def crc32_ieee(data: bytes) -> int:
    """CRC-32/IEEE of ``data``, computed byte by byte with a 256-entry table."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


# The catalogue check value of CRC-32/ISO-HDLC, and two other well-known values.
assert crc32_ieee(b"123456789") == 0xCBF43926
assert crc32_ieee(b"") == 0
assert crc32_ieee(b"The quick brown fox jumps over the lazy dog") == 0x414FA339


class Repeat:
    """A long value: ``unit`` repeated ``times`` times (stored as such in the JSON)."""

    def __init__(self, unit: str | bytes, times: int) -> None:
        self.unit = unit
        self.times = times

    def value(self) -> str | bytes:
        return self.unit * self.times


def encode(kind: str, key: Any) -> bytes:
    """The bytes hashed for ``key`` (independent restatement of the dal contract)."""
    if kind == "int":
        return str(key).encode("ascii")
    if kind == "str":
        return key.encode("utf-8")  # type: ignore[no-any-return]
    if kind == "bytes":
        return bytes(key)
    if kind == "uuid":
        return str(uuid.UUID(key)).encode("ascii")
    raise ValueError(kind)


INT_KEYS: list[int] = [
    0, 1, -1, 7, 42, -42, 100, 255, 256, 1000, 65535, 123456789,
    2**31 - 1, -(2**31), 2**32, 2**53 + 1, 1234567890123,
    2**63 - 1, -(2**63), 2**64, 10**30, -(10**30),
]

STR_KEYS: list[str | Repeat] = [
    "", "a", "abc", "42", "-1", "123456789", " ", "hello world", "user:42",
    "The quick brown fox jumps over the lazy dog",
    "\x00", "tab\tnew\nline", "null", "true",
    "用户", "用户:12345", "日本語テキスト",
    "🎉", "party 🎉🎊",
    "é",          # U+00E9 precomposed (NFC)
    "e\u0301",    # e + U+0301 combining acute (NFD): different bytes, different slot
    "Ångström",
    "Привет, мир",
    "مرحبا بالعالم",
    "straße", "Ω≈ç√∫",
    "\uffff", "\U0010ffff",
    Repeat("ab", 6000),          # 12,000 ASCII chars
    Repeat("x", 100000),         # 100,000 ASCII chars
    Repeat("用户", 5000),         # 10,000 chars, 30,000 UTF-8 bytes
    Repeat("🎉", 10000),         # 10,000 chars, 40,000 UTF-8 bytes
    Repeat("aé用🎉", 3000),       # 12,000 chars of 1-, 2-, 3- and 4-byte UTF-8
]

BYTES_KEYS: list[bytes | Repeat] = [
    b"", b"\x00", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"123456789",
    b"\xde\xad\xbe\xef", b"\x80\x81\xfe\xff",   # not UTF-8
    "用户".encode(),                           # same bytes as the str key
    bytes(range(256)),
    Repeat(bytes(range(256)), 50),             # 12,800 bytes
]

UUID_KEYS: list[str] = [
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "12345678-1234-5678-1234-567812345678",
    "f47ac10b-58cc-4372-a567-0e02b2c3d479",
    str(uuid.uuid3(uuid.NAMESPACE_DNS, "example.com")),
    str(uuid.uuid5(uuid.NAMESPACE_DNS, "example.com")),
    "01890a5d-ac96-774b-bcce-b302099a8057",
]


def _json_key(kind: str, key: Any) -> Any:
    if isinstance(key, Repeat):
        unit = key.unit.hex() if isinstance(key.unit, bytes) else key.unit
        return {"repeat": unit, "times": key.times}
    if kind == "bytes":
        return key.hex()
    return key


def _vector(kind: str, key: Any) -> dict[str, Any]:
    if isinstance(key, Repeat):
        data = encode(kind, key.value())
        unit = encode(kind, key.unit)
        encoded: Any = {"repeat": unit.hex(), "times": key.times}
    else:
        data = encode(kind, key)
        encoded = data.hex()
    crc = crc32_ieee(data)
    return {
        "type": kind,
        "key": _json_key(kind, key),
        "encoded_hex": encoded,
        "crc32": crc,
        "slots": {str(n): crc % n for n in SLOT_COUNTS},
    }


def build() -> dict[str, Any]:
    """The whole document written to crc32_vectors.json."""
    vectors = (
        [_vector("int", k) for k in INT_KEYS]
        + [_vector("str", k) for k in STR_KEYS]
        + [_vector("bytes", k) for k in BYTES_KEYS]
        + [_vector("uuid", k) for k in UUID_KEYS]
    )
    return {
        "about": "dal shard placement vectors; generated by make_crc32_vectors.py, do not edit",
        "algorithm": "CRC-32/IEEE: reflected poly 0xEDB88320, init 0xFFFFFFFF, xorout 0xFFFFFFFF "
        "(Go crc32.ChecksumIEEE); slot = crc32 % n",
        "encoding": "int: decimal ASCII; str: UTF-8; bytes: as is (key is hex); "
        "uuid: canonical lowercase hyphenated string",
        "long_values": '{"repeat": X, "times": N} means X repeated N times '
        "(X is text for a str key, hex for a bytes key and for encoded_hex)",
        "slot_counts": list(SLOT_COUNTS),
        "vectors": vectors,
    }


def render(doc: dict[str, Any]) -> str:
    """JSON text with one vector per line (readable diffs)."""
    head = {k: v for k, v in doc.items() if k != "vectors"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},")
    lines.append('  "vectors": [')
    body = [f"    {json.dumps(v, ensure_ascii=False)}" for v in doc["vectors"]]
    lines.append(",\n".join(body))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    doc = build()
    text = render(doc)
    if "--check" in argv:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(doc['vectors'])} vectors)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
