"""TrainConfig: a frozen, validated description of one training run.

:class:`RecipeConfig` holds what every kind of run shares (optimiser,
schedule, budget, loss weights, observation) and its JSON round trip;
:class:`TrainConfig` adds a decoder-only model and its text files, and
:class:`speedec.encdec.TranslationConfig` a translator and a parallel corpus.

A run is fully determined by its config: the model (a shape, a preset or an
existing model directory to continue from), the data files, the optimiser
and schedule, and the seed. Runtime-only fields (where to log, how often to
save, how many threads) may change when a run is resumed; everything else
must not, or the resumed run would silently be a different run.

Batch semantics: ``batch_size`` is the *global* number of sequences per
optimizer step, summed over data-parallel ranks and accumulation
micro-batches. Each rank takes ``batch_size / world_size`` of them in
``grad_accum`` micro-batches, so changing the number of processes or the
accumulation changes the speed of a run, not its mathematics.

Paths in a config file are taken relative to the current directory (run
from the repository root), like paths given on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from ..config import ModelConfig, preset
from ..errors import ConfigError, TrainingError

# Fields that only change how a run is executed or observed, not what it
# computes: they may differ between a run and its resumption.
RUNTIME_FIELDS = frozenset({"out_dir", "eval_every", "eval_batches", "log_every", "save_every",
                            "threads", "description"})

DEVICES = ("auto", "cpu", "cuda")

# Schedules of the intermediate readouts' loss weights (speedec.training.loss).
SCHEDULES = ("constant", "ramp", "curriculum")


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    """The training recipe every kind of run shares: optimiser, schedule, budget,
    early-exit loss weights, observation and runtime fields, their validation and
    their JSON round trip.

    Subclasses add the model and the data (:class:`TrainConfig` for decoder-only
    models, :class:`speedec.encdec.TranslationConfig` for translation), name the
    class of their ``model`` field in ``MODEL_CLASS`` and extend
    ``__post_init__``.
    """

    # The class of the ``model`` field (parsed from a JSON object by from_dict).
    MODEL_CLASS: ClassVar[type] = ModelConfig

    # Tokenizer (tokenizer.json) used to encode the data; it is copied into the
    # final model directory.
    tokenizer: str
    # Run directory: metrics.jsonl, checkpoint/, and model/ at the end.
    out_dir: str
    # Global examples per optimizer step (sequences, or sentence pairs).
    batch_size: int = 16
    # Peak and final learning rate; linear warmup then cosine decay.
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    # Length of the run: exactly one of optimizer steps or training tokens.
    max_steps: int | None = None
    max_tokens: int | None = None
    # AdamW (decay on matrices only, not on norm gains).
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    # Global gradient-norm clip; null for none.
    grad_clip: float | None = 1.0
    # Loss = CE(final) + sum over loops l = 1..L-1 of s_l(step) * w_l * CE(readout after l)
    #        + draft_weight * distill(final -> exit readout), with
    # w_l = exit_weight [l = exit_loop] + all_loops_weight / (L - 1) + loop_weights[l - 1]
    # (see speedec.training.loss).
    exit_weight: float = 0.5
    all_loops_weight: float = 0.0
    # Per-loop supervision weights of the readouts after loops 1..L-1 (L - 1
    # numbers, e.g. rising with depth); null: none.
    loop_weights: list[float] | None = None
    # Schedule s_l(step) of the intermediate readouts' weights: "constant", "ramp"
    # (0 -> 1 across the window) or "curriculum" (LayerSkip-style: the deepest
    # readout switched on at the window's start, the exit last).
    exit_schedule: str = "constant"
    # [start, end] of the schedule as fractions of the run; null: [0, 1].
    exit_schedule_window: list[float] | None = None
    # Weight of the exit readout's distillation loss (models with exit_readout_rank;
    # trains only the readout: the shared layers get no gradient from it).
    draft_weight: float = 1.0
    # Standard deviation of the random init (ignored with init_from).
    init_std: float = 0.02
    # Observation: log training loss every log_every steps; evaluate on
    # eval_batches global batches of validation every eval_every steps (and
    # at the end); checkpoint every save_every steps (and at the end).
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 8
    save_every: int = 500
    seed: int = 0
    # CPU threads per process (null: PyTorch's default).
    threads: int | None = None
    # "auto" (CUDA when available), "cpu" or "cuda".
    device: str = "auto"
    # Free text: why this config exists (not used by training).
    description: str = ""

    def __post_init__(self) -> None:
        for name in ("tokenizer", "out_dir"):
            check_path(name, getattr(self, name))
        for name in ("batch_size", "log_every", "eval_every", "eval_batches", "save_every"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if (self.max_steps is None) == (self.max_tokens is None):
            raise TrainingError("give exactly one of max_steps or max_tokens")
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, minimum=1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1)
        for name in ("lr", "init_std"):
            _check_number(name, getattr(self, name), positive=True)
        for name in ("min_lr", "weight_decay", "exit_weight", "all_loops_weight", "draft_weight"):
            _check_number(name, getattr(self, name), positive=False)
        if self.min_lr > self.lr:
            raise TrainingError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check_number(name, value, positive=False)
            if not value < 1:
                raise TrainingError(f"{name} must be in [0, 1), got {value}")
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, positive=True)
        if self.loop_weights is not None:
            if not isinstance(self.loop_weights, (list, tuple)) or not self.loop_weights:
                raise TrainingError(f"loop_weights must be a list of numbers (one per loop 1..L-1) or "
                                    f"null, got {self.loop_weights!r}")
            for value in self.loop_weights:
                _check_number("loop_weights entries", value, positive=False)
        if self.exit_schedule not in SCHEDULES:
            raise TrainingError(f"exit_schedule must be one of {', '.join(SCHEDULES)}, "
                                f"got {self.exit_schedule!r}")
        if self.exit_schedule_window is not None:
            window = self.exit_schedule_window
            if (not isinstance(window, (list, tuple)) or len(window) != 2
                    or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in window)
                    or not 0 <= window[0] < window[1] <= 1):
                raise TrainingError("exit_schedule_window must be [start, end] with "
                                    f"0 <= start < end <= 1 (fractions of the run), got {window!r}")
        if self.device not in DEVICES:
            raise TrainingError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not isinstance(self.description, str):
            raise TrainingError(f"description must be a string, got {self.description!r}")

    def check_warmup(self, total_steps: int) -> None:
        """Warmup must end before the run does."""
        if self.warmup_steps >= total_steps:
            raise TrainingError(f"warmup_steps ({self.warmup_steps}) must be smaller than the "
                                f"number of steps ({total_steps})")

    def check_loss_weights(self, model_config) -> None:
        """The loss terms must exist in ``model_config`` (an early exit, several loops)."""
        if self.exit_weight > 0 and model_config.exit_loop is None:
            raise TrainingError("exit_weight > 0 needs a model with an early exit "
                                "(this one has exit_loop null); set exit_weight to 0")
        if self.all_loops_weight > 0 and model_config.n_loops == 1:
            raise TrainingError("all_loops_weight > 0 needs n_loops > 1; set it to 0")
        if self.loop_weights is not None and len(self.loop_weights) != model_config.n_loops - 1:
            raise TrainingError(f"loop_weights must have n_loops - 1 = {model_config.n_loops - 1} "
                                f"entries (loops 1..{model_config.n_loops - 1}), got {len(self.loop_weights)}")
        if self.exit_schedule == "curriculum" and model_config.n_loops < 2:
            raise TrainingError("exit_schedule curriculum needs n_loops > 1")

    # ------------------------------------------------------- (de)serialise
    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if data.get("model") is not None:
            data["model"] = data["model"].to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any):
        if not isinstance(data, dict):
            raise TrainingError(f"a training config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainingError(f"unknown training config field(s): {', '.join(unknown)}")
        required = sorted(f.name for f in fields(cls) if f.default is dataclasses.MISSING)
        missing = [name for name in required if name not in data]
        if missing:
            raise TrainingError(f"missing training config field(s): {', '.join(missing)}")
        data = dict(data)
        if isinstance(data.get("model"), dict):
            try:
                data["model"] = cls.MODEL_CLASS.from_dict(data["model"])
            except ConfigError as exc:
                raise TrainingError(f"model: {exc}") from None
        try:
            return cls(**data)
        except ConfigError as exc:  # e.g. a preset's own validation
            raise TrainingError(str(exc)) from None

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None):
        """Load a JSON config; ``overrides`` (e.g. from the command line) replace its fields."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainingError(f"training config {path} does not exist") from None
        except OSError as exc:
            raise TrainingError(f"cannot read training config {path}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TrainingError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise TrainingError(f"{path}: a training config must be a JSON object")
        data.update(overrides or {})
        try:
            return cls.from_dict(data)
        except TrainingError as exc:
            raise TrainingError(f"{path}: {exc}") from None

    def differences(self, other: RecipeConfig) -> list[str]:
        """Names of the non-runtime fields whose values differ (why a resume is refused)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(name for name in mine if name not in RUNTIME_FIELDS and mine[name] != theirs.get(name))


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RecipeConfig):
    """A decoder-only run: a looped decoder trained on windows of running text."""

    # Plain UTF-8 text of the training and validation splits.
    train_file: str
    val_file: str
    # Where the model comes from: exactly one of a shape (random init), a
    # named preset (random init), or a saved model directory (its weights).
    model: ModelConfig | None = None
    preset: str | None = None
    init_from: str | None = None
    # Tokens per training sequence (the window is seq_len + 1 tokens long).
    seq_len: int = 256
    # Micro-batches per rank and step (gradients accumulated over them);
    # batch_size counts sequences, summed over ranks and micro-batches.
    grad_accum: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("train_file", "val_file"):
            check_path(name, getattr(self, name))
        check_model_sources(self, ("model", "preset", "init_from"), ModelConfig)
        for name in ("seq_len", "grad_accum"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.batch_size % self.grad_accum:
            raise TrainingError(f"batch_size ({self.batch_size}) must be divisible by "
                                f"grad_accum ({self.grad_accum})")
        self.check_warmup(self.total_steps)

    # ------------------------------------------------------------ derived
    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run (a token budget is rounded up to whole steps)."""
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.max_tokens / self.tokens_per_step)

    def resolve_model_config(self) -> ModelConfig:
        """The shape of the model to train, checked against the loss and sequence length."""
        if self.model is not None:
            config = self.model
        elif self.preset is not None:
            try:
                config = preset(self.preset)
            except ConfigError as exc:
                raise TrainingError(str(exc)) from None
        else:
            from ..storage import load_config

            try:
                config = load_config(self.init_from)
            except Exception as exc:  # ModelLoadError: a user's bad path
                raise TrainingError(f"init_from: {exc}") from None
        if self.seq_len > config.max_seq_len:
            raise TrainingError(f"seq_len ({self.seq_len}) exceeds the model's max_seq_len "
                                f"({config.max_seq_len})")
        self.check_loss_weights(config)
        return config


