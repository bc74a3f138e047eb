"""The training loop: AdamW on the early-exit loss, data parallel under torchrun.

One optimizer step:

1. set the learning rate of the step (warmup + cosine, a function of the step);
2. draw this rank's share of the step's global batch (a function of seed and step);
3. forward/backward over ``grad_accum`` micro-batches (DDP all-reduces the
   gradients on the last one);
4. clip the global gradient norm and step AdamW.

Around it: periodic logging to ``metrics.jsonl`` and a progress bar, periodic
evaluation of every loop on the validation split, and atomic checkpoints.
Only rank 0 writes; every rank computes the same schedule, so collective
calls (loss averages, evaluation sums) happen at the same steps everywhere.

Because the data, the schedule and the RNG states are all functions of the
step or stored in the checkpoint, a resumed run continues bit-for-bit where
the saved one stopped.

The loop itself and its helpers (optimizer, schedule, update, logging,
checkpoints, final model) are shared with translation training
(:mod:`speedec.encdec.trainer`) and live in :mod:`speedec.training.loop`; this
module is the decoder-only run: its setup, its step and its evaluation.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..errors import TrainingError
from ..model import LoopedLM
from ..tokenizer import BPETokenizer
from .checkpoint import CHECKPOINT_DIR
from .config import TrainConfig
from .data import check_tokens, evaluation_windows, load_tokens, training_batch
from .distributed import Distributed, autocast, setup_distributed
from .evaluate import loop_metrics
from .loop import (
    LOSS_PARTS,
    RunCore,
    TrainSummary,
    apply_update,
    build_optimizer,
    initial_model,
    loss_parts,
    open_output,
    restore_state,
    resume_point,
    run_training,
    schedule_of,
    set_learning_rate,
    training_tokenizer,
)
from .loss import LossSchedule, looped_loss, loss_loops


@dataclass
class Run(RunCore):
    """A decoder-only run: everything its training loop works with, set up once."""

    # The module that trains the model (DDP, or the model itself).
    net: torch.nn.Module
    train_tokens: np.ndarray
    # [N, seq_len + 1] fixed validation windows.
    val_windows: torch.Tensor


# ------------------------------------------------------------------ setup
def check_files(config: TrainConfig) -> Path:
    """Fail early, with the file's name, when an input is missing; returns the tokenizer path."""
    for name in ("tokenizer", "train_file", "val_file"):
        path = Path(getattr(config, name))
        if not path.is_file():
            raise TrainingError(f"{name} {path} does not exist")
    return Path(config.tokenizer)


def load_split(path: str, tokenizer: BPETokenizer, dist: Distributed, seq_len: int) -> np.ndarray:
    """Tokens of a split; rank 0 tokenises (and caches) first, the others then read the cache."""
    if dist.is_main:
        tokens = load_tokens(path, tokenizer)
    dist.barrier()
    if not dist.is_main:
        tokens = load_tokens(path, tokenizer)
    check_tokens(tokens, seq_len, path)
    return tokens


def setup_run(config: TrainConfig, dist: Distributed, resume: bool) -> Run:
    model_config = config.resolve_model_config()
    tokenizer_file = check_files(config)
    tokenizer = training_tokenizer(tokenizer_file, model_config.vocab_size)
    if config.batch_size % (dist.world_size * config.grad_accum):
        raise TrainingError(f"batch_size ({config.batch_size}) must be divisible by processes x "
                            f"grad_accum ({dist.world_size} x {config.grad_accum})")
    out_dir = Path(config.out_dir)
    checkpoint = resume_point(config, out_dir / CHECKPOINT_DIR, resume, dist.device)

    train_tokens = load_split(config.train_file, tokenizer, dist, config.seq_len)
    val_tokens = load_split(config.val_file, tokenizer, dist, config.seq_len)
    val_windows = evaluation_windows(val_tokens, config.seq_len, config.eval_batches * config.batch_size)

    model = initial_model(config, checkpoint, LoopedLM, model_config, dist.device)
    optimizer = build_optimizer(model, config)
    start_step, start_tokens, start_elapsed_s = restore_state(checkpoint, optimizer)
    if dist.enabled:
        net = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    else:
        net = model

    metrics = open_output(config, dist, start_step)
    return Run(config=config, dist=dist, model=model, net=net, optimizer=optimizer,
               schedule=schedule_of(config, config.total_steps),
               losses=LossSchedule.from_recipe(config, model.config, config.total_steps),
               train_tokens=train_tokens, val_windows=val_windows, tokenizer_file=tokenizer_file,
               out_dir=out_dir, metrics=metrics, total_steps=config.total_steps,
               start_step=start_step, start_tokens=start_tokens, start_elapsed_s=start_elapsed_s,
               resumed_from=start_step if checkpoint is not None else None)


# --------------------------------------------------------------- one step
def train_step(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One optimizer step; returns this rank's ``[5]`` loss parts (total, final, exit,
    all-loops, draft; 0 where unused) and the global gradient norm, both still on the
    device, and the training tokens of the step (all ranks)."""
    c = run.config
    set_learning_rate(run, step)
    weights = run.losses.at(step, run.model.config.n_loops)
    output_loops = loss_loops(run.model.config, weights)
    extra = {"output_draft": True} if weights.draft_weight > 0 else {}
    batch = training_batch(run.train_tokens, seq_len=c.seq_len, batch_size=c.batch_size, seed=c.seed,
                           step=step, rank=run.dist.rank, world_size=run.dist.world_size)
    micro_batches = batch.to(run.dist.device).reshape(c.grad_accum, -1, c.seq_len + 1)  # [A, b, T+1]
    parts = torch.zeros(LOSS_PARTS, device=run.dist.device)
    for i, micro in enumerate(micro_batches):
        # Gradients are all-reduced only on the last micro-batch of the step.
        last = i == c.grad_accum - 1
        sync = nullcontext() if last or not run.dist.enabled else run.net.no_sync()
        with sync:
            with autocast(run.dist.device):
                out = run.net(micro[:, :-1], output_loops=output_loops, **extra)
                loss = looped_loss(out, micro[:, 1:], run.model.config, weights)
            (loss.total / c.grad_accum).backward()
        parts += loss_parts(loss) / c.grad_accum
    return parts, apply_update(run), c.tokens_per_step


# ------------------------------------------------------------- observers
def evaluate(run: Run, step: int) -> dict:
    micro = run.config.batch_size // (run.dist.world_size * run.config.grad_accum)
    result = loop_metrics(run.model, run.val_windows, batch_size=micro, dist=run.dist)
    run.metrics.write({"event": "eval", "step": step, **result})
    return result


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainSummary:
    """Train (or, with ``resume``, continue) the run described by ``config``.

    Under ``torchrun`` each process calls this; rank 0 writes everything.
    """
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    dist = setup_distributed(config.device)
    try:
        # train_step and evaluate looked up at call time, so that tests can patch them
        return run_training(setup_run(config, dist, resume), progress, step_fn=train_step, eval_fn=evaluate)
    finally:
        dist.shutdown()
        torch.set_num_threads(previous_threads)
