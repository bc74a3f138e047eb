"""Reader for SWORD "zText" Bible modules and their OSIS verse markup.

Debian's sword-text-* packages hold each testament as three files, checked
against the real KJV, WEB and Reina-Valera modules:

* ``.bzs``: 12-byte little-endian records, one per compressed block:
  offset into ``.bzz``, compressed size, uncompressed size (u32 each);
* ``.bzz``: the blocks, each a zlib stream;
* ``.bzv``: 10-byte little-endian records, one per verse slot in canonical
  order: block number (u32), offset inside the uncompressed block (u32),
  size (u16). Size 0 means the slot is empty.

Slot 0 is unused, slot 1 is the testament heading; then every book has a
heading slot, and every chapter a heading slot followed by its verses. The
book and chapter slots are recognised by their OSIS milestones
(``<div type="book" sID=...>``, ``<chapter sID=...>``), so no versification
table is needed to tell headings from verses.

Verse text carries OSIS markup: Strong's numbers on ``<w>`` elements,
footnotes in ``<note>``, editorial section titles in ``<title>``. The text
of the words is kept; notes, non-canonical titles, front matter and
introductions are dropped whole, and stray USFM markers (``\\nd``) removed.

Real modules are not always regular: the WEB stores its whole "Daniel with
Greek portions" (chapters 1-6) in the book's heading slot, cut off in the
middle of a tag, because the book does not fit the module's versification.
Such text is kept and the broken tag removed.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from speedec.errors import DataError

TESTAMENTS = ("ot", "nt")
_BLOCK_RECORD = struct.Struct("<III")  # offset, compressed size, uncompressed size
_VERSE_RECORD = struct.Struct("<IIH")  # block, offset in block, size

_NOTE = re.compile(r"<note\b[^>]*?(?:/>|>.*?</note>)", re.DOTALL)
_EDITORIAL_TITLE = re.compile(r"<title\b(?![^>]*canonical=\"true\")[^>]*?(?:/>|>.*?</title>)", re.DOTALL)
_TAG = re.compile(r"<[^>]*>")
_UNCLOSED_TAG = re.compile(r"<[^>]*$")
# A few KJV verses keep a raw USFM character marker (a backslash, then "nd" for the divine name).
_USFM_MARKER = re.compile(r"\\\+?[a-z]+[0-9]*\*?(?=\s|<|$)")
_DIV_TAG = re.compile(r"<div\b[^>]*>")
_ATTRIBUTE = re.compile(r'(\w+)="([^"]*)"')
_EDITORIAL_DIVS = {"front", "introduction"}
_NOTE_MARK = "\ue000"  # stands where a note was until spacing is settled
_BOOK_START = re.compile(r"<div\b[^>]*\btype=\"book\"[^>]*\bsID=|<div\b[^>]*\bsID=[^>]*\btype=\"book\"")
_BOOK_ID = re.compile(r"<div\b[^>]*\bosisID=\"([^\"]+)\"[^>]*\btype=\"book\"")
_CHAPTER_START = re.compile(r"<chapter\b[^>]*\bsID=")


@dataclass(frozen=True)
class Slot:
    """One verse slot of a ztext module, in canonical order."""

    testament: str  # "ot" or "nt"
    index: int  # position in the testament's .bzv
    markup: str  # the raw OSIS text ("" for an empty slot)

    @property
    def starts_book(self) -> bool:
        return bool(_BOOK_START.search(self.markup))

    @property
    def starts_chapter(self) -> bool:
        return bool(_CHAPTER_START.search(self.markup))

    @property
    def is_heading(self) -> bool:
        """Testament, book or chapter heading rather than a verse."""
        return self.index <= 1 or self.starts_book or self.starts_chapter


def read_blocks(bzs: bytes, bzz: bytes, name: str = "module") -> list[bytes]:
    """Decompressed blocks of one testament."""
    if len(bzs) % _BLOCK_RECORD.size:
        raise DataError(f"{name}: .bzs size {len(bzs)} is not a multiple of {_BLOCK_RECORD.size}")
    blocks = []
    for number, (offset, size, full) in enumerate(_BLOCK_RECORD.iter_unpack(bzs)):
        if offset + size > len(bzz):
            raise DataError(f"{name}: block {number} runs past the end of .bzz")
        try:
            block = zlib.decompress(bzz[offset : offset + size])
        except zlib.error as exc:
            raise DataError(f"{name}: block {number} is not a zlib stream ({exc})") from exc
        if len(block) != full:
            raise DataError(f"{name}: block {number} inflates to {len(block)} bytes, index says {full}")
        blocks.append(block)
    return blocks


def read_testament(bzs: bytes, bzv: bytes, bzz: bytes, testament: str, name: str = "module") -> list[Slot]:
    """Every verse slot of one testament, decoded as UTF-8 OSIS markup."""
    if len(bzv) % _VERSE_RECORD.size:
        raise DataError(f"{name}: .bzv size {len(bzv)} is not a multiple of {_VERSE_RECORD.size}")
    blocks = read_blocks(bzs, bzz, name)
    slots = []
    for index, (block, offset, size) in enumerate(_VERSE_RECORD.iter_unpack(bzv)):
        if size == 0:
            slots.append(Slot(testament, index, ""))
            continue
        if block >= len(blocks) or offset + size > len(blocks[block]):
            raise DataError(f"{name}: {testament} verse slot {index} points outside its block")
        raw = blocks[block][offset : offset + size]
        try:
            slots.append(Slot(testament, index, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise DataError(f"{name}: {testament} verse slot {index} is not UTF-8") from exc
    return slots


def _drop_editorial_divs(markup: str) -> str:
    """Remove front matter and introductions (milestone divs from sID to eID).

    They are the editors' words about the edition (the WEB preface, notes on
    which churches accept a book), not the text itself. A section that is
    not closed inside the fragment runs to its end.
    """
    pieces = []
    position = 0
    for match in _DIV_TAG.finditer(markup):
        if match.start() < position:
            continue
        attributes = dict(_ATTRIBUTE.findall(match.group(0)))
        if attributes.get("type") not in _EDITORIAL_DIVS or "sID" not in attributes:
            continue
        pieces.append(markup[position : match.start()])
        close = re.search(rf'<div\b[^>]*\beID="{re.escape(attributes["sID"])}"[^>]*>', markup[match.end() :])
        position = match.end() + close.end() if close else len(markup)
    pieces.append(markup[position:])
    return " ".join(pieces)


def osis_to_text(markup: str) -> str:
    """Plain text of an OSIS fragment: words kept; notes, titles and editors' matter gone."""
    # A slot cut off mid-tag (one WEB slot is) must not leave "<d" behind.
    markup = _UNCLOSED_TAG.sub("", markup)
    text = _EDITORIAL_TITLE.sub(" ", _drop_editorial_divs(markup))
    text = _NOTE.sub(_NOTE_MARK, text)
    text = html.unescape(_TAG.sub("", text)).replace("¶", " ")
    text = _USFM_MARKER.sub(" ", text)
    # A note glued between two words (God<note/>created) leaves a word
    # break; one before punctuation (earth<note/>.) leaves none.
    text = re.sub(rf"\s*{_NOTE_MARK}\s*(?=[,.;:!?’”)\]]|$)", "", text)
    text = re.sub(rf"\s*{_NOTE_MARK}\s*", " ", text)
    return " ".join(text.split())


