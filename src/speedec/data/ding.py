"""Parser for the Ding German-English dictionary (Debian trans-de-en).

Each line of ``usr/share/trans/de-en`` is ``de | de ... :: en | en ...``:
the two sides hold the same number of ``|``-separated sub-entries, aligned
one to one. A sub-entry lists synonyms separated by ``;`` and carries
dictionary annotations: ``{f}`` (gender, part of speech), ``[ugs.]``
(register, region, field), ``<...>`` (search keywords) and ``(...)``
(optional words or context).

Most sub-entries are headwords or phrases; many dictionary entries also
give a complete example sentence with its translation. Only those sentence
pairs are kept, as translation training data: both sides must start with a
capital and end like a sentence. Pairs that still contain ``/`` (inline
alternatives such as "bei/in") or an ellipsis (an unfinished sentence) are
dropped, because no single reading of them is the translation.
"""

from __future__ import annotations

import re

from speedec.data.clean import normalize_text

_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_PARENS = re.compile(r"\([^()]*\)")
_ANGLES = re.compile(r"<[^<>]*>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_SENTENCE_END = re.compile(r"[.!?][\"'”’»«)]?$")


def first_alternative(entry: str) -> str:
    """The text before the first top-level `;` (synonyms follow it)."""
    depth = 0
    for position, char in enumerate(entry):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif char == ";" and depth == 0:
            return entry[:position]
    return entry


def strip_annotations(text: str) -> str:
    """Remove `{...}`, `[...]`, `<...>` and `(...)` annotations and tidy the spacing left behind."""
    previous = None
    while previous != text:  # parentheses can nest
        previous = text
        text = _PARENS.sub(" ", _BRACKETS.sub(" ", _BRACES.sub(" ", _ANGLES.sub(" ", text))))
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", normalize_text(text).replace("\n", " "))
    return " ".join(text.split())


def is_sentence(text: str) -> bool:
    """Looks like one complete sentence rather than a headword or fragment."""
    return (
        len(text.split()) >= 2
        and text[:1].isupper()
        and bool(_SENTENCE_END.search(text))
        and "/" not in text
        and "…" not in text
        and "..." not in text
    )


def parse_line(line: str) -> list[tuple[str, str]]:
    """The (German, English) sentence pairs of one dictionary line."""
    if line.startswith("#") or " :: " not in line:
        return []
    german, english = line.split(" :: ", 1)
    german_entries, english_entries = german.split(" | "), english.split(" | ")
    if len(german_entries) != len(english_entries):
        return []  # misaligned line: no sub-entry can be trusted
    pairs = []
    for de_entry, en_entry in zip(german_entries, english_entries, strict=True):
        de = strip_annotations(first_alternative(de_entry))
        en = strip_annotations(first_alternative(en_entry))
        if is_sentence(de) and is_sentence(en):
            pairs.append((de, en))
    return pairs


def parse_dictionary(text: str) -> list[tuple[str, str]]:
    """All sentence pairs of the dictionary, in file order (duplicates kept)."""
    pairs = []
    for line in text.splitlines():
        pairs.extend(parse_line(line))
    return pairs
