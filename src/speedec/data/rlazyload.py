"""Minimal reader for R lazy-load databases (``.rdx`` index + ``.rdb`` data).

Debian's r-cran-janeaustenr ships Jane Austen's novels as R character
vectors inside ``data/Rdata.rdb``. Reading them needs only a small part of
R's serialization format, so this module implements that part instead of
pulling in a full R-data library and its dependencies:

* ``.rdx`` is a gzip-compressed serialized list: ``variables`` maps each
  object name to ``(offset, length)`` in the ``.rdb``; ``compressed`` says
  how each chunk is compressed (1 zlib, 2 bzip2, 3 xz).
* each ``.rdb`` chunk is a 4-byte big-endian uncompressed length followed by
  the compressed serialized object (for type 2 and 3 a 1-byte method tag
  follows the length).
* serialization "XDR" format, versions 2 and 3: big-endian 32-bit integers,
  each object a flags word (type in the low byte, "has attributes" 0x200,
  "has tag" 0x400) followed by its payload.

Only the types needed for data tables of text are supported: NULL, symbols,
pairlists, logical/integer/double/character vectors, lists and references.
Anything else raises DataError, so an unexpected file fails loudly.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field

from speedec.errors import DataError

_NILVALUE, _REF = 254, 255
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
_HAS_ATTR, _HAS_TAG = 0x200, 0x400
_NA_STRING = -1


@dataclass
class RVector:
    """An R vector (atomic or list) with its attributes (names, class...)."""

    items: list
    attributes: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class RSymbol:
    name: str


class _Unserializer:
    """Reads one XDR-serialized R object from bytes."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.pos = 0
        self.name = name
        self.refs: list[object] = []

    def _int(self) -> int:
        if self.pos + 4 > len(self.data):
            raise DataError(f"{self.name}: R serialization ends early")
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, length: int) -> bytes:
        if length < 0 or self.pos + length > len(self.data):
            raise DataError(f"{self.name}: R serialization ends early")
        chunk = self.data[self.pos : self.pos + length]
        self.pos += length
        return chunk

    def read(self) -> object:
        if self.data[:2] != b"X\n":
            raise DataError(f"{self.name}: not R XDR serialization (starts with {self.data[:2]!r})")
        self.pos = 2
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # minimal R version to read it
        if version == 3:
            self._bytes(self._int())  # native encoding name; strings carry their own flags
        elif version != 2:
            raise DataError(f"{self.name}: unsupported R serialization version {version}")
        return self._object()

    def _attributes(self) -> dict[str, object]:
        pairs = self._object()
        attributes: dict[str, object] = {}
        while isinstance(pairs, tuple):  # ("pairlist", tag, value, rest)
            _, tag, value, pairs = pairs
            attributes[tag.name if isinstance(tag, RSymbol) else str(tag)] = value
        return attributes

    def _object(self) -> object:
        flags = self._int()
        kind = flags & 0xFF
        if kind == _NILVALUE:
            return None
        if kind == _REF:
            index = flags >> 8 or self._int()
            if not 1 <= index <= len(self.refs):
                raise DataError(f"{self.name}: bad R reference {index}")
            return self.refs[index - 1]
        if kind == _SYMSXP:
            symbol = RSymbol(str(self._object()))
            self.refs.append(symbol)
            return symbol
        if kind == _LISTSXP:
            if flags & _HAS_ATTR:
                self._attributes()  # a pairlist's own attributes never matter for data
            tag = self._object() if flags & _HAS_TAG else None
            value = self._object()
            rest = self._object()
            return ("pairlist", tag, value, rest)
        if kind == _CHARSXP:
            length = self._int()
            if length == _NA_STRING:
                return None
            raw = self._bytes(length)
            # Latin-1 strings are flagged (bit 2 of the levels); UTF-8 and ASCII decode as UTF-8.
            encoding = "latin-1" if (flags >> 12) & 4 else "utf-8"
            return raw.decode(encoding, errors="replace")
        if kind in (_LGLSXP, _INTSXP):
            length = self._int()
            items: list = list(struct.unpack(f">{length}i", self._bytes(4 * length)))
        elif kind == _REALSXP:
            length = self._int()
            items = list(struct.unpack(f">{length}d", self._bytes(8 * length)))
        elif kind in (_STRSXP, _VECSXP):
            length = self._int()
            items = [self._object() for _ in range(length)]
        else:
            raise DataError(f"{self.name}: unsupported R object type {kind}")
        return RVector(items, self._attributes() if flags & _HAS_ATTR else {})


