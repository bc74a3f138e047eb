"""Saving and loading models: ``config.json`` + ``model.safetensors``, atomically.

Each file is written to a temporary name in the target directory and renamed
over the old one, so an interrupted save never leaves a half-written file.
The weights file also carries the config in its metadata; loading checks that
both agree, so a save interrupted between the two renames is detected, not
silently mixed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import ConfigError, ModelLoadError
from .model import LoopedLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "speedec-looped-lm"
FORMAT_VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _config_json(model: LoopedLM) -> str:
    return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                       **model.config.to_dict()}, indent=2) + "\n"


def save_pretrained(model: LoopedLM, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Contiguous, unshared copies: safetensors refuses aliased tensors, and the
    # tied LM head is simply the embedding (not stored twice).
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    config_text = _config_json(model)
    metadata = {"speedec_config": config_text}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write_text(directory / CONFIG_FILE, config_text)
    return directory


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
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
        raise ModelLoadError(f"{path} is not a speedec model config (no \"format\": \"{FORMAT}\")")
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ModelLoadError(f"{path} has format_version {version!r}; this speedec reads {FORMAT_VERSION}")
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def from_pretrained(directory: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> LoopedLM:
    directory = Path(directory)
    config = load_config(directory)
    return load_weights(LoopedLM(config), directory, dtype=dtype, device=device)


def load_weights(model, directory: Path, *, dtype: torch.dtype, device: str | torch.device):
    """Fill ``model`` (built from the directory's config) from its ``model.safetensors``.

    Shared by every model family: a missing, corrupt, mismatched-config or
    wrongly-shaped weights file is a ModelLoadError that names it.
    """
    config = model.config
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is truncated or corrupt: {exc}") from None
    stored = metadata.get("speedec_config")
    if stored is not None:
        stored_dict = _stored_config(stored)
        if stored_dict != config.to_dict():
            raise ModelLoadError(
                f"{path} was saved with a different config than {directory / CONFIG_FILE} "
                "(interrupted save or mixed files)")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ModelLoadError(f"{path} lacks tensor(s): {', '.join(missing[:5])}")
    if unexpected:
        raise ModelLoadError(f"{path} has unexpected tensor(s): {', '.join(unexpected[:5])}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ModelLoadError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, config says "
                f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors)
    return model.to(dtype=dtype, device=device).eval()


def _stored_config(text: str) -> dict | None:
    """The config a weights file was saved with (formatting aside); None if unreadable."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(data, dict):
        data.pop("format", None)
        data.pop("format_version", None)
    return data
