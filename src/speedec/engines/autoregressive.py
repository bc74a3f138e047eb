"""The reference engine: one token at a time through all L loops."""

from __future__ import annotations

import torch

from ..cache import KVCache
from ..sampling import Sampler
from .base import Engine, GenerationStats, Output


class AutoregressiveEngine(Engine):
    name = "autoregressive"

    def decode(self, cache: KVCache, first_pos: int, out: Output, stats: GenerationStats,
               sampler: Sampler) -> None:
        model = self.model
        n_loops = model.config.n_loops
        pos = first_pos
        while not out.done:
            layout = model.layout([[pos]], [0])
            x = model.embed_rows(torch.tensor([[out.tokens[-1]]], device=model.device))  # [1, 1, D]
            x = model.run_loops(x, layout, cache, n_loops)
            stats.steps += n_loops
            stats.lm_head_calls += 1
            out.emit(sampler.pick(model.head(x[0, 0])))  # deliberate host sync: one per token
            pos += 1
        stats.mean_in_flight = 1.0 if stats.steps else 0.0
