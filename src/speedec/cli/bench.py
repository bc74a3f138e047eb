"""``speedec bench`` (engines side by side) and ``speedec kernels`` (matmul kernels side by side)."""

from __future__ import annotations

from pathlib import Path

import click

from ..bundled import resolve_model_dir
from ..config import PRESET_RESIDUAL_SCALE
from ..devices import MODEL_DTYPES
from ..kernels import FEW_ROWS
from .common import parse_ids, progress_bar, split_list
from .options import (
    AT_LEAST_ONE,
    POSITIVE,
    IntRange,
    Placement,
    exit_loop_option,
    placement_options,
    threads_option,
)

PRESET_HELP = ("membound, membound-deep, ouro-1.4b-shape (Ouro-1.4B's shapes and architecture, random "
               "weights: 5.7 GB float32, 2.9 GB with --dtype bfloat16), nanbeige-4.2-3b-shape (Nanbeige4.2-3B's "
               "shapes and architecture, random weights: 16.7 GB float32, 8.3 GB bfloat16, 4.4 GB int8), "
               "huginn-3.5b-shape (Huginn-0125's recurrent-depth shapes, r = 32: 7.1 GB bfloat16), "
               "membound-recurrent (a recurrent-depth model at membound's widths, r = 32), tiny, "
               "or default (the bundled model).")
# Rows of `speedec bench` when --engines is not given.
DEFAULT_ENGINES = ("autoregressive,speed,self-speculative,hf-generate,hf-early-exit,"
                   "llamacpp-f32,llamacpp-f16,llamacpp-q8_0")
# Presets whose default rows are fewer: at 1.4B parameters each row costs minutes.
PRESET_ENGINES = {"ouro-1.4b-shape": "autoregressive,speed", "nanbeige-4.2-3b-shape": "autoregressive,speed",
                  "huginn-3.5b-shape": "autoregressive,speed"}
# Rows of transformers' generate on the exported Llama: row name -> what it runs.
HF_ROWS = {"hf-generate": "generate", "hf-early-exit": "early-exit"}


def _model_dir(preset_name: str, model_dir: str | None) -> str | None:
    """``--model``, or the bundled model for ``--preset default``."""
    if preset_name == "default" and model_dir is None:
        return str(resolve_model_dir(None))
    return model_dir


def default_engines(preset_name: str, model_dir: str | None) -> str:
    """The rows ``speedec bench`` runs when ``--engines`` is not given."""
    return DEFAULT_ENGINES if model_dir is not None else PRESET_ENGINES.get(preset_name, DEFAULT_ENGINES)


def bench_rows(engines: str, draft_tokens: str) -> tuple[list, list[str]]:
    """The benchmark rows named by ``--engines`` (specs such as ``speed+correction``; plain
    ``self-speculative`` is one row per ``--draft-tokens`` value) and notes on rows skipped."""
    from ..bench.llamacpp import LLAMACPP_ROWS, SKIP_NOTE, llamacpp_available
    from ..bench.runner import EngineSpec
    from ..bench.setup import hf_supports_early_exit
    from ..engines.spec import parse_engine_spec

    specs, notes, missing_llamacpp = [], [], []
    for name in split_list(engines):
        if name in LLAMACPP_ROWS:
            if llamacpp_available():
                specs.append(EngineSpec(name, "llamacpp", LLAMACPP_ROWS[name]))
            else:
                missing_llamacpp.append(name)
            continue
        if name in HF_ROWS:
            if name == "hf-early-exit" and not hf_supports_early_exit():
                notes.append("the installed transformers has no assistant_early_exit: hf-early-exit skipped")
            else:
                specs.append(EngineSpec(name, "hf", HF_ROWS[name]))
            continue
        variant = parse_engine_spec(name)
        if name == "self-speculative":
            for k in parse_ids(draft_tokens):
                specs.append(EngineSpec(f"self-speculative k={k}", "ours", name, {"draft_tokens": k}))
        else:
            specs.append(EngineSpec(name, "ours", variant.engine, variant.options))
    if missing_llamacpp:
        notes.append(SKIP_NOTE.format(rows=", ".join(missing_llamacpp)))
    return specs, notes


def peer_rows(model, specs: list) -> tuple[list, list[str]]:
    """The rows ``model`` can run, and notes on those dropped: the Hugging Face peers run
    the model exported as a transformers Llama (llama models only); the llama.cpp peers
    its GGUF export (llama, and nanbeige as llama.cpp's nanbeige architecture)."""
    from ..errors import ConfigError
    from ..gguf_export import check_exportable

    notes = []
    architecture = model.config.architecture
    if architecture != "llama" and any(s.kind == "hf" for s in specs):
        specs = [s for s in specs if s.kind != "hf"]
        notes.append(f"the Hugging Face peers are transformers Llama exports: skipped for a {architecture} model")
    if any(s.kind == "llamacpp" for s in specs):
        try:
            check_exportable(model)
        except ConfigError as exc:
            specs = [s for s in specs if s.kind != "llamacpp"]
            notes.append(f"the llama.cpp peers run the GGUF export: skipped ({exc})")
    return specs, notes


