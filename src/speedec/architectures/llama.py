"""Llama: speedec's own architecture (``architecture = "llama"``, the default) and its
Hugging Face export, the independent reference.

Pre-norm layers (:class:`~speedec.model.layer.LoopedLayer`), the final norm once
before the head, no early-exit gate, float64 rotary angles. A looped model with
K unique layers and L loops is exactly a plain Llama with K * L layers whose
weights repeat with period K. The export writes that plain model (``config.json``
+ ``model.safetensors``) without needing ``transformers``;
``transformers.LlamaForCausalLM.from_pretrained`` loads it. The tensor names are
:class:`LlamaConversion`'s table (:mod:`speedec.conversion`), which also reads
such a checkpoint back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import ModelConfig
from ..conversion import Conversion, Fused
from ..model.layer import LoopedLayer
from .base import Architecture, decoder_config

if TYPE_CHECKING:
    from ..model.looped import LoopedLM


def _attention_rows(c: ModelConfig) -> tuple[int, int, int]:
    return c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim


class LlamaConversion(Conversion):
    """transformers' ``LlamaForCausalLM``: every virtual layer stored as a layer of its own."""

    name = "llama"
    globals = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "lm_head": "lm_head.weight"}  # lm_head only when untied
    layer_prefix = "model.layers.{i}."
    layer = {
        "attn_norm.weight": "input_layernorm.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "wqkv": Fused(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                      _attention_rows),
        "wo": "self_attn.o_proj.weight",
        "w_gate_up": Fused(("mlp.gate_proj.weight", "mlp.up_proj.weight"), lambda c: (c.ffn_dim, c.ffn_dim)),
        "w_down": "mlp.down_proj.weight",
    }
    unrolled = True
    # The exit readout only reads drafts at the early exit; the final output does not use it.
    not_exported = ("exit_readout.",)


def hf_config(model: LoopedLM) -> dict:
    """A plain Llama ``config.json`` for ``model`` (K * L layers)."""
    c = model.config
    return {
        **decoder_config(model, "LlamaForCausalLM", "llama", c.n_virtual_layers),
        # Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
    }


LLAMA = Architecture(name="llama", layer=LoopedLayer, conversion=LlamaConversion, hf_config=hf_config,
                     checkpoint_title="a Llama")
