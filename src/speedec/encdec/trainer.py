"""Training a translator: the decoder-only recipe on padded batches of sentence pairs.

Everything but the data and the forward is shared with the decoder-only
recipe (:mod:`speedec.training.loop`): the loop (:func:`loop.run_training`: logging to
``metrics.jsonl``, progress bar, periodic evaluation, atomic checkpoints,
final model directory with ``tokenizer.json``), AdamW and its parameter
groups, the warmup + cosine schedule, the early-exit loss
(:func:`~speedec.training.loss.looped_loss`, which skips padded targets),
gradient clipping and exact resume. This module supplies one optimizer step
and one validation pass for an :class:`EncDecLM`.

One step: the batch of the step (:class:`~speedec.encdec.data.BucketSampler`,
a function of seed and step), teacher-forced forward with the exit loop's
logits, ``CE(final) + exit_weight * CE(exit)`` over the real target tokens,
backward, clip, AdamW. Runs in one process (no data parallelism).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError, TrainingError
from ..tokenizer import BPETokenizer
from ..training import loop
from ..training.checkpoint import CHECKPOINT_DIR
from ..training.distributed import Distributed, autocast, pick_device
from ..training.loss import LossSchedule, looped_loss, loss_loops
from .data import (
    BucketSampler,
    PairBatch,
    TokenizedPairs,
    fit_lengths,
    fixed_batches,
    load_pairs,
    make_batch,
    split_path,
    steps_for_tokens,
)
from .evaluate import validation_metrics
from .model import EncDecLM
from .train_config import TranslationConfig


@dataclass
class TranslationRun(loop.RunCore):
    """A translation run: the shared run state plus its corpus and batch plan."""

    # Training pairs that fit the model, and the batches of each step.
    train_pairs: TokenizedPairs
    sampler: BucketSampler
    # Fixed validation batches.
    val_batches: list[PairBatch]
    # Decoder start, end and padding ids.
    bos: int
    eos: int
    pad: int


def _single_process(device: str) -> Distributed:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError("translation training runs in a single process; start it without torchrun")
    return Distributed(rank=0, world_size=1, local_rank=0, device=pick_device(device, 0), owns_group=False)


def _load_split(config: TranslationConfig, split: str, tokenizer: BPETokenizer, model_config,
                ) -> tuple[TokenizedPairs, int]:
    try:
        pairs = load_pairs(split_path(config.data, split), tokenizer)
    except DataError as exc:
        raise TrainingError(str(exc)) from None
    return fit_lengths(pairs, model_config.max_source_len, model_config.max_target_len)


def setup_translation_run(config: TranslationConfig, resume: bool) -> TranslationRun:
    """Check the inputs, tokenise (or read the cache of) the corpus, build or restore the model."""
    model_config = config.resolve_model_config()
    dist = _single_process(config.device)
    tokenizer_file = Path(config.tokenizer)
    if not tokenizer_file.is_file():
        raise TrainingError(f"tokenizer {tokenizer_file} does not exist (train one with: speedec tokenizer "
                            f"train --parallel {config.data} --out {tokenizer_file})")
    tokenizer = loop.training_tokenizer(tokenizer_file, model_config.vocab_size)
    if tokenizer.eos_token_id is None:
        raise TrainingError(f"the tokenizer {tokenizer_file} has no <|endoftext|> token to end translations")
    out_dir = Path(config.out_dir)
    checkpoint = loop.resume_point(config, out_dir / CHECKPOINT_DIR, resume, dist.device, model_cls=EncDecLM)

    train_pairs, train_dropped = _load_split(config, config.train_split, tokenizer, model_config)
    val_pairs, val_dropped = _load_split(config, config.val_split, tokenizer, model_config)
    if len(val_pairs) == 0:
        raise TrainingError(f"the {config.val_split} split has no pair that fits the model's lengths")
    sampler = BucketSampler(train_pairs, config.batch_size, config.seed)
    ids = dict(bos=model_config.bos_token_id, eos=tokenizer.eos_token_id, pad=model_config.pad_token_id)
    val_batches = fixed_batches(val_pairs, config.eval_batches * config.batch_size, config.batch_size, **ids)
    total_steps = (config.max_steps if config.max_steps is not None
                   else steps_for_tokens(config.max_tokens, config.batch_size, train_pairs))
    config.check_warmup(total_steps)

    model = loop.initial_model(config, checkpoint, EncDecLM, model_config, dist.device)
    optimizer = loop.build_optimizer(model, config)
    start_step, start_tokens, start_elapsed_s = loop.restore_state(checkpoint, optimizer)
    metrics = loop.open_output(config, dist, start_step)
    if checkpoint is None:  # a fresh run: drop even the step-0 data event of an earlier, killed start
        metrics.truncate_after(-1)
        metrics.write({"event": "data", "step": 0, "train_pairs": len(train_pairs),
                       "train_dropped_too_long": train_dropped, "val_pairs": len(val_pairs),
                       "val_dropped_too_long": val_dropped, "val_pairs_scored": sum(len(b.src) for b in val_batches),
                       "batches_per_epoch": sampler.batches_per_epoch, "total_steps": total_steps})
    return TranslationRun(
        config=config, dist=dist, model=model, optimizer=optimizer, schedule=loop.schedule_of(config, total_steps),
        losses=LossSchedule.from_recipe(config, model.config, total_steps), tokenizer_file=tokenizer_file,
        out_dir=out_dir, metrics=metrics, total_steps=total_steps, start_step=start_step,
        start_tokens=start_tokens, start_elapsed_s=start_elapsed_s,
        resumed_from=start_step if checkpoint is not None else None,
        train_pairs=train_pairs, sampler=sampler, val_batches=val_batches, **ids)


def train_step(run: TranslationRun, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One optimizer step on the batch of ``step``; returns the ``[5]`` loss parts, the
    gradient norm (both on the device) and the real tokens of the batch."""
    loop.set_learning_rate(run, step)
    batch = make_batch(run.train_pairs, run.sampler.indices(step), bos=run.bos, eos=run.eos,
                       pad=run.pad).to(run.dist.device)
    weights = run.losses.at(step, run.model.config.n_loops)
    with autocast(run.dist.device):
        out = run.model(batch.src, batch.src_mask, batch.tgt_in,
                        output_loops=loss_loops(run.model.config, weights),
                        output_draft=weights.draft_weight > 0)
        loss = looped_loss(out, batch.targets, run.model.config, weights)
    loss.total.backward()
    return loop.loss_parts(loss), loop.apply_update(run), batch.tokens


def evaluate(run: TranslationRun, step: int) -> dict:
    """Per-loop validation loss, perplexity and agreement with the final prediction; logged."""
    result = validation_metrics(run.model, run.val_batches)
    run.metrics.write({"event": "eval", "step": step, **result})
    return result


def train_translation(config: TranslationConfig, *, resume: bool = False, progress: bool = True) -> loop.TrainSummary:
    """Train (or, with ``resume``, continue) the translation run described by ``config``."""
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        run = setup_translation_run(config, resume)
        return loop.run_training(run, progress, step_fn=train_step, eval_fn=evaluate)
    finally:
        torch.set_num_threads(previous_threads)

