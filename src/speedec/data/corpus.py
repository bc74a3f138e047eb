"""The English corpus: download, parse, clean, deduplicate, split, write.

`prepare_corpus` is the only function with side effects; `assemble` does the
deduplication and splitting as a pure function of the documents, so tests
can check it on small inputs.

Output, in the chosen directory:

* ``train.txt``, ``validation.txt``, ``test.txt``: UTF-8 text, paragraphs
  separated by one blank line, lines inside a paragraph only where the text
  has them (verse, dialogue, one Bible verse per line);
* ``manifest.json``: for each source its package, version, registry,
  licence, downloaded file and sha256, and its bytes of clean text; for
  each split its bytes and sha256.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from speedec.data.clean import Deduplicator
from speedec.data.fetch import Artifact
from speedec.data.output import atomic_write_text, prepare_out_dir, write_manifest
from speedec.data.progress import stage
from speedec.data.sources import SOURCES, Document, Source
from speedec.data.split import SPLITS, passages, split_of

CORPUS_FORMAT = "speedec-english-corpus/1"
PARAGRAPH_SEPARATOR = "\n\n"


@dataclass
class SplitText:
    """The paragraphs that went to one split, and where they came from."""

    paragraphs: list[str] = field(default_factory=list)
    passages: int = 0  # passages assigned to this split
    source_bytes: dict[str, int] = field(default_factory=dict)  # UTF-8 bytes per source

    def text(self) -> str:
        return PARAGRAPH_SEPARATOR.join(self.paragraphs) + "\n" if self.paragraphs else ""


@dataclass
class Assembly:
    """Result of deduplicating and splitting a set of documents."""

    splits: dict[str, SplitText]  # keyed by "train", "validation", "test"
    duplicates_removed: int  # paragraphs dropped as repeats of earlier ones
    documents: dict[str, int]  # documents per source
    paragraphs: dict[str, int]  # kept paragraphs per source


def assemble(documents: Sequence[Document], *, dedup_min_chars: int = 40) -> Assembly:
    """Deduplicate paragraphs across all documents, then split passages by content hash.

    Documents are processed in the given order, so the first copy of a
    repeated paragraph wins.
    """
    dedup = Deduplicator(dedup_min_chars)
    splits = {name: SplitText() for name in SPLITS}
    doc_counts: dict[str, int] = {}
    para_counts: dict[str, int] = {}
    for document in documents:
        kept = list(dedup.filter(document.paragraphs))
        doc_counts[document.source] = doc_counts.get(document.source, 0) + 1
        para_counts[document.source] = para_counts.get(document.source, 0) + len(kept)
        for group in passages(kept):
            split = splits[split_of(PARAGRAPH_SEPARATOR.join(group))]
            split.paragraphs.extend(group)
            split.passages += 1
            size = sum(len(p.encode("utf-8")) + len(PARAGRAPH_SEPARATOR) for p in group)
            split.source_bytes[document.source] = split.source_bytes.get(document.source, 0) + size
    return Assembly(splits, dedup.removed, doc_counts, para_counts)


def _source_entry(source: Source, artifact: Artifact, assembly: Assembly) -> dict:
    return {
        "name": source.name,
        "registry": artifact.registry,
        "package": artifact.package,
        "version": artifact.version,
        "file": artifact.path.name,
        "sha256": artifact.sha256,
        "licence": source.licence,
        "description": source.description,
        "documents": assembly.documents.get(source.name, 0),
        "paragraphs": assembly.paragraphs.get(source.name, 0),
        "bytes": sum(split.source_bytes.get(source.name, 0) for split in assembly.splits.values()),
    }


def prepare_corpus(out_dir: str | Path, *, work_dir: Path | None = None, progress: bool = True) -> dict:
    """Build the English corpus in `out_dir` and return its manifest.

    Packages are downloaded into `work_dir` (default ``out_dir/downloads``)
    with pip, apt-get and npm, and reused when already there. Raises
    DataError for every failure a user can cause or meet.
    """
    out = prepare_out_dir(out_dir)
    work = Path(work_dir) if work_dir is not None else out / "downloads"
    artifacts = {
        source.name: source.fetch(work)
        for source in stage(SOURCES, "download", enabled=progress, unit="package")
    }
    documents: list[Document] = []
    for source in stage(SOURCES, "parse and clean", enabled=progress, unit="source"):
        documents.extend(source.read(artifacts[source.name], work))
    assembly = assemble(documents)

    split_entries = {}
    for name in stage(SPLITS, "write", enabled=progress, unit="file"):
        split = assembly.splits[name]
        text = split.text()
        digest = atomic_write_text(out / f"{name}.txt", text)
        split_entries[name] = {
            "file": f"{name}.txt",
            "bytes": len(text.encode("utf-8")),
            "sha256": digest,
            "paragraphs": len(split.paragraphs),
            "passages": split.passages,
            "source_bytes": dict(sorted(split.source_bytes.items())),
        }
    manifest = {
        "format": CORPUS_FORMAT,
        "sources": [_source_entry(s, artifacts[s.name], assembly) for s in SOURCES],
        "splits": split_entries,
        "duplicate_paragraphs_removed": assembly.duplicates_removed,
        "total_bytes": sum(entry["bytes"] for entry in split_entries.values()),
    }
    write_manifest(out, manifest)
    return manifest
