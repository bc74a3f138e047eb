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


class SpeedEngine(Engine):
    name = "speed"

    def __init__(self, model: LoopedLM) -> None:
        super().__init__(model)
        if not model.config.has_early_exit:
            raise GenerationError(
                "the speed engine needs a model with an early exit (n_loops >= 2 and exit_loop set)")

    def decode(self, cache: KVCache, first_pos: int, out: Output, stats: GenerationStats) -> None:
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
            ids = model.head(x[rows, 0]).argmax(-1).tolist()  # deliberate host sync: once per step
            stats.lm_head_calls += 1
            verified = ids[0] if wants_final else None
            guess = ids[-1] if wants_draft else None

            if verified is not None:
                self._verify(slots, verified, out, stats)
                x = x[: len(slots)]
                if not slots and not out.done:
                    slots.append(Slot(verified, oldest.pos + 1))
                    x = self._embed([verified])
                    continue
                if not slots:
                    break
            if guess is not None and slots and slots[0] is newest:
                slots.insert(0, Slot(guess, newest.pos + 1, is_draft=True))
                x = torch.cat((self._embed([guess]), x))
                stats.drafts_launched += 1

        stats.drafts_discarded += sum(s.is_draft for s in slots)
        stats.mean_in_flight = rows_total / stats.steps if stats.steps else 0.0

    def _verify(self, slots: list[Slot], verified: int, out: Output, stats: GenerationStats) -> None:
        """Retire the oldest slot; keep its successor if it guessed right, else flush."""
        slots.pop()
        out.emit(verified)
        if not slots:
            return
        successor = slots[-1]
        if successor.token == verified and not out.done:
            stats.drafts_accepted += 1
            successor.is_draft = False
            return
        if successor.token == verified:
            stats.drafts_accepted += 1
        else:
            stats.drafts_rejected += 1
            stats.flushes += 1
        # Wrong guess (or nothing more needed): every younger slot goes.
        stats.drafts_discarded += len(slots) - 1
        slots.clear()

    def _embed(self, tokens: list[int]) -> torch.Tensor:
        return self.model.embed(torch.tensor(tokens, device=self.model.device)[:, None])  # [n, 1, D]
