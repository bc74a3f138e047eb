"""``speedec train``, ``eval``, ``train-exit`` and ``tokenizer train``.

Thin wrappers over :func:`~speedec.training.train`,
:func:`~speedec.training.evaluate_model`,
:func:`~speedec.training.exit_fit.fit_exit_readout` (a translator's:
:func:`~speedec.encdec.exit_fit.fit_translator_readout`) and
:func:`~speedec.tokenizer.train_bpe` (``tokenizer train --parallel``: the joint
tokenizer of a parallel corpus). ``run_options`` (a training run's options,
delivered as one :class:`TrainingRun`) and ``summary_line`` are shared with the
translation commands (:mod:`.translate`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from .options import (
    AT_LEAST_ONE,
    Placement,
    model_dtype_option,
    option_group,
    placement_options,
    threads_option,
)

# Command-line options that override a field of the config file (option -> field).
_OVERRIDES = ("out_dir", "max_steps", "max_tokens", "threads", "seed", "lr", "batch_size",
              "grad_accum", "log_every", "eval_every", "save_every", "device")


def parse_settings(settings: tuple[str, ...]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs; VALUE is read as JSON, and as a plain string if it is not JSON."""
    parsed = {}
    for item in settings:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise click.UsageError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            parsed[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[name.strip()] = raw
    return parsed


@dataclass(frozen=True)
class TrainingRun:
    """A training command's run: the config file, whether to continue the run saved in its
    output directory, the config fields the command line replaces and whether to show progress."""

    config_file: str
    resume: bool
    overrides: dict[str, Any]
    progress: bool

    @classmethod
    def from_options(cls, config_file: str, resume: bool, settings: tuple[str, ...], no_progress: bool,
                     **options: Any) -> TrainingRun:
        return cls(config_file, resume, config_overrides(settings, options), not no_progress)


def run_options(config_help: str, batch_help: str, *extra) -> Callable:
    """The options every training command shares (config, resume, overrides, progress),
    then the ``extra`` overrides, delivered as one :class:`TrainingRun` named ``run``."""
    return option_group(TrainingRun, "run", [
        click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False),
                     help=config_help),
        click.option("--resume", is_flag=True, help="Continue the run saved in the output directory."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False),
                     help="Output directory (overrides the config's out_dir)."),
        click.option("--max-steps", type=int, help="Run length in steps (replaces the config's budget)."),
        click.option("--max-tokens", type=int, help="Run length in tokens (replaces the config's budget)."),
        click.option("--threads", type=int, help="CPU threads per process."),
        click.option("--seed", type=int),
        click.option("--lr", type=float, help="Peak learning rate."),
        click.option("--batch-size", type=int, help=batch_help),
        click.option("--log-every", type=int),
        click.option("--eval-every", type=int),
        click.option("--save-every", type=int),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--set", "settings", multiple=True, metavar="FIELD=VALUE",
                     help="Override any config field (VALUE is JSON, or a string). Repeatable."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
        *extra,
    ], make=TrainingRun.from_options)


def config_overrides(settings: tuple[str, ...], options: dict[str, Any]) -> dict[str, Any]:
    """Config fields replaced on the command line: ``--set`` pairs, then the named options."""
    overrides = parse_settings(settings)
    overrides.update({name: value for name, value in options.items()
                      if name in _OVERRIDES and value is not None})
    # A budget given on the command line replaces the file's, whichever kind it is.
    if options.get("max_steps") is not None:
        overrides.setdefault("max_tokens", None)
    if options.get("max_tokens") is not None:
        overrides.setdefault("max_steps", None)
    return overrides


def summary_line(summary) -> str:
    """One line about a finished run (a :class:`~speedec.training.TrainSummary`)."""
    line = (f"trained {summary.steps} steps ({summary.tokens:,} tokens"
            + (f", {summary.tokens_per_s:.0f} tokens/s" if summary.tokens_per_s else "") + ")")
    if summary.eval is not None:
        ev = summary.eval
        line += f"; validation loss {ev['loss']:.4f} (ppl {ev['ppl']:.1f})"
        if ev["exit_agreement"] is not None:
            line += f", exit agreement {ev['exit_agreement']:.3f}"
    return f"{line}; model in {summary.model_dir}"


@click.command("train")
@run_options("Training config (JSON; see configs/train/).", "Global sequences per optimizer step.",
             click.option("--grad-accum", type=int, help="Micro-batches per process and step."))
def train_command(run: TrainingRun) -> None:
    """Train a looped model with the early-exit loss (use torchrun for data parallelism)."""
    from ..training.config import TrainConfig
    from ..training.distributed import launched_rank
    from ..training.trainer import train

    config = TrainConfig.from_file(run.config_file, run.overrides)
    summary = train(config, resume=run.resume, progress=run.progress)
    if launched_rank() != 0:
        return  # under torchrun only the main process reports
    click.echo(summary_line(summary))


