"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

A pure function of the step, so the "scheduler state" of a checkpoint is
just its step counter and a resumed run follows the same curve exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    # Learning rate at the end of warmup.
    peak: float
    # Learning rate the cosine decays to at the last step.
    minimum: float
    # Steps of linear warmup (the first step already has peak / warmup_steps).
    warmup_steps: int
    # Steps of the whole run.
    total_steps: int

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.minimum + 0.5 * (self.peak - self.minimum) * (1.0 + math.cos(math.pi * progress))
