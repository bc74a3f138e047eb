"""Model directories: ``config.json`` + ``model.safetensors``, written atomically,
read through one registry of formats (and Hugging Face checkpoints of the
architectures in :data:`IMPORTED`).

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

from .architectures import IMPORTED as IMPORTED_ARCHITECTURES
from .errors import ConfigError, ModelLoadError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# A sharded Hugging Face checkpoint's index: {"weight_map": {tensor name: shard file}}.
INDEX_FILE = "model.safetensors.index.json"


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


@dataclass(frozen=True)
class ImportedFormat:
    """A Hugging Face architecture speedec imports: a ``config.json`` whose
    ``"model_type"`` is ``model_type``, read into the ``reads`` format's classes."""

    model_type: str
    # The speedec format whose model class runs it.
    reads: ModelFormat
    # What reads it (an imported speedec.architectures.base.Architecture):
    # config_from_hf(data, path) -> config and load_weights(model, directory, dtype=, device=) -> model.
    reader: Any


# Hugging Face checkpoints speedec loads, by their config's "model_type": the imported
# architectures of speedec.architectures (the registry), each run by a LoopedLM.
IMPORTED: dict[str, ImportedFormat] = {
    model_type: ImportedFormat(model_type, LOOPED_LM, arch) for model_type, arch in IMPORTED_ARCHITECTURES.items()
}


# Files of a model directory besides its weights and config that a derived copy (a
# quantized model, a fitted exit readout, an export) keeps: tokenizer, chat template,
# generation defaults, model card.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "README.md")


def copy_companions(source: str | Path, out: str | Path) -> list[str]:
    """Copy ``source``'s :data:`COMPANION_FILES` into ``out`` (each atomically); the names copied."""
    import shutil

    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        return []
    copied = []
    for name in COMPANION_FILES:
        if (source / name).is_file():
            atomic_write(out / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
            copied.append(name)
    return copied


def is_imported(directory: str | Path) -> bool:
    """Whether ``directory`` holds a Hugging Face checkpoint of an imported architecture
    (its ``config.json`` has a ``model_type`` and no speedec ``format``)."""
    data = _peek_config(Path(directory))
    return isinstance(data, dict) and "format" not in data and "model_type" in data


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
    if name is None and isinstance(data, dict) and "model_type" in data:
        fmt, config, _ = _read_imported(path, data, expected, None)
        return fmt, config
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


def _read_imported(path: Path, data: dict, expected: ModelFormat | None,
                   exit_loop: int | None) -> tuple[ModelFormat, Any, ImportedFormat]:
    """The format and config of a Hugging Face ``config.json`` of an imported architecture."""
    model_type = data["model_type"]
    imported = IMPORTED.get(model_type) if isinstance(model_type, str) else None
    if imported is None:
        raise ModelLoadError(f"{path} has model_type {model_type!r}; speedec imports "
                             f"{', '.join(IMPORTED)} checkpoints and its own models")
    if expected is not None and expected is not imported.reads:
        raise ModelLoadError(f"{path} is not a {expected.description} (a {model_type} checkpoint)")
    config = imported.reader.config_from_hf(data, path)
    if exit_loop is not None:
        config = config.replace(exit_loop=exit_loop)
    return imported.reads, config, imported


def read_hf_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path], Path]:
    """The tensors of a Hugging Face checkpoint: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` names. Returns the tensors, the file each came from and
    the file that describes them all (for errors); every problem is a ModelLoadError naming a file."""
    index = directory / INDEX_FILE
    if not index.is_file():
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing (and there is no {INDEX_FILE})")
        tensors = _read_safetensors(path)
        return tensors, dict.fromkeys(tensors, path), path
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if Path(shard).name != shard:
            raise ModelLoadError(f"{index} names shard {shard!r} outside the model directory")
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing (a shard named by {index})")
        for name, tensor in _read_safetensors(path).items():
            if weight_map.get(name) != shard:
                raise ModelLoadError(f"{path} holds {name}, which {index} places elsewhere")
            tensors[name], sources[name] = tensor, path
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise ModelLoadError(f"{index} names tensor(s) its shards lack: {', '.join(absent[:5])}")
    return tensors, sources, index


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is truncated or corrupt: {exc}") from None


