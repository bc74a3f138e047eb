"""Ouro checkpoints (Hugging Face format, ``"model_type": "ouro"``): import and export.

An Ouro model is a looped decoder of ``num_hidden_layers`` unique layers applied
``total_ut_steps`` times, which speedec runs as ``architecture = "ouro"``
(sandwich-norm layers, the final norm at the end of every loop, a readout
without a second norm, an early-exit gate; see ``docs/ouro.md``). The tensor
names are :class:`OuroConversion`'s table; :func:`config_from_hf` maps the
config, :func:`load_weights` fills a model from ``model.safetensors`` or a
sharded checkpoint, and :func:`export_ouro` writes a model back (the tensors
round-trip bit for bit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .conversion import Conversion
from .errors import ConfigError, ModelLoadError
from .hf import LlamaConversion, decoder_config
from .model import LoopedLM, rope_table
from .storage import CONFIG_FILE, WEIGHTS_FILE, atomic_write, atomic_write_text, read_hf_tensors

# The early exit SPEED drafts from in an imported model unless told otherwise.
DEFAULT_EXIT_LOOP = 1


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


def _field(data: dict, path: Path, name: str, default: Any = None, *, required: bool = True) -> Any:
    if name in data and data[name] is not None:
        return data[name]
    if required and default is None:
        raise ModelLoadError(f"{path} has no {name}")
    return default


def config_from_hf(data: dict, path: Path) -> ModelConfig:
    """Our config for the Ouro ``config.json`` ``data`` read from ``path``; a ModelLoadError
    names the file and the field it lacks or that speedec cannot run."""
    if "total_ut_steps" not in data:
        raise ModelLoadError(f"{path} has no total_ut_steps (the number of loops of an Ouro model)")
    hidden = _field(data, path, "hidden_size")
    heads = _field(data, path, "num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        head_dim = data.get("head_dim") or hidden // heads
        if head_dim * heads != hidden:
            raise ModelLoadError(f"{path}: head_dim {head_dim} x {heads} heads != hidden_size {hidden}; "
                                 "speedec needs head_dim = hidden_size / num_attention_heads")
    if data.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: hidden_act {data['hidden_act']!r} is not supported (only silu)")
    if data.get("rope_scaling"):
        raise ModelLoadError(f"{path}: rope_scaling is not supported")
    layer_types = data.get("layer_types") or []
    if data.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise ModelLoadError(f"{path}: sliding-window attention is not supported")
    loops = data["total_ut_steps"]
    exit_loop = DEFAULT_EXIT_LOOP if isinstance(loops, int) and loops > 1 else None
    try:
        return ModelConfig(
            vocab_size=_field(data, path, "vocab_size"), d_model=hidden, n_heads=heads,
            n_kv_heads=_field(data, path, "num_key_value_heads", heads),
            ffn_dim=_field(data, path, "intermediate_size"),
            n_unique_layers=_field(data, path, "num_hidden_layers"), n_loops=loops, exit_loop=exit_loop,
            max_seq_len=_field(data, path, "max_position_embeddings"),
            rope_theta=float(_field(data, path, "rope_theta", 10000.0)),
            norm_eps=float(_field(data, path, "rms_norm_eps", 1e-6)),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)), architecture="ouro")
    except (ConfigError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def load_weights(model: LoopedLM, directory: Path, *, dtype: torch.dtype | None,
                 device: str | torch.device) -> LoopedLM:
    """Fill ``model`` from the Ouro checkpoint in ``directory`` (single file or shards), in
    ``dtype`` (None: the checkpoint's own, see :func:`checkpoint_dtype`); a missing,
    misshapen or unplaced tensor is a ModelLoadError naming its file.

    ``model`` may be built on the meta device (no memory): it is then materialised in
    ``dtype`` on ``device`` before the tensors are copied in, so a bf16 checkpoint never
    takes a float32 copy's memory on its way in."""
    tensors, sources, where = read_hf_tensors(directory)
    if dtype is None:
        dtype = checkpoint_dtype(tensors, directory)
    expected = OuroConversion.their_shapes(model)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ModelLoadError(f"{where} lacks tensor(s): {', '.join(missing[:5])}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ModelLoadError(f"{sources[name]}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                 f"{directory / CONFIG_FILE} says {tuple(shape)}")
    try:
        state = OuroConversion.to_ours(tensors, model.config)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
    del tensors
    if model.device.type == "meta":
        c = model.config
        model = model.to(dtype=dtype).to_empty(device=device)
        model.rope = rope_table(c.max_seq_len, c.head_dim, c.rope_theta).to(dtype=dtype, device=device)
    else:
        model = model.to(dtype=dtype, device=device)
    model.load_state_dict(state)
    return model.eval()


def checkpoint_dtype(tensors: dict[str, torch.Tensor], directory: Path) -> torch.dtype:
    """The dtype a checkpoint is stored in: that of most of its floating-point weights
    (counted in elements), else ``torch_dtype`` / ``dtype`` of its ``config.json``, else float32."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    if counts:
        return max(counts, key=counts.__getitem__)
    try:
        data = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = {}
    name = (data.get("torch_dtype") or data.get("dtype")) if isinstance(data, dict) else None
    found = getattr(torch, name, None) if isinstance(name, str) else None
    return found if isinstance(found, torch.dtype) and found.is_floating_point else torch.float32


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


def export_ouro(model: LoopedLM, directory: str | Path) -> Path:
    """Write an ``architecture = "ouro"`` model as an Ouro checkpoint in ``directory``."""
    if model.config.architecture != "ouro":
        raise ConfigError(f"an Ouro checkpoint needs architecture 'ouro', not {model.config.architecture!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = OuroConversion.from_ours(model)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(hf_config(model), indent=2) + "\n")
    return directory
