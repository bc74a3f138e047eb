"""Export to a Hugging Face Llama checkpoint, the independent reference.

A looped model with K unique layers and L loops is exactly a plain Llama with
K * L layers whose weights repeat with period K. The export writes that plain
model (``config.json`` + ``model.safetensors``) without needing
``transformers``; ``transformers.LlamaForCausalLM.from_pretrained`` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import LoopedLM
from .storage import atomic_write, atomic_write_text

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


def hf_config(model: LoopedLM) -> dict:
    c = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_virtual_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta.
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": _DTYPE_NAMES.get(model.dtype, "float32"),
        "use_cache": True,
    }


def hf_state_dict(model: LoopedLM) -> dict[str, torch.Tensor]:
    """Llama tensor names, one copy of the unique layer's weights per virtual layer."""
    c = model.config
    H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_embeddings:
        out["lm_head.weight"] = model.head_weight
    for v in range(c.n_virtual_layers):
        layer = model.layers[v % c.n_unique_layers]
        p = f"model.layers.{v}."
        out[p + "input_layernorm.weight"] = layer.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = layer.mlp_norm.weight
        out[p + "self_attn.q_proj.weight"] = layer.wqkv[: H * hd]
        out[p + "self_attn.k_proj.weight"] = layer.wqkv[H * hd: (H + Hkv) * hd]
        out[p + "self_attn.v_proj.weight"] = layer.wqkv[(H + Hkv) * hd:]
        out[p + "self_attn.o_proj.weight"] = layer.wo
        out[p + "mlp.gate_proj.weight"] = layer.w_gate_up[: c.ffn_dim]
        out[p + "mlp.up_proj.weight"] = layer.w_gate_up[c.ffn_dim:]
        out[p + "mlp.down_proj.weight"] = layer.w_down
    # safetensors needs separate, contiguous storage for every name.
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in out.items()}


def export_hf(model: LoopedLM, directory: str | Path) -> Path:
    """Write ``model`` as a Hugging Face Llama checkpoint in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    atomic_write(directory / "model.safetensors",
                 lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(directory / "config.json", json.dumps(hf_config(model), indent=2) + "\n")
    return directory
