"""Fit the exit readout (the drafter) of a trained model, its trunk frozen.

SPEED verifies every draft against the final loop, so the drafter can be
fitted (or refitted, with another rank or at another exit loop) after the
model is trained without touching what the model computes: only the
readout's parameters change, by distillation towards the final loop's
distribution on training text. A fresh readout starts as the shared exit
(adapter off, the final norm's gains), so fitting starts from the shared
exit's agreement and the report shows before and after on validation.

What does not depend on the data is shared with translators
(:mod:`speedec.encdec.exit_fit`, which fits on sentence pairs): the settings,
:func:`with_readout`, the optimisation loop (:func:`fit_readout`) and
:func:`save_fitted`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, TrainingError
from ..model import LoopedLM, LoopedModelBase
from ..tokenizer import Tokenizer
from .data import check_tokens, evaluation_windows, load_tokens, training_batch
from .evaluate import loop_metrics
from .loss import distillation
from .schedule import CosineSchedule


@dataclass(frozen=True)
class ExitFitSettings:
    # Rank of the readout's adapter; None: keep the model's (or 64 if it has none).
    rank: int | None = None
    # Loop of the early exit; None: keep the model's.
    exit_loop: int | None = None
    # Optimizer steps, sequences per step (a translator: sentence pairs), tokens per
    # sequence (not used for a translator, whose sequences are whole sentence pairs).
    steps: int = 400
    batch_size: int = 8
    seq_len: int = 256
    # Peak learning rate (AdamW, warmup then cosine) and weight decay of the adapter.
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    # Validation windows scored before and after.
    eval_windows: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainingError(f"lr must be a positive number, got {self.lr!r}")
        if self.warmup_steps >= self.steps:
            raise TrainingError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")


@dataclass(frozen=True)
class ExitFitResult:
    # The model with its fitted readout (float32, eval mode): a LoopedLM, or an EncDecLM.
    model: LoopedModelBase
    # Validation metrics (speedec.training.evaluate.loop_metrics; a translator's:
    # speedec.encdec.evaluate.validation_metrics) before and after fitting;
    # "draft_agreement" is the readout's agreement with the final loop's argmax.
    before: dict
    after: dict
    steps: int
    train_s: float


def with_readout(model: LoopedModelBase, rank: int | None, exit_loop: int | None) -> LoopedModelBase:
    """``model`` itself when its readout already has this rank and exit, else a copy of the
    same class (a decoder-only model or a translator) with the same trunk and a fresh
    readout (equal to the shared exit until fitted)."""
    c = model.config
    if c.n_loops < 2:
        raise TrainingError("the model has a single loop: there is no early exit to fit a readout for")
    rank = rank if rank is not None else (c.exit_readout_rank or 64)
    exit_loop = exit_loop if exit_loop is not None else c.exit_loop
    if rank == c.exit_readout_rank and exit_loop == c.exit_loop:
        return model
    try:
        config = c.replace(exit_readout_rank=rank, exit_loop=exit_loop)
    except ConfigError as exc:  # a rank or exit the shape cannot take
        raise TrainingError(str(exc)) from None
    fresh = type(model)(config).to(model.dtype)
    trunk = {name: t for name, t in model.state_dict().items() if not name.startswith("exit_readout.")}
    missing, unexpected = fresh.load_state_dict(trunk, strict=False)
    assert not unexpected and all(name.startswith("exit_readout.") for name in missing)
    fresh.exit_readout.reset_parameters(fresh.norm, std=0.02,
                                        generator=torch.Generator().manual_seed(config.d_model))
    return fresh.eval()


def fit_readout(model: LoopedModelBase, settings: ExitFitSettings, step_loss: Callable[[int], torch.Tensor], *,
                progress: bool = True) -> float:
    """Train ``model``'s exit readout alone: ``settings.steps`` AdamW steps (warmup then
    cosine) on ``step_loss(step)``, the loss of a training-mode forward on the batch of
    ``step``; every other parameter is frozen meanwhile. Leaves the model in eval mode;
    returns the seconds spent."""
    s = settings
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("exit_readout."))
    params = list(model.exit_readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.95))
    schedule = CosineSchedule(peak=s.lr, minimum=s.lr / 10, warmup_steps=s.warmup_steps, total_steps=s.steps)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=s.steps, unit="step", desc="train-exit", dynamic_ncols=True)
    model.train()
    begin = time.perf_counter()
    try:
        for step in range(s.steps):
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            loss = step_loss(step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")  # deliberate host sync, every 10 steps
    finally:
        if bar is not None:
            bar.close()
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    return time.perf_counter() - begin


def fit_exit_readout(model: LoopedLM, tokenizer: Tokenizer, train_file: str | Path, val_file: str | Path,
                     settings: ExitFitSettings = ExitFitSettings(), *, progress: bool = True) -> ExitFitResult:
    """Fit the exit readout of ``model`` (see the module docstring); the trunk is not changed."""
    s = settings
    model = with_readout(model.float(), s.rank, s.exit_loop)
    seq_len = min(s.seq_len, model.config.max_seq_len)
    train_tokens = load_tokens(train_file, tokenizer)
    check_tokens(train_tokens, seq_len, str(train_file))
    val_tokens = load_tokens(val_file, tokenizer)
    check_tokens(val_tokens, seq_len, str(val_file))
    windows = evaluation_windows(val_tokens, seq_len, s.eval_windows)
    batch = min(s.batch_size, 8)
    before = loop_metrics(model, windows, batch_size=batch)

    def step_loss(step: int) -> torch.Tensor:
        window = training_batch(train_tokens, seq_len=seq_len, batch_size=s.batch_size, seed=s.seed, step=step)
        out = model(window[:, :-1], output_draft=True)
        return distillation(out.draft_logits, out.logits, window[:, 1:])

    train_s = fit_readout(model, s, step_loss, progress=progress)
    after = loop_metrics(model, windows, batch_size=batch)
    return ExitFitResult(model=model, before=before, after=after, steps=s.steps, train_s=train_s)


def save_fitted(result: ExitFitResult, source_dir: Path, out_dir: Path) -> None:
    """Write the fitted model to ``out_dir`` in speedec's format (atomically; in place when
    it is ``source_dir``), with the source's tokenizer and chat files. An imported
    checkpoint (Ouro, Nanbeige) is never overwritten: its directory keeps the
    checkpoint as published."""
    from ..storage import copy_companions, is_imported

    if Path(out_dir).resolve() == Path(source_dir).resolve() and is_imported(source_dir):
        raise TrainingError(f"{source_dir} is an imported checkpoint, which is not overwritten; "
                            "write the fitted model elsewhere (--out DIR)")
    result.model.save_pretrained(out_dir)
    copy_companions(source_dir, out_dir)
