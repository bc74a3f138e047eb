"""The default model shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError


def bundled_model_dir() -> Path | None:
    """The model shipped inside the package, if this install has one."""
    path = Path(__file__).parent / "assets" / "default-model"
    return path if (path / "config.json").is_file() else None


def resolve_model_dir(model: str | None) -> Path:
    if model is not None:
        return Path(model)
    bundled = bundled_model_dir()
    if bundled is None:
        raise ModelLoadError("no --model given and this install has no bundled model")
    return bundled
