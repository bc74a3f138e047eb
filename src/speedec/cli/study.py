"""``speedec study depth|translation``: accuracy against latency across loop counts."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import AT_LEAST_ONE, load_model, progress_bar, set_threads, split_list, threads_option

ENGINES_HELP = ("Comma-separated rows: autoregressive (required), speed, and speed variants such as "
                "speed+correction (as in bench).")
# Engines a study times: the reference and the pipeline (with its options).
STUDY_ENGINES = ("autoregressive", "speed")


@click.group()
def study() -> None:
    """Accuracy against latency for models that differ only in their number of loops."""


def study_rows(engines: str) -> dict[str, tuple[str, dict]]:
    """Row name -> (engine, options), autoregressive first."""
    from ..engines import ENGINES
    from ..engines.spec import parse_engine_spec

    offered = {name: ENGINES[name] for name in STUDY_ENGINES}
    rows: dict[str, tuple[str, dict]] = {}
    for name in split_list(engines):
        variant = parse_engine_spec(name, offered)
        rows[name] = (variant.engine, variant.options)
    if "autoregressive" not in rows:
        raise click.UsageError("--engines must include autoregressive (every latency is relative to it)")
    return {"autoregressive": rows.pop("autoregressive"), **rows}


def _model_dirs(models: str) -> list[str]:
    dirs = split_list(models)
    if len(dirs) < 2:
        raise click.UsageError("--models takes at least two comma-separated model directories")
    return dirs


def _run(entries: list, kind: str, unit: str, repeats: int):
    from ..bench.study import run_study

    with progress_bar(repeats * sum(len(e.engines) for e in entries), "study") as progress:
        return run_study(entries, kind=kind, unit=unit, repeats=repeats, progress=progress)


def _finish(report, json_path, plot_path, quality_key, quality_label) -> None:
    from ..bench.study import format_study, plot_study
    from ..storage import atomic_write_text

    click.echo(format_study(report))
    if json_path:
        atomic_write_text(Path(json_path), json.dumps(report.to_dict(), indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        click.echo(f"wrote {plot_study(report, plot_path, quality_key=quality_key, quality_label=quality_label)}",
                   err=True)


def _outputs(func):
    func = click.option("--plot", "plot_path", default=None, help="Write the PNG plot here.")(func)
    return click.option("--json", "json_path", default=None, help="Write the results as JSON here.")(func)


@study.command("depth")
@click.option("--models", required=True, help="Comma-separated model directories; the first is the baseline.")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False),
              help="Validation text for perplexity.")
@click.option("--prompts", "n_prompts", default=4, show_default=True, type=AT_LEAST_ONE)
@click.option("--prompt-len", default=16, show_default=True, type=AT_LEAST_ONE)
@click.option("--max-new-tokens", default=64, show_default=True, type=AT_LEAST_ONE)
@click.option("--engines", default="autoregressive,speed", show_default=True, help=ENGINES_HELP)
@click.option("--repeats", default=3, show_default=True, type=AT_LEAST_ONE)
@threads_option(2)
@_outputs
def depth(models, data_file, n_prompts, prompt_len, max_new_tokens, engines, repeats, threads, json_path,
          plot_path) -> None:
    """Decoder-only models: validation perplexity against ms per token (autoregressive and speed)."""
    from ..bench.setup import make_prompts
    from ..bench.study import decoder_entry
    from ..tokenizer import load_tokenizer
    from ..training.evaluate import evaluate_model

    rows = study_rows(engines)
    set_threads(threads)
    entries = []
    for directory in _model_dirs(models):
        _, model = load_model(directory, "float32", "cpu")
        tokenizer = load_tokenizer(directory, model.config.vocab_size)
        metrics = evaluate_model(model, tokenizer, data_file, prompts=0)
        prompts = make_prompts(model, directory, count=n_prompts, length=prompt_len)
        entries.append(decoder_entry(f"L={model.config.n_loops}", model, prompts, max_new_tokens,
                                     {"ppl": metrics["ppl"]}, rows))
    _finish(_run(entries, "depth", "token", repeats), json_path, plot_path, "ppl", "validation perplexity")


@study.command("translation")
@click.option("--models", required=True, help="Comma-separated translator directories; the first is the baseline.")
@click.option("--data", "data_dir", required=True, help="Parallel corpus directory (speedec data prepare-parallel).")
@click.option("--split", default="test", show_default=True)
@click.option("--sentences", default=40, show_default=True, type=AT_LEAST_ONE,
              help="Sentences of the split timed per repetition (BLEU uses the whole split).")
@click.option("--engines", default="autoregressive,speed", show_default=True, help=ENGINES_HELP)
@click.option("--repeats", default=3, show_default=True, type=AT_LEAST_ONE)
@threads_option(2)
@_outputs
def translation(models, data_dir, split, sentences, engines, repeats, threads, json_path, plot_path) -> None:
    """Translators: test BLEU/chrF against ms per sentence (autoregressive and speed)."""
    from ..bench.study import translation_entry
    from ..encdec.data import read_pairs, split_path
    from ..encdec.evaluate import evaluate_translation
    from ..encdec.translate import encode_source, load_translator

    rows = study_rows(engines)
    set_threads(threads)
    pairs = read_pairs(split_path(data_dir, split))
    entries = []
    for directory in _model_dirs(models):
        model, tokenizer = load_translator(directory)
        scores = evaluate_translation(model, tokenizer, pairs, engine="autoregressive").report
        c = model.config
        sources = [encode_source(tokenizer, p.src)[: c.max_source_len] for p in pairs[:sentences]]
        entries.append(translation_entry(f"L={c.n_loops}", model, tokenizer, sources,
                                         {"bleu": scores["bleu"], "chrf": scores["chrf"]}, rows))
    _finish(_run(entries, "translation", "sentence", repeats), json_path, plot_path, "bleu", "test BLEU")
