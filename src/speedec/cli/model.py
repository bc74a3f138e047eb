"""Model directories: ``speedec init`` (random weights), ``speedec export-hf`` and ``export-gguf``."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import PRESET_RESIDUAL_SCALE, ModelConfig, preset
from ..model import LoopedLM
from .common import POSITIVE


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
    imported model in its own architecture's format."""
    import shutil

    from ..hf import export_hf as export
    from ..tokenizer import TOKENIZER_FILE

    model = LoopedLM.from_pretrained(model_dir)
    export(model, out_dir)
    tokenizer = Path(model_dir) / TOKENIZER_FILE
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, Path(out_dir) / TOKENIZER_FILE)
    if model.config.architecture == "llama":
        click.echo(f"wrote {out_dir} (LlamaForCausalLM, {model.config.n_virtual_layers} layers)")
    else:
        click.echo(f"wrote {out_dir} ({model.config.architecture}: {model.config.n_unique_layers} layers x "
                   f"{model.config.n_loops} loops)")


@click.command("export-gguf")
@click.argument("model_dir")
@click.argument("out_file")
@click.option("--dtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True,
              help="Weight type of the matrices (norms stay f32; q8_0 writes f16 where rows do not "
                   "split into blocks of 32).")
def export_gguf(model_dir, out_file, dtype) -> None:
    """Write MODEL_DIR as a llama GGUF file (K*L layers) for llama.cpp, with its tokenizer."""
    from ..gguf_export import check_exportable
    from ..gguf_export import export_gguf as export
    from ..tokenizer import TOKENIZER_FILE

    model = LoopedLM.from_pretrained(model_dir)
    check_exportable(model)
    tokenizer = Path(model_dir) / TOKENIZER_FILE
    export(model, out_file, dtype=dtype, tokenizer_json=tokenizer if tokenizer.is_file() else None,
           name=Path(model_dir).resolve().name)
    vocab = "with its tokenizer" if tokenizer.is_file() else "no tokenizer (token ids only)"
    click.echo(f"wrote {out_file} (llama, {model.config.n_virtual_layers} layers, {dtype}, {vocab})")
