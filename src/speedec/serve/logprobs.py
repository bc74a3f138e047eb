"""Logprobs of a served request: each verified token's, and (echo) the prompt's.

A logprob is the float32 log-softmax over the full vocabulary of the final
loop's logits for the position (``log_softmax(logits.float())``), before any
sampling transform (temperature, top-k, top-p, the position-keyed noise): the
scheduler keeps the very logits row that verified each token (the pipeline's
``keep_final``), so a token's logprobs equal what the ``autoregressive``
engine computes for its position, alone or batched (docs/serving.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..cache import KVCache
from ..engines.base import prefill, prefill_hidden
from ..errors import GenerationError
from ..kernels import FEW_ROWS

if TYPE_CHECKING:
    from ..engines.pipeline import Pipeline


@dataclass(frozen=True)
class TokenLogprob:
    """A token's logprob (the final loop's float32 log-softmax, before any sampling
    transform) and the ``k`` most likely tokens there, best first: ``[(id, logprob)]``."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Each row of ``logits [n, V]`` (or ``[V]``) as the :class:`TokenLogprob` of the
    token at the same index of ``tokens``: ``log_softmax(logits.float())``."""
    if not tokens:
        return []
    lp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if k:
        values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)  # a vocabulary smaller than k: all of it
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


def check_logprobs(request: Any) -> None:
    """A :class:`~speedec.serve.requests.ServeRequest`'s ``max_tokens`` (0 only with
    ``prompt_logprobs``), ``logprobs`` and ``prompt_logprobs``."""
    m = request.max_tokens
    least = 0 if request.prompt_logprobs is not None else 1  # 0: the prompt's logprobs alone
    if isinstance(m, bool) or not isinstance(m, int) or m < least:
        raise GenerationError(f"max_tokens must be an integer >= {least}, got {m!r}")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(request, name)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise GenerationError(f"{name} must be an integer >= 0, got {k!r}")


def prefill_request(model: Any, cache: KVCache, handle: Any) -> torch.Tensor | None:
    """Prefill ``handle``'s request into ``cache``: the logits ``[V]`` of its first new
    token (None when ``max_tokens`` is 0). With ``prompt_logprobs`` the handle gets
    the prompt's: the final loop's states of every position through ``model.head``
    a few rows at a time (within the few-row kernel's limit a row's logits do
    not depend on the rows beside it: each equals ``model.head`` of that row
    alone; and only a few ``[V]`` rows are held at once)."""
    request = handle.request
    prompt, k = list(request.prompt_ids), request.prompt_logprobs
    if k is None:
        return prefill(model, cache, prompt) if request.max_tokens else None
    hidden = prefill_hidden(model, cache, prompt)[0]
    entries: list[TokenLogprob] = []
    for i in range(0, len(prompt) - 1, FEW_ROWS):
        end = min(i + FEW_ROWS, len(prompt) - 1)
        entries += token_logprobs(model.head(hidden[i:end]), prompt[i + 1: end + 1], k)
    handle.prompt_logprobs = entries
    return model.head(hidden[-1]) if request.max_tokens else None


def first_logprobs(logits: torch.Tensor | None, tokens: list[int], k: int | None) -> list[TokenLogprob] | None:
    """The prefill's token's logprobs (None when not asked for, or nothing was generated)."""
    return None if k is None or logits is None else token_logprobs(logits, tokens, k)


def verified_logprobs(pipeline: Pipeline, tokens: list[int], k: int | None) -> list[TokenLogprob] | None:
    """The logprobs of ``tokens``, the ones a step verified, from the final logits the
    pipeline kept for them (None when not asked for)."""
    if k is None:
        return None
    finals, pipeline.finals = pipeline.finals, []
    return token_logprobs(torch.stack(finals), tokens, k) if tokens else []
