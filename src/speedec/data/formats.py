"""Parsers for the plain-text source formats: pure functions from text to paragraphs.

Each parser undoes one format's conventions (Brown's word/tag tokens,
fortune's `%` separators, hard-wrapped Gutenberg prose, line numbers in
poetry) and returns clean paragraphs. Paragraphs may hold single newlines
where the line break is part of the text (verse, dialogue, a quotation's
attribution); prose is unwrapped to one line.
"""

from __future__ import annotations

import re

from speedec.data.clean import (
    letter_ratio,
    normalize_text,
    remove_overstrike,
    split_paragraphs,
    strip_gutenberg,
    unwrap,
)

# --- Brown corpus (word/tag tokens, one sentence a line) -------------------

# Tokens that attach to the word before them, and those that attach to the next.
_CLOSING = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "'", "%"}
_OPENING = {"``", "`", "(", "[", "{", "$"}
_QUOTES = {"``": '"', "''": '"', "`": "'"}
_INSIDE_QUOTES = {".", ",", "?", "!"}


def brown_word(token: str) -> str:
    """The word of a Brown `word/tag` token (the tag follows the last slash)."""
    word, slash, _tag = token.rpartition("/")
    return word if slash and word else token


def _is_headline(line: str) -> bool:
    tags = [token.rpartition("/")[2] for token in line.split()]
    return bool(tags) and all(tag.endswith("-hl") for tag in tags)


def _punctuation_inside_quotes(words: list[str]) -> list[str]:
    """Move `.,?!` that follow a closing quote in front of it.

    The tagged Brown corpus splits `word."` into `word '' .`; printed
    American English puts those marks inside the quotes.
    """
    words = list(words)
    for index in range(len(words) - 1):
        if words[index] == "''":
            end = index + 1
            while end < len(words) and words[end] in _INSIDE_QUOTES:
                end += 1
            if end > index + 1:
                words[index:end] = [*words[index + 1 : end], "''"]
    return words


def detokenize_brown(line: str) -> str:
    """One tagged Brown sentence as ordinary text with ordinary spacing."""
    out: list[str] = []
    glue_next = False
    for word in _punctuation_inside_quotes([brown_word(token) for token in line.split()]):
        text = _QUOTES.get(word, word)
        if out and not glue_next and word not in _CLOSING:
            out.append(" ")
        out.append(text)
        glue_next = word in _OPENING
    return "".join(out)


def parse_brown(text: str) -> list[str]:
    """Paragraphs of one Brown corpus file.

    A sentence line that starts with a tab opens a paragraph; other lines
    continue it. Headlines (every tag ends in -hl) stand alone.
    """
    paragraphs: list[list[str]] = []
    previous_headline = False
    for raw in text.replace("\r\n", "\n").split("\n"):
        if not raw.strip():
            continue
        headline = _is_headline(raw)
        sentence = detokenize_brown(raw)
        if not paragraphs or raw.startswith("\t") or headline or previous_headline:
            paragraphs.append([sentence])
        else:
            paragraphs[-1].append(sentence)
        previous_headline = headline
    cleaned = (normalize_text(" ".join(sentences)) for sentences in paragraphs)
    return [p for p in cleaned if p]


# --- fortune cookie files (`%` on a line of its own between entries) ------


def parse_fortunes(text: str, *, min_letter_ratio: float = 0.6) -> list[str]:
    """The fortunes of one file, each a paragraph; ASCII art and tables dropped.

    Line breaks inside a fortune are kept (poems, dialogues, attributions),
    indentation is not.
    """
    fortunes = []
    for block in re.split(r"^%[ \t]*$", remove_overstrike(text.replace("\r\n", "\n")), flags=re.MULTILINE):
        # Blank lines inside a fortune would read as paragraph breaks later.
        fortune = "\n".join(line for line in normalize_text(block).split("\n") if line)
        if fortune and letter_ratio(fortune) >= min_letter_ratio:
            fortunes.append(fortune)
    return fortunes


# --- hard-wrapped prose (Austen novels as R character vectors) ------------

_ITALICS = re.compile(r"(?<![\w_])_([^_\n]+?)_(?![\w_])")


def strip_italics(text: str) -> str:
    """`_word_` is how Gutenberg texts mark italics; keep the word."""
    return _ITALICS.sub(r"\1", text)


def parse_prose_lines(lines: list[str | None]) -> list[str]:
    """Paragraphs from the lines of a hard-wrapped book (empty line = break).

    Missing lines (R's NA) count as breaks; each paragraph is unwrapped.
    """
    text = "\n".join(line or "" for line in lines)
    return [strip_italics(unwrap(p)) for p in split_paragraphs(strip_gutenberg(text))]


# --- plays and poems in Gutenberg plain text --------------------------------

# Poetry editions print a line number every ten lines, after a wide gap.
_TRAILING_LINE_NUMBER = re.compile(r"[ \t]{3,}\d{1,5}[ \t]*$", re.MULTILINE)
# Some editions indent verse with runs of dots instead of spaces.
_DOT_INDENT = re.compile(r"^\.{3,}", re.MULTILINE)


def parse_gutenberg_work(text: str) -> list[str]:
    """Paragraphs of a play or poem, line breaks kept (they are the verse)."""
    text = _DOT_INDENT.sub("", _TRAILING_LINE_NUMBER.sub("", text))
    return [strip_italics(p) for p in split_paragraphs(strip_gutenberg(text))]
