"""What the commands share besides their options (:mod:`.options`): model loading,
prompt ids, comma-separated lists and one progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..bundled import resolve_model_dir
from ..errors import GenerationError
from ..kernels import prepare_kernel
from ..model import LoopedLM
from .options import Placement


def load_model(model: str | None, placement: Placement,
               exit_loop: int | None = None, loops: int | None = None) -> tuple[Path, LoopedLM]:
    """The model directory (the bundled model when None; a Hugging Face model id's cached
    or downloaded snapshot: :func:`~speedec.bundled.resolve_model_dir`) and its model,
    kernel prepared, in the placement's dtype (None: the checkpoint's own) on its device;
    ``exit_loop`` replaces the model's early exit, ``loops`` its depth (``at_depth``)."""
    directory = resolve_model_dir(model)
    loaded = LoopedLM.from_pretrained(directory, dtype=placement.torch_dtype,
                                      device=placement.torch_device, exit_loop=exit_loop, loops=loops)
    prepare_kernel(loaded)
    return directory, loaded


def parse_ids(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise GenerationError(f"--prompt-ids must be comma-separated integers, got {text!r}")
    try:
        return [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise GenerationError(f"--prompt-ids: {bad!r} is not an integer") from None


def split_list(text: str) -> list[str]:
    """The non-empty items of a comma-separated option."""
    return [item.strip() for item in text.split(",") if item.strip()]


@contextmanager
def progress_bar(total: int, desc: str, unit: str = "run") -> Iterator[Callable[[str], None]]:
    """A progress bar on stderr, gone when done; yields ``progress(message)``, to call once per unit."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False) as bar:
        def progress(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)
        yield progress
