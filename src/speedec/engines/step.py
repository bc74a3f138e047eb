"""One step of SPEED: what it runs (:class:`StepPlan`) and running it, for one
request (:func:`run_step`) or several at once (:func:`run_steps`, the server's).

A :class:`~speedec.engines.pipeline.Pipeline` plans a step; whoever owns the
model runs it here: one pass over the K unique layers for all its rows, then one
LM-head matmul for the rows read.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..model import SpareRows, StepLayout
from .protocol import DecodingModel


def max_rows(n_loops: int, exit_loop: int, guesses: int) -> int:
    """Most rows a step carries: ``depth = ceil(L / e)`` guesses in flight and, with
    ``guesses = b`` candidates per guess, ``b - 1`` spares beside all but the
    oldest (docs/design.md §3)."""
    depth = math.ceil(n_loops / exit_loop)
    return depth + (depth - 1) * (guesses - 1)


@dataclass(frozen=True)
class StepPlan:
    """One step of one request: the rows to pass once through the K unique layers,
    and the rows whose outputs then need logits.

    Logits rows come in the order ``head_rows`` then ``exit_rows``, all from one
    LM-head matmul (``model.head_and_exit``).
    """

    # [G + S, 1, D] rows entering the pass: a token's embedding for a row at
    # loop 0, else the hidden state its earlier passes left. G slot rows
    # (newest first), then S spare rows.
    rows: torch.Tensor
    # [G] position of each slot row.
    positions: list[int]
    # [G] loops each slot row has completed (the loop it runs now); ascending.
    loops: list[int]
    # [S] position, loops completed and side-buffer index of each spare row.
    spare_positions: list[int]
    spare_loops: list[int]
    spare_index: list[int]
    # Rows (indices into ``rows``) read by the final head after the pass: the
    # retiring slot, early-correction checks, the spares that may replace its
    # successor.
    head_rows: list[int]
    # Rows read at the early exit (through the exit readout, when the model has
    # one): the newest slot when it has just completed ``exit_loop`` loops.
    exit_rows: list[int]
    # The request's KV cache, and its spares' side buffers (None without spares).
    cache: KVCache
    side: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def reads_logits(self) -> bool:
        return bool(self.head_rows or self.exit_rows)


def _segment(model: DecodingModel, plan: StepPlan) -> tuple[StepLayout, KVCache, SpareRows | None]:
    """What ``model`` needs to run ``plan``'s rows: their layout, the cache, the spares."""
    layout = model.layout([[p] for p in plan.positions], plan.loops)
    spares = None
    if plan.spare_positions:
        spares = model.spare_rows(plan.spare_positions, plan.spare_loops, plan.spare_index, plan.side)
    return layout, plan.cache, spares


def run_step(model: DecodingModel, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Execute ``plan``: one pass for all its rows, then one LM-head matmul for the
    rows it reads. Returns the hidden states ``[G + S, 1, D]`` and the logits
    ``[len(head_rows) + len(exit_rows), V]`` (None when it reads none)."""
    layout, cache, spares = _segment(model, plan)
    hidden = model.run_loops(plan.rows, layout, cache, 1, spares=spares)
    if not plan.reads_logits:
        return hidden, None
    return hidden, model.head_and_exit(_take(hidden, plan.head_rows), _take(hidden, plan.exit_rows))


def run_steps(model, plans: list[StepPlan]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Execute several requests' plans as one step (the server's): one pass over the
    unique layers for all their rows (:meth:`~speedec.model.LoopedLM.run_segments`,
    a decoder-only model's), then one LM-head matmul for every row any of them
    reads. Returns each plan's ``(hidden [G + S, 1, D], logits [its head rows +
    its exit rows, V] or None)``, exactly what :func:`run_step` returns for it alone."""
    if len(plans) == 1:
        return [run_step(model, plans[0])]
    x = torch.cat([plan.rows for plan in plans])
    out = model.run_segments(x, [_segment(model, plan) for plan in plans])  # [N, 1, D]
    hidden = out.split([plan.rows.shape[0] for plan in plans])
    starts = list(itertools.accumulate((plan.rows.shape[0] for plan in plans), initial=0))
    head_rows = [starts[i] + r for i, plan in enumerate(plans) for r in plan.head_rows]
    exit_rows = [starts[i] + r for i, plan in enumerate(plans) for r in plan.exit_rows]
    logits = None
    if head_rows or exit_rows:
        logits = model.head_and_exit(_take(out, head_rows), _take(out, exit_rows))
    results, h, x_ = [], 0, len(head_rows)
    for plan, rows in zip(plans, hidden):
        n, m = len(plan.head_rows), len(plan.exit_rows)
        if n + m == 0:
            results.append((rows, None))
            continue
        part = torch.cat((logits[h: h + n], logits[x_: x_ + m])) if n and m else (
            logits[h: h + n] if n else logits[x_: x_ + m])
        results.append((rows, part))
        h, x_ = h + n, x_ + m
    return results


def _take(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``hidden[rows, 0]``: ``[len(rows), D]``, a view when the rows are consecutive
    (the usual case: no index tensor to build)."""
    if not rows or rows == list(range(rows[0], rows[0] + len(rows))):
        start = rows[0] if rows else 0
        return hidden[start: start + len(rows), 0]
    return hidden[rows, 0]
