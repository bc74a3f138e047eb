"""SPEED: speculative pipelined execution over shared layers (exact).

Tokens in flight ("slots") sit at different loops of the same K unique layers,
so one pass over those layers (a *step*) serves all of them as one batch. After
each step (docs/design.md §2) the oldest slot is **verified** against its final
logits, guesses whose prediction changed are **corrected** (option
``early_correction``) and the newest slot **drafts** the next token at its
early exit, with spares beside the guess (``guesses = b > 1``) and, with
``adaptive``, as many candidates as the measured acceptance and step costs
make worth it. All logits rows of a step go through one LM-head matmul.

The per-request state and those three moves live in
:class:`~speedec.engines.pipeline.Pipeline`; :class:`SpeedEngine` runs its
steps (plan, run, advance) and owns the options. Under sampling a guess (and
each spare) is drawn independently from the early-exit distribution q and
verified with the lossless rules of :mod:`speedec.sampling`, so the output is
distributed as plain sampling's.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence

import torch

from ..cache import KVCache
from ..errors import GenerationError
from ..sampling import Sampler
from .base import Engine, GenerationStats, Output
from .pipeline import Pipeline, max_rows, run_step
from .protocol import DecodingModel

# Measured step costs per model (keyed by its embedding module, which a model
# shares with the decoders bound to it) and row count: engines are created per
# request by ``speedec.generate``, the measurement is done once.
_STEP_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_costs_for(model: DecodingModel, rows: int) -> list[float]:
    """:func:`measure_step_costs`, remembered for the lifetime of the model."""
    known = _STEP_COSTS.setdefault(model.embed, {})
    if rows not in known:
        known[rows] = measure_step_costs(model, rows)
    return known[rows]


def measure_step_costs(model: DecodingModel, rows: int, *, repeats: int = 5) -> list[float]:
    """Seconds of one step (one pass over the K unique layers) with 1..``rows``
    slots in flight, measured on a scratch cache (median of ``repeats``)."""
    c = model.config
    length = min(c.max_seq_len, 64)
    cache = KVCache(c, length, dtype=model.dtype, device=model.device)
    costs = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in range(1, rows + 1):
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
    b best candidates (under sampling: among b tokens drawn from the exit's
    distribution; moving averages over about ``window`` verifications,
    starting optimistic), and combines the cost model of docs/design.md §3
    with measured step costs ``t(n)`` for n rows in flight.

    Guessing with b candidates takes ``s_b = a_1 e + (a_b - a_1)(L - e) +
    (1 - a_b) L`` steps per token (a spare that wins saves e of the L - e
    steps a flush loses), not guessing ``s_0 = L``. The choice is priced in
    two stages (:meth:`choose`):

    * the pipeline: launching b candidates at every opportunity fills it to
      ``R_b = depth + (depth - 1)(b - 1)`` rows (``depth = ceil(L / e)``), so
      b costs ``s_b t(R_b)`` seconds per token against ``L t(1)`` for none.
      A guess launched now rides every step until it is verified, and the
      guesses launched behind it meanwhile ride with it, so its marginal row
      is priced where the pipeline will be, not where it is: declining a
      guess does not hold the depth at the current rows, it drains the
      pipeline (a slot drafts only once, on completing e loops) and the next
      token starts alone. Guessing pays when its saving ``(L - s_b) t(1)``
      exceeds the marginal cost of the rows, ``s_b (t(R_b) - t(1))``;
    * the rows in flight now (``rows``, the slots and spares the next step
      carries without this launch): of the candidates the first stage allows,
      no more are launched than pay at the current state,
      ``s_b t(rows + b) < s_c t(rows + c)`` for the c < b passed over (with
      ``s_0 t(rows) = L t(rows)``). This trims spares where the step cost
      steps up right above the rows in flight; it never vetoes the first
      candidate that the first stage wants (``s_1 t(rows + 1) <= s_1 t(R_1) <
      L t(1) <= L t(rows)``).

    On a flat table (step cost independent of the rows) any acceptance above
    zero pays; on a table that grows beyond a few rows, guessing stops once
    ``s_b t(R_b)`` exceeds ``L t(1)``.

    While it launches nothing, every ``probe_every``-th opportunity still
    launches one guess so that the estimates stay current.
    """

    def __init__(self, n_loops: int, exit_loop: int, step_costs: Sequence[float], *, max_guesses: int = 1,
                 window: int = 16, probe_every: int = 4) -> None:
        self.n_loops, self.exit_loop = n_loops, exit_loop
        self.step_costs = list(step_costs)
        self.max_guesses = max_guesses
        self.window, self.probe_every = window, probe_every
        self.hit_rate = [1.0] * max_guesses  # a_1 .. a_B
        self._skipped = 0
        self.guesses_skipped = 0

    def rows(self, guesses: int) -> int:
        return 1 if guesses == 0 else max_rows(self.n_loops, self.exit_loop, guesses)

    def step_cost(self, rows: int) -> float:
        """``t(rows)``: the measured seconds of a step with ``rows`` rows (the last
        measured for more)."""
        return self.step_costs[min(max(rows, 1), len(self.step_costs)) - 1]

    def expected_cost(self, guesses: int, rows: int | None = None) -> float:
        """Expected seconds per token when launching ``guesses`` candidates now, with
        ``rows`` rows in flight without them (None: a pipeline that launches
        ``guesses`` candidates at every opportunity, from empty to full)."""
        L, e = self.n_loops, self.exit_loop
        if guesses == 0:
            return L * self.step_cost(1 if rows is None else rows)
        a1, ab = self.hit_rate[0], self.hit_rate[guesses - 1]
        steps = a1 * e + (ab - a1) * (L - e) + (1 - ab) * L
        return steps * self.step_cost(self.rows(guesses) if rows is None else rows + guesses)

    def choose(self, rows: int | None = None) -> int:
        """How many candidates to launch at this opportunity: the best for the full
        pipeline, trimmed to what pays with ``rows`` rows in flight without them
        (None: no trimming)."""
        best = min(range(self.max_guesses + 1), key=self.expected_cost)
        if rows is not None and best > 0:
            best = min(range(best + 1), key=lambda b: self.expected_cost(b, rows))
        if best > 0:
            self._skipped = 0
            return best
        self._skipped += 1
        if self._skipped >= self.probe_every:
            self._skipped = 0
            return 1
        self.guesses_skipped += 1
        return 0

    def record(self, rank: int | None, *, known: int | None = None) -> None:
        """The verified token was the exit's candidate number ``rank`` (0 = best; None:
        not among them). ``known``: how many of the rates the observation speaks for
        (``a_1 .. a_known``; None: all), e.g. the number of tokens drawn under
        sampling, which says nothing of more draws than were made."""
        for b in range(self.max_guesses if known is None else min(known, self.max_guesses)):
            hit = rank is not None and rank <= b
            self.hit_rate[b] += (float(hit) - self.hit_rate[b]) / self.window


