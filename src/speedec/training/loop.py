"""The training loop shared by every kind of run (:func:`run_training`) and its parts.

:func:`run_training` works on any :class:`RunCore` with the run's own step and
evaluation functions: the decoder-only run (:mod:`speedec.training.trainer`)
and translation training (:mod:`speedec.encdec.trainer`) both use it, with
the helpers here for the optimizer, the schedule, the update, logging to
``metrics.jsonl`` and a progress bar, checkpoints and the final model.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError, TokenizerError, TrainingError
from ..model import LoopedLM
from ..storage import atomic_write, atomic_write_text
from ..tokenizer import BPETokenizer
from .checkpoint import (
    CHECKPOINT_DIR,
    TOKENIZER_FILE,
    TRAIN_CONFIG_FILE,
    Checkpoint,
    TrainingState,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .config import RecipeConfig
from .distributed import Distributed
from .loss import LoopedLoss, LossSchedule
from .schedule import CosineSchedule

METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"


@dataclass(frozen=True)
class TrainSummary:
    """What a finished run reports."""

    # Optimizer steps completed and training tokens consumed (all ranks).
    steps: int
    tokens: int
    # Training loss (weighted total) averaged over the last logging interval.
    train_loss: float | None
    # The last validation evaluation (see :func:`~speedec.training.evaluate.loop_metrics`).
    eval: dict | None
    # The final model: config.json, model.safetensors, tokenizer.json.
    model_dir: Path
    # Seconds of training (over all sessions of a resumed run) and its throughput.
    train_s: float
    tokens_per_s: float | None
    # The step the run was resumed from; None for a fresh run.
    resumed_from: int | None


class MetricsLog:
    """``metrics.jsonl``: one JSON object per event, appended (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, event: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop events past ``step`` (a resumed run recomputes them; a fresh run starts
        from 0) and any line torn by a kill mid-write."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))


@dataclass
class RunCore:
    """What the shared loop (:func:`run_training`), checkpointing and logging use of a run.

    Each kind of run (decoder-only here, translation in :mod:`speedec.encdec.trainer`)
    extends it with its data and supplies its own step and evaluation functions.
    """

    config: RecipeConfig
    dist: Distributed
    # The bare model (saved, evaluated): anything with save_pretrained.
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    # The loss weights of every step.
    losses: LossSchedule
    tokenizer_file: Path
    out_dir: Path
    metrics: MetricsLog
    # Optimizer steps of the whole run.
    total_steps: int
    # Where this session starts: steps done, tokens seen and seconds trained so far
    # (all 0 for a fresh run, the checkpoint's values when resuming).
    start_step: int
    start_tokens: int
    start_elapsed_s: float
    resumed_from: int | None


# ------------------------------------------------------------------ setup
def training_tokenizer(path: Path, vocab_size: int) -> BPETokenizer:
    """The run's tokenizer, checked against the model's vocabulary (errors as TrainingError)."""
    try:
        tokenizer = BPETokenizer(path)
    except TokenizerError as exc:
        raise TrainingError(str(exc)) from None
    if tokenizer.vocab_size > vocab_size:
        raise TrainingError(f"the tokenizer {path} has {tokenizer.vocab_size} tokens but the "
                            f"model's vocabulary has only {vocab_size}")
    return tokenizer


def build_optimizer(model: torch.nn.Module, config: RecipeConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norm gains toward 0 only hurts."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def resume_point(config: RecipeConfig, root: Path, resume: bool, device: torch.device, *,
                 model_cls: type = LoopedLM) -> Checkpoint | None:
    """The checkpoint to continue from, after checking it belongs to this config
    (``model_cls``: the kind of model the run trains)."""
    path = latest_checkpoint(root)
    if not resume:
        if path is not None:
            raise TrainingError(f"{config.out_dir} already holds a checkpoint ({path.name}); "
                                "pass --resume to continue it or choose another output directory")
        return None
    if path is None:
        raise TrainingError(f"nothing to resume: {root} holds no checkpoint")
    checkpoint = load_checkpoint(path, device=device, model_cls=model_cls, config_cls=type(config))
    differing = checkpoint.config.differences(config)
    if differing:
        raise TrainingError(f"cannot resume {path}: the config differs in {', '.join(differing)}")
    return checkpoint


def initial_model(config: RecipeConfig, checkpoint: Checkpoint | None, model_cls: type, model_config,
                  device: torch.device) -> torch.nn.Module:
    """The model a run starts from: the checkpoint's, the saved one ``config.init_from`` names,
    or a random ``model_cls`` of shape ``model_config``; float32, on ``device``, in train mode."""
    torch.manual_seed(config.seed)
    if checkpoint is not None:
        model = checkpoint.model
    elif config.init_from is not None:
        try:
            model = model_cls.from_pretrained(config.init_from)
        except ModelLoadError as exc:
            raise TrainingError(f"init_from: {exc}") from None
    else:
        model = model_cls.random(model_config, seed=config.seed, std=config.init_std)
    return model.to(device=device, dtype=torch.float32).train()


def restore_state(checkpoint: Checkpoint | None, optimizer: torch.optim.Optimizer) -> tuple[int, int, float]:
    """Load the checkpoint's optimizer and RNG states; returns (step, tokens seen, seconds
    trained) to start from (zeros without a checkpoint)."""
    if checkpoint is None:
        return 0, 0, 0.0
    optimizer.load_state_dict(checkpoint.state.optimizer)
    restore_rng(checkpoint.state.rng)
    return checkpoint.state.step, checkpoint.state.tokens_seen, checkpoint.state.elapsed_s


def schedule_of(config: RecipeConfig, total_steps: int) -> CosineSchedule:
    return CosineSchedule(peak=config.lr, minimum=config.min_lr, warmup_steps=config.warmup_steps,
                          total_steps=total_steps)


def open_output(config: RecipeConfig, dist: Distributed, start_step: int) -> MetricsLog:
    """Create the run directory, record the config, and drop metrics past ``start_step``."""
    out_dir = Path(config.out_dir)
    metrics = MetricsLog(out_dir / METRICS_FILE, enabled=dist.is_main)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / TRAIN_CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
        metrics.truncate_after(start_step)
    return metrics


# --------------------------------------------------------------- one step
def set_learning_rate(run: RunCore, step: int) -> None:
    """The schedule's learning rate for optimizer step ``step``."""
    lr = run.schedule(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr


# Loss parts logged per step: total, final, exit, all-loops, draft.
LOSS_PARTS = 5


def loss_parts(loss: LoopedLoss) -> torch.Tensor:
    """``[5]`` detached loss parts: total, final, exit, all-loops, draft (0 where unused)."""
    zero = torch.zeros((), device=loss.total.device)
    return torch.stack([loss.total, loss.final] + [
        part if part is not None else zero for part in (loss.exit, loss.all_loops, loss.draft)]).detach()


def apply_update(run: RunCore) -> torch.Tensor:
    """Clip the global gradient norm (if configured), step AdamW, clear the gradients;
    returns the norm before clipping (on the device)."""
    max_norm = run.config.grad_clip if run.config.grad_clip is not None else math.inf  # inf: measure only
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ------------------------------------------------------------- observers
def save(run: RunCore, step: int, tokens_seen: int, elapsed_s: float) -> None:
    if run.dist.is_main:
        state = TrainingState(step=step, tokens_seen=tokens_seen, elapsed_s=elapsed_s,
                              optimizer=run.optimizer.state_dict(), rng=capture_rng())
        save_checkpoint(run.out_dir / CHECKPOINT_DIR, run.model, state, run.config, run.tokenizer_file)
    run.dist.barrier()


def write_final_model(run: RunCore) -> Path:
    """``out_dir/model``: the trained model, its tokenizer and the config that made it."""
    directory = run.out_dir / MODEL_DIR
    if run.dist.is_main:
        run.model.save_pretrained(directory)
        atomic_write(directory / TOKENIZER_FILE, lambda tmp: shutil.copyfile(run.tokenizer_file, tmp))
        atomic_write_text(directory / TRAIN_CONFIG_FILE, json.dumps(run.config.to_dict(), indent=2) + "\n")
    run.dist.barrier()
    return directory


def _progress_bar(run: RunCore, enabled: bool):
    if not (enabled and run.dist.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=run.start_step, unit="step",
                desc="train", dynamic_ncols=True)


class Interval:
    """Loss parts, steps, tokens and seconds accumulated since the last log event."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.parts = torch.zeros(LOSS_PARTS, device=self.device)  # total, final, exit, all-loops, draft
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0

    def average(self, dist: Distributed) -> list[float]:
        """Loss parts averaged over ranks and steps; a deliberate host sync once per interval."""
        return (dist.all_reduce_sum(self.parts) / (dist.world_size * self.steps)).tolist()


def log_train(run: RunCore, interval: Interval, losses: list[float], grad_norm: torch.Tensor,
              step: int, tokens_seen: int, elapsed_s: float, bar) -> float:
    """Write a ``train`` event for the interval ending at ``step``; returns its mean loss."""
    total_loss, final, exit_ce, all_loops, draft = losses
    tokens_per_s = interval.tokens / interval.seconds
    event = {"event": "train", "step": step, "loss": total_loss, "loss_final": final,
             "lr": run.schedule(step - 1), "grad_norm": float(grad_norm),
             "tokens": tokens_seen, "tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s}
    weights = run.losses.base
    if weights.exit_weight > 0 or weights.loop_weights:
        event["loss_exit"] = exit_ce
    if weights.all_loops_weight > 0:
        event["loss_all_loops"] = all_loops
    if weights.draft_weight > 0:
        event["loss_draft"] = draft
    run.metrics.write(event)
    if bar is not None:
        bar.set_postfix(loss=f"{total_loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
    return total_loss


# ------------------------------------------------------------------- loop
def run_training(run: RunCore, progress: bool, *, step_fn, eval_fn) -> TrainSummary:
    """The loop shared by every kind of run: steps, logging, evaluation, checkpoints, final model.

    ``step_fn(run, step) -> (loss parts [5], grad norm, tokens)`` performs one
    optimizer step and ``eval_fn(run, step) -> dict`` (with ``loss`` and
    ``exit_agreement``) evaluates and logs; the decoder-only ones are
    :func:`speedec.training.trainer.train_step` and
    :func:`speedec.training.trainer.evaluate`.
    """
    c = run.config
    total = run.total_steps
    step, tokens_seen, elapsed_s = run.start_step, run.start_tokens, run.start_elapsed_s
    bar = _progress_bar(run, progress)
    interval = Interval(run.dist.device)
    train_loss, last_eval = None, None
    try:
        while step < total:
            start = time.perf_counter()
            parts, grad_norm, step_tokens = step_fn(run, step)
            step += 1
            tokens_seen += step_tokens
            interval.parts += parts
            interval.steps += 1
            interval.tokens += step_tokens
            log_now = step % c.log_every == 0 or step == total
            losses = interval.average(run.dist) if log_now else None
            step_s = time.perf_counter() - start  # after the sync, so device time is counted
            elapsed_s += step_s
            interval.seconds += step_s
            if bar is not None:
                bar.update(1)
            if log_now:
                train_loss = log_train(run, interval, losses, grad_norm, step, tokens_seen, elapsed_s, bar)
                interval.reset()
            if step % c.eval_every == 0 or step == total:
                last_eval = eval_fn(run, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.3f}" if train_loss is not None else "-",
                                    val=f"{last_eval['loss']:.3f}",
                                    agree=f"{last_eval.get('draft_agreement', last_eval['exit_agreement']) or 0:.2f}")
            if step % c.save_every == 0 or step == total:
                save(run, step, tokens_seen, elapsed_s)
    finally:
        if bar is not None:
            bar.close()
    if last_eval is None:  # resumed a finished run: evaluate its final weights once more
        last_eval = eval_fn(run, step)
    model_dir = write_final_model(run)
    run.metrics.write({"event": "done", "step": step, "tokens": tokens_seen, "train_s": elapsed_s,
                       "model_dir": str(model_dir)})
    return TrainSummary(steps=step, tokens=tokens_seen, train_loss=train_loss, eval=last_eval,
                        model_dir=model_dir, train_s=elapsed_s,
                        tokens_per_s=tokens_seen / elapsed_s if elapsed_s > 0 else None,
                        resumed_from=run.resumed_from)