@click.command()
@click.option("--preset", "preset_name", default="membound", show_default=True, help=PRESET_HELP)
@click.option("--model", "model_dir", default=None, help="Benchmark a saved model instead of a preset.")
@click.option("--engines", default=None,
              show_default=DEFAULT_ENGINES + " (ouro-1.4b-shape, nanbeige-4.2-3b-shape: autoregressive,speed)",
              help="Comma-separated: speedec engines, speed variants (options joined by '+': "
                   "speed+correction, speed+guesses=2, speed+adaptive, speed+correction+guesses=2+adaptive), "
                   "hf-generate, hf-early-exit (llama models only), llamacpp-f32, llamacpp-f16, llamacpp-q8_0 "
                   "(llama.cpp, in a process of its own, on the GGUF export: K x L unrolled blocks; a nanbeige "
                   "model: llama.cpp's nanbeige architecture), llamacpp-looped-f32/-f16/-q8_0 (llama.cpp's "
                   "looped llama: K blocks shared by L loops); skipped without llama-cpp-python.")
@click.option("--draft-tokens", default="1,2,3,4", show_default=True,
              help="k values for self-speculative (one row each).")
@click.option("--prompts", "n_prompts", default=4, show_default=True, type=AT_LEAST_ONE)
@click.option("--prompt-len", default=16, show_default=True, type=AT_LEAST_ONE)
@click.option("--max-new-tokens", default=64, show_default=True, type=AT_LEAST_ONE)
@click.option("--repeats", default=5, show_default=True, type=AT_LEAST_ONE)
@click.option("--warmup", default=1, show_default=True, type=int)
@placement_options(threads_option(2))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "json_path", default=None, help="Write the results as JSON here.")
@click.option("--plots", "plots_dir", default=None, help="Write PNG plots into this directory.")
@click.option("--bandwidth-mb", default=400.0, show_default=True, type=float,
              help="Buffer size for the memory-bandwidth measurement.")
@click.option("--residual-scale", type=POSITIVE, default=None,
              help="Random presets: scale of the residual branches (for ouro-1.4b-shape the gain of "
                   "the sandwich norms on their outputs; sets the acceptance; default: the preset's).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "int8"]),
              help="Weights' dtype, built directly in it (no float32 copy); int8: q8_0, the float32 "
                   "model's weights quantized one matrix at a time as they are drawn (the same as quantizing "
                   "the float32 model, which is never made). Default: float32 for a preset, the "
                   "checkpoint's own for --model.")
