"""One request's SPEED pipeline as a resumable object (docs/design.md §2).

A :class:`Pipeline` holds the tokens in flight of one request and nothing of
the model's execution. Each step is three calls:

* :meth:`Pipeline.plan` says what to run: a :class:`~speedec.engines.step.StepPlan` with the rows
  of the step (token embeddings or hidden states), their positions and
  loops, and which rows need logits (at the exit or by the final head);
* whoever owns the model runs it: one pass over the K unique layers for all
  rows, then one LM-head matmul for the rows read
  (:func:`~speedec.engines.step.run_step`);
* :meth:`Pipeline.advance` takes the hidden states and logits back and
  moves the pipeline on: **verify** (the oldest slot retires and gives the
  verified token), **correct** (option ``early_correction``: guesses behind a
  changed prediction are replaced) and **draft** (the newest slot guesses the
  next token at its exit, with spares when ``guesses > 1``); it returns the
  tokens emitted.

The speed engine is this loop for one request. A server batches the rows of
several requests' plans in one step, advances each with its share of the
outputs, and drops a request between two steps without ceremony.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..cache import KVCache
from ..model import SpareRows
from ..sampling import Sampler
from .base import GenerationStats, Output
from .policy import SpeculationPolicy
from .protocol import DecodingModel
from .step import StepPlan, max_rows

# (logits [n, V], the position each row predicts) -> logits [n, V]
LogitsTransform = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass(eq=False)
class Spare:
    """An alternative guess for the position of a guess :class:`Slot`: it runs in the
    same matmuls but keeps its keys and values in side buffers (the guess owns
    the cache entry of the position)."""

    # Token id held by the spare.
    token: int
    # Its position (its guess's).
    pos: int
    # Index of its side buffers (keys/values of its loops).
    index: int
    # [1, D] (one position): its token's embedding until its first pass, then its hidden state.
    row: torch.Tensor
    # Loops completed so far.
    loops_done: int = 0
    # [V] distribution it was drawn from (sampling only).
    draft_probs: torch.Tensor | None = None


@dataclass(eq=False)
class Slot:
    """One token in flight, with its row."""

    # Token id held by the slot.
    token: int
    # Its position in the sequence.
    pos: int
    # [1, D] (one position): its token's embedding until its first pass, then its hidden state.
    row: torch.Tensor
    # Loops completed so far (0..L).
    loops_done: int = 0
    # True when the token is a guess that still awaits verification.
    is_draft: bool = False
    # [V] distribution the guess was drawn from (sampling only).
    draft_probs: torch.Tensor | None = None
    # What the adaptive policy learns from when the position is verified: greedy,
    # the exit's candidates ranked best first (all ``guesses`` of them); sampling,
    # the tokens drawn and launched, in draw order (see Pipeline.record).
    candidates: tuple[int, ...] = ()
    # Spares launched beside this guess, in candidate order.
    spares: list[Spare] = field(default_factory=list)


@dataclass(frozen=True)
class _Reads:
    """What a planned step reads, each reader with its row of the step's logits."""

    # Row 0 when set: the oldest slot's final logits (verification).
    final: bool
    # (slot index, logits row) of each early-correction check, oldest first.
    checks: list[tuple[int, int]]
    # The spares that may replace the retiring slot's successor, read from row
    # ``first_rival`` on.
    rivals: list[Spare]
    first_rival: int
    # Logits row of the newest slot's exit read (its draft), or None.
    draft: int | None
    # The position each logits row predicts the token of (row order), for a
    # position-keyed logits transform (Pipeline's ``transform``).
    targets: list[int]


class _Logits:
    """A step's logits rows and, greedy, their argmaxes (one host sync)."""

    def __init__(self, logits: torch.Tensor, greedy: bool) -> None:
        self.logits = logits
        self.greedy_ids = logits.argmax(-1).tolist() if greedy else None  # deliberate host sync

    def __call__(self, row: int) -> tuple[torch.Tensor, int | None]:
        return self.logits[row], self.greedy_ids[row] if self.greedy_ids is not None else None


