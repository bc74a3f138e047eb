"""The early-exit training loss of a looped decoder.

SPEED's speedup depends on how often the early exit agrees with the final
prediction, so the exit is trained to predict the next token as well:

    loss = CE(final) + exit_weight * CE(exit loop)
           + all_loops_weight * mean(CE(loop) for loop in 1..L-1)

The optional last term trains every intermediate readout (a depth-study
knob); the exit loop is one of them and is computed only once.

Targets equal to ``IGNORE_INDEX`` (padding of translation batches) are left
out of every term: each cross-entropy is the mean over the other targets.
The model only needs ``logits`` and ``loop_logits`` (a decoder-only
``LoopedOutput`` or an encoder-decoder ``EncDecOutput``) and a config with
``exit_loop`` and ``n_loops``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import LoopedOutput

# Target id that marks a position without a target (padding): no loss there.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossWeights:
    # Weight of the cross-entropy at the model's exit loop.
    exit_weight: float = 0.5
    # Weight of the mean cross-entropy over every loop 1..L-1.
    all_loops_weight: float = 0.0


@dataclass(frozen=True)
class LoopedLoss:
    # The weighted sum that is back-propagated (scalar).
    total: torch.Tensor
    # Cross-entropy after all loops (scalar).
    final: torch.Tensor
    # Cross-entropy at the exit loop; None when the loss does not read it.
    exit: torch.Tensor | None
    # Mean cross-entropy over loops 1..L-1; None when its weight is 0.
    all_loops: torch.Tensor | None


def loss_loops(config: ModelConfig, weights: LossWeights) -> tuple[int, ...]:
    """The early-exit loops whose logits the loss needs (``output_loops`` of the forward)."""
    loops = set()
    if weights.exit_weight > 0 and config.exit_loop is not None:
        loops.add(config.exit_loop)
    if weights.all_loops_weight > 0:
        loops.update(range(1, config.n_loops))
    return tuple(sorted(loops))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [B, T, V]`` against ``targets [B, T]`` (in float32),
    over the targets that are not ``IGNORE_INDEX``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),  # [B*T, V]
                           targets.reshape(-1), ignore_index=IGNORE_INDEX)


def looped_loss(output: LoopedOutput, targets: torch.Tensor, config: ModelConfig,
                weights: LossWeights) -> LoopedLoss:
    """The weighted loss of one forward; ``output`` must hold the loops of :func:`loss_loops`."""
    final = cross_entropy(output.logits, targets)
    per_loop = {loop: cross_entropy(output.loop_logits[loop], targets)
                for loop in loss_loops(config, weights)}
    total = final
    exit_ce = None
    if weights.exit_weight > 0 and config.exit_loop is not None:
        exit_ce = per_loop[config.exit_loop]
        total = total + weights.exit_weight * exit_ce
    all_loops = None
    if weights.all_loops_weight > 0:
        all_loops = torch.stack([per_loop[loop] for loop in range(1, config.n_loops)]).mean()
        total = total + weights.all_loops_weight * all_loops
    return LoopedLoss(total=total, final=final, exit=exit_ce, all_loops=all_loops)
