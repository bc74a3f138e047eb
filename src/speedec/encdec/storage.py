"""Encoder-decoder model directories: the ``speedec-encdec-lm`` format of :mod:`speedec.storage`.

Saving and loading are :mod:`speedec.storage`'s, as for decoder-only models;
these names only fix the expected format for the encoder-decoder's callers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import storage
from ..storage import ENCDEC_LM, save_pretrained
from .config import EncDecConfig

__all__ = ["from_pretrained", "load_config", "save_pretrained"]


def load_config(directory: str | Path) -> EncDecConfig:
    return storage.load_config(directory, ENCDEC_LM)


def from_pretrained(directory: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu"):
    return storage.from_pretrained(directory, ENCDEC_LM, dtype=dtype, device=device)
