"""Token selection: greedy, or sampling that stays lossless under speculation.

A speculative engine draws its guess ``x`` from the early-exit distribution
``q`` and, once the final distribution ``p`` of the same position is known,
keeps it with probability ``min(1, p(x) / q(x))``; on rejection it draws from
``normalize(max(p - q, 0))``. The token that results is distributed exactly
as ``p`` (docs/design.md §5), so every engine samples the same distribution
as plain autoregressive sampling. ``p`` and ``q`` are both processed the same
way (temperature, then top-k, then top-p) before the rule is applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    # 0 means greedy (argmax); otherwise logits are divided by it.
    temperature: float = 0.0
    # Keep only the k most likely tokens (None: all).
    top_k: int | None = None
    # Keep the smallest set of most likely tokens whose mass reaches top_p (None: all).
    top_p: float | None = None
    # Seed of the engine's random generator (None: nondeterministic).
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or t == float("inf"):
            raise GenerationError(f"temperature must be a finite number >= 0, got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise GenerationError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise GenerationError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Turns logits into tokens for one generation request."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` logits -> processed probabilities (float64 for exact ratios)."""
        p = self.params
        logits = logits.double() / p.temperature
        if p.top_k is not None and p.top_k < logits.shape[-1]:
            kth = logits.topk(p.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p is not None and p.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # drop a token when the mass before it already reaches top_p
            drop = (sorted_p.cumsum(-1) - sorted_p) >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def draw(self, probs: torch.Tensor) -> int:
        """One token from a ``[V]`` distribution."""
        return int(torch.multinomial(probs, 1, generator=self.generator))  # deliberate host sync

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from ``[V]`` logits: argmax when greedy, else a draw."""
        if self.greedy:
            return int(logits.argmax())  # deliberate host sync
        return self.draw(self.probs(logits))

    def accept(self, p: torch.Tensor, q: torch.Tensor, draft: int) -> tuple[bool, int]:
        """Speculative rule for a guess ``draft`` drawn from ``q`` where ``p`` is the truth.

        Returns (kept, token): the guess itself if kept, else a draw from the
        residual ``max(p - q, 0)``.
        """
        index, token = self.accept_many(p, [(draft, q)])
        return index is not None, token

    def accept_many(self, p: torch.Tensor, drafts: list[tuple[int, torch.Tensor]]) -> tuple[int | None, int]:
        """The rule for several guesses, each drawn independently from its own ``q``.

        Guesses are tried in order: guess ``x`` from ``q`` is kept with
        probability ``min(1, t(x) / q(x))`` where ``t`` is the target, ``p`` at
        first; on rejection the target becomes ``normalize(max(t - q, 0))``
        for the next guess, and after the last one the token is drawn from
        the target. Each stage is the one-guess rule, so the token is
        distributed as ``p``. Returns (index of the kept guess or None, token).
        """
        target = p
        for index, (draft, q) in enumerate(drafts):
            u = torch.rand((), dtype=torch.float64, generator=self.generator, device=p.device)
            if float(u) * float(q[draft]) < float(target[draft]):  # u < t/q without dividing
                return index, draft
            residual = (target - q).clamp_min(0.0)
            total = float(residual.sum())
            if total <= 0.0:  # t == q: rejection has probability zero
                return index, draft
            target = residual / total
        return None, self.draw(target)