@dataclass(frozen=True)
class Book:
    """One book of a module: its OSIS id and its chapters of verse texts."""

    osis_id: str
    chapters: list[list[str]]


def iter_books(slots: list[Slot]) -> Iterator[Book]:
    """Group the verses of a testament into books and chapters.

    Text left in a heading slot once editorial matter is removed (WEB's Greek
    Daniel) is kept as a chapter of its own; empty slots are skipped.
    """
    osis_id = ""
    chapters: list[list[str]] = []
    for slot in slots:
        if slot.index <= 1:
            continue
        if slot.starts_book:
            if any(chapters):
                yield Book(osis_id, [c for c in chapters if c])
            match = _BOOK_ID.search(slot.markup)
            osis_id = match.group(1) if match else ""
            chapters = [[]]
        elif slot.starts_chapter or not chapters:
            chapters.append([])
        text = osis_to_text(slot.markup)
        if text:
            chapters[-1].append(text)
    if any(chapters):
        yield Book(osis_id, [c for c in chapters if c])


def verse_books(slots: list[Slot]) -> dict[tuple[str, int], str]:
    """The OSIS id of the book every slot after a book's start belongs to, keyed as
    :func:`verse_texts` keys verses (``""`` before the first book of a testament)."""
    books, osis_id = {}, ""
    for slot in slots:
        if slot.starts_book:
            match = _BOOK_ID.search(slot.markup)
            osis_id = match.group(1) if match else ""
        books[(slot.testament, slot.index)] = osis_id
    return books


def verse_texts(slots: list[Slot]) -> dict[tuple[str, int], str]:
    """Text of every non-empty verse slot (headings excluded), keyed by (testament, index).

    Two modules with the same versification share keys, which is what
    aligns a translation with the KJV verse by verse.
    """
    texts = {}
    for slot in slots:
        if slot.is_heading or not slot.markup:
            continue
        text = osis_to_text(slot.markup)
        if text:
            texts[(slot.testament, slot.index)] = text
    return texts
