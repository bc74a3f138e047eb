"""What an architecture is to speedec: an :class:`Architecture` description, and the
``config.json`` fields every Hugging Face decoder shares (:func:`decoder_config`).

An architecture is the layer and loop variant a :class:`~speedec.model.looped.LoopedLM`
runs (``ModelConfig.architecture``) together with the checkpoint format it is
written in: its layer class, whether the final norm closes every loop, whether
it has an early-exit gate, its rotary table, its checks of a config, and its
:class:`~speedec.conversion.Conversion` table. An imported architecture (one
whose Hugging Face checkpoints speedec loads) also has a ``model_type`` and
reads such a ``config.json`` (``config_from_hf``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ModelConfig
from ..conversion import Conversion
from ..errors import ConfigError, ModelLoadError
from ..model.rotary import rope_table

if TYPE_CHECKING:
    from ..model.looped import LoopedLM

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


def no_loop_norm(config: ModelConfig) -> bool:
    """The final norm runs once, before the head (``loop_norm`` of most architectures)."""
    return False


def every_loop_norm(config: ModelConfig) -> bool:
    """The final norm closes every loop."""
    return True


def refuse_skip_loop_final_norm(config: ModelConfig) -> None:
    """``skip_loop_final_norm`` is a switch of the architectures whose final norm closes
    every loop but may be told not to (nanbeige); any other refuses it."""
    if config.skip_loop_final_norm:
        raise ConfigError(f"skip_loop_final_norm is a nanbeige switch; the {config.architecture} "
                          "architecture has no final norm between loops to skip")


@dataclass(frozen=True)
class Architecture:
    """One architecture (see the module docstring)."""

    # ModelConfig.architecture.
    name: str
    # The class of the model's K unique layers (built from the config).
    layer: type[torch.nn.Module]
    # Tensor names of its Hugging Face checkpoints (speedec.conversion).
    conversion: type[Conversion]
    # The Hugging Face config.json of a model (hf_config(model) -> dict).
    hf_config: Callable[[LoopedLM], dict]
    # How its checkpoints are named in errors: "an Ouro" (checkpoint).
    checkpoint_title: str
    # rope_table(max_len, head_dim, theta) -> [max_len, 2, head_dim]: float64 angles for
    # speedec's own (speedec.model.rotary.rope_table), float32 for imported ones.
    rope_table: Callable[[int, int, float], torch.Tensor] = rope_table
    # Whether the final norm closes every loop (the next loop reads the normed state and
    # the head reads the last loop's without a second norm): loop_norm(config) -> bool.
    loop_norm: Callable[[ModelConfig], bool] = no_loop_norm
    # Whether the model has an early-exit gate (hidden state -> logit of exiting).
    exit_gate: bool = False
    # Raises a ConfigError for a config this architecture cannot be (called by
    # ModelConfig once the fields themselves are valid).
    check_config: Callable[[ModelConfig], None] = refuse_skip_loop_final_norm
    # Imported architectures only: the "model_type" of their Hugging Face config.json,
    # and config_from_hf(data, path) -> ModelConfig (a ModelLoadError names the file).
    model_type: str | None = None
    config_from_hf: Callable[[dict, Path], ModelConfig] | None = None
    # Recurrent-depth architectures (huginn): a prelude and a coda around the looped core,
    # run by their own model class (a LoopedLM subclass); None: LoopedLM itself.
    recurrent_depth: bool = False
    model_class: type | None = None

    @property
    def imported(self) -> bool:
        """Whether speedec loads Hugging Face checkpoints of this architecture."""
        return self.model_type is not None

    def rope(self, config: ModelConfig) -> torch.Tensor:
        """The rotary table of a decoder of ``config``."""
        return self.rope_table(config.max_seq_len, config.head_dim, config.rope_theta)

    def export(self, model: LoopedLM, directory: str | Path) -> Path:
        """Write ``model`` as a Hugging Face checkpoint of this architecture in ``directory``
        (``model.safetensors`` under the conversion table's names, and ``config.json``)."""
        if model.config.architecture != self.name:
            raise ConfigError(f"{self.checkpoint_title} checkpoint needs architecture {self.name!r}, "
                              f"not {model.config.architecture!r}")
        return self.conversion.save(model, directory, self.hf_config(model))

    def load_weights(self, model: LoopedLM, directory: Path, *, dtype: torch.dtype | None,
                     device: str | torch.device) -> LoopedLM:
        """Fill ``model`` from the checkpoint in ``directory`` (see :meth:`Conversion.load`)."""
        return self.conversion.load(model, directory, dtype=dtype, device=device)


def decoder_config(model: LoopedLM, architecture: str, model_type: str, num_hidden_layers: int) -> dict:
    """The ``config.json`` fields a Hugging Face decoder of ``model``'s shapes has in common
    with any other (Llama, Ouro, Nanbeige)."""
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


def hf_field(data: dict, path: Path, name: str, default: Any = None) -> Any:
    """``data[name]`` of a Hugging Face ``config.json`` read from ``path``, else ``default``;
    a ModelLoadError names the file when the field is missing and has no default."""
    if data.get(name) is not None:
        return data[name]
    if default is None:
        raise ModelLoadError(f"{path} has no {name}")
    return default


def decoder_config_from_hf(data: dict, path: Path, *, architecture: str, loops: int, exit_loop: int | None,
                           **fields: Any) -> ModelConfig:
    """Our :class:`ModelConfig` for the fields every Hugging Face decoder's ``config.json``
    shares (sizes, rotary base, norm epsilon, tied head, ``head_dim``: a head width that is
    not ``hidden_size / num_attention_heads`` becomes ``attention_head_dim``), plus an
    architecture's own ``fields``. Refused with the file named: an activation other than
    silu, rope scaling, and any value ModelConfig rejects."""
    if data.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: hidden_act {data['hidden_act']!r} is not supported (only silu)")
    if data.get("rope_scaling"):
        raise ModelLoadError(f"{path}: rope_scaling is not supported")
    hidden = hf_field(data, path, "hidden_size")
    heads = hf_field(data, path, "num_attention_heads")
    head_dim = data.get("head_dim")
    try:
        square = hidden // heads
        return ModelConfig(
            vocab_size=hf_field(data, path, "vocab_size"), d_model=hidden, n_heads=heads,
            n_kv_heads=hf_field(data, path, "num_key_value_heads", heads),
            ffn_dim=hf_field(data, path, "intermediate_size"),
            n_unique_layers=hf_field(data, path, "num_hidden_layers"), n_loops=loops, exit_loop=exit_loop,
            max_seq_len=hf_field(data, path, "max_position_embeddings"),
            rope_theta=float(hf_field(data, path, "rope_theta", 10000.0)),
            norm_eps=float(hf_field(data, path, "rms_norm_eps", 1e-6)),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)), architecture=architecture,
            attention_head_dim=None if head_dim in (None, square) else head_dim, **fields)
    except (ConfigError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
