"""Evaluation of translators: per-loop validation metrics, and BLEU/chrF with a decoding engine.

* :func:`validation_metrics` (used during training) scores fixed padded
  batches with teacher forcing: loss, perplexity and agreement with the
  final argmax after every decoder loop, over real target tokens only (the
  same summary as the decoder-only :func:`~speedec.training.evaluate.loop_metrics`).
  The agreement at the exit loop estimates SPEED's draft acceptance.
* :func:`evaluate_translation` translates sentences one at a time with an
  engine (batch 1, as SPEED decodes), scores them against the references
  with ``sacrebleu`` (corpus BLEU and chrF), and reports the engine's speed:
  milliseconds per sentence (encoder included), acceptance and steps per
  token pooled over all sentences.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.parallel import Pair
from ..errors import SpeedecError
from ..tokenizer import BPETokenizer
from ..training.distributed import autocast
from ..training.evaluate import add_loop_sums, new_loop_sums, summarize_loop_sums
from .data import PairBatch
from .model import EncDecLM
from .translate import encode_source, translate_source


@torch.no_grad()
def validation_metrics(model: EncDecLM, batches: Sequence[PairBatch]) -> dict:
    """Per-loop loss, perplexity and agreement with the final argmax on padded ``batches``;
    for a model with an exit readout, also the drafter's (``draft_agreement``: how often
    SPEED's draft equals the final prediction under teacher forcing)."""
    L = model.config.n_loops
    has_readout = model.exit_readout is not None
    device = model.device
    sums = new_loop_sums(L, device)
    was_training = model.training
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        with autocast(device):
            out = model(batch.src, batch.src_mask, batch.tgt_in, output_loops=tuple(range(1, L)), output_draft=has_readout)
        add_loop_sums(sums, out, batch.targets, L)
    model.train(was_training)
    return {"pairs": sum(len(b.src) for b in batches),
            **summarize_loop_sums(sums, L, model.config.exit_loop, draft=has_readout)}


@dataclass
class TranslationEval:
    """The result of :func:`evaluate_translation`."""

    # JSON-ready summary: scores, speed, engine statistics.
    report: dict
    # One translation per evaluated pair, in order.
    hypotheses: list[str]


@torch.no_grad()
def split_metrics(model: EncDecLM, tokenizer: BPETokenizer, data, split: str, *, batch_size: int = 32) -> dict:
    """:func:`validation_metrics` over every pair of ``split`` of the corpus ``data`` that
    fits the model (teacher forcing: per-loop loss and agreement, the drafter's agreement)."""
    from .data import fitting_split, fixed_batches

    c = model.config
    if tokenizer.eos_token_id is None:
        raise SpeedecError("the tokenizer has no <|endoftext|> token to end translations")
    pairs = fitting_split(data, split, tokenizer, c)
    batches = fixed_batches(pairs, len(pairs), batch_size, bos=c.bos_token_id, eos=tokenizer.eos_token_id,
                            pad=c.pad_token_id)
    return validation_metrics(model, batches)


def reference_streams(pairs: Sequence[Pair]) -> list[list[str]]:
    """sacrebleu's reference streams for ``pairs``: every pair's ``refs`` when all of them
    have the same number of references (two or more: the Bible pairs' KJV and WEB), else
    the targets alone."""
    counts = {len(p.refs) for p in pairs}
    if len(counts) == 1 and (n := counts.pop()) > 1:
        return [[p.refs[i] for p in pairs] for i in range(n)]
    return [[p.tgt for p in pairs]]


def corpus_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU and chrF (sacrebleu defaults) against one or more reference streams
    (each one reference per hypothesis), and their signatures."""
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise SpeedecError("BLEU and chrF need sacrebleu: pip install 'sacrebleu>=2.3'") from None
    bleu, chrf = BLEU(), CHRF()
    streams = [list(stream) for stream in references]
    return {"bleu": bleu.corpus_score(list(hypotheses), streams).score,
            "chrf": chrf.corpus_score(list(hypotheses), streams).score, "references": len(streams),
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def evaluate_translation(model: EncDecLM, tokenizer: BPETokenizer, pairs: Sequence[Pair], *,
                         engine: str = "speed", max_new_tokens: int | None = None, warmup: int = 1,
                         progress: bool = False, **engine_options) -> TranslationEval:
    """Translate every source of ``pairs`` greedily with ``engine`` and score against the targets.

    Sources longer than the model's ``max_source_len`` are cut to it (counted in
    ``truncated_sources``). ``warmup`` translations of the first source run
    untimed first. ``max_new_tokens`` None: per sentence, 2 x source tokens +
    10 within the model's ``max_target_len``.
    """
    if not pairs:
        raise SpeedecError("no sentence pairs to evaluate")
    c = model.config
    sources, truncated = [], 0
    for pair in pairs:
        ids = encode_source(tokenizer, pair.src)
        if len(ids) > c.max_source_len:
            ids, truncated = ids[:c.max_source_len], truncated + 1
        sources.append(ids)
    for _ in range(max(0, warmup)):
        translate_source(model, tokenizer, sources[0], engine=engine, max_new_tokens=max_new_tokens,
                         **engine_options)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sources), unit="sentence", desc=f"translate ({engine})", dynamic_ncols=True)
    hypotheses = []
    wall_s = new_tokens = steps = after_first = accepted = verified = stopped_at_eos = 0
    begin = time.perf_counter()
    try:
        for ids in sources:
            result = translate_source(model, tokenizer, ids, engine=engine, max_new_tokens=max_new_tokens,
                                      **engine_options)
            hypotheses.append(result.text)
            s = result.stats
            wall_s += s.wall_s
            new_tokens += s.new_tokens
            steps += s.steps
            after_first += max(0, s.new_tokens - 1)
            accepted += s.drafts_accepted
            verified += s.drafts_accepted + s.drafts_rejected
            stopped_at_eos += result.stop_reason == "eos"
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    total_s = time.perf_counter() - begin
    steps_per_token = steps / after_first if after_first else None
    report = {
        "sentences": len(pairs), "engine": engine, "n_loops": c.n_loops, "exit_loop": c.exit_loop,
        **corpus_scores(hypotheses, reference_streams(pairs)),
        # Engine wall time per sentence (encoder, prefill and decoding), and per generated token.
        "ms_per_sentence": 1000 * wall_s / len(pairs),
        "ms_per_token": 1000 * wall_s / new_tokens if new_tokens else None,
        "new_tokens": new_tokens,
        "acceptance": accepted / verified if verified else None,
        "steps_per_token": steps_per_token,
        # Plain decoding takes n_loops steps per token: the step-count speedup.
        "step_speedup": c.n_loops / steps_per_token if steps_per_token else None,
        "stopped_at_eos": stopped_at_eos,
        "truncated_sources": truncated,
        "total_s": total_s,
    }
    return TranslationEval(report=report, hypotheses=hypotheses)
