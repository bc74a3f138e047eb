"""The options commands share, and the typed objects that carry them.

Options that travel together reach a command as one frozen object: the sampling
options as a :class:`Sampling` named ``sampling``, the speculation options as a
:class:`Speculation` named ``speculation``, --dtype/--device/--threads as a
:class:`Placement` named ``placement``. :func:`option_group` builds such a
decorator: it adds its click options, takes their values out of the command's
keyword arguments and passes the one object in their stead.

Number ranges are worded like the CLI's other errors (``--rounds must be >= 1, got 0``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

import click
import torch

from ..devices import DTYPES, MODEL_DTYPES, parse_device


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


def parameter_names(options: list[Callable]) -> list[str]:
    """The names of the parameters ``options`` declare (as the command receives them)."""
    def probe() -> None:
        pass

    apply_options(options, probe)
    return [param.name for param in probe.__click_params__]


def option_group(cls: type, name: str, options: list[Callable], *,
                 make: Callable[..., object] | None = None) -> Callable:
    """A decorator adding ``options`` (in the order --help shows them) whose values reach
    the command as one ``cls`` object, as the keyword argument ``name``: ``cls(**values)``,
    a dataclass whose fields are the options' parameter names (fields without an option
    keep their defaults), or ``make(**values)`` where the values need more than that."""
    names = parameter_names(options)
    if make is None:
        make = cls
        unknown = set(names) - {field.name for field in fields(cls)}
        if unknown:
            raise TypeError(f"{cls.__name__} has no field for {sorted(unknown)}")

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def command(*args, **kwargs):
            kwargs[name] = make(**{field: kwargs.pop(field) for field in names})
            return func(*args, **kwargs)

        return apply_options(options, command)

    return decorate


# ----------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy at temperature 0, else sampled (``--temperature``,
    ``--top-k``, ``--top-p``, ``--seed``)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def as_kwargs(self) -> dict:
        """The keyword arguments of :func:`~speedec.generate` (and ``translate``) they set."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


sampling_options = option_group(Sampling, "sampling", [
    click.option("--temperature", default=0.0, show_default=True, type=float,
                 help="0 is greedy; above 0 samples (losslessly under speculation)."),
    click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens."),
    click.option("--top-p", type=float, default=None, help="Sample within this probability mass."),
    click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible runs)."),
])


# ----------------------------------------------------------------------------- speculation

@dataclass(frozen=True)
class Speculation:
    """How an engine drafts (``--draft-tokens``, ``--early-correction``, ``--guesses``,
    ``--adaptive``); None and False leave the engine's default, the engine checks the rest."""

    draft_tokens: int | None = None
    early_correction: bool = False
    guesses: int | None = None
    adaptive: bool = False

    def engine_options(self) -> dict:
        """Engine keyword arguments for the options given."""
        options: dict = {}
        if self.draft_tokens is not None:
            options["draft_tokens"] = self.draft_tokens
        if self.early_correction:
            options["early_correction"] = True
        if self.guesses is not None:
            options["guesses"] = self.guesses
        if self.adaptive:
            options["adaptive"] = True
        return options


speculation_options = option_group(Speculation, "speculation", [
    click.option("--draft-tokens", type=int, default=None, help="Guesses per round (self-speculative)."),
    click.option("--early-correction", is_flag=True,
                 help="speed: replace a guess as soon as a later loop predicts otherwise."),
    click.option("--guesses", type=int, default=None,
                 help="speed: candidates launched per guess (the best as the guess, the rest as spares)."),
    click.option("--adaptive", is_flag=True,
                 help="speed: choose how many candidates to launch (none included) from measured "
                      "acceptance and step costs."),
])


# ----------------------------------------------------------------------------- placement

@dataclass(frozen=True)
class Placement:
    """Where and how a model runs: its weights' dtype (a ``--dtype`` name; None: the
    checkpoint's own), its device and PyTorch's CPU threads (None: PyTorch's choice)."""

    dtype: str | None = None
    device: str = "cpu"
    threads: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else MODEL_DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        """The device; a :class:`~speedec.errors.SpeedecError` for an unknown name or a missing GPU."""
        return parse_device(self.device)

    def set_threads(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)


def threads_option(default: int | None = None) -> Callable:
    """``--threads`` (at least 1; None leaves PyTorch's choice)."""
    return click.option("--threads", type=AT_LEAST_ONE, default=default, show_default=default is not None,
                        help="CPU threads for PyTorch.")


dtype_option = click.option("--dtype", default="float32", show_default=True, type=click.Choice(list(DTYPES)))
# --dtype of the commands that load a decoder-only model: default the checkpoint's own.
model_dtype_option = click.option(
    "--dtype", default=None, type=click.Choice(list(MODEL_DTYPES)),
    help="Weights' dtype in memory (default: the checkpoint's own, e.g. bfloat16 for a bf16 "
         "Hugging Face checkpoint, q8_0 for a quantized one; float32 for speedec's own models). "
         "int8: quantize to q8_0 at load (see `speedec quantize`).")
device_option = click.option("--device", default="cpu", show_default=True)


def placement_options(*options: Callable) -> Callable:
    """Some of ``dtype_option`` or ``model_dtype_option``, ``device_option`` and
    ``threads_option(...)``, in the order --help shows them, delivered as one
    :class:`Placement` named ``placement`` (the others at their defaults)."""
    return option_group(Placement, "placement", list(options))


loops_option = click.option(
    "--loops", type=AT_LEAST_ONE, default=None,
    help="Run the model for this many loops (default: the model's; a recurrent-depth model such "
         "as Huginn runs any number of recurrences, e.g. 32; a looped model 1 up to its own).")

exit_loop_option = click.option(
    "--exit-loop", type=AT_LEAST_ONE, default=None,
    help="Loops before the early exit SPEED drafts from (default: the model's; 1 for an imported "
         "checkpoint).")
