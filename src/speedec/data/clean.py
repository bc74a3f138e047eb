"""Format-independent text cleaning: pure functions of strings.

Every source ends up as paragraphs of plain UTF-8 text. The rules here are
the ones all sources share: one Unicode normal form, no control characters,
no Project Gutenberg licence boilerplate, tidy whitespace that still keeps
the line breaks of verse, and removal of repeated paragraphs so that a text
shipped twice (in two packages, or twice in one) is not learned twice.
Case and real punctuation are never touched.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator

# Characters that are whitespace to a reader but would become odd tokens.
_SPACE_LIKE = str.maketrans({"\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u3000": " ", "\t": " "})
# C0/C1 controls except newline; zero-width and byte-order marks.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r" {2,}")
# A UTF-8 lead byte read as Latin-1 (Â Ã â ...) followed by a continuation byte.
_MOJIBAKE = re.compile(r"[\u00c2-\u00f4][\u0080-\u00bf]")

# Markers that bracket the body of a Project Gutenberg text, old and new style.
_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT|"
    r"\*{3}\s*START\*\*THE SMALL PRINT)",
    re.IGNORECASE,
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE |THIS )?PROJECT GUTENBERG)",
    re.IGNORECASE,
)
# A paragraph that talks about the distribution rather than being the work.
_LICENCE = re.compile(
    r"project gutenberg|gutenberg\.org|gutenberg-tm|\betexts?\b|this electronic (version|edition)",
    re.IGNORECASE,
)


def fix_mojibake(line: str) -> str:
    """Undo UTF-8 text that was decoded as Latin-1, once or twice ("donÃ¢ÂÂt").

    Only lines that show the telltale pairs are touched, and only when the
    repair decodes cleanly, so genuine accented text is left alone.
    """
    for _ in range(2):
        if not _MOJIBAKE.search(line):
            break
        try:
            line = line.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            break
    return line


def normalize_text(text: str) -> str:
    """NFC, Unix line ends, no control characters, single spaces, no trailing blanks.

    Line breaks are kept: they carry verse and dialogue structure.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _MOJIBAKE.search(text):
        text = "\n".join(fix_mojibake(line) for line in text.split("\n"))
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text.translate(_SPACE_LIKE))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(lines).strip()


def remove_overstrike(text: str) -> str:
    """Resolve backspace overstrikes the way a printing terminal shows them.

    Old text files underline with `___<BS><BS><BS>and` and embolden with
    `a<BS>a`; what a reader saw is the letters, so a later character wins
    over an underscore written in the same column.
    """
    if "\x08" not in text:
        return text
    lines = []
    for line in text.split("\n"):
        cells: list[str] = []
        column = 0
        for char in line:
            if char == "\x08":
                column = max(0, column - 1)
                continue
            if column < len(cells):
                if cells[column] == "_" or char != "_":
                    cells[column] = char
            else:
                cells.append(char)
            column += 1
        lines.append("".join(cells))
    return "\n".join(lines)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text, without header, footer or licence.

    Texts without the markers are returned whole (after dropping licence
    paragraphs), because many redistributions already removed them.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    start = 0
    end = len(lines)
    for index, line in enumerate(lines):
        if _GUTENBERG_START.search(line):
            start = index + 1
            break
    for index in range(len(lines) - 1, start - 1, -1):
        if _GUTENBERG_END.search(lines[index]):
            end = index
    body = "\n".join(lines[start:end])
    return "\n\n".join(p for p in split_paragraphs(body) if not _LICENCE.search(p))


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines, each normalized, empty ones dropped."""
    paragraphs = (normalize_text(block) for block in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n")))
    return [p for p in paragraphs if p]


def unwrap(paragraph: str) -> str:
    """Join the hard-wrapped lines of a prose paragraph into one line."""
    return " ".join(line.strip() for line in paragraph.split("\n") if line.strip())


def dedup_key(paragraph: str) -> str:
    """What two paragraphs must share to count as the same text.

    Whitespace and case are ignored, so a reflowed or re-capitalised copy is
    still caught; punctuation is kept, it distinguishes real variants.
    """
    return " ".join(paragraph.split()).casefold()


class Deduplicator:
    """Keeps the first occurrence of each paragraph across all sources.

    Paragraphs shorter than `min_chars` are never dropped: short lines such
    as "[Exit.]", "CHAPTER I" or a one-word reply recur legitimately inside
    one work, and removing them would break the text around them.
    """

    def __init__(self, min_chars: int = 40) -> None:
        self.min_chars = min_chars
        self._seen: set[str] = set()
        self.removed = 0  # paragraphs dropped so far

    def keep(self, paragraph: str) -> bool:
        """True the first time a (long enough) paragraph is seen."""
        if len(paragraph) < self.min_chars:
            return True
        key = dedup_key(paragraph)
        if key in self._seen:
            self.removed += 1
            return False
        self._seen.add(key)
        return True

    def filter(self, paragraphs: Iterable[str]) -> Iterator[str]:
        """The paragraphs that are kept, in order."""
        return (p for p in paragraphs if self.keep(p))


def letter_ratio(text: str) -> float:
    """Share of letters among non-space characters (low for ASCII art, code, tables)."""
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return 0.0
    return sum(c.isalpha() for c in visible) / len(visible)
