"""Checkpoint conversion by table: an external architecture's tensor names against ours.

One :class:`Conversion` subclass per external architecture holds its table:

* ``globals``: tensors outside the layers, our name -> theirs;
* ``layer``: the tensors of one layer, our name (under ``layers.{k}.``) ->
  theirs (under ``layer_prefix`` with their layer index), or a :class:`Fused`
  where one tensor of ours stacks several of theirs along dim 0 (speedec fuses
  q/k/v and gate/up);
* ``unrolled``: whether their layer ``i`` is our *virtual* layer ``i`` (every
  unique layer stored once per loop, as in a plain Llama with K * L layers)
  or our unique layer ``i`` (a looped checkpoint that stores K layers);
* ``not_exported`` / ``not_imported``: prefixes of tensors one side has and
  the other deliberately does without.

:meth:`Conversion.from_ours` and :meth:`Conversion.to_ours` read the same
table in opposite directions (export, import), and both are strict: a tensor
that has no place in the table is an error, never silently dropped. Adding
an architecture is adding a table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .config import ModelConfig
from .errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class Fused:
    """One tensor of ours made of several of theirs, stacked along dim 0 in this order."""

    # Their names (under the layer prefix), in stacking order.
    parts: tuple[str, ...]
    # Rows of each part, from our config.
    rows: Callable[[ModelConfig], tuple[int, ...]]


class Conversion:
    """The table of one external architecture (see the module docstring)."""

    # The architecture's name, as errors say it.
    name: ClassVar[str]
    globals: ClassVar[dict[str, str]]
    # Their prefix of layer i's tensors, with "{i}" for the index.
    layer_prefix: ClassVar[str]
    layer: ClassVar[dict[str, str | Fused]]
    unrolled: ClassVar[bool]
    # Prefixes of our tensors that the architecture has no place for and that the
    # final output does not depend on: left out of an export.
    not_exported: ClassVar[tuple[str, ...]] = ()
    # Prefixes of their tensors that speedec has no use for: left out of an import.
    not_imported: ClassVar[tuple[str, ...]] = ()
    # Endings of their tensor names left out of an import (stored buffers speedec
    # recomputes, such as a rotary table's inverse frequencies).
    not_imported_suffixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def their_layers(cls, config: ModelConfig) -> int:
        return config.n_virtual_layers if cls.unrolled else config.n_unique_layers

    @classmethod
    def _parts(cls, i: int, theirs: str | Fused) -> list[str]:
        prefix = cls.layer_prefix.format(i=i)
        return [prefix + part for part in (theirs.parts if isinstance(theirs, Fused) else (theirs,))]

    @classmethod
    def from_ours(cls, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Our model's tensors under their names (contiguous CPU copies, ready to save)."""
        out = cls.their_views(model)
        # safetensors needs separate, contiguous storage for every name.
        return {name: t.detach().to("cpu").contiguous().clone() for name, t in out.items()}

    @classmethod
    def their_shapes(cls, model: torch.nn.Module) -> dict[str, torch.Size]:
        """The shape of every tensor of theirs that ``model``'s config implies."""
        return {name: t.shape for name, t in cls.their_views(model).items()}

    @classmethod
    def their_views(cls, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Our model's tensors under their names, as views (no copies)."""
        config, state = model.config, model.state_dict()
        placed = {*cls.globals, *(f"layers.{k}.{ours}" for k in range(config.n_unique_layers) for ours in cls.layer)}
        unplaced = [n for n in state if n not in placed and not n.startswith(cls.not_exported)]
        if unplaced:
            raise ConfigError(f"a {cls.name} checkpoint has no place for {', '.join(unplaced)}")
        out = {theirs: state[ours] for ours, theirs in cls.globals.items() if ours in state}
        for i in range(cls.their_layers(config)):
            k = i % config.n_unique_layers
            for ours, theirs in cls.layer.items():
                tensor = state[f"layers.{k}.{ours}"]
                pieces = tensor.split(theirs.rows(config)) if isinstance(theirs, Fused) else (tensor,)
                out.update(zip(cls._parts(i, theirs), pieces))
        return out

    @classmethod
    def to_ours(cls, tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """Their tensors as our state dict for ``config``; a ModelLoadError names a missing,
        misshapen or unplaced tensor, or (unrolled) a layer that is not a copy of its unique layer."""
        out = {ours: tensors[theirs] for ours, theirs in cls.globals.items() if theirs in tensors}
        used = {cls.globals[ours] for ours in out}
        K = config.n_unique_layers
        for i in range(cls.their_layers(config)):
            for ours, theirs in cls.layer.items():
                names = cls._parts(i, theirs)
                missing = [n for n in names if n not in tensors]
                if missing:
                    raise ModelLoadError(f"the {cls.name} checkpoint lacks {', '.join(missing)}")
                used.update(names)
                if isinstance(theirs, Fused):
                    rows = theirs.rows(config)
                    for name, n in zip(names, rows):
                        if tensors[name].shape[0] != n:
                            raise ModelLoadError(f"{name} has {tensors[name].shape[0]} rows, the config says {n}")
                    tensor = torch.cat([tensors[n] for n in names])
                else:
                    tensor = tensors[names[0]]
                key = f"layers.{i % K}.{ours}"
                if i < K:
                    out[key] = tensor
                elif not torch.equal(out[key], tensor):
                    raise ModelLoadError(f"{names[0]} differs from layer {i % K}'s: not a looped model "
                                         f"with {K} unique layers")
        unused = sorted(n for n in set(tensors) - used
                        if not n.startswith(cls.not_imported) and not n.endswith(cls.not_imported_suffixes))
        if unused:
            raise ModelLoadError(f"no place in speedec for {cls.name} tensor(s) {', '.join(unused[:5])}")
        return out

    @classmethod
    def load(cls, model: torch.nn.Module, directory: Path, *, dtype: torch.dtype | None,
             device: str | torch.device) -> torch.nn.Module:
        """Fill ``model`` from the checkpoint in ``directory`` (``model.safetensors`` or
        shards) in ``dtype`` (None: the checkpoint's own, see :func:`checkpoint_dtype`);
        a missing, misshapen or unplaced tensor is a ModelLoadError naming its file.

        ``model`` may be built on the meta device (no memory): it is then materialised in
        ``dtype`` on ``device`` before the tensors are copied in, so a bf16 checkpoint never
        takes a float32 copy's memory on its way in. The rotary table is computed, never
        read from the checkpoint."""
        from .model.looped import model_rope_table
        from .storage import CONFIG_FILE, read_hf_tensors

        tensors, sources, where = read_hf_tensors(directory)
        if dtype is None:
            dtype = checkpoint_dtype(tensors, directory)
        expected = cls.their_shapes(model)
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ModelLoadError(f"{where} lacks tensor(s): {', '.join(missing[:5])}")
        for name, shape in expected.items():
            if tensors[name].shape != shape:
                raise ModelLoadError(f"{sources[name]}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                     f"{directory / CONFIG_FILE} says {tuple(shape)}")
        try:
            state = cls.to_ours(tensors, model.config)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{where}: {exc}") from None
        del tensors
        if model.device.type == "meta":
            model = model.to(dtype=dtype).to_empty(device=device)
            model.rope = model_rope_table(model.config).to(dtype=dtype, device=device)
        else:
            model = model.to(dtype=dtype, device=device)
        model.load_state_dict(state)
        return model.eval()

    @classmethod
    def save(cls, model: torch.nn.Module, directory: str | Path, config: dict) -> Path:
        """Write ``model``'s tensors under their names (``model.safetensors``) and the
        ``config.json`` ``config`` to ``directory``, each atomically."""
        from safetensors.torch import save_file

        from .storage import CONFIG_FILE, WEIGHTS_FILE, atomic_write, atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = cls.from_ours(model)
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return directory


def checkpoint_dtype(tensors: Mapping[str, torch.Tensor], directory: Path) -> torch.dtype:
    """The dtype a checkpoint is stored in: that of most of its floating-point weights
    (counted in elements), else ``torch_dtype`` / ``dtype`` of its ``config.json``, else float32."""
    from .storage import CONFIG_FILE

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
