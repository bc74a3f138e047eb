"""Deterministic train/validation/test assignment.

A unit of text goes to a split according to a hash of its own content, not
a random draw or its position: re-running the pipeline, adding a source or
reordering files never moves an existing passage to another split, so
validation text can never leak into training between runs.

For running text the unit is a *passage*: consecutive paragraphs of one
document grouped to at least `min_chars` characters. Whole documents would
be too coarse (a corpus of forty plays cannot be split 98/1/1 by play) and
single paragraphs too fine (a speech would land in validation while its
reply trains), so passages keep local context together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

SPLITS = ("train", "validation", "test")
VALIDATION_PERCENT = 1
TEST_PERCENT = 1
PASSAGE_MIN_CHARS = 2000


def split_of(text: str) -> str:
    """The split a unit of text belongs to: a fixed function of its bytes."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < VALIDATION_PERCENT:
        return "validation"
    if bucket < VALIDATION_PERCENT + TEST_PERCENT:
        return "test"
    return "train"


def passages(paragraphs: Iterable[str], min_chars: int = PASSAGE_MIN_CHARS) -> Iterator[list[str]]:
    """Consecutive paragraphs grouped until each group holds at least `min_chars` characters.

    The last group of a document may be shorter.
    """
    group: list[str] = []
    size = 0
    for paragraph in paragraphs:
        group.append(paragraph)
        size += len(paragraph)
        if size >= min_chars:
            yield group
            group, size = [], 0
    if group:
        yield group
