"""Checkpoints that survive being killed at any moment.

Layout of ``out_dir/checkpoint/``::

    latest                 one line: the name of the current checkpoint
    step-00001000/         the current checkpoint
        config.json, model.safetensors   (the model, as save_pretrained writes it)
        tokenizer.json
        train_config.json                (the config of the run)
        training_state.pt                (step, optimizer, RNG states)

A save writes a complete new directory under a temporary name, fsyncs it,
renames it to ``step-N`` and only then switches ``latest`` (an atomic file
replace). Until that switch, ``latest`` names the previous, untouched
checkpoint; after it, the new one is complete. Directories left by an
interrupted save are never named by ``latest`` and are removed by the next
save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TrainingError
from ..model import LoopedLM
from ..storage import atomic_write, atomic_write_text
from ..tokenizer import TOKENIZER_FILE
from .config import RecipeConfig, TrainConfig

CHECKPOINT_DIR = "checkpoint"
POINTER_FILE = "latest"
STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
_STEP_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs to continue exactly."""

    # Optimizer steps completed (also the data position and the schedule position).
    step: int
    # Training tokens consumed so far (all ranks).
    tokens_seen: int
    # Seconds of training so far (for throughput and ETA after a resume).
    elapsed_s: float
    # ``optimizer.state_dict()``.
    optimizer: dict
    # Random generator states (see :func:`capture_rng`).
    rng: dict


@dataclass
class Checkpoint:
    # The checkpoint directory.
    path: Path
    # The model (a LoopedLM, or an EncDecLM for translation runs) and the run's config.
    model: torch.nn.Module
    state: TrainingState
    config: RecipeConfig


# ------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch generator states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    rng = {"python": random.getstate(),
           "numpy": [name, keys.tolist(), pos, has_gauss, cached],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ----------------------------------------------------------------- save
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_pointer(root: Path) -> str | None:
    """The name ``latest`` points to, or None when there is no checkpoint yet."""
    try:
        name = (root / POINTER_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return name or None


def write_training_state(directory: Path, state: TrainingState) -> None:
    payload = {"step": state.step, "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed_s,
               "optimizer": state.optimizer, "rng": state.rng}
    atomic_write(directory / STATE_FILE, lambda tmp: torch.save(payload, tmp))


def write_checkpoint_files(directory: Path, model: torch.nn.Module, state: TrainingState,
                           config: RecipeConfig, tokenizer_file: Path) -> None:
    """All files of one checkpoint, each fsynced, into ``directory``."""
    model.save_pretrained(directory)
    atomic_write(directory / TOKENIZER_FILE, lambda tmp: shutil.copyfile(tokenizer_file, tmp))
    atomic_write_text(directory / TRAIN_CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    write_training_state(directory, state)


def switch_pointer(root: Path, name: str) -> None:
    """Make ``name`` the latest checkpoint: the commit point of a save (one atomic replace)."""
    atomic_write_text(root / POINTER_FILE, name + "\n")
    _fsync_dir(root)


def remove_stale(root: Path, keep: str | None) -> None:
    """Delete temporary and superseded checkpoint directories (all but ``keep``)."""
    for entry in root.iterdir():
        stale = entry.name.startswith(_TMP_PREFIX) or (
            entry.name.startswith(_STEP_PREFIX) and entry.name != keep)
        if stale and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def save_checkpoint(root: str | Path, model: torch.nn.Module, state: TrainingState, config: RecipeConfig,
                    tokenizer_file: str | Path) -> Path:
    """Write checkpoint ``step-N`` under ``root`` and make it the latest; returns its path.

    ``model`` is any model with ``save_pretrained`` (decoder-only or encoder-decoder).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{_STEP_PREFIX}{state.step:08d}"
    current = read_pointer(root)
    if current == name:
        return root / name  # this step is already saved
    remove_stale(root, keep=current)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
    try:
        write_checkpoint_files(tmp, model, state, config, Path(tokenizer_file))
        _fsync_dir(tmp)
        os.replace(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    switch_pointer(root, name)  # until here `latest` names the previous checkpoint
    remove_stale(root, keep=name)
    return root / name


# ----------------------------------------------------------------- load
def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory ``latest`` names, or None when ``root`` holds no checkpoint."""
    root = Path(root)
    name = read_pointer(root)
    if name is None:
        return None
    path = root / name
    if not path.is_dir():
        raise TrainingError(f"{root / POINTER_FILE} names {name}, which does not exist")
    return path


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", model_cls: type = LoopedLM,
                    config_cls: type = TrainConfig) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint`.

    ``model_cls`` (with ``from_pretrained``) and ``config_cls`` (with
    ``from_dict``) are the kinds of model and run config it holds; the
    defaults are the decoder-only ones.
    """
    path = Path(path)
    try:
        model = model_cls.from_pretrained(path, device=device)
        config = config_cls.from_dict(json.loads((path / TRAIN_CONFIG_FILE).read_text(encoding="utf-8")))
        payload = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except TrainingError as exc:
        raise TrainingError(f"checkpoint {path}: {exc}") from None
    except Exception as exc:  # missing or corrupt files: a one-line message, not a traceback
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingError(f"checkpoint {path} is unreadable: {first_line}") from None
    state = TrainingState(step=payload["step"], tokens_seen=payload["tokens_seen"],
                          elapsed_s=payload["elapsed_s"], optimizer=payload["optimizer"],
                          rng=payload["rng"])
    return Checkpoint(path=path, model=model.train(), state=state, config=config)
