"""Nanbeige (``architecture = "nanbeige"``; Hugging Face ``"model_type": "nanbeige"``):
its hooks and its checkpoints.

A Nanbeige model (Nanbeige4.2-3B: 22 layers run twice) is a looped decoder of
``num_hidden_layers`` pre-norm Llama layers applied ``num_loops`` times, which
speedec runs as ``architecture = "nanbeige"``: Llama's layers
(:class:`~speedec.model.layer.LoopedLayer`), and the final norm at the end of
every loop (its output is what the next loop reads, and the head reads the last
loop's without a second norm) unless ``skip_loop_final_norm``, when the final
norm runs once before the head; float32 rotary angles as in the reference. The
attention heads are ``head_dim`` wide whatever ``hidden_size /
num_attention_heads`` is (``attention_head_dim``), and a non-empty
``loop_loss_weights`` means ``len + 1`` loops, as in the reference. Switches
that need weights or code speedec does not have are refused by name
(:data:`UNSUPPORTED`). See ``docs/nanbeige.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ModelConfig
from ..conversion import Conversion
from ..errors import ConfigError, ModelLoadError
from ..model.layer import LoopedLayer
from ..model.rotary import float32_rope_table
from .base import Architecture, decoder_config, decoder_config_from_hf
from .llama import LlamaConversion

if TYPE_CHECKING:
    from ..model.looped import LoopedLM

# The early exit SPEED drafts from in an imported model unless told otherwise:
# the state between the first and the second loop.
DEFAULT_EXIT_LOOP = 1

# Config switches of the reference that change the computation and that speedec does
# not implement: loading such a checkpoint is refused with the switch named, never
# run without it. (Released Nanbeige4.2 checkpoints leave all of them off.)
UNSUPPORTED = (
    "enable_double_loop_split", "loop_share_kv", "enable_hyper_connection", "enable_mhc",
    "enable_h_res_identity", "mhc_diff_for_loop", "enable_depth_attention", "qk_layernorm",
    "attention_bias", "mlp_bias", "loop_middle_layers", "ngram_insert_all_layers", "insert_ngram_layer_idx",
    # n-gram embeddings (on in the reference when these three are set)
    "emb_neighbor_num", "emb_split_num", "ngram_vocab_size_ratio",
)


class NanbeigeConversion(Conversion):
    """``NanbeigeForCausalLM``: each unique layer stored once, Llama's tensor names."""

    name = "nanbeige"
    globals = dict(LlamaConversion.globals)
    layer_prefix = LlamaConversion.layer_prefix
    layer = dict(LlamaConversion.layer)
    unrolled = False
    # The exit readout (fitted by `speedec train-exit`) only reads drafts.
    not_exported = ("exit_readout.",)
    # Some checkpoints store the rotary table's inverse frequencies; speedec computes them.
    not_imported_suffixes = ("rotary_emb.inv_freq",)


def num_loops(data: dict, path: Path) -> int:
    """The reference's loop count: ``len(loop_loss_weights) + 1`` when that list is
    non-empty, else ``num_loops`` (default 1)."""
    weights = data.get("loop_loss_weights") or []
    if not isinstance(weights, list):
        raise ModelLoadError(f"{path}: loop_loss_weights must be a list, got {weights!r}")
    if weights:
        return len(weights) + 1
    loops = data.get("num_loops", 1)
    if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
        raise ModelLoadError(f"{path}: num_loops must be an integer >= 1, got {loops!r}")
    return loops


def config_from_hf(data: dict, path: Path) -> ModelConfig:
    """Our config for the Nanbeige ``config.json`` ``data`` read from ``path``; a
    ModelLoadError names the file and the field it lacks or that speedec cannot run."""
    for name in UNSUPPORTED:
        if data.get(name):
            raise ModelLoadError(f"{path}: {name} = {data[name]!r} is not supported by speedec "
                                 "(only the released Nanbeige4.2 architecture is)")
    skip = data.get("skip_loop_final_norm", False)
    if not isinstance(skip, bool):
        raise ModelLoadError(f"{path}: skip_loop_final_norm must be true or false, got {skip!r}")
    loops = num_loops(data, path)
    return decoder_config_from_hf(data, path, architecture="nanbeige", loops=loops,
                                  exit_loop=DEFAULT_EXIT_LOOP if loops > 1 else None, skip_loop_final_norm=skip)


def hf_config(model: LoopedLM) -> dict:
    """A Nanbeige ``config.json`` for ``model``."""
    c = model.config
    return {
        **decoder_config(model, "NanbeigeForCausalLM", "nanbeige", c.n_unique_layers),
        "num_loops": c.n_loops,
        "loop_loss_weights": [],
        "skip_loop_final_norm": c.skip_loop_final_norm,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
    }


def loop_norm(config: ModelConfig) -> bool:
    """The final norm closes every loop unless ``skip_loop_final_norm``."""
    return not config.skip_loop_final_norm


def check_config(config: ModelConfig) -> None:
    """Nanbeige has no per-loop embedding."""
    if config.loop_embedding:
        raise ConfigError("the nanbeige architecture has no loop_embedding")


NANBEIGE = Architecture(name="nanbeige", layer=LoopedLayer, conversion=NanbeigeConversion, hf_config=hf_config,
                        checkpoint_title="a Nanbeige", rope_table=float32_rope_table, loop_norm=loop_norm,
                        check_config=check_config, model_type="nanbeige", config_from_hf=config_from_hf)