@exit_loop_option
def bench(preset_name, model_dir, engines, draft_tokens, n_prompts, prompt_len, max_new_tokens, repeats,
          warmup, placement: Placement, seed, json_path, plots_dir, bandwidth_mb, residual_scale, dtype, exit_loop) -> None:
    """Measure engines side by side (interleaved, paired) and print a table, then the
    model's size and the process's peak resident memory (building, decoding)."""
    from ..bench import measure_bandwidth, run_benchmark
    from ..bench.memory import format_memory, peak_rss_bytes, reset_peak_rss
    from ..bench.report import format_table, write_json, write_plots
    from ..bench.setup import build_model, load_hf_peer, make_prompts

    placement.set_threads()
    model_dir = _model_dir(preset_name, model_dir)
    if residual_scale is not None and model_dir is not None:
        raise click.UsageError("--residual-scale takes a positive number and applies to random presets only")
    if engines is None:
        engines = default_engines(preset_name, model_dir)
    specs, notes = bench_rows(engines, draft_tokens)
    # Before the model exists, so that its buffers never sit beside the weights in
    # memory; the peak is then restarted, so that the build's peak is the model's.
    click.echo("measuring memory bandwidth...", err=True)
    bandwidth = measure_bandwidth(buffer_mb=bandwidth_mb)
    reset_peak_rss()
    model = build_model(preset_name, seed=seed, model_dir=model_dir, residual_scale=residual_scale,
                        exit_loop=exit_loop, dtype=MODEL_DTYPES[dtype] if dtype else None)
    build_peak = peak_rss_bytes()
    specs, dropped = peer_rows(model, specs)
    notes.extend(dropped)
    label = preset_name if model_dir is None or preset_name == "default" else Path(model_dir).name
    if residual_scale is not None:
        label = f"{label}-rs{residual_scale:g}"
    prompts = make_prompts(model, model_dir, count=n_prompts, length=prompt_len, seed=seed)
    if len(prompts[0]) + max_new_tokens > model.config.max_seq_len:
        raise click.UsageError("--prompt-len + --max-new-tokens exceeds the model's max_seq_len")
    hf_model = load_hf_peer(model) if any(s.kind == "hf" for s in specs) else None
    llamacpp_peers = None
    try:
        if any(s.kind == "llamacpp" for s in specs):
            from ..bench.llamacpp import load_llamacpp_peers

            click.echo("exporting the GGUF files for llama.cpp...", err=True)
            llamacpp_peers = load_llamacpp_peers(model, [s.engine for s in specs if s.kind == "llamacpp"])
        total = repeats * (len(specs) + (0 if any(s.engine == "autoregressive" for s in specs) else 1))
        with progress_bar(total, "bench") as progress:
            report = run_benchmark(model, specs, prompts, max_new_tokens=max_new_tokens, repeats=repeats,
                                   warmup=warmup, hf_model=hf_model, llamacpp_peers=llamacpp_peers,
                                   bandwidth=bandwidth, preset=label, progress=progress,
                                   build_peak_rss_bytes=build_peak)
    finally:
        if llamacpp_peers is not None:  # the workers end and the GGUF files are deleted
            llamacpp_peers.close()
    report.notes.extend(notes)
    if model_dir is None:
        report.residual_scale = (residual_scale if residual_scale is not None
                                 else PRESET_RESIDUAL_SCALE.get(preset_name, 1.0))
    for peer in (llamacpp_peers or {}).values():
        report.notes.append(f"llama.cpp {peer.dtype}: {peer.path.name} ({peer.file_bytes / 1e6:.1f} MB, "
                            f"memory-mapped; speedec's model: {report.memory.model_bytes / 1e6:.1f} MB)")
    click.echo(format_table(report))
    click.echo(format_memory(report.memory, report.dtype))
    if json_path:
        write_json(report, json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plots_dir:
        for path in write_plots(report, plots_dir):
            click.echo(f"wrote {path}", err=True)


@click.command()
@click.option("--preset", "preset_name", default="membound", show_default=True, help=PRESET_HELP)
@click.option("--model", "model_dir", default=None, help="Measure a saved model instead of a preset.")
@click.option("--max-rows", default=8, show_default=True, type=IntRange(1, FEW_ROWS),
              help=f"Rows in flight: 1..N (at most {FEW_ROWS}: more rows always use F.linear).")
@click.option("--rounds", default=3, show_default=True, type=AT_LEAST_ONE, help="Interleaved rounds per kernel.")
@click.option("--repeats", default=5, show_default=True, type=AT_LEAST_ONE,
              help="Steps timed per row count and round.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "int8"]),
              help="Weights' dtype (bfloat16: the kernels' bf16 weight paths; int8: q8_0, one row per "
                   "8-bit kernel path this CPU runs).")
@placement_options(threads_option(2))
def kernels(preset_name, model_dir, max_rows, rounds, repeats, dtype, placement: Placement) -> None:
    """Time one step (K layers) against the rows in flight, for each matmul kernel."""
    from ..bench.kernels import compare_kernels, format_kernel_table
    from ..bench.setup import build_model
    from ..kernels import active_kernel, available_kernels, float_paths_report, kernel_choice

    placement.set_threads()
    model = build_model(preset_name, model_dir=_model_dir(preset_name, model_dir), dtype=MODEL_DTYPES[dtype])
    click.echo(f"active kernel: {active_kernel()} (SPEEDEC_KERNEL={kernel_choice()}), weights {dtype}")
    click.echo(f"float paths here: {float_paths_report()}")
    if model.config.quantization is not None:
        from ..bench.kernels import compare_q8_paths
        from ..q8_kernels import best_path, probe_report

        click.echo("instruction sets: " + "; ".join(
            f"{isa} {'yes' if ok else 'no'} ({why})" for isa, (ok, why) in probe_report().items()))
        click.echo(f"q8_0 path: {best_path() or 'torch'} (SPEEDEC_Q8_KERNEL to force one)")
        with progress_bar(rounds, "kernels", unit="round") as progress:
            costs = compare_q8_paths(model, max_rows, rounds=rounds, repeats=repeats, progress=progress)
        click.echo(format_kernel_table(costs))
        return
    if dtype == "bfloat16":
        click.echo("(bf16: the onednn row runs W @ x.T, oneDNN's reordered weights being float32's)")
    with progress_bar(rounds * len(available_kernels()), "kernels", unit="round") as progress:
        costs = compare_kernels(model, max_rows, rounds=rounds, repeats=repeats, progress=progress)
    click.echo(format_kernel_table(costs))
