"""Model directories: ``config.json`` + ``model.safetensors``, written atomically,
read through one registry of formats.

``config.json`` names its format (``"format"`` and ``"format_version"``);
:data:`FORMATS` maps each format to the config class and the model class that
read it: decoder-only models (``speedec-looped-lm``) and encoder-decoder
translators (``speedec-encdec-lm``). Saving and loading are the same for every
format; a loader told which format to expect refuses a directory of another,
so neither family mistakes the other's directory for one of its own.

Each file is written to a temporary name in the target directory and renamed
over the old one, so an interrupted save never leaves a half-written file.
The weights file also carries the config in its metadata; loading checks that
both agree, so a save interrupted between the two renames is detected, not
silently mixed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import ConfigError, ModelLoadError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, fsync, then rename over
    ``path`` (readable by all, as a plainly written file would be)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> str:
    """Write UTF-8 text atomically; return its sha256 (manifests record it)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ModelFormat:
    """One kind of model directory and the classes that read it."""

    # The "format" field of config.json.
    name: str
    # The "format_version" this speedec writes and reads.
    version: int
    # What a directory of another format is said not to be, e.g. "speedec model config".
    description: str
    # "module:attribute" of the config class (from_dict / to_dict) and of the model
    # class (built from a config); imported when first used, so that loading one
    # family does not import the others.
    config_class_path: str
    model_class_path: str

    @property
    def config_class(self) -> Any:
        return _import(self.config_class_path)

    @property
    def model_class(self) -> Any:
        return _import(self.model_class_path)


def _import(path: str) -> Any:
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


LOOPED_LM = ModelFormat("speedec-looped-lm", 1, "speedec model config",
                        "speedec.config:ModelConfig", "speedec.model:LoopedLM")
ENCDEC_LM = ModelFormat("speedec-encdec-lm", 1, "speedec encoder-decoder config",
                        "speedec.encdec.config:EncDecConfig", "speedec.encdec.model:EncDecLM")
FORMATS: dict[str, ModelFormat] = {f.name: f for f in (LOOPED_LM, ENCDEC_LM)}


def format_of(model: torch.nn.Module) -> ModelFormat:
    """The registered format a model is saved in."""
    for fmt in FORMATS.values():
        if isinstance(model, fmt.model_class):
            return fmt
    raise TypeError(f"no model format is registered for {type(model).__name__}")


def _config_json(fmt: ModelFormat, config) -> str:
    return json.dumps({"format": fmt.name, "format_version": fmt.version, **config.to_dict()}, indent=2) + "\n"


def save_pretrained(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of any registered model family."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Contiguous, unshared copies: safetensors refuses aliased tensors, and a
    # tied LM head is simply the embedding (not stored twice).
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    config_text = _config_json(format_of(model), model.config)
    metadata = {"speedec_config": config_text}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write_text(directory / CONFIG_FILE, config_text)
    return directory


def read_config(directory: str | Path, expected: ModelFormat | None = None) -> tuple[ModelFormat, Any]:
    """The format and config of a model directory: ``expected``'s, or (None) whichever
    registered format ``config.json`` names. Every problem is a ModelLoadError naming the file."""
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
    name = data.pop("format", None) if isinstance(data, dict) else None
    if expected is not None:
        if name != expected.name:
            raise ModelLoadError(f"{path} is not a {expected.description} (no \"format\": \"{expected.name}\")")
        fmt = expected
    elif isinstance(name, str) and name in FORMATS:
        fmt = FORMATS[name]
    else:
        raise ModelLoadError(f"{path} names no speedec model format (\"format\": one of {', '.join(FORMATS)})")
    version = data.pop("format_version", None)
    if version != fmt.version:
        raise ModelLoadError(f"{path} has format_version {version!r}; this speedec reads {fmt.version}")
    try:
        return fmt, fmt.config_class.from_dict(data)
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def load_config(directory: str | Path, expected: ModelFormat | None = LOOPED_LM):
    """The config of a model directory of the ``expected`` format (decoder-only unless told;
    None: any registered format)."""
    return read_config(directory, expected)[1]


def from_pretrained(directory: str | Path, expected: ModelFormat | None = LOOPED_LM, *,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The model saved in ``directory``, of the ``expected`` format (decoder-only unless
    told; None: whichever registered format the directory holds)."""
    directory = Path(directory)
    fmt, config = read_config(directory, expected)
    return load_weights(fmt.model_class(config), directory, dtype=dtype, device=device)


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
