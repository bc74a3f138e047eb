"""What the commands share: option decorators, number ranges worded like the
CLI's other errors, model loading, prompt ids and one progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import torch

from ..bundled import resolve_model_dir
from ..devices import DTYPES, MODEL_DTYPES, parse_device
from ..errors import GenerationError
from ..kernels import prepare_kernel
from ..model import LoopedLM


class _Worded:
    """A click number range that fails with ``--rounds must be >= 1, got 0``:
    click checks the range, only the message is the CLI's."""

    number: click.ParamType

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            number = self.number.convert(value, param, ctx)  # not a number: click's own message
            low = self.min is not None and (number <= self.min if self.min_open else number < self.min)
            if low:
                bound = f"> {self.min}" if self.min_open else f">= {self.min}"
            else:
                bound = f"< {self.max}" if self.max_open else f"at most {self.max}"
            name = param.opts[0] if param is not None else "the value"
            raise click.UsageError(f"{name} must be {bound}, got {number}", ctx) from None


class IntRange(_Worded, click.IntRange):
    number = click.INT


class FloatRange(_Worded, click.FloatRange):
    number = click.FLOAT


POSITIVE = FloatRange(min=0, min_open=True)
AT_LEAST_ONE = IntRange(min=1)


def apply_options(options: list[Callable], func: Callable) -> Callable:
    """Decorate ``func`` with click options, listed in the order --help shows them."""
    for option in reversed(options):
        func = option(func)
    return func


def threads_option(default: int | None = None) -> Callable:
    """``--threads`` (at least 1; None leaves PyTorch's choice)."""
    return click.option("--threads", type=AT_LEAST_ONE, default=default, show_default=default is not None,
                        help="CPU threads for PyTorch.")


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


dtype_option = click.option("--dtype", default="float32", show_default=True, type=click.Choice(list(DTYPES)))
# --dtype of the commands that load a decoder-only model: default the checkpoint's own.
model_dtype_option = click.option(
    "--dtype", default=None, type=click.Choice(list(MODEL_DTYPES)),
    help="Weights' dtype in memory (default: the checkpoint's own, e.g. bfloat16 for a bf16 "
         "Hugging Face checkpoint, q8_0 for a quantized one; float32 for speedec's own models). "
         "int8: quantize to q8_0 at load (see `speedec quantize`).")
device_option = click.option("--device", default="cpu", show_default=True)


def speculation_options(func: Callable) -> Callable:
    """``--draft-tokens``, ``--early-correction``, ``--guesses``, ``--adaptive``
    (read them back with :func:`engine_options`)."""
    return apply_options([
        click.option("--draft-tokens", type=int, default=None, help="Guesses per round (self-speculative)."),
        click.option("--early-correction", is_flag=True,
                     help="speed: replace a guess as soon as a later loop predicts otherwise."),
        click.option("--guesses", type=int, default=None,
                     help="speed: candidates launched per guess (the best as the guess, the rest as spares)."),
        click.option("--adaptive", is_flag=True,
                     help="speed: choose how many candidates to launch (none included) from measured "
                          "acceptance and step costs."),
    ], func)


def engine_options(draft_tokens: int | None, early_correction: bool, guesses: int | None,
                   adaptive: bool) -> dict:
    """Engine keyword arguments for the options given (the engine checks them)."""
    options: dict = {}
    if draft_tokens is not None:
        options["draft_tokens"] = draft_tokens
    if early_correction:
        options["early_correction"] = True
    if guesses is not None:
        options["guesses"] = guesses
    if adaptive:
        options["adaptive"] = True
    return options


def sampling_options(func: Callable) -> Callable:
    """``--temperature``, ``--top-k``, ``--top-p``, ``--seed``."""
    return apply_options([
        click.option("--temperature", default=0.0, show_default=True, type=float,
                     help="0 is greedy; above 0 samples (losslessly under speculation)."),
        click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens."),
        click.option("--top-p", type=float, default=None, help="Sample within this probability mass."),
        click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible runs)."),
    ], func)


exit_loop_option = click.option(
    "--exit-loop", type=AT_LEAST_ONE, default=None,
    help="Loops before the early exit SPEED drafts from (default: the model's; 1 for an imported "
         "checkpoint).")


def load_model(model: str | None, dtype: str | None, device: str,
               exit_loop: int | None = None) -> tuple[Path, LoopedLM]:
    """The model directory (the bundled model when None; a Hugging Face model id's cached
    or downloaded snapshot: :func:`~speedec.bundled.resolve_model_dir`) and its model,
    kernel prepared; ``dtype`` None: the checkpoint's own; ``exit_loop`` replaces the
    model's early exit."""
    directory = resolve_model_dir(model)
    loaded = LoopedLM.from_pretrained(directory, dtype=None if dtype is None else MODEL_DTYPES[dtype],
                                      device=parse_device(device), exit_loop=exit_loop)
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
