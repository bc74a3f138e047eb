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
steps (plan, run, advance: :mod:`speedec.engines.step`) and owns the options;
``adaptive`` hands each request a
:class:`~speedec.engines.policy.SpeculationPolicy` priced with the step costs
measured here (:func:`step_costs_for`). Under sampling a guess (and
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
from .pipeline import Pipeline
from .policy import SpeculationPolicy
from .protocol import DecodingModel
from .step import max_rows, run_step

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
            x = model.embed_rows(torch.zeros(n, 1, dtype=torch.long, device=model.device))
            x = x + torch.randn(x.shape, generator=gen).to(model.dtype).to(model.device)
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
        if not getattr(model, "reads_any_loop", True) and (early_correction or guesses > 1):
            raise GenerationError("a recurrent-depth model reads its drafts through its coda at the exit only: "
                                  "the speed engine runs it without early_correction and with guesses=1")
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
