"""The adaptive speculation policy (:class:`SpeculationPolicy`): how many candidates to
launch, guess by guess, priced with the measured step costs
(:func:`speedec.engines.speed.step_costs_for`)."""

from __future__ import annotations

from collections.abc import Sequence

from .step import max_rows


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
