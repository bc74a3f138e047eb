"""Position-keyed sampling: the server's sampled tokens do not depend on the load.

A speculative engine's sampled tokens depend on which guesses it launched:
the lossless accept/reject rule consumes random numbers per guess, so the
same seeded request gives other (equally distributed) tokens when a busy
server grants it fewer guesses. The server instead samples with the
Gumbel-max trick, keyed by position: the token at position ``t`` is

    argmax_v ( log p_t(v) + g_t(v) ),   g_t(v) = -log(-log u_t(v)),

where ``p_t`` is the processed distribution (temperature, top-k, top-p, as
:class:`speedec.sampling.Sampler` makes it) and ``u_t`` are uniforms drawn
from a generator seeded by ``(seed, t)`` alone. The argmax of log-probabilities
plus independent Gumbel noise is an exact draw from ``p_t``, and since the
noise of position ``t`` depends on nothing but the seed and ``t``, the token
is a deterministic function of the final logits there, exactly like greedy
decoding: the pipeline verifies guesses by equality (guesses are drafted from
the exit's logits with the same noise) and the output is the same whatever
was guessed, flushed or batched alongside. Greedy requests pass unchanged.
"""

from __future__ import annotations

import torch

from ..sampling import Sampler, SamplingParams

_MASK = (1 << 63) - 1


def position_seed(seed: int, position: int) -> int:
    """A generator seed for ``(seed, position)``: distinct pairs give unrelated streams
    (a splitmix64-style mix, so nearby seeds and positions do not share noise)."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


class KeyedSampling:
    """The logits transform of one sampled request: ``(logits [n, V], positions) ->
    scores [n, V]`` whose argmax is the sampled token of each position."""

    def __init__(self, params: SamplingParams, seed: int) -> None:
        self.params, self.seed = params, seed
        self.sampler = Sampler(params)

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def gumbel(self, position: int, vocab: int) -> torch.Tensor:
        """``[V]`` float64 Gumbel noise of ``position``."""
        generator = torch.Generator().manual_seed(position_seed(self.seed, position))
        u = torch.rand(vocab, dtype=torch.float64, generator=generator)
        return -torch.log(-torch.log(u))

    def __call__(self, logits: torch.Tensor, positions: list[int]) -> torch.Tensor:
        if self.greedy:
            return logits
        log_p = self.sampler.probs(logits.cpu()).log()  # float64; filtered tokens -> -inf
        noise = torch.stack([self.gumbel(t, logits.shape[-1]) for t in positions])
        return (log_p + noise).to(logits.device)

    def pick(self, logits: torch.Tensor, position: int) -> int:
        """The token at ``position`` from its ``[V]`` logits."""
        return int(self(logits[None], [position])[0].argmax())