@click.command("eval")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False),
              help="Model directory (with tokenizer.json, or byte-level; default: the bundled model).")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False),
              help="Validation text file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--prompts", default=16, show_default=True, type=int,
              help="Prompts decoded with the speed engine (0: skip).")
@click.option("--prompt-tokens", default=32, show_default=True, type=int)
@click.option("--new-tokens", default=64, show_default=True, type=int)
@click.option("--windows", default=64, show_default=True, type=int,
              help="Validation windows scored per loop.")
@click.option("--seq-len", default=256, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--loops", type=AT_LEAST_ONE, default=None,
              help="Evaluate the model at this depth: its first N loops, as `speedec serve` serves "
                   "NAME@loops=N (default: all its loops).")
@placement_options(model_dtype_option, threads_option())
def eval_command(model_dir, data_file, as_json, prompts, prompt_tokens, new_tokens, windows,
                 seq_len, batch_size, loops, placement: Placement) -> None:
    """Per-loop perplexity, exit/final agreement and SPEED acceptance of a model
    (at depth --loops: the early exit moves to min(exit loop, N - 1), none at 1)."""
    from ..bundled import resolve_model_dir
    from ..kernels import prepare_kernel
    from ..model import LoopedLM
    from ..tokenizer import load_tokenizer
    from ..training.evaluate import evaluate_model

    placement.set_threads()
    model_dir = resolve_model_dir(model_dir)
    model = LoopedLM.from_pretrained(model_dir, dtype=placement.torch_dtype)
    if loops is not None:
        try:
            model = model.at_depth(loops)  # any r for a recurrent-depth model, 1..L for a looped one
        except ConfigError as exc:
            raise click.UsageError(f"--loops: {exc}") from None
    prepare_kernel(model)
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    result = evaluate_model(model, tokenizer, data_file, seq_len=seq_len, windows=windows,
                            batch_size=batch_size, prompts=prompts, prompt_tokens=prompt_tokens,
                            new_tokens=new_tokens)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{data_file}: {result['tokens']:,} tokens in windows of {result['seq_len']}")
    click.echo("loop  loss     ppl        agreement with final")
    for i, (loss, ppl, agree) in enumerate(zip(result["loss_per_loop"], result["ppl_per_loop"],
                                                result["agreement_per_loop"]), start=1):
        mark = "  <- exit" if i == result["exit_loop"] else ""
        click.echo(f"{i:>4}  {loss:7.4f}  {ppl:9.2f}  {agree:6.3f}{mark}")
    if result["acceptance"] is not None:
        click.echo(f"speed engine on {result['prompts']} prompts x {result['new_tokens']} tokens: "
                   f"acceptance {result['acceptance']:.3f}, {result['steps_per_token']:.2f} steps/token "
                   f"({result['step_speedup']:.2f}x fewer steps than plain decoding)")


@click.command("train-exit")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False),
              help="Trained model directory, decoder-only or translator (default: the bundled model).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Where to write the model with its fitted readout (default: in place; an imported "
                   "checkpoint is never overwritten and needs --out).")
@click.option("--train", "train_file", default=None, type=click.Path(dir_okay=False),
              help="Training text of a decoder-only model (the readout learns to match the final loop on it).")
@click.option("--val", "val_file", default=None, type=click.Path(dir_okay=False),
              help="Validation text of a decoder-only model (agreement reported before and after).")
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False),
              help="A translator's parallel corpus directory (speedec data prepare-parallel): fitted on "
                   "its train split, agreement reported on its validation split.")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Adapter rank (default: the model's readout's, or 64).")
@click.option("--exit-loop", type=click.IntRange(min=1), default=None,
              help="Loop of the early exit (default: the model's).")
