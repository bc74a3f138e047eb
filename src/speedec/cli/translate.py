"""``speedec train-translation``, ``translate`` and ``eval-translation``.

Thin wrappers over :func:`~speedec.encdec.train_translation`,
:func:`~speedec.encdec.translate` and :func:`~speedec.encdec.evaluate_translation`.

The whole setting, from the registries to a score (``speedec translate "..."``
alone uses the bundled Spanish -> English translator)::

    speedec data prepare-parallel --out data/parallel-es-en --pairs es-en
    speedec tokenizer train --parallel data/parallel-es-en --out data/parallel-es-en/tokenizer.json --vocab-size 8192
    speedec train-translation --config configs/translation/es-en-L4.json
    speedec translate --model runs/translation/es-en-L4/model "Y dijo Dios: Sea la luz."
    speedec eval-translation --model runs/translation/es-en-L4/model --data data/parallel-es-en
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..engines import engine_class
from ..errors import GenerationError, SpeedecError
from ..kernels import prepare_kernel
from .options import (
    AT_LEAST_ONE,
    IntRange,
    Placement,
    Sampling,
    Speculation,
    device_option,
    dtype_option,
    placement_options,
    sampling_options,
    speculation_options,
    threads_option,
)
from .train import TrainingRun, run_options, summary_line

ENGINE_HELP = ("autoregressive, speed or self-speculative (greedy: all give the same translation; "
               "sampling: the same distribution).")


def _check_engine(engine: str) -> None:
    from ..encdec.engines import TRANSLATION_ENGINES

    engine_class(engine, TRANSLATION_ENGINES)


@click.command("train-translation")
@run_options("Translation training config (JSON; see configs/translation/).",
             "Sentence pairs per optimizer step.")
def train_translation_command(run: TrainingRun) -> None:
    """Train an encoder-decoder translator with a looped decoder and the early-exit loss.

    The config names a parallel corpus (speedec data prepare-parallel) and a
    shared tokenizer (speedec tokenizer train --parallel). The run directory
    gets metrics.jsonl, checkpoint/ (continue with --resume) and, at the end,
    model/ with config.json, model.safetensors and tokenizer.json.
    """
    from ..encdec.train_config import TranslationConfig
    from ..encdec.trainer import train_translation

    config = TranslationConfig.from_file(run.config_file, run.overrides)
    summary = train_translation(config, resume=run.resume, progress=run.progress)
    click.echo(summary_line(summary))


@click.command("translate")
@click.argument("text_arg", metavar="[TEXT]", required=False)
@click.option("--model", "model_dir", default=None,
              help="Translator directory (with tokenizer.json) or Hub id; default: the bundled Spanish -> "
                   "English translator.")
@click.option("--text", help="Sentence to translate (instead of the TEXT argument).")
@click.option("--engine", default="speed", show_default=True, help=ENGINE_HELP)
@click.option("--max-new-tokens", type=int, default=None,
              help="Token limit (default: 2 x source tokens + 10, within the model's max_target_len).")
@speculation_options
@sampling_options
@placement_options(dtype_option, device_option, threads_option())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: tokens, text, stats.")
def translate_command(text_arg, model_dir, text, engine, max_new_tokens, speculation: Speculation,
                      sampling: Sampling, placement: Placement, as_json) -> None:
    """Translate one sentence with a trained translator, by default the bundled Spanish -> English
    one (greedy by default, where every engine gives the same tokens; with --temperature every
    engine samples from the same distribution)."""
    from ..encdec.translate import load_translator, translate

    if text_arg is not None and text is not None:
        raise click.UsageError("give the text once: as an argument or with --text")
    text = text if text is not None else text_arg
    if text is None:
        raise click.UsageError("give the sentence to translate (TEXT or --text)")
    if not text.strip():
        raise GenerationError("the text to translate is empty")
    _check_engine(engine)
    placement.set_threads()
    model, tokenizer = load_translator(model_dir, dtype=placement.torch_dtype, device=placement.torch_device)
    prepare_kernel(model)
    result = translate(model, tokenizer, text, engine=engine, max_new_tokens=max_new_tokens,
                       **sampling.as_kwargs(), **speculation.engine_options())
    if as_json:
        click.echo(json.dumps({"engine": engine, **result.to_dict()}, ensure_ascii=False))
    else:
        click.echo(result.text)


@click.command("eval-translation")
@click.option("--model", "model_dir", default=None,
              help="Translator directory (with tokenizer.json) or Hub id; default: the bundled translator.")
@click.option("--data", "data", required=True, type=click.Path(),
              help="Parallel corpus directory (speedec data prepare-parallel) or one JSONL file.")
@click.option("--split", default="test", show_default=True, help="Split to translate (with a directory).")
@click.option("--engine", default="speed", show_default=True, help=ENGINE_HELP)
@speculation_options
@click.option("--limit", type=AT_LEAST_ONE, default=None, help="Only the first N pairs.")
@click.option("--max-new-tokens", type=int, default=None,
              help="Token limit per sentence (default: 2 x source tokens + 10, within max_target_len).")
@click.option("--warmup", default=1, show_default=True, type=IntRange(min=0),
              help="Untimed translations before measuring.")
@placement_options(threads_option(), device_option)
@click.option("--hypotheses", "hypotheses_file", type=click.Path(dir_okay=False),
              help="Also write the translations here, one a line.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_translation_command(model_dir, data, split, engine, speculation: Speculation, limit, max_new_tokens,
                             warmup, placement: Placement, hypotheses_file, as_json, no_progress) -> None:
    """BLEU and chrF (sacrebleu) of a translator on a split, with the engine's speed and acceptance."""
    from ..encdec.data import read_pairs, split_path
    from ..encdec.evaluate import evaluate_translation
    from ..encdec.translate import load_translator
    from ..storage import atomic_write_text

    _check_engine(engine)
    placement.set_threads()
    path = split_path(data, split)
    pairs = read_pairs(path)[:limit]
    if not pairs:
        raise SpeedecError(f"{path} holds no sentence pairs")
    model, tokenizer = load_translator(model_dir, device=placement.torch_device)
    prepare_kernel(model)
    result = evaluate_translation(model, tokenizer, pairs, engine=engine, max_new_tokens=max_new_tokens,
                                  warmup=warmup, progress=not no_progress and not as_json,
                                  **speculation.engine_options())
    report = {"model": str(model_dir) if model_dir is not None else "bundled", "data": str(path), **result.report}
    if hypotheses_file is not None:
        Path(hypotheses_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(hypotheses_file), "".join(h.replace("\n", " ") + "\n" for h in result.hypotheses))
    if as_json:
        click.echo(json.dumps(report))
        return
    r = report
    line = (f"{path}: {r['sentences']} sentences, BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f}; "
            f"{engine} (L={r['n_loops']}): {r['ms_per_sentence']:.1f} ms/sentence")
    if r["steps_per_token"] is not None:
        line += f", {r['steps_per_token']:.2f} steps/token"
    if r["acceptance"] is not None:
        line += f", acceptance {r['acceptance']:.3f}"
    click.echo(line)
