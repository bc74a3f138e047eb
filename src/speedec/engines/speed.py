"""SPEED: speculative pipelined execution over shared layers (exact).

Tokens in flight ("slots") sit at different loops of the same K unique layers,
so one pass over those layers (a *step*) serves all of them as one batch. After
each step (docs/design.md §2):

1. verify — the oldest slot, having completed L loops, retires; its final
   logits give the verified next token. If the next slot holds that token it
   stays, otherwise every younger slot is flushed and the verified token
   enters at loop 0;
2. correct (option ``early_correction``) — every slot between its exit and
   its last loop re-reads its prediction for the next position; when it has
   changed, the guess that follows it (and everything younger) is replaced at
   once by the new prediction instead of waiting for verification;
3. draft — the newest surviving slot, if it has just completed ``exit_loop``
   loops, guesses the following token from its early exit; the guess enters at
   loop 0 in the next step. With ``guesses = b > 1`` the next b - 1 candidates
   enter too, as *spares*: rows that run through the same matmuls but keep
   their keys and values in side buffers (the guess owns the cache entry of
   that position). If verification finds the token among the spares, that
   spare takes the guess's place with the loops it has already done (its side
   entries are copied into the cache) instead of restarting at loop 0. With
   ``adaptive`` a policy chooses, guess by guess, how many candidates to
   launch (none included) from the measured acceptance and step costs.

All logits rows of a step (final, corrections, draft) go through one LM-head
matmul. Slots are kept newest first. Under sampling a guess (and each spare)
is drawn independently from the early-exit distribution q and verified with
the lossless rules of :mod:`speedec.sampling`; a correction re-couples the
guess to the later loop's distribution with the same rule, so the guess stays
distributed as the distribution it is finally verified against.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..errors import GenerationError
from ..model import LoopedLM, SpareRows
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
    # Candidates ranked by the exit that produced the guess, best first (the
    # adaptive policy's record of where the verified token ranked).
    candidates: tuple[int, ...] = ()


@dataclass
class Spare:
    """An alternative guess for a position whose main guess is a :class:`Slot`."""

    token: int
    pos: int
    # Index of its side buffers (keys/values of its loops).
    index: int
    loops_done: int = 0
    draft_probs: torch.Tensor | None = None


# Measured step costs per model (keyed by its embedding module, which a model
# shares with the decoders bound to it) and row count: engines are created per
# request by ``speedec.generate``, the measurement is done once.
_STEP_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_costs_for(model: LoopedLM, max_rows: int) -> list[float]:
    """:func:`measure_step_costs`, remembered for the lifetime of the model."""
    known = _STEP_COSTS.setdefault(model.embed, {})
    if max_rows not in known:
        known[max_rows] = measure_step_costs(model, max_rows)
    return known[max_rows]


def measure_step_costs(model: LoopedLM, max_rows: int, *, repeats: int = 5) -> list[float]:
    """Seconds of one step (one pass over the K unique layers) with 1..max_rows
    slots in flight, measured on a scratch cache (median of ``repeats``)."""
    c = model.config
    length = min(c.max_seq_len, 64)
    cache = KVCache(c, length, dtype=model.dtype, device=model.device)
    costs = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in range(1, max_rows + 1):
            loops = [min(i * (c.exit_loop or 1), c.n_loops - 1) for i in range(n)]
            layout = model.layout([[length - 1 - i] for i in range(n)], loops)
            x = torch.randn(n, 1, c.d_model, generator=gen).to(model.dtype).to(model.device)
            model.run_loops(x, layout, cache, 1)  # warm-up
            times = []
            for _ in range(repeats):
                begin = time.perf_counter()
                model.run_loops(x, layout, cache, 1)
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                times.append(time.perf_counter() - begin)
            costs.append(sorted(times)[len(times) // 2])
    return costs


class SpeculationPolicy:
    """Chooses, guess by guess, how many candidates to launch (0 = none) so as to
    minimise the expected time per token.

    It tracks ``a_b``, the rate at which the verified token is among the exit's
    b best candidates (moving averages over about ``window`` verifications,
    starting optimistic), and combines the cost model of docs/design.md §3
    with measured step costs ``t(n)`` for n rows in flight. With ``depth =
    ceil(L / e)`` guesses in flight: no guessing costs ``L t(1)`` per token; b
    candidates cost ``s_b t(depth + (depth - 1)(b - 1))`` where
    ``s_b = a_1 e + (a_b - a_1)(L - e) + (1 - a_b) L`` steps (a spare that wins
    saves e of the L - e steps a flush loses). While it launches nothing,
    every ``probe_every``-th opportunity still launches one guess so that the
    estimates stay current.
    """

    def __init__(self, n_loops: int, exit_loop: int, step_costs: Sequence[float], *, max_guesses: int = 1,
                 window: int = 16, probe_every: int = 4) -> None:
        self.n_loops, self.exit_loop = n_loops, exit_loop
        self.depth = math.ceil(n_loops / exit_loop)
        self.step_costs = list(step_costs)
        self.max_guesses = max_guesses
        self.window, self.probe_every = window, probe_every
        self.hit_rate = [1.0] * max_guesses  # a_1 .. a_B
        self._skipped = 0
        self.guesses_skipped = 0

    @property
    def acceptance(self) -> float:
        return self.hit_rate[0]

    def rows(self, guesses: int) -> int:
        return 1 if guesses == 0 else self.depth + (self.depth - 1) * (guesses - 1)

    def expected_cost(self, guesses: int) -> float:
        """Expected seconds per token when launching ``guesses`` candidates per guess."""
        L, e = self.n_loops, self.exit_loop
        if guesses == 0:
            return L * self.step_costs[0]
        a1, ab = self.hit_rate[0], self.hit_rate[guesses - 1]
        steps = a1 * e + (ab - a1) * (L - e) + (1 - ab) * L
        return steps * self.step_costs[min(self.rows(guesses), len(self.step_costs)) - 1]

    def choose(self) -> int:
        """How many candidates to launch at this opportunity."""
        best = min(range(self.max_guesses + 1), key=self.expected_cost)
        if best > 0:
            self._skipped = 0
            return best
        self._skipped += 1
        if self._skipped >= self.probe_every:
            self._skipped = 0
            return 1
        self.guesses_skipped += 1
        return 0

    def speculate(self) -> bool:
        return self.choose() > 0

    def record(self, rank: int | None) -> None:
        """The verified token was the exit's candidate number ``rank`` (0 = best; None: not among them)."""
        for b in range(self.max_guesses):
            hit = rank is not None and rank <= b
            self.hit_rate[b] += (float(hit) - self.hit_rate[b]) / self.window