def load_config(directory: str | Path, expected: ModelFormat | None = LOOPED_LM):
    """The config of a model directory of the ``expected`` format (decoder-only unless told;
    None: any registered format)."""
    return read_config(directory, expected)[1]


def from_pretrained(directory: str | Path, expected: ModelFormat | None = LOOPED_LM, *,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    exit_loop: int | None = None, loops: int | None = None):
    """The model saved in ``directory``, of the ``expected`` format (decoder-only unless
    told; None: whichever registered format the directory holds), or the Hugging Face
    checkpoint of an imported architecture there. A string that is no directory but a
    Hugging Face Hub id (``owner/name[@revision]``) loads that model's snapshot from the
    local cache, downloaded first when online (:func:`speedec.bundled.resolve_model_dir`). ``exit_loop`` replaces the config's
    early exit (decoder-only models). ``dtype`` None: the checkpoint's own dtype for an
    imported checkpoint (a bf16 one stays bf16: no float32 copy is made), float32 for
    speedec's own models. ``loops``: run the model for that many loops (recurrences, for a
    recurrent-depth model any number; see ``at_depth``)."""
    if isinstance(directory, str) and not Path(directory).exists():
        from .bundled import resolve_model_dir  # a Hugging Face Hub id: its snapshot

        directory = resolve_model_dir(directory)
    directory = Path(directory)
    if loops is not None:  # the exit is set once the depth is
        model = from_pretrained(directory, expected, dtype=dtype, device=device)
        return _at_depth(model, loops, exit_loop)
    data = _peek_config(directory)
    quantize = dtype == torch.int8  # q8_0 weights (speedec.quant), quantized from the float ones
    if isinstance(data, dict) and "format" not in data and "model_type" in data:
        fmt, config, imported = _read_imported(directory / CONFIG_FILE, data, expected, exit_loop)
        with torch.device("meta"):  # no memory (nor random init) until the weights' dtype is known
            skeleton = fmt.model_class(config)
        model = imported.reader.load_weights(skeleton, directory, dtype=None if quantize else dtype, device=device)
        return _quantized(model) if quantize else model
    fmt, config = read_config(directory, expected)
    stored = getattr(config, "quantization", None)
    if stored is not None and dtype not in (None, torch.int8, torch.float32):
        raise ModelLoadError(f"{directory} holds {stored} weights, which run with float32 activations; "
                             f"load it without a dtype (or int8), not {str(dtype).replace('torch.', '')}")
    float_dtype = torch.float32 if quantize or dtype is None else dtype
    model = load_weights(fmt.model_class(config), directory, dtype=float_dtype, device=device)
    if quantize and stored is None:
        model = _quantized(model)
    if exit_loop is not None and exit_loop != config.exit_loop:
        model.config = model.config.replace(exit_loop=exit_loop)
    return model


def _at_depth(model, loops: int | None, exit_loop: int | None):
    """``model`` run for ``loops`` loops (recurrences), with ``exit_loop`` when given."""
    if loops is None:
        return model
    try:
        model = model.at_depth(loops)
        if exit_loop is not None and exit_loop != model.config.exit_loop:
            model.config = model.config.replace(exit_loop=exit_loop)
    except ConfigError as exc:
        raise ModelLoadError(f"cannot run the model at {loops} loops: {exc}") from None
    return model


def _quantized(model):
    """``model`` in q8_0 (speedec.quant); a model that cannot be is a ModelLoadError."""
    from .quant import quantize_model

    try:
        return quantize_model(model)
    except ConfigError as exc:
        raise ModelLoadError(f"cannot load the model as int8: {exc}") from None


def _peek_config(directory: Path) -> Any:
    """``config.json`` as JSON, or None when it cannot be read (read_config then says why)."""
    try:
        return json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


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
    if "embed.qs" in expected and "embed.weight" in tensors and "embed.qs" not in tensors:
        # A q8_0 model written before its embedding was 8-bit too: quantize it as loaded.
        from .quant import Q8Weight

        embedding = Q8Weight.from_float(tensors.pop("embed.weight"))
        tensors["embed.qs"], tensors["embed.d"] = embedding.qs, embedding.d
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
    if getattr(config, "quantization", None) is not None:
        from .quant import check_q8_tensors, quantized_names

        problem = check_q8_tensors(tensors, quantized_names(model), path)
        if problem is not None:
            raise ModelLoadError(problem)
        model.requires_grad_(False)  # a quantized model is for inference
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
