"""Model directories: ``speedec init`` (random weights), ``speedec export-hf`` and ``export-gguf``."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import PRESET_RESIDUAL_SCALE, ModelConfig, preset
from ..model import LoopedLM
from .options import POSITIVE


@click.command()
@click.option("--preset", "preset_name", help="Named shape: tiny, membound, membound-deep.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="JSON file with ModelConfig fields.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to create.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed of the weights.")
@click.option("--residual-scale", type=POSITIVE, default=None,
              help="Scale of the residual branches' output weights, or of their output norms' gains "
                   "for architecture ouro (default: the preset's).")
@click.option("--force", is_flag=True, help="Overwrite a model already in --out.")
def init(preset_name, config_file, out, seed, residual_scale, force) -> None:
    """Create a random-weight model (for tests and benchmarks)."""
    if (preset_name is None) == (config_file is None):
        raise click.UsageError("give exactly one of --preset or --config")
    config = preset(preset_name) if preset_name else ModelConfig.from_file(config_file)
    if residual_scale is None:
        residual_scale = PRESET_RESIDUAL_SCALE.get(preset_name, 1.0)
    out_dir = Path(out)
    if (out_dir / "config.json").exists() and not force:
        raise click.UsageError(f"{out_dir} already holds a model; pass --force to overwrite it")
    from ..bench.setup import random_model  # the bench's models, scale applied per architecture

    model = random_model(config, seed=seed, residual_scale=residual_scale)
    model.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {out_dir} ({n_params / 1e6:.2f}M parameters, "
               f"K={config.n_unique_layers} L={config.n_loops} exit={config.exit_loop})")


@click.command("export-hf")
@click.argument("model_dir")
@click.argument("out_dir")
def export_hf(model_dir, out_dir) -> None:
    """Write MODEL_DIR as a Hugging Face checkpoint in OUT_DIR: a plain Llama (K*L layers), or an
    imported model in its own architecture's format; with its tokenizer and chat files."""
    from ..bundled import resolve_model_dir
    from ..hf import export_hf as export
    from ..storage import copy_companions

    model_dir = resolve_model_dir(model_dir)  # a directory or a Hugging Face Hub id
    model = LoopedLM.from_pretrained(model_dir)
    export(model, out_dir)
    copy_companions(model_dir, out_dir)
    if model.config.architecture == "llama":
        click.echo(f"wrote {out_dir} (LlamaForCausalLM, {model.config.n_virtual_layers} layers)")
    else:
        click.echo(f"wrote {out_dir} ({model.config.architecture}: {model.config.n_unique_layers} layers x "
                   f"{model.config.n_loops} loops)")


@click.command("export-gguf")
@click.argument("model_dir")
@click.argument("out_file")
@click.option("--dtype", type=click.Choice(["f32", "f16", "q8_0"]), default=None,
              help="Weight type of the matrices (default: q8_0 for a quantized model, which writes its own "
                   "blocks, else f32; norms stay f32; q8_0 writes f16 where rows do not split into "
                   "blocks of 32).")
@click.option("--looped/--unrolled", default=None,
              help="--looped: llama.cpp's looped architecture (nanbeige: the K blocks once, run L times); "
                   "--unrolled: a plain llama with K x L blocks. Default: looped for a nanbeige model (a "
                   "nanbeige model whose final norm closes every loop has no unrolled form), unrolled for "
                   "a llama one.")
def export_gguf(model_dir, out_file, dtype, looped) -> None:
    """Write MODEL_DIR as a GGUF file for llama.cpp, with its tokenizer: a plain llama (K*L
    layers), or llama.cpp's looped nanbeige architecture (K layers shared by L loops)."""
    from ..gguf_export import check_exportable, export_looped
    from ..gguf_export import export_gguf as export
    from ..tokenizer import TOKENIZER_FILE

    model = LoopedLM.from_pretrained(model_dir)
    check_exportable(model, looped)
    looped = export_looped(model, looped)
    if dtype is None:
        dtype = "q8_0" if model.config.quantization == "q8_0" else "f32"
    tokenizer = Path(model_dir) / TOKENIZER_FILE
    export(model, out_file, dtype=dtype, tokenizer_json=tokenizer if tokenizer.is_file() else None,
           name=Path(model_dir).resolve().name, looped=looped)
    vocab = "with its tokenizer" if tokenizer.is_file() else "no tokenizer (token ids only)"
    c = model.config
    if looped:
        norm = "final norm closing every loop" if c.loop_norm else "final norm once"
        layout = f"nanbeige (looped), {c.n_unique_layers} layers x {c.n_loops} loops, {norm}"
    else:
        layout = f"llama, {c.n_virtual_layers} layers"
    click.echo(f"wrote {out_file} ({layout}, {dtype}, {vocab})")


@click.command()
@click.argument("model_dir")
@click.argument("out_dir")
@click.option("--dtype", type=click.Choice(["int8"]), default="int8", show_default=True,
              help="int8: llama.cpp's q8_0 (blocks of 32 weights with a float16 scale) for every layer's "
                   "projections and the LM head; norms and embeddings stay float32.")
@click.option("--force", is_flag=True, help="Replace a model already in OUT_DIR.")
def quantize(model_dir, out_dir, dtype, force) -> None:
    """Write MODEL_DIR (a speedec model or an imported checkpoint) with 8-bit weights to OUT_DIR,
    with its tokenizer and chat files; every command loads OUT_DIR as it is."""
    import os
    import shutil
    import tempfile

    from ..bundled import resolve_model_dir
    from ..errors import ConfigError, ModelLoadError
    from ..quant import quantize_model
    from ..storage import copy_companions

    source, out = Path(resolve_model_dir(model_dir)), Path(out_dir)
    if out.resolve() == source.resolve():
        raise click.UsageError("OUT_DIR must differ from MODEL_DIR")
    if out.exists() and not force:
        raise click.UsageError(f"{out} already exists; pass --force to replace it")
    model = LoopedLM.from_pretrained(source)
    if model.config.quantization is not None:
        raise ConfigError(f"{source} is already quantized ({model.config.quantization})")
    quantized = quantize_model(model)
    del model
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside OUT_DIR and moved in whole: an interrupted run leaves no half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        quantized.save_pretrained(staging)
        copy_companions(source, staging)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError as exc:
        raise ModelLoadError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    click.echo(f"wrote {out} (q8_0 weights, {size / 1e6:.1f} MB on disk)")
