"""Evaluation: how good is each loop, and how often would SPEED's drafts hold?

Two measurements:

* :func:`loop_metrics` reads the logits after every loop 1..L on validation
  windows: loss and perplexity per loop, and how often each loop's argmax
  equals the final argmax. The agreement at the exit loop is the teacher-
  forced estimate of the draft acceptance rate.
* :func:`evaluate_model` adds the real thing: it runs the ``speed`` engine
  on validation prompts and reports the acceptance and steps per token it
  achieved (these include the pipeline's own effects: a rejected draft also
  discards the drafts behind it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engines import generate
from ..errors import TrainingError
from ..model import LoopedLM
from ..tokenizer import Tokenizer
from .data import check_tokens, evaluation_windows, load_tokens
from .distributed import Distributed, autocast
from .loss import IGNORE_INDEX


@torch.no_grad()
def loop_metrics(model: LoopedLM, windows: torch.Tensor, *, batch_size: int,
                 dist: Distributed | None = None) -> dict:
    """Per-loop loss, perplexity and agreement with the final argmax on ``windows [N, T+1]``.

    Under data parallelism each process scores every world_size-th window
    and the sums are added up, so the result does not depend on the layout.
    """
    L = model.config.n_loops
    device = model.device
    if dist is not None and dist.enabled:
        windows = windows[dist.rank::dist.world_size]
    sums = new_loop_sums(L, device)
    has_readout = getattr(model, "exit_readout", None) is not None
    was_training = model.training
    model.eval()
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast(device):
            out = model(inputs, output_loops=tuple(range(1, L)), output_draft=has_readout)
        add_loop_sums(sums, out, targets, L)
    model.train(was_training)
    if dist is not None:
        dist.all_reduce_sum(sums)
    result = summarize_loop_sums(sums, L, model.config.exit_loop, draft=has_readout)
    return result


def new_loop_sums(n_loops: int, device: torch.device) -> torch.Tensor:
    """Zeroed accumulators for :func:`add_loop_sums`: per loop 1..L the summed
    cross-entropy, then per loop the agreement count, then the token count, last the
    exit readout's (drafter's) summed cross-entropy and agreement count."""
    return torch.zeros(2 * n_loops + 3, dtype=torch.float64, device=device)


def add_loop_sums(sums: torch.Tensor, out, targets: torch.Tensor, n_loops: int) -> None:
    """Add one batch to ``sums``: ``out`` holds the final logits and those of loops
    1..L-1 (``[B, T, V]`` each), and the drafter's when ``out.draft_logits`` is set;
    targets equal to ``IGNORE_INDEX`` (padding) count nowhere."""
    L = n_loops
    mask = targets != IGNORE_INDEX  # [B, T]
    final_argmax = out.logits.argmax(-1)  # [B, T]

    def add(loss_at: int, agree_at: int, logits: torch.Tensor) -> None:
        sums[loss_at] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),  # [B*T, V]
                                         targets.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX).double()
        sums[agree_at] += ((logits.argmax(-1) == final_argmax) & mask).sum()

    for loop in range(1, L + 1):
        add(loop - 1, L + loop - 1, out.logits if loop == L else out.loop_logits[loop])
    sums[2 * L] += mask.sum()
    if getattr(out, "draft_logits", None) is not None:
        add(2 * L + 1, 2 * L + 2, out.draft_logits)


def summarize_loop_sums(sums: torch.Tensor, n_loops: int, exit_loop: int | None, *, draft: bool = False) -> dict:
    """Loss, perplexity and agreement with the final argmax per loop, from :func:`add_loop_sums`;
    with ``draft``, also the exit readout's loss, perplexity and agreement."""
    L = n_loops
    values = sums.tolist()  # deliberate host sync: once per evaluation
    count = values[2 * L]
    if count == 0:
        raise TrainingError("no validation windows to evaluate")
    losses = [v / count for v in values[:L]]
    agreement = [v / count for v in values[L:2 * L]]
    result = {
        "tokens": int(count),
        "loss": losses[-1],
        "ppl": _perplexity(losses[-1]),
        # Entry i is the value after i + 1 loops; the last entry is the final output.
        "loss_per_loop": losses,
        "ppl_per_loop": [_perplexity(v) for v in losses],
        "agreement_per_loop": agreement,
        "exit_loop": exit_loop,
        "exit_agreement": agreement[exit_loop - 1] if exit_loop is not None else None,
    }
    if draft:
        draft_loss, agreeing = values[2 * L + 1] / count, values[2 * L + 2] / count
        result.update(draft_loss=draft_loss, draft_ppl=_perplexity(draft_loss), draft_agreement=agreeing)
    return result


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def speed_metrics(model: LoopedLM, prompts: list[list[int]], new_tokens: int) -> dict:
    """Acceptance and steps per token of the ``speed`` engine, pooled over ``prompts``."""
    accepted = verified = steps = tokens_after_first = 0
    decode_s = 0.0
    for prompt in prompts:
        stats = generate(model, prompt, new_tokens, engine="speed").stats
        accepted += stats.drafts_accepted
        verified += stats.drafts_accepted + stats.drafts_rejected
        steps += stats.steps
        tokens_after_first += max(0, stats.new_tokens - 1)
        decode_s += stats.decode_s
    steps_per_token = steps / tokens_after_first if tokens_after_first else None
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "acceptance": accepted / verified if verified else None,
        "steps_per_token": steps_per_token,
        # Plain decoding takes n_loops steps per token: the step-count speedup.
        "step_speedup": model.config.n_loops / steps_per_token if steps_per_token else None,
        "decode_tokens_per_s": tokens_after_first / decode_s if decode_s > 0 else None,
    }


def evaluate_model(model: LoopedLM, tokenizer: Tokenizer, text_file: str | Path, *,
                   seq_len: int = 256, windows: int = 64, batch_size: int = 8, prompts: int = 16,
                   prompt_tokens: int = 32, new_tokens: int = 64) -> dict:
    """Loop metrics on up to ``windows`` windows of ``text_file`` (``seq_len`` capped at the
    model's max_seq_len), plus ``speed``-engine acceptance on ``prompts`` prompts of
    ``prompt_tokens`` tokens generating ``new_tokens`` each.

    The engine numbers are None for a model without an early exit (or with ``prompts=0``).
    """
    c = model.config
    seq_len = min(seq_len, c.max_seq_len)
    for name, value in (("seq_len", seq_len), ("windows", windows), ("batch_size", batch_size),
                        ("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens)):
        if value < 1:
            raise TrainingError(f"{name} must be >= 1, got {value}")
    if prompts < 0:
        raise TrainingError(f"prompts must be >= 0, got {prompts}")
    run_engine = c.has_early_exit and prompts > 0
    if run_engine and prompt_tokens + new_tokens > c.max_seq_len:
        raise TrainingError(f"prompt_tokens + new_tokens ({prompt_tokens + new_tokens}) exceeds the "
                            f"model's max_seq_len ({c.max_seq_len})")
    tokens = load_tokens(text_file, tokenizer)
    check_tokens(tokens, seq_len, str(text_file))
    result = {"file": str(text_file), "seq_len": seq_len, "n_loops": c.n_loops,
              **loop_metrics(model, evaluation_windows(tokens, seq_len, windows),
                             batch_size=batch_size)}
    prompt_ids = []
    if run_engine:
        check_tokens(tokens, prompt_tokens, str(text_file))
        prompt_ids = evaluation_windows(tokens, prompt_tokens - 1, prompts).tolist()  # P x prompt_tokens
    return {**result, **speed_metrics(model, prompt_ids, new_tokens)}
