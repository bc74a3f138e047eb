"""``speedec study depth|translation``: accuracy against latency across loop counts."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import load_model, progress_bar, split_list
from .options import AT_LEAST_ONE, Placement, placement_options, threads_option

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


def _finish(report, json_path, plot_path, quality_key, quality_label, *, pareto: bool = False,
            higher_is_better: bool = False) -> None:
    from ..bench.study import format_study, plot_pareto, plot_study
    from ..storage import atomic_write_text

    click.echo(format_study(report))
    if json_path:
        atomic_write_text(Path(json_path), json.dumps(report.to_dict(), indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        if pareto:
            written = plot_pareto(report, plot_path, quality_key=quality_key, quality_label=quality_label,
                                  higher_is_better=higher_is_better)
        else:
            written = plot_study(report, plot_path, quality_key=quality_key, quality_label=quality_label)
        click.echo(f"wrote {written}", err=True)


def _outputs(func):
    func = click.option("--plot", "plot_path", default=None, help="Write the PNG plot here.")(func)
    return click.option("--json", "json_path", default=None, help="Write the results as JSON here.")(func)


@study.command("depth")
@click.option("--models", required=True, help="Comma-separated model directories; the first is the baseline.")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False),
              help="Validation text for perplexity.")
@click.option("--test", "test_file", default=None, type=click.Path(dir_okay=False),
              help="Test text: also report its perplexity.")
@click.option("--labels", default=None, help="Comma-separated names of the models (default: L=<loops>).")
@click.option("--prompts", "n_prompts", default=4, show_default=True, type=AT_LEAST_ONE)
@click.option("--prompt-len", default=16, show_default=True, type=AT_LEAST_ONE)
@click.option("--max-new-tokens", default=64, show_default=True, type=AT_LEAST_ONE)
@click.option("--engines", default="autoregressive,speed", show_default=True, help=ENGINES_HELP)
@click.option("--repeats", default=3, show_default=True, type=AT_LEAST_ONE)
@placement_options(threads_option(2))
@_outputs
def depth(models, data_file, test_file, labels, n_prompts, prompt_len, max_new_tokens, engines, repeats,
          placement: Placement, json_path, plot_path) -> None:
    """Decoder-only models: perplexity (final and after every loop), exit agreement and
    latency relative to the first model's autoregressive decoding; --plot draws the
    Pareto chart (latency against validation perplexity, one point per model and engine)."""
    from ..bench.setup import make_prompts
    from ..bench.study import decoder_entry
    from ..tokenizer import load_tokenizer
    from ..training.evaluate import evaluate_model

    rows = study_rows(engines)
    placement.set_threads()
    dirs = _model_dirs(models)
    names = split_list(labels) if labels else None
    if names is not None and len(names) != len(dirs):
        raise click.UsageError(f"--labels gives {len(names)} names for {len(dirs)} models")
    entries = []
    for i, directory in enumerate(dirs):
        _, model = load_model(directory, Placement(dtype="float32"))
        tokenizer = load_tokenizer(directory, model.config.vocab_size)
        metrics = evaluate_model(model, tokenizer, data_file, prompts=0)
        quality = {"ppl": metrics["ppl"]}
        details = {"ppl_per_loop": metrics["ppl_per_loop"], "agreement_per_loop": metrics["agreement_per_loop"],
                   "exit_loop": metrics["exit_loop"], "params": sum(p.numel() for p in model.parameters())}
        if test_file is not None:
            test = evaluate_model(model, tokenizer, test_file, prompts=0)
            quality["test_ppl"] = test["ppl"]
            details["test_ppl_per_loop"] = test["ppl_per_loop"]
        if metrics["exit_agreement"] is not None:
            quality["exit_agree"] = metrics.get("draft_agreement", metrics["exit_agreement"])
        prompts = make_prompts(model, directory, count=n_prompts, length=prompt_len)
        label = names[i] if names else f"L={model.config.n_loops}"
        entries.append(decoder_entry(label, model, prompts, max_new_tokens, quality, rows, details))
    report = _run(entries, "depth", "token", repeats)
    report.notes.append("exit_agree: agreement of the exit's argmax with the final loop's on validation "
                        "(through the exit readout where the model has one)")
    for entry in entries:
        loops = " / ".join(f"{p:.1f}" for p in entry.details["ppl_per_loop"])
        report.notes.append(f"{entry.label}: validation perplexity after loops 1..{entry.n_loops}: {loops}")
    _finish(report, json_path, plot_path, "ppl", "validation perplexity", pareto=True)


@study.command("translation")
@click.option("--models", required=True, help="Comma-separated translator directories; the first is the baseline.")
@click.option("--data", "data_dir", required=True, help="Parallel corpus directory (speedec data prepare-parallel).")
@click.option("--splits", default="test", show_default=True,
              help="Comma-separated splits scored (BLEU/chrF over every pair, against both references where "
                   "every pair has two); the first is the main score and the timed workload, e.g. test,test-book.")
@click.option("--labels", default=None, help="Comma-separated names of the models (default: L=<loops>).")
@click.option("--sentences", default=40, show_default=True, type=AT_LEAST_ONE,
              help="Sentences of the first split timed per repetition (BLEU uses the whole split).")
@click.option("--per-loop/--no-per-loop", default=True, show_default=True,
              help="Also BLEU after every decoder loop 1..L-1 on the first split (greedy through the shared "
                   "head: the model's view at that depth).")
@click.option("--engines", default="autoregressive,speed", show_default=True, help=ENGINES_HELP)
@click.option("--repeats", default=3, show_default=True, type=AT_LEAST_ONE)
@placement_options(threads_option(2))
@_outputs
def translation(models, data_dir, splits, labels, sentences, per_loop, engines, repeats, placement: Placement,
                json_path, plot_path) -> None:
    """Translators: BLEU/chrF on each split, per-loop BLEU, exit agreement on validation, and ms per
    sentence relative to the first model's autoregressive decoding; --plot draws the Pareto chart
    (first split's BLEU against latency, one point per model and engine)."""
    from ..bench.study import translation_entry
    from ..encdec.data import read_pairs, split_path
    from ..encdec.evaluate import evaluate_translation, split_metrics
    from ..encdec.translate import encode_source, load_translator

    rows = study_rows(engines)
    placement.set_threads()
    dirs = _model_dirs(models)
    names = split_list(labels) if labels else None
    if names is not None and len(names) != len(dirs):
        raise click.UsageError(f"--labels gives {len(names)} names for {len(dirs)} models")
    split_names = split_list(splits)
    if not split_names:
        raise click.UsageError("--splits names no split")
    scored = {name: read_pairs(split_path(data_dir, name)) for name in split_names}
    main, pairs = split_names[0], scored[split_names[0]]
    entries = []
    for i, directory in enumerate(dirs):
        model, tokenizer = load_translator(directory)
        c = model.config
        label = names[i] if names else f"L={c.n_loops}"

        def bleu(view, split: str) -> dict:
            return evaluate_translation(view, tokenizer, scored[split], engine="autoregressive", warmup=0,
                                        progress=True).report

        quality, details = {}, {"params": sum(p.numel() for p in model.parameters()), "exit_loop": c.exit_loop}
        for split in split_names:
            report = bleu(model, split)
            suffix = "" if split == main else f"_{split}"
            quality[f"bleu{suffix}"], quality[f"chrf{suffix}"] = report["bleu"], report["chrf"]
            details[f"references{suffix}"] = report["references"]
        details["bleu_signature"] = report["bleu_signature"]
        if per_loop:
            details["bleu_per_loop"] = [bleu(model.at_depth(d), main)["bleu"] for d in range(1, c.n_loops)]
            details["bleu_per_loop"].append(quality["bleu"])
        metrics = split_metrics(model, tokenizer, data_dir, "validation")
        details["agreement_per_loop"] = metrics["agreement_per_loop"]
        details["ppl_per_loop"] = metrics["ppl_per_loop"]
        if c.exit_loop is not None:
            quality["exit_agree"] = metrics.get("draft_agreement", metrics["exit_agreement"])
        sources = [encode_source(tokenizer, p.src)[: c.max_source_len] for p in pairs[:sentences]]
        entries.append(translation_entry(label, model, tokenizer, sources, quality, rows, details))
    report = _run(entries, "translation", "sentence", repeats)
    refs = {e.details.get("references", 1) for e in entries}
    report.notes.append(f"bleu, chrf: sacrebleu corpus scores on {main} ({len(pairs)} pairs, greedy, "
                        f"{'/'.join(map(str, sorted(refs)))} reference(s)); "
                        + "; ".join(f"{s}: {len(scored[s])} pairs" for s in split_names[1:]))
    report.notes.append("exit_agree: teacher-forced agreement of the early exit's argmax (through the exit "
                        "readout where the model has one) with the final loop's on the validation split")
    if per_loop:
        for entry in entries:
            loops = " / ".join(f"{b:.2f}" for b in entry.details["bleu_per_loop"])
            report.notes.append(f"{entry.label}: {main} BLEU after decoder loops 1..{entry.n_loops}: {loops}")
    _finish(report, json_path, plot_path, "bleu", f"{main} BLEU (higher is better)", pareto=True,
            higher_is_better=True)
