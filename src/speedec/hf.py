"""Export to a Hugging Face Llama checkpoint, the independent reference.

A looped model with K unique layers and L loops is exactly a plain Llama with
K * L layers whose weights repeat with period K. The export writes that plain
model (``config.json`` + ``model.safetensors``) without needing
``transformers``; ``transformers.LlamaForCausalLM.from_pretrained`` loads it.
The tensor names are :class:`LlamaConversion`'s table
(:mod:`speedec.conversion`), which also reads such a checkpoint back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .conversion import Conversion, Fused
from .model import LoopedLM
from .storage import CONFIG_FILE, WEIGHTS_FILE, atomic_write, atomic_write_text

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


def decoder_config(model: LoopedLM, architecture: str, model_type: str, num_hidden_layers: int) -> dict:
    """The ``config.json`` fields a Hugging Face decoder of ``model``'s shapes has in common
    with any other (Llama, Ouro)."""
    c = model.config
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": _DTYPE_NAMES.get(model.dtype, "float32"),
        "use_cache": True,
    }


def hf_config(model: LoopedLM) -> dict:
    c = model.config
    return {
        **decoder_config(model, "LlamaForCausalLM", "llama", c.n_virtual_layers),
        # Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
    }


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


def export_hf(model: LoopedLM, directory: str | Path) -> Path:
    """Write ``model`` as a Hugging Face checkpoint in ``directory``: an Ouro checkpoint
    for an ``architecture = "ouro"`` model, else a plain Llama."""
    if model.config.architecture == "ouro":
        from .ouro import export_ouro

        return export_ouro(model, directory)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = LlamaConversion.from_ours(model)
    atomic_write(directory / WEIGHTS_FILE,
                 lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(hf_config(model), indent=2) + "\n")
    return directory