class SpeedEngine(Engine):
    name = "speed"

    MAX_GUESSES = 8

    def __init__(self, model: LoopedLM, *, early_correction: bool = False, guesses: int = 1,
                 adaptive: bool = False, step_costs: Sequence[float] | None = None) -> None:
        super().__init__(model)
        c = model.config
        if not c.has_early_exit:
            raise GenerationError(
                "the speed engine needs a model with an early exit (n_loops >= 2 and exit_loop set); "
                "decode this model with the autoregressive engine")
        for name, value in (("early_correction", early_correction), ("adaptive", adaptive)):
            if not isinstance(value, bool):
                raise GenerationError(f"{name} must be True or False, got {value!r}")
        if (isinstance(guesses, bool) or not isinstance(guesses, int)
                or not 1 <= guesses <= min(self.MAX_GUESSES, c.vocab_size)):
            raise GenerationError(
                f"guesses must be an integer from 1 to {min(self.MAX_GUESSES, c.vocab_size)}, got {guesses!r}")
        self.early_correction = early_correction
        self.guesses = guesses
        self.adaptive = adaptive
        depth = math.ceil(c.n_loops / c.exit_loop)
        self.max_rows = depth + (depth - 1) * (guesses - 1)
        self.step_costs: list[float] | None = None
        if step_costs is not None:
            costs = list(step_costs)
            if len(costs) < self.max_rows or not all(
                    isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in costs):
                raise GenerationError(f"step_costs must hold {self.max_rows} positive seconds "
                                      f"(1..{self.max_rows} rows), got {step_costs!r}")
            self.step_costs = costs

    def _policy(self) -> SpeculationPolicy | None:
        if not self.adaptive:
            return None
        if self.step_costs is None:  # measured once per model, so later requests decide alike
            self.step_costs = step_costs_for(self.model, self.max_rows)
        c = self.model.config
        return SpeculationPolicy(c.n_loops, c.exit_loop, self.step_costs, max_guesses=self.guesses)

    def decode(self, cache: KVCache, first_pos: int, out: Output, stats: GenerationStats,
               sampler: Sampler) -> None:
        model = self.model
        c = model.config
        n_loops, exit_loop = c.n_loops, c.exit_loop
        policy = self._policy()
        # A slot at position q is needed only while its successor's token is:
        # the last token to generate sits at first_pos + max_new_tokens - 1.
        last_needed_pos = first_pos + out.max_new_tokens - 2
        slots = [Slot(out.tokens[-1], first_pos)]
        x = self._embed([slots[0].token])  # [G, 1, D], row g = slots[g]
        spares: list[Spare] = []
        xs = x[:0]  # [S, 1, D], row j = spares[j]
        side = None
        free: list[int] = []
        if self.guesses > 1:
            capacity = self.max_rows
            side = SpareRows.side_buffers(c, capacity, dtype=model.dtype, device=model.device)
            free = list(range(capacity))
        rows_total = 0

        def drop_spares(keep) -> None:
            nonlocal spares, xs
            kept = [j for j, sp in enumerate(spares) if keep(sp)]
            for j, sp in enumerate(spares):
                if j not in kept:
                    free.append(sp.index)
            if len(kept) < len(spares):
                spares = [spares[j] for j in kept]
                xs = xs[kept]

        def launch(parent_pos: int, logits: torch.Tensor, greedy_token: int | None) -> None:
            """Guesses for ``parent_pos + 1`` from ``logits`` ([V]) of the slot at ``parent_pos``."""
            nonlocal x, xs, spares
            n = self.guesses if policy is None else policy.choose()
            if n == 0:
                return
            if sampler.greedy:
                ranked = (logits.topk(self.guesses).indices.tolist() if self.guesses > 1
                          else [greedy_token])  # deliberate host sync
                tokens, q = ranked[:n], None
            else:
                q = sampler.probs(logits)
                tokens = [sampler.draw(q) for _ in range(n)]
                ranked = tokens
            slots.insert(0, Slot(tokens[0], parent_pos + 1, is_draft=True, draft_probs=q,
                                 candidates=tuple(ranked)))
            x = torch.cat((self._embed(tokens[:1]), x))
            stats.drafts_launched += 1
            if n > 1:
                new = [Spare(t, parent_pos + 1, free.pop(), draft_probs=q) for t in tokens[1:]]
                spares = spares + new
                xs = torch.cat((xs, self._embed(tokens[1:])))
                stats.spares_launched += len(new)

        while slots:
            G = len(slots)
            layout = model.layout([[s.pos] for s in slots], [s.loops_done for s in slots])
            if spares:
                rows = model.spare_rows([sp.pos for sp in spares], [sp.loops_done for sp in spares],
                                        [sp.index for sp in spares], side)
                both = model.run_loops(torch.cat((x, xs)), layout, cache, 1, spares=rows)
                x, xs = both[:G], both[G:]
                for sp in spares:
                    sp.loops_done += 1
            else:
                x = model.run_loops(x, layout, cache, 1)
            stats.steps += 1
            rows_total += G + len(spares)
            for s in slots:
                s.loops_done += 1

            oldest, newest = slots[-1], slots[0]
            wants_final = oldest.loops_done == n_loops
            wants_draft = newest.loops_done == exit_loop and newest.pos < last_needed_pos
            # Slots past their exit whose successor is a guess: slots[i] precedes slots[i - 1].
            checks = ([i for i in range(G - 1, 0, -1) if exit_loop < slots[i].loops_done < n_loops]
                      if self.early_correction else [])
            # Spares of the retiring slot's successor may take its place: read them too.
            rivals = [j for j, sp in enumerate(spares) if sp.pos == oldest.pos + 1] if wants_final else []
            rows = ([G - 1] if wants_final else []) + checks
            if not rows and not wants_draft:
                continue
            hidden = x[rows, 0] if not rivals else torch.cat((x[rows, 0], xs[rivals, 0]))
            # One LM-head matmul: [len(rows) + len(rivals) (+ 1 draft row, read at the exit), V].
            logits = model.head_and_exit(hidden, x[:1, 0] if wants_draft else x[:0, 0])
            draft_row = len(rows) + len(rivals)
            stats.lm_head_calls += 1
            greedy_ids = logits.argmax(-1).tolist() if sampler.greedy else None  # deliberate host sync
            row = 0

            if wants_final:
                slots.pop()
                successor = slots[-1] if slots else None
                drafts = ([successor] if successor else []) + [spares[j] for j in rivals]
                winner, verified = self._verify(drafts, logits[0], greedy_ids[0] if greedy_ids else None,
                                                sampler)
                row = 1
                out.emit(verified)
                if successor is not None and policy is not None:
                    policy.record(successor.candidates.index(verified)
                                  if verified in successor.candidates else None)
                kept = successor is not None and winner == 0
                if kept and not out.done:
                    stats.drafts_accepted += 1
                    successor.is_draft = False
                    drop_spares(lambda sp: sp.pos != oldest.pos + 1)
                    x = x[: len(slots)]
                else:
                    if slots:  # a wrong guess (or nothing more needed): every younger slot goes
                        stats.drafts_accepted += kept
                        stats.drafts_rejected += not kept
                        stats.flushes += not kept
                        stats.drafts_discarded += len(slots) - 1
                        slots.clear()
                    if out.done:
                        break
                    if winner is not None:  # a spare held it: it goes on from the loops it has done
                        j = rivals[winner - (successor is not None)]
                        sp = spares[j]
                        stats.spare_hits += 1
                        SpareRows.promote(cache, side, sp.index, sp.pos, sp.loops_done)
                        slots.append(Slot(sp.token, sp.pos, loops_done=sp.loops_done))
                        x = xs[j: j + 1]
                        drop_spares(lambda _: False)
                        if sp.pos < last_needed_pos:
                            k = len(rows) + rivals.index(j)
                            launch(sp.pos, logits[k], greedy_ids[k] if greedy_ids else None)
                    else:
                        drop_spares(lambda _: False)
                        slots.append(Slot(verified, oldest.pos + 1))
                        x = self._embed([verified])
                    continue

            corrected = False
            for i in checks:  # oldest first: a correction discards every younger check
                guess, q = self._predict(logits[row], greedy_ids[row] if greedy_ids else None,
                                         sampler, slots[i - 1])
                row += 1
                if guess == slots[i - 1].token:
                    slots[i - 1].draft_probs = q
                    continue
                stats.corrections += 1
                stats.drafts_discarded += i
                slots, x = slots[i:], x[i:]
                drop_spares(lambda sp, limit=slots[0].pos: sp.pos <= limit)
                slots.insert(0, Slot(guess, slots[0].pos + 1, is_draft=True, draft_probs=q,
                                     candidates=(guess,)))
                x = torch.cat((self._embed([guess]), x))
                stats.drafts_launched += 1
                corrected = True
                break

            if wants_draft and not corrected:
                launch(newest.pos, logits[draft_row], greedy_ids[draft_row] if greedy_ids else None)

        stats.drafts_discarded += sum(s.is_draft for s in slots)
        stats.mean_in_flight = rows_total / stats.steps if stats.steps else 0.0
        if policy is not None:
            stats.guesses_skipped += policy.guesses_skipped

    @staticmethod
    def _predict(logits: torch.Tensor, greedy_token: int | None, sampler: Sampler,
                 guess: Slot | None) -> tuple[int, torch.Tensor | None]:
        """A guess for the next position from intermediate ``logits`` ([V]) and the
        distribution it follows. With ``guess`` (an earlier guess for the same
        position, drawn from its ``draft_probs``), sampling re-couples it: it is
        kept with probability min(1, q_new/q_old), else replaced by a draw from
        the residual, so the result is distributed as q_new."""
        if sampler.greedy:
            return greedy_token, None
        q = sampler.probs(logits)
        if guess is None:
            return sampler.draw(q), q
        return sampler.accept(q, guess.draft_probs, guess.token)[1], q

    @staticmethod
    def _verify(drafts: list[Slot | Spare], final_logits: torch.Tensor, greedy_token: int | None,
                sampler: Sampler) -> tuple[int | None, int]:
        """The verified next token, and which of the guesses for it (if any) holds it."""
        if sampler.greedy:
            winner = next((i for i, d in enumerate(drafts) if d.token == greedy_token), None)
            return winner, greedy_token
        p = sampler.probs(final_logits)
        return sampler.accept_many(p, [(d.token, d.draft_probs) for d in drafts])

    def _embed(self, tokens: list[int]) -> torch.Tensor:
        return self.model.embed(torch.tensor(tokens, device=self.model.device)[:, None])  # [n, 1, D]
