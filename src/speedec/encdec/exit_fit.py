"""Fit a translator's exit readout (the drafter) with its trunk frozen: ``speedec train-exit --data``.

The decoder-only fit (:mod:`speedec.training.exit_fit`) on sentence pairs:
the same settings (:class:`~speedec.training.exit_fit.ExitFitSettings`, whose
``batch_size`` counts pairs here and whose ``seq_len`` does not apply, a pair
being scored whole), the same fresh readout
(:func:`~speedec.training.exit_fit.with_readout`: equal to the shared exit
until fitted), the same optimisation loop
(:func:`~speedec.training.exit_fit.fit_readout`) and the same loss: the
readout's distillation towards the final loop, here on teacher-forced
batches of the corpus's training split (:class:`~speedec.encdec.data.BucketSampler`,
as ``train-translation`` draws them), over the real target tokens only.
Validation agreement of the draft with the final loop is measured before and
after by :func:`~speedec.encdec.evaluate.validation_metrics` on the first
``eval_pairs`` pairs of the validation split. Save the result with
:func:`~speedec.training.exit_fit.save_fitted`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TrainingError
from ..tokenizer import BPETokenizer
from ..training.exit_fit import ExitFitResult, ExitFitSettings, fit_readout, with_readout
from ..training.loss import distillation
from .data import (
    BucketSampler,
    fitting_split,
    fixed_batches,
    make_batch,
)
from .evaluate import validation_metrics
from .model import EncDecLM

# Validation pairs scored before and after, and pairs per scoring batch.
EVAL_PAIRS = 256
EVAL_BATCH = 16


def fit_translator_readout(model: EncDecLM, tokenizer: BPETokenizer, data: str | Path,
                           settings: ExitFitSettings | None = None, *, train_split: str = "train",
                           val_split: str = "validation", eval_pairs: int = EVAL_PAIRS,
                           progress: bool = True) -> ExitFitResult:
    """Fit the exit readout of the translator ``model`` on the parallel corpus ``data`` (a
    directory from ``speedec data prepare-parallel``; see the module docstring). The trunk
    is not changed. ``settings`` (None: the defaults) are read as for a decoder-only model,
    ``batch_size`` counting pairs; ``seq_len`` and ``eval_windows`` are not read (a pair is
    scored whole; ``eval_pairs`` validation pairs are scored)."""
    s = settings if settings is not None else ExitFitSettings()
    if tokenizer.eos_token_id is None:
        raise TrainingError(f"the tokenizer {tokenizer.path} has no <|endoftext|> token to end translations")
    if eval_pairs < 1:
        raise TrainingError(f"eval_pairs must be >= 1, got {eval_pairs}")
    model = with_readout(model.float(), s.rank, s.exit_loop)
    c = model.config
    train_pairs = fitting_split(data, train_split, tokenizer, c)
    val_pairs = fitting_split(data, val_split, tokenizer, c)
    ids = dict(bos=c.bos_token_id, eos=tokenizer.eos_token_id, pad=c.pad_token_id)
    sampler = BucketSampler(train_pairs, s.batch_size, s.seed)
    val_batches = fixed_batches(val_pairs, eval_pairs, min(s.batch_size, EVAL_BATCH), **ids)
    before = validation_metrics(model, val_batches)

    def step_loss(step: int) -> torch.Tensor:
        batch = make_batch(train_pairs, sampler.indices(step), **ids).to(model.device)
        out = model(batch.src, batch.src_mask, batch.tgt_in, output_draft=True)
        return distillation(out.draft_logits, out.logits, batch.targets)

    train_s = fit_readout(model, s, step_loss, progress=progress)
    after = validation_metrics(model, val_batches)
    return ExitFitResult(model=model, before=before, after=after, steps=s.steps, train_s=train_s)