def unserialize(data: bytes, name: str = "R data") -> object:
    """One R object from XDR-serialized bytes (as written by saveRDS without compression)."""
    return _Unserializer(data, name).read()


def _names(vector: RVector, name: str) -> list[str]:
    names = vector.attributes.get("names")
    if not isinstance(names, RVector) or len(names.items) != len(vector.items):
        raise DataError(f"{name}: list without names")
    return [str(n) for n in names.items]


def _inflate_chunk(chunk: bytes, method: int, name: str) -> bytes:
    if len(chunk) < 4:
        raise DataError(f"{name}: truncated .rdb chunk")
    (length,) = struct.unpack_from(">I", chunk)
    try:
        if method == 1:
            data = zlib.decompress(chunk[4:])
        elif method in (2, 3):
            tag, body = chunk[4:5], chunk[5:]
            if tag == b"2":
                data = bz2.decompress(body)
            elif tag == b"Z":
                data = lzma.decompress(body)
            elif tag == b"0":
                data = body
            else:
                data = zlib.decompress(body)
        else:
            raise DataError(f"{name}: unknown .rdb compression {method}")
    except (zlib.error, OSError, lzma.LZMAError, ValueError) as exc:
        raise DataError(f"{name}: .rdb chunk does not decompress ({exc})") from exc
    if len(data) != length:
        raise DataError(f"{name}: .rdb chunk inflates to {len(data)} bytes, header says {length}")
    return data


def read_lazyload(rdx: bytes, rdb: bytes, name: str = "Rdata") -> dict[str, object]:
    """Every object of a lazy-load database, by name."""
    try:
        index = unserialize(gzip.decompress(rdx), f"{name}.rdx")
    except (OSError, EOFError) as exc:
        raise DataError(f"{name}.rdx is not gzip-compressed ({exc})") from exc
    if not isinstance(index, RVector):
        raise DataError(f"{name}.rdx does not hold an R list")
    fields = dict(zip(_names(index, f"{name}.rdx"), index.items, strict=True))
    variables = fields.get("variables")
    compressed = fields.get("compressed")
    if not isinstance(variables, RVector):
        raise DataError(f"{name}.rdx has no variables table")
    method = compressed.items[0] if isinstance(compressed, RVector) and compressed.items else 1
    objects: dict[str, object] = {}
    for var, where in zip(_names(variables, f"{name}.rdx"), variables.items, strict=True):
        if not isinstance(where, RVector) or len(where.items) != 2:
            raise DataError(f"{name}.rdx: bad position for {var}")
        offset, length = where.items
        if offset < 0 or offset + length > len(rdb):
            raise DataError(f"{name}.rdb is shorter than its index says (object {var})")
        data = _inflate_chunk(rdb[offset : offset + length], int(method), f"{name}.rdb")
        objects[var] = unserialize(data, f"{name}.rdb:{var}")
    return objects


def read_character_vectors(rdx: bytes, rdb: bytes, name: str = "Rdata") -> dict[str, list[str | None]]:
    """The character vectors of a lazy-load database, by name (None for NA)."""
    vectors = {}
    for var, value in read_lazyload(rdx, rdb, name).items():
        if isinstance(value, RVector) and all(v is None or isinstance(v, str) for v in value.items):
            vectors[var] = value.items
    return vectors
