"""Saving and loading encoder-decoder models: ``config.json`` + ``model.safetensors``.

Same files, same atomic writes (:func:`speedec.storage.atomic_write`) and the
same consistency check as decoder-only models, under a format name of its
own, so neither loader mistakes the other's directory for one of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ConfigError, ModelLoadError
from ..storage import CONFIG_FILE, WEIGHTS_FILE, atomic_write, atomic_write_text, load_weights
from .config import EncDecConfig
from .model import EncDecLM

FORMAT = "speedec-encdec-lm"
FORMAT_VERSION = 1


def _config_json(config: EncDecConfig) -> str:
    return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **config.to_dict()},
                      indent=2) + "\n"


def save_pretrained(model: EncDecLM, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Contiguous, unshared copies: safetensors refuses aliased tensors; a tied
    # LM head is the embedding and is not stored twice.
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    config_text = _config_json(model.config)
    # The weights carry the config too: a save interrupted between the two
    # renames leaves files that disagree, which loading detects.
    atomic_write(directory / WEIGHTS_FILE,
                 lambda tmp: save_file(tensors, str(tmp), metadata={"speedec_config": config_text}))
    atomic_write_text(directory / CONFIG_FILE, config_text)
    return directory


def load_config(directory: str | Path) -> EncDecConfig:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {directory} does not exist or is not a directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing (not a speedec model directory?)") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
        raise ModelLoadError(
            f"{path} is not a speedec encoder-decoder config (no \"format\": \"{FORMAT}\")")
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ModelLoadError(f"{path} has format_version {version!r}; this speedec reads {FORMAT_VERSION}")
    try:
        return EncDecConfig.from_dict(data)
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def from_pretrained(directory: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> EncDecLM:
    directory = Path(directory)
    config = load_config(directory)
    return load_weights(EncDecLM(config), directory, dtype=dtype, device=device)
