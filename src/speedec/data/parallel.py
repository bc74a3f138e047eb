"""The parallel corpus for the translation setting: sentence pairs into English.

Two sources, both downloaded with apt-get:

* ``de-en``: the example sentences of the Ding dictionary (trans-de-en);
* ``es-en``: the Reina-Valera 1909 Bible (sword-text-sparv) aligned verse
  by verse with both English Bibles of the registry, the King James Version
  (sword-text-kjv) and the World English Bible (sword-text-web); the three
  modules use the KJV versification, so equal verse slots hold the same
  verse. A verse is kept when all three have it; its target is the KJV's
  and ``refs`` holds both translations (KJV, WEB), for evaluation against
  two references.

Output, in the chosen directory: ``train.jsonl``, ``validation.jsonl`` and
``test.jsonl``, one ``{"src": ..., "tgt": ...}`` object a line (source
language first, English as target; a Bible pair also has ``refs``, its
``verse`` id and its ``book``), ``test-book.jsonl`` (every verse of the
held-out books, which no other split has a verse of: a harder test), and
``manifest.json`` (pairs, bytes and words of each split). Pairs are
deduplicated on their source sentence (the first translation wins, so the
same input never has two targets) and split by a hash of their unit: the
verse id for a Bible pair, else the source sentence, so a verse or a
sentence cannot appear in two splits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from speedec.data import fetch
from speedec.data.clean import dedup_key, normalize_text
from speedec.data.ding import parse_dictionary
from speedec.data.fetch import Artifact
from speedec.data.output import atomic_write_text, prepare_out_dir, write_manifest
from speedec.data.progress import stage
from speedec.data.sources import decode_text, sword_module_files, sword_slots
from speedec.data.split import SPLITS, split_of
from speedec.data.sword import verse_books, verse_texts
from speedec.errors import DataError

PARALLEL_FORMAT = "speedec-parallel-corpus/1"
DING_FILE = "usr/share/trans/de-en"


@dataclass(frozen=True)
class Pair:
    """One translation example."""

    src: str  # sentence in the source language
    tgt: str  # its English translation
    # Every English reference (the first is tgt), when there are several.
    refs: tuple[str, ...] = ()
    # What the split hashes (a Bible verse's id, "ot.1037"; "" for the source sentence)
    # and the document it belongs to (a Bible book's OSIS id, "Acts").
    unit: str = ""
    book: str = ""


@dataclass(frozen=True)
class ParallelSource:
    """A parallel source: the packages it needs and how to turn them into pairs."""

    name: str  # "de-en" or "es-en": source language, then target
    licence: str
    description: str
    packages: tuple[str, ...]  # Debian packages, in the order `read` expects them
    read: Callable[[list[Artifact], Path], list[Pair]]


def dictionary_pairs(text: str) -> list[Pair]:
    """German-English sentence pairs from the text of the Ding dictionary."""
    return [Pair(de, en) for de, en in parse_dictionary(text)]


def aligned_verses(source_files: dict[str, bytes], *english_files: dict[str, bytes]) -> list[Pair]:
    """Verse pairs of zText modules that share a versification, in canonical order: the
    source module's verse, the first English module's as the target, and every English
    module's as ``refs`` (with two or more), each with its verse id and book.

    A slot that is empty in any module (a verse one translation omits) gives no pair.
    """
    slots = sword_slots(source_files, "source module")
    source, books = verse_texts(slots), verse_books(slots)
    english = [verse_texts(sword_slots(files, "English module")) for files in english_files]
    pairs = []
    for key, text in source.items():
        if all(key in module for module in english):
            refs = tuple(normalize_text(module[key]) for module in english)
            pairs.append(Pair(normalize_text(text), refs[0], refs if len(refs) > 1 else (),
                              unit=f"{key[0]}.{key[1]}", book=books.get(key, "")))
    return pairs


def _read_ding(artifacts: list[Artifact], work_dir: Path) -> list[Pair]:
    (ding,) = artifacts
    root = fetch.extract_deb(ding, work_dir)
    pairs = dictionary_pairs(decode_text(fetch.read_member(root, DING_FILE, ding.package)))
    if not pairs:
        raise DataError(f"{DING_FILE} in {ding.package} holds no sentence pairs (format changed?)")
    return pairs


def _read_bibles(artifacts: list[Artifact], work_dir: Path) -> list[Pair]:
    spanish, *english = artifacts
    pairs = aligned_verses(
        sword_module_files(fetch.extract_deb(spanish, work_dir), spanish.package),
        *(sword_module_files(fetch.extract_deb(e, work_dir), e.package) for e in english),
    )
    if not pairs:
        raise DataError(f"{spanish.package} and {', '.join(e.package for e in english)} share no verses")
    return pairs


PARALLEL_SOURCES: tuple[ParallelSource, ...] = (
    ParallelSource(
        name="de-en",
        licence="GPL-2+",
        description="example sentences of the Ding German-English dictionary (TU Chemnitz)",
        packages=("trans-de-en",),
        read=_read_ding,
    ),
    ParallelSource(
        name="es-en",
        licence="public domain",
        description="Reina-Valera 1909 (Spanish) aligned verse by verse with the King James Version "
                    "(the target) and the World English Bible (a second reference)",
        packages=("sword-text-sparv", "sword-text-kjv", "sword-text-web"),
        read=_read_bibles,
    ),
)


def dedup_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """First pair for each source sentence (whitespace and case ignored); empty sides dropped."""
    seen: set[str] = set()
    kept = []
    for pair in pairs:
        key = dedup_key(pair.src)
        if not key or not pair.tgt.strip() or key in seen:
            continue
        seen.add(key)
        kept.append(pair)
    return kept


# The split of the held-out books' verses (``test-book.jsonl``).
BOOK_SPLIT = "test-book"
# The book no other split has a verse of, by default: Acts (1,007 verses of narrative).
HELD_OUT_BOOKS = ("Acts",)


def _record(pair: Pair) -> dict:
    record = {"src": pair.src, "tgt": pair.tgt}
    if pair.refs:
        record["refs"] = list(pair.refs)
    if pair.unit:
        record["verse"] = pair.unit
    if pair.book:
        record["book"] = pair.book
    return record


def jsonl(pairs: Sequence[Pair]) -> str:
    """Pairs as JSON lines with a fixed key order (src, tgt, then refs, verse, book when set)."""
    return "".join(json.dumps(_record(p), ensure_ascii=False) + "\n" for p in pairs)


def split_pairs(pairs: Sequence[Pair], held_out_books: Sequence[str] = ()) -> dict[str, list[Pair]]:
    """Assign each pair to a split: the held-out books' verses to ``test-book``, every
    other pair by a hash of its unit (its verse id, else its source sentence)."""
    splits: dict[str, list[Pair]] = {name: [] for name in (*SPLITS, BOOK_SPLIT)}
    held_out = set(held_out_books)
    for pair in pairs:
        splits[BOOK_SPLIT if pair.book in held_out else split_of(pair.unit or pair.src)].append(pair)
    return splits


def words(pairs: Sequence[Pair]) -> dict[str, int]:
    """Whitespace-separated words of the source sides and of the targets."""
    return {"src": sum(len(p.src.split()) for p in pairs), "tgt": sum(len(p.tgt.split()) for p in pairs)}


def prepare_parallel(
    out_dir: str | Path,
    *,
    work_dir: Path | None = None,
    progress: bool = True,
    pairs: Sequence[str] = ("de-en", "es-en"),
    held_out_books: Sequence[str] = HELD_OUT_BOOKS,
) -> dict:
    """Build the parallel corpus in `out_dir` and return its manifest.

    `pairs` chooses the sources ("de-en", "es-en"); all chosen ones go into
    the same files. `held_out_books`: OSIS ids of the Bible books whose verses
    form ``test-book.jsonl`` and no other split. Packages are downloaded into
    `work_dir` (default ``out_dir/downloads``) with apt-get and reused when
    already there.
    """
    by_name = {source.name: source for source in PARALLEL_SOURCES}
    unknown = [name for name in pairs if name not in by_name]
    if unknown or not pairs:
        raise DataError(f"unknown language pairs {unknown or 'none given'}; choose from {sorted(by_name)}")
    chosen = [by_name[name] for name in dict.fromkeys(pairs)]
    out = prepare_out_dir(out_dir)
    work = Path(work_dir) if work_dir is not None else out / "downloads"

    packages = list(dict.fromkeys(p for source in chosen for p in source.packages))
    artifacts = {
        package: fetch.debian_package(package, work)
        for package in stage(packages, "download", enabled=progress, unit="package")
    }
    kept_by_source = {}
    all_pairs: list[Pair] = []
    for source in stage(chosen, "parse and clean", enabled=progress, unit="source"):
        raw = source.read([artifacts[p] for p in source.packages], work)
        # Dedup across sources too: a later source never repeats an earlier source sentence.
        kept = dedup_pairs([*all_pairs, *raw])[len(all_pairs) :]
        kept_by_source[source.name] = (len(raw), len(kept), sum(len(jsonl([p]).encode()) for p in kept))
        all_pairs.extend(kept)

    splits = split_pairs(all_pairs, held_out_books)
    split_entries = {}
    for name in stage([*SPLITS, BOOK_SPLIT], "write", enabled=progress, unit="file"):
        text = jsonl(splits[name])
        split_entries[name] = {
            "file": f"{name}.jsonl",
            "pairs": len(splits[name]),
            "with_two_references": sum(len(p.refs) > 1 for p in splits[name]),
            "words": words(splits[name]),
            "bytes": len(text.encode("utf-8")),
            "sha256": atomic_write_text(out / f"{name}.jsonl", text),
        }
    manifest = {
        "format": PARALLEL_FORMAT,
        "fields": {"src": "source-language sentence", "tgt": "English translation",
                   "refs": "every English reference, tgt first (Bible pairs)",
                   "verse": "the verse id the split hashes (Bible pairs)", "book": "its book's OSIS id"},
        "sources": [
            {
                "name": source.name,
                "licence": source.licence,
                "description": source.description,
                "pairs_found": kept_by_source[source.name][0],
                "pairs": kept_by_source[source.name][1],
                "bytes": kept_by_source[source.name][2],
                "packages": [
                    {
                        "registry": artifacts[p].registry,
                        "package": p,
                        "version": artifacts[p].version,
                        "file": artifacts[p].path.name,
                        "sha256": artifacts[p].sha256,
                    }
                    for p in source.packages
                ],
            }
            for source in chosen
        ],
        "splits": split_entries,
        "held_out_books": list(held_out_books),
        "total_pairs": len(all_pairs),
    }
    write_manifest(out, manifest)
    return manifest