class SpeedEngine(Engine):
    """SPEED over a :class:`~speedec.engines.pipeline.Pipeline` per request.

    With ``adaptive`` and no ``step_costs``, the step costs are measured here,
    when the engine is built (once per model, remembered by
    :func:`step_costs_for`), so that no request's timings include them.
    """

    name = "speed"

    MAX_GUESSES = 8

    def __init__(self, model: DecodingModel, *, early_correction: bool = False, guesses: int = 1,
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
        self.max_rows = max_rows(c.n_loops, c.exit_loop, guesses)
        self.step_costs: list[float] | None = None
        if step_costs is not None:
            costs = list(step_costs)
            if len(costs) < self.max_rows or not all(
                    isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in costs):
                raise GenerationError(f"step_costs must hold {self.max_rows} positive seconds "
                                      f"(1..{self.max_rows} rows), got {step_costs!r}")
            self.step_costs = costs
        elif adaptive:  # measured once per model, so later requests decide alike
            self.step_costs = step_costs_for(model, self.max_rows)

    def _policy(self) -> SpeculationPolicy | None:
        """A fresh policy for one request (None unless adaptive)."""
        if not self.adaptive:
            return None
        c = self.model.config
        return SpeculationPolicy(c.n_loops, c.exit_loop, self.step_costs, max_guesses=self.guesses)

    def pipeline(self, cache: KVCache, first_pos: int, out: Output, stats: GenerationStats,
                 sampler: Sampler) -> Pipeline:
        """The pipeline of one request with this engine's options; ``out.tokens[-1]``
        (from prefill, at ``first_pos``) enters it."""
        return Pipeline(self.model, cache, first_pos, out, stats, sampler,
                        early_correction=self.early_correction, guesses=self.guesses,
                        policy=self._policy())

    def decode(self, cache: KVCache, first_pos: int, out: Output, stats: GenerationStats,
               sampler: Sampler) -> None:
        pipeline = self.pipeline(cache, first_pos, out, stats, sampler)
        while not pipeline.done:
            plan = pipeline.plan()
            pipeline.advance(*run_step(self.model, plan))
        pipeline.finish()