class Pipeline:
    """The tokens in flight of one request (docs/design.md §2).

    Slots are kept newest first. A slot is always at least one loop ahead of
    its successor, so in this order their loops ascend (without corrections,
    in steps of ``exit_loop``): the cache then hands attention a strided view
    of the loop dimension instead of a gathered copy (``StepLayout.loop_index``
    takes that fast path only for ascending, evenly spaced loops).
    Each slot holds its own row; spares hang on the guess they stand beside.
    """

    def __init__(self, model: DecodingModel, cache: KVCache, first_pos: int, out: Output,
                 stats: GenerationStats, sampler: Sampler, *, early_correction: bool = False,
                 guesses: int = 1, policy: SpeculationPolicy | None = None, speculate: bool = True,
                 transform: LogitsTransform | None = None, keep_final: bool = False) -> None:
        """``out.tokens[-1]`` (at ``first_pos``, from prefill) enters at loop 0.

        ``keep_final``: every verified token's final logits ``[V]`` (as the step
        computed them, before ``transform``) are appended to :attr:`finals`, one
        per emitted token and in order (the server's logprobs; the reader pops them).

        ``speculate=False``: no guesses at all (no exit read either): every token
        runs its L loops alone, one row per step (the server's autoregressive rows).
        ``transform(logits [n, V], targets)``: applied to every step's logits rows
        before they are read; ``targets[i]`` is the position whose token row i
        predicts (the server's position-keyed sampling, :mod:`speedec.serve.keyed`).
        """
        c = model.config
        self.model = model  # for its embeddings only: the engine runs the steps
        self.device = model.device
        self.n_loops, self.exit_loop = c.n_loops, c.exit_loop
        self.cache, self.out, self.stats, self.sampler = cache, out, stats, sampler
        self.early_correction, self.guesses, self.policy = early_correction, guesses, policy
        self.speculate, self.transform = speculate, transform
        self.keep_final = keep_final
        self.finals: list[torch.Tensor] = []
        # A slot at position q is needed only while its successor's token is:
        # the last token to generate sits at first_pos + max_new_tokens - 1.
        self.last_needed_pos = first_pos + out.max_new_tokens - 2
        self.slots = [Slot(out.tokens[-1], first_pos, self._embed(out.tokens[-1:])[0])]
        self.side: tuple[torch.Tensor, torch.Tensor] | None = None
        self.free: list[int] = []  # side-buffer indices not held by a spare
        if guesses > 1:
            capacity = max_rows(c.n_loops, c.exit_loop, guesses)
            self.side = SpareRows.side_buffers(c, capacity, dtype=model.dtype, device=model.device)
            self.free = list(range(capacity))
        self.rows_total = 0
        self._reads: _Reads | None = None

    @property
    def done(self) -> bool:
        return self.out.done

    def spares(self) -> list[Spare]:
        """Every spare in flight, in row order: by position, then candidate order."""
        return [sp for slot in reversed(self.slots) for sp in slot.spares]

    # ------------------------------------------------------------------ a step
    def plan(self) -> StepPlan:
        """The next step: every slot and spare passes once through the unique layers."""
        slots, L, e = self.slots, self.n_loops, self.exit_loop
        G = len(slots)
        spares = self.spares()
        # What the rows will have completed after this pass decides what is read.
        final = slots[-1].loops_done + 1 == L
        draft = self.speculate and slots[0].loops_done + 1 == e and slots[0].pos < self.last_needed_pos
        # Slots past their exit whose successor is a guess: slots[i] precedes slots[i - 1].
        checks = ([i for i in range(G - 1, 0, -1) if e < slots[i].loops_done + 1 < L]
                  if self.early_correction else [])
        # The retiring slot's successor's spares may take its place: read them too.
        rivals = list(slots[-2].spares) if final and G > 1 else []
        first_rival = int(final) + len(checks)
        targets = (([slots[-1].pos + 1] if final else []) + [slots[i].pos + 1 for i in checks]
                   + [sp.pos + 1 for sp in rivals] + ([slots[0].pos + 1] if draft else []))
        self._reads = _Reads(final=final, checks=[(i, int(final) + n) for n, i in enumerate(checks)],
                             rivals=rivals, first_rival=first_rival,
                             draft=first_rival + len(rivals) if draft else None, targets=targets)
        parts = [s.row for s in slots] + [sp.row for sp in spares]
        return StepPlan(
            rows=parts[0][None] if len(parts) == 1 else torch.stack(parts),
            positions=[s.pos for s in slots], loops=[s.loops_done for s in slots],
            spare_positions=[sp.pos for sp in spares], spare_loops=[sp.loops_done for sp in spares],
            spare_index=[sp.index for sp in spares],
            head_rows=([G - 1] if final else []) + checks + [G + spares.index(sp) for sp in rivals],
            exit_rows=[0] if draft else [], cache=self.cache, side=self.side)

    def advance(self, hidden: torch.Tensor, logits: torch.Tensor | None) -> list[int]:
        """Take the outputs of the planned step (``hidden [G + S, 1, D]``, and the
        logits of its rows read, or None) and move on: verify, correct, draft.
        Returns the tokens emitted (verified) by this step."""
        reads, self._reads = self._reads, None
        if reads is None:
            raise RuntimeError("advance() needs the outputs of a step that plan() made")
        slots, stats = self.slots, self.stats
        stats.steps += 1
        self.rows_total += hidden.shape[0]
        rows = hidden.unbind(0)  # [1, D] each
        for slot, row in zip(slots, rows):
            slot.row = row
            slot.loops_done += 1
        if len(rows) > len(slots):
            for spare, row in zip(self.spares(), rows[len(slots):]):
                spare.row = row
                spare.loops_done += 1
        if logits is None:
            return []
        stats.lm_head_calls += 1
        if reads.final and self.keep_final:
            self.finals.append(logits[0])  # verify emits exactly one token from row 0
        if self.transform is not None:
            logits = self.transform(logits, reads.targets)
        read = _Logits(logits, self.sampler.greedy)
        emitted = len(self.out.tokens)
        newest = slots[0]
        if not reads.final or self.verify(reads, read):
            corrected = self.correct(reads, read)
            if reads.draft is not None and not corrected:
                self.draft(newest.pos, *read(reads.draft))
        return self.out.tokens[emitted:]

    def finish(self) -> None:
        """Close the request's counters (guesses still in flight count as discarded)."""
        stats = self.stats
        stats.drafts_discarded += sum(s.is_draft for s in self.slots)
        stats.mean_in_flight = self.rows_total / stats.steps if stats.steps else 0.0
        if self.policy is not None:
            stats.guesses_skipped += self.policy.guesses_skipped

    # ------------------------------------------------------------ the three moves
    def verify(self, reads: _Reads, read: _Logits) -> bool:
        """The oldest slot has completed L loops and retires; its final logits give
        the verified next token. True when the guess behind it held that token
        (the pipeline goes on); otherwise every younger slot is flushed and the
        token restarts the pipeline: at loop 0, or from the loops a spare that
        held it has done."""
        slots, stats = self.slots, self.stats
        oldest = slots.pop()
        successor = slots[-1] if slots else None
        drafts: list[Slot | Spare] = ([successor] if successor is not None else []) + reads.rivals
        winner, verified = self._judge(drafts, *read(0))
        self.out.emit(verified)
        if successor is not None and self.policy is not None:
            self.record(successor, verified)
        kept = successor is not None and winner == 0
        if kept and not self.out.done:
            stats.drafts_accepted += 1
            successor.is_draft = False
            self._free(successor.spares)
            successor.spares = []
            return True
        spares = self.spares()
        if slots:  # a wrong guess (or nothing more needed): every younger slot goes
            stats.drafts_accepted += kept
            stats.drafts_rejected += not kept
            stats.flushes += not kept
            stats.drafts_discarded += len(slots) - 1
            slots.clear()
        if self.out.done:
            return False
        self._free(spares)
        if winner is None:
            slots.append(Slot(verified, oldest.pos + 1, self._embed([verified])[0]))
            return False
        k = winner - (successor is not None)  # a spare held it: it goes on from its loops
        spare = reads.rivals[k]
        stats.spare_hits += 1
        SpareRows.promote(self.cache, self.side, spare.index, spare.pos, spare.loops_done)
        slots.append(Slot(spare.token, spare.pos, spare.row, loops_done=spare.loops_done))
        if spare.pos < self.last_needed_pos:
            self.draft(spare.pos, *read(reads.first_rival + k))
        return False

    def correct(self, reads: _Reads, read: _Logits) -> bool:
        """Early correction: every slot between its exit and its last loop re-reads
        its prediction for the next position; at the first (oldest) that changed,
        the guess behind it and every younger slot are replaced by the new
        prediction. True when a guess was replaced."""
        slots, stats = self.slots, self.stats
        for i, row in reads.checks:  # oldest first: a correction discards every younger check
            guess = slots[i - 1]
            token, q = self._repredict(guess, *read(row))
            if token == guess.token:
                guess.draft_probs = q
                continue
            stats.corrections += 1
            stats.drafts_discarded += i
            self._free([sp for slot in reversed(slots[:i]) for sp in slot.spares])
            del slots[:i]
            slots.insert(0, Slot(token, slots[0].pos + 1, self._embed([token])[0], is_draft=True,
                                 draft_probs=q, candidates=(token,)))
            stats.drafts_launched += 1
            return True
        return False

    def draft(self, parent_pos: int, logits: torch.Tensor, greedy_token: int | None) -> None:
        """Guesses for ``parent_pos + 1`` from ``logits`` ([V]) of the slot at
        ``parent_pos``: the guess enters at loop 0 in the next step, with the
        other candidates as spares (``guesses > 1``); the adaptive policy
        decides how many, none included, priced at the rows in flight (the
        slots and spares that the next step carries without them)."""
        n = self.guesses if self.policy is None else self.policy.choose(
            len(self.slots) + sum(len(s.spares) for s in self.slots))
        if n == 0:
            return
        if self.sampler.greedy:
            ranked = (logits.topk(self.guesses).indices.tolist() if self.guesses > 1
                      else [greedy_token])  # deliberate host sync
            tokens, q = ranked[:n], None
        else:
            q = self.sampler.probs(logits)
            tokens = [self.sampler.draw(q) for _ in range(n)]
            ranked = tokens
        embedded = self._embed(tokens).unbind(0)  # [1, D] each
        guess = Slot(tokens[0], parent_pos + 1, embedded[0], is_draft=True, draft_probs=q,
                     candidates=tuple(ranked))
        guess.spares = [Spare(t, parent_pos + 1, self.free.pop(), row, draft_probs=q)
                        for t, row in zip(tokens[1:], embedded[1:])]
        self.slots.insert(0, guess)
        self.stats.drafts_launched += 1
        self.stats.spares_launched += len(guess.spares)

    def record(self, guess: Slot, verified: int) -> None:
        """Tell the adaptive policy where the verified token stood among the guess's
        candidates. Greedy, they are the exit's ranking, so its rank speaks for
        every ``a_b``. Sampling, they are the ``n`` tokens drawn, in draw order:
        the first index of the verified token among them is the guess that the
        lossless rule kept (a rejected token gets no mass later), which is what
        ``a_b`` means for ``b <= n`` independent draws; of larger ``b`` they say
        nothing, and those rates are left as they are."""
        rank = guess.candidates.index(verified) if verified in guess.candidates else None
        self.policy.record(rank, known=None if self.sampler.greedy else len(guess.candidates))

    # ---------------------------------------------------------------- helpers
    def _judge(self, drafts: Sequence[Slot | Spare], final_logits: torch.Tensor,
               greedy_token: int | None) -> tuple[int | None, int]:
        """The verified next token, and which of the guesses for it (if any) holds it."""
        if self.sampler.greedy:
            winner = next((i for i, d in enumerate(drafts) if d.token == greedy_token), None)
            return winner, greedy_token
        p = self.sampler.probs(final_logits)
        return self.sampler.accept_many(p, [(d.token, d.draft_probs) for d in drafts])

    def _repredict(self, guess: Slot, logits: torch.Tensor,
                   greedy_token: int | None) -> tuple[int, torch.Tensor | None]:
        """The guess for ``guess``'s position from a later loop's ``logits`` ([V]),
        and the distribution it follows. Sampling re-couples the earlier guess
        (drawn from its ``draft_probs``): it is kept with probability
        min(1, q_new / q_old), else replaced by a draw from the residual, so the
        result is distributed as q_new."""
        if self.sampler.greedy:
            return greedy_token, None
        q = self.sampler.probs(logits)
        return self.sampler.accept(q, guess.draft_probs, guess.token)[1], q

    def _free(self, spares: list[Spare]) -> None:
        self.free.extend(sp.index for sp in spares)

    def _embed(self, tokens: list[int]) -> torch.Tensor:
        return self.model.embed_rows(torch.tensor(tokens, device=self.device)[:, None])  # [n, 1, D]
