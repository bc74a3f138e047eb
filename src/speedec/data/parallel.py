"""The parallel corpus for the translation setting: sentence pairs into English.

Two sources, both downloaded with apt-get:

* ``de-en``: the example sentences of the Ding dictionary (trans-de-en);
* ``es-en``: the Reina-Valera 1909 Bible (sword-text-sparv) aligned verse
  by verse with the King James Version (sword-text-kjv); both modules use
  the KJV versification, so equal verse slots hold the same verse.

Output, in the chosen directory: ``train.jsonl``, ``validation.jsonl`` and
``test.jsonl``, one ``{"src": ..., "tgt": ...}`` object a line (source
language first, English as target), and ``manifest.json``. Pairs are
deduplicated on their source sentence (the first translation wins, so the
same input never has two targets) and split by a hash of the source
sentence, so a sentence cannot appear in two splits.
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
from speedec.data.sword import verse_texts
from speedec.errors import DataError

PARALLEL_FORMAT = "speedec-parallel-corpus/1"
DING_FILE = "usr/share/trans/de-en"


@dataclass(frozen=True)
class Pair:
    """One translation example."""

    src: str  # sentence in the source language
    tgt: str  # its English translation


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


def aligned_verses(source_files: dict[str, bytes], english_files: dict[str, bytes]) -> list[Pair]:
    """Verse pairs of two zText modules that share a versification, in canonical order.

    A slot that is empty in either module (a verse one translation omits)
    gives no pair.
    """
    source = verse_texts(sword_slots(source_files, "source module"))
    english = verse_texts(sword_slots(english_files, "English module"))
    pairs = []
    for key, text in source.items():
        if key in english:
            pairs.append(Pair(normalize_text(text), normalize_text(english[key])))
    return pairs


def _read_ding(artifacts: list[Artifact], work_dir: Path) -> list[Pair]:
    (ding,) = artifacts
    root = fetch.extract_deb(ding, work_dir)
    pairs = dictionary_pairs(decode_text(fetch.read_member(root, DING_FILE, ding.package)))
    if not pairs:
        raise DataError(f"{DING_FILE} in {ding.package} holds no sentence pairs (format changed?)")
    return pairs


def _read_bibles(artifacts: list[Artifact], work_dir: Path) -> list[Pair]:
    spanish, english = artifacts
    pairs = aligned_verses(
        sword_module_files(fetch.extract_deb(spanish, work_dir), spanish.package),
        sword_module_files(fetch.extract_deb(english, work_dir), english.package),
    )
    if not pairs:
        raise DataError(f"{spanish.package} and {english.package} share no verses")
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
        description="Reina-Valera 1909 (Spanish) aligned verse by verse with the King James Version",
        packages=("sword-text-sparv", "sword-text-kjv"),
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


def jsonl(pairs: Sequence[Pair]) -> str:
    """Pairs as JSON lines with a fixed key order (src, tgt)."""
    return "".join(json.dumps({"src": p.src, "tgt": p.tgt}, ensure_ascii=False) + "\n" for p in pairs)


def split_pairs(pairs: Sequence[Pair]) -> dict[str, list[Pair]]:
    """Assign each pair to a split by a hash of its source sentence."""
    splits: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    for pair in pairs:
        splits[split_of(pair.src)].append(pair)
    return splits


def prepare_parallel(
    out_dir: str | Path,
    *,
    work_dir: Path | None = None,
    progress: bool = True,
    pairs: Sequence[str] = ("de-en", "es-en"),
) -> dict:
    """Build the parallel corpus in `out_dir` and return its manifest.

    `pairs` chooses the sources ("de-en", "es-en"); all chosen ones go into
    the same files. Packages are downloaded into `work_dir` (default
    ``out_dir/downloads``) with apt-get and reused when already there.
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

    splits = split_pairs(all_pairs)
    split_entries = {}
    for name in stage(SPLITS, "write", enabled=progress, unit="file"):
        text = jsonl(splits[name])
        split_entries[name] = {
            "file": f"{name}.jsonl",
            "pairs": len(splits[name]),
            "bytes": len(text.encode("utf-8")),
            "sha256": atomic_write_text(out / f"{name}.jsonl", text),
        }
    manifest = {
        "format": PARALLEL_FORMAT,
        "fields": {"src": "source-language sentence", "tgt": "English translation"},
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
        "total_pairs": len(all_pairs),
    }
    write_manifest(out, manifest)
    return manifest
