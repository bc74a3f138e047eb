"""Ouro (``architecture = "ouro"``; Hugging Face ``"model_type": "ouro"``): its layer,
its hooks, its checkpoints.

An Ouro model is a looped decoder of ``num_hidden_layers`` unique layers applied
``total_ut_steps`` times: sandwich-norm layers (:class:`SandwichLayer`), the
final norm at the end of every loop (so the head reads the state without a
second norm), an early-exit gate, float32 rotary angles as in the reference;
see ``docs/ouro.md``. The tensor names are :class:`OuroConversion`'s table;
:func:`config_from_hf` maps the config, and :data:`OURO` (its
:class:`~speedec.architectures.base.Architecture`) fills a model from
``model.safetensors`` or a sharded checkpoint and writes a model back (the
tensors round-trip bit for bit).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig
from ..conversion import Conversion
from ..errors import ConfigError, ModelLoadError
from ..model.layer import LoopedLayer
from ..model.norms import RMSNorm
from ..model.rotary import float32_rope_table
from .base import (
    Architecture,
    decoder_config,
    decoder_config_from_hf,
    every_loop_norm,
    refuse_skip_loop_final_norm,
)
from .llama import LlamaConversion

if TYPE_CHECKING:
    from ..model.looped import LoopedLM

# The early exit SPEED drafts from in an imported model unless told otherwise.
DEFAULT_EXIT_LOOP = 1


class SandwichLayer(LoopedLayer):
    """A layer whose branch outputs are normalised before they join the residual
    stream (sandwich norms, the ``"ouro"`` architecture):
    ``x + attn_out_norm(attention)``, then ``x + mlp_out_norm(mlp)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.attn_out_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp_out_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend) -> torch.Tensor:
        x = x + self.attn_out_norm(self.attention_branch(x, cos, sin, attend))
        return x + self.mlp_out_norm(self.mlp_branch(x))


class OuroConversion(Conversion):
    """``OuroForCausalLM``: each unique layer stored once, plus the early-exit gate."""

    name = "ouro"
    globals = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "lm_head": "lm_head.weight",  # only when untied
               "exit_gate.weight": "model.early_exit_gate.weight",
               "exit_gate.bias": "model.early_exit_gate.bias"}
    layer_prefix = "model.layers.{i}."
    layer = {**LlamaConversion.layer,
             "attn_out_norm.weight": "input_layernorm_2.weight",
             "mlp_out_norm.weight": "post_attention_layernorm_2.weight"}
    unrolled = False


def check_config(config: ModelConfig) -> None:
    """Ouro has no per-loop embedding, no exit readout and no switch for its loop norm."""
    if config.loop_embedding or config.exit_readout_rank is not None:
        raise ConfigError("the ouro architecture has no loop_embedding or exit_readout_rank")
    refuse_skip_loop_final_norm(config)


def config_from_hf(data: dict, path: Path) -> ModelConfig:
    """Our config for the Ouro ``config.json`` ``data`` read from ``path``; a ModelLoadError
    names the file and the field it lacks or that speedec cannot run."""
    if "total_ut_steps" not in data:
        raise ModelLoadError(f"{path} has no total_ut_steps (the number of loops of an Ouro model)")
    layer_types = data.get("layer_types") or []
    if data.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise ModelLoadError(f"{path}: sliding-window attention is not supported")
    loops = data["total_ut_steps"]
    exit_loop = DEFAULT_EXIT_LOOP if isinstance(loops, int) and loops > 1 else None
    return decoder_config_from_hf(data, path, architecture="ouro", loops=loops, exit_loop=exit_loop)


def hf_config(model: LoopedLM) -> dict:
    """An Ouro ``config.json`` for ``model``."""
    c = model.config
    return {
        **decoder_config(model, "OuroForCausalLM", "ouro", c.n_unique_layers),
        "total_ut_steps": c.n_loops,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "layer_types": ["full_attention"] * c.n_unique_layers,
        "early_exit_threshold": 1.0,
    }


OURO = Architecture(name="ouro", layer=SandwichLayer, conversion=OuroConversion, hf_config=hf_config,
                    checkpoint_title="an Ouro", rope_table=float32_rope_table, loop_norm=every_loop_norm,
                    exit_gate=True, check_config=check_config, model_type="ouro", config_from_hf=config_from_hf)