def check_path(name: str, value: Any) -> None:
    """A config field that names a file or directory must be a non-empty string."""
    if not isinstance(value, str) or not value:
        raise TrainingError(f"{name} must be a non-empty path, got {value!r}")


def check_model_sources(config: RecipeConfig, names: tuple[str, ...], model_class: type) -> None:
    """Exactly one of the model sources ``names`` is set; a shape has the right class."""
    sources = [name for name in names if getattr(config, name) is not None]
    if len(sources) != 1:
        choices = [f"{names[0]} (a shape)", *names[1:]]
        raise TrainingError(f"give exactly one of {', '.join(choices[:-1])} or {choices[-1]}, got "
                            + (", ".join(sources) if sources else "none"))
    model = getattr(config, "model", None)
    if model is not None and not isinstance(model, model_class):
        raise TrainingError(f"model must be a {model_class.__name__}, got {type(model).__name__}")
    for name in names:
        value = getattr(config, name)
        if name != "model" and value is not None and (not isinstance(value, str) or not value):
            raise TrainingError(f"{name} must be a non-empty string, got {value!r}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrainingError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise TrainingError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrainingError(f"{name} must be a number, got {value!r}")
    if positive and not value > 0:
        raise TrainingError(f"{name} must be positive, got {value}")
    if not positive and value < 0:
        raise TrainingError(f"{name} must be >= 0, got {value}")
