"""Export to a Hugging Face checkpoint (``speedec export-hf``, :func:`speedec.export_hf`).

Each architecture writes its own format (:mod:`speedec.architectures`): a plain
Llama with K * L layers for speedec's own models (the independent reference:
``transformers.LlamaForCausalLM.from_pretrained`` loads it), an Ouro or
Nanbeige checkpoint for a model of those architectures.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .architectures import architecture

if TYPE_CHECKING:
    from .model.looped import LoopedLM

__all__ = ["export_hf"]


def export_hf(model: LoopedLM, directory: str | Path) -> Path:
    """Write ``model`` as a Hugging Face checkpoint in ``directory`` in its architecture's
    format: an Ouro or Nanbeige checkpoint for an ``architecture = "ouro"`` or
    ``"nanbeige"`` model, else a plain Llama."""
    return architecture(model.config.architecture).export(model, directory)