@click.option("--steps", default=400, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Sequences per step (a translator: sentence pairs).")
@click.option("--seq-len", default=None, type=click.IntRange(min=1),
              help="Tokens per training sequence of a decoder-only model [default: 256]; "
                   "not for a translator, whose sequences are whole sentence pairs.")
@click.option("--lr", default=3e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@placement_options(threads_option())
def train_exit_command(model_dir, out_dir, train_file, val_file, data_dir, rank, exit_loop, steps, batch_size,
                       seq_len, lr, seed, as_json, no_progress, placement: Placement) -> None:
    """Fit (or refit) a model's exit readout (the drafter) with its trunk frozen.

    Only the readout changes: the model's output is the same, its drafts agree
    more often with it (measured before and after on --val, or for a translator
    on the validation split of --data).
    """
    from ..bundled import resolve_model_dir
    from ..storage import ENCDEC_LM, is_imported, read_config
    from ..training.exit_fit import ExitFitSettings, save_fitted

    placement.set_threads()
    given = model_dir
    model_dir = Path(resolve_model_dir(model_dir))
    if out_dir is None and given is not None and not Path(given).exists():
        raise click.UsageError(f"{given} is a Hugging Face Hub id, whose cached files are not overwritten; "
                               "give --out DIR for the fitted model")
    out_dir = Path(out_dir) if out_dir is not None else model_dir
    if out_dir.resolve() == model_dir.resolve() and is_imported(model_dir):
        raise click.UsageError(f"{model_dir} is an imported checkpoint, which is not overwritten; "
                               "give --out DIR for the fitted model")
    translator = read_config(model_dir)[0] is ENCDEC_LM
    settings = ExitFitSettings(rank=rank, exit_loop=exit_loop, steps=steps, batch_size=batch_size,
                               seq_len=ExitFitSettings.seq_len if seq_len is None else seq_len, lr=lr,
                               warmup_steps=min(20, steps - 1), seed=seed)
    progress = not no_progress
    if translator:
        from ..encdec.data import split_path
        from ..encdec.exit_fit import fit_translator_readout
        from ..encdec.translate import load_translator

        if train_file is not None or val_file is not None or data_dir is None:
            raise click.UsageError(f"{model_dir} is a translator, fitted on sentence pairs: give --data DIR "
                                   "(a parallel corpus from speedec data prepare-parallel), not --train/--val")
        if seq_len is not None:
            raise click.UsageError("--seq-len does not apply to a translator, whose sequences are whole "
                                   "sentence pairs")
        model, tokenizer = load_translator(model_dir)
        result = fit_translator_readout(model, tokenizer, data_dir, settings, progress=progress)
        validation = split_path(data_dir, "validation")
    else:
        from ..model import LoopedLM
        from ..tokenizer import load_tokenizer
        from ..training.exit_fit import fit_exit_readout

        if data_dir is not None:
            raise click.UsageError(f"{model_dir} is a decoder-only model: --data is a translator's parallel "
                                   "corpus; give --train and --val text files")
        if train_file is None or val_file is None:
            raise click.UsageError("give --train and --val text files (or, for a translator, --data DIR)")
        model = LoopedLM.from_pretrained(model_dir)
        tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
        result = fit_exit_readout(model, tokenizer, train_file, val_file, settings, progress=progress)
        validation = val_file
    save_fitted(result, model_dir, out_dir)
    c = result.model.config
    report = {"model": str(out_dir), "exit_loop": c.exit_loop, "rank": c.exit_readout_rank,
              "steps": result.steps, "train_s": result.train_s,
              "agreement_before": result.before["draft_agreement"],
              "agreement_after": result.after["draft_agreement"],
              "final_ppl": result.after["ppl"]}
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"exit readout (loop {c.exit_loop}, rank {c.exit_readout_rank}) fitted in {result.steps} steps "
               f"({result.train_s:.0f} s): agreement with the final loop {report['agreement_before']:.3f} -> "
               f"{report['agreement_after']:.3f} on {validation}; model in {out_dir}")


@click.group("tokenizer")
def tokenizer_group() -> None:
    """Train byte-level BPE tokenizers."""


@tokenizer_group.command("train")
@click.option("--input", "inputs", multiple=True, type=click.Path(dir_okay=False),
              help="Training text file (repeatable).")
@click.option("--parallel", "parallel", type=click.Path(),
              help="Instead of --input: a parallel corpus (directory or JSONL file); one tokenizer "
                   "for both languages, trained on the source and target sides of its train split.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="tokenizer.json to write.")
@click.option("--vocab-size", default=8192, show_default=True, type=int)
@click.option("--min-frequency", default=2, show_default=True, type=int,
              help="Minimum count of a pair to be merged.")
def tokenizer_train(inputs, parallel, out, vocab_size, min_frequency) -> None:
    """Train a byte-level BPE (with an end-of-text token) on text files or a parallel corpus."""
    from ..tokenizer import train_bpe

    if bool(inputs) == (parallel is not None):
        raise click.UsageError("give either --input files or --parallel CORPUS")
    if min_frequency < 1:
        raise click.UsageError(f"--min-frequency must be >= 1, got {min_frequency}")
    if parallel is not None:
        from ..encdec.data import train_joint_tokenizer

        tokenizer = train_joint_tokenizer(parallel, out, vocab_size=vocab_size, min_frequency=min_frequency)
    else:
        tokenizer = train_bpe([Path(p) for p in inputs], out, vocab_size=vocab_size,
                              min_frequency=min_frequency)
    click.echo(f"wrote {out} ({tokenizer.vocab_size} tokens)")
