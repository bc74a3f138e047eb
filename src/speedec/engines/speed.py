"""SPEED: speculative pipelined execution over shared layers (greedy, exact).

Tokens in flight ("slots") sit at different loops of the same K unique layers,
so one pass over those layers (a *step*) serves all of them as one batch. After
each step (DESIGN.md section 2):

1. verify — the oldest slot, having completed L loops, retires; its final
   logits give the verified next token. If the next slot holds that token it
   stays, otherwise every younger slot is flushed and the verified token
   enters at loop 0;
2. draft — the newest surviving slot, if it has just completed ``exit_loop``
   loops, guesses the following token from its early exit; the guess enters at
   loop 0 in the next step.

Slots are kept newest first, so their loops ascend with a constant stride
(``exit_loop``) and their caches are strided views of the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..errors import GenerationError
from ..model import LoopedLM
from ..sampling import Sampler
from .base import Engine, GenerationStats, Output


@dataclass
class Slot:
    """One token in flight."""

    # Token id held by the slot.
    token: int
    # Its position in the sequence.
    pos: int
    # Loops completed so far (0..L).
    loops_done: int = 0
    # True when the token is a guess that still awaits verification.
    is_draft: bool = False
    # [V] distribution the guess was drawn from (sampling only).
    draft_probs: torch.Tensor | None = None


class SpeedEngine(Engine):
    name = "speed"

    def __init__(self, model: LoopedLM) -> None:
        super().__init__(model)
        if not model.config.has_early_exit:
            raise GenerationError(
                "the speed engine needs a model with an early exit (n_loops >= 2 and exit_loop set)")

    def decode(self, cache: KVCache, first_pos: int, out: Output, stats: GenerationStats,
               sampler: Sampler) -> None:
        model = self.model
        c = model.config
        n_loops, exit_loop = c.n_loops, c.exit_loop
        # A slot at position q is needed only while its successor's token is:
        # the last token to generate sits at first_pos + max_new_tokens - 1.
        last_needed_pos = first_pos + out.max_new_tokens - 2
        slots = [Slot(out.tokens[-1], first_pos)]
        x = self._embed([slots[0].token])  # [G, 1, D], row g = slots[g]
        rows_total = 0

        while slots:
            layout = model.layout([[s.pos] for s in slots], [s.loops_done for s in slots])
            x = model.run_loops(x, layout, cache, 1)
            stats.steps += 1
            rows_total += len(slots)
            for s in slots:
                s.loops_done += 1

            # One LM-head matmul for the exit row (newest) and the final row (oldest).
            oldest, newest = slots[-1], slots[0]
            wants_final = oldest.loops_done == n_loops
            wants_draft = newest.loops_done == exit_loop and newest.pos < last_needed_pos
            rows = ([len(slots) - 1] if wants_final else []) + ([0] if wants_draft else [])
            if not rows:
                continue
            logits = model.head(x[rows, 0])  # [len(rows), V]
            stats.lm_head_calls += 1
            greedy_ids = logits.argmax(-1).tolist() if sampler.greedy else None  # deliberate host sync

            if wants_final:
                slots.pop()
                kept, verified = self._verify(slots, logits[0], greedy_ids[0] if greedy_ids else None,
                                              sampler)
                out.emit(verified)
                if kept and not out.done:
                    stats.drafts_accepted += 1
                    slots[-1].is_draft = False
                else:
                    if slots:  # a wrong guess (or nothing more needed): every younger slot goes
                        stats.drafts_accepted += kept
                        stats.drafts_rejected += not kept
                        stats.flushes += not kept
                        stats.drafts_discarded += len(slots) - 1
                        slots.clear()
                    if out.done:
                        break
                    slots.append(Slot(verified, oldest.pos + 1))
                    x = self._embed([verified])
                    continue
                x = x[: len(slots)]
            if wants_draft:
                if sampler.greedy:
                    guess, q = greedy_ids[-1], None
                else:
                    q = sampler.probs(logits[-1])
                    guess = sampler.draw(q)
                slots.insert(0, Slot(guess, newest.pos + 1, is_draft=True, draft_probs=q))
                x = torch.cat((self._embed([guess]), x))
                stats.drafts_launched += 1

        stats.drafts_discarded += sum(s.is_draft for s in slots)
        stats.mean_in_flight = rows_total / stats.steps if stats.steps else 0.0

    @staticmethod
    def _verify(slots: list[Slot], final_logits: torch.Tensor, greedy_token: int | None,
                sampler: Sampler) -> tuple[bool, int]:
        """The verified next token, and whether the successor slot (a guess) holds it."""
        successor = slots[-1] if slots else None
        if sampler.greedy:
            return successor is not None and successor.token == greedy_token, greedy_token
        p = sampler.probs(final_logits)
        if successor is None:
            return False, sampler.draw(p)
        return sampler.accept(p, successor.draft_probs, successor.token)

    def _embed(self, tokens: list[int]) -> torch.Tensor:
        return self.model.embed(torch.tensor(tokens, device=self.model.device)[:, None])  # [n, 1, D]
