"""The training loss of a looped decoder: final answer, intermediate readouts, drafter.

SPEED's speedup depends on how often the early exit agrees with the final
prediction, and a looped decoder's reason to exist is that later loops are
better than earlier ones. The loss weighs both:

    loss = CE(final)
           + sum over loops l in 1..L-1 of w_l(step) * CE(readout after loop l)
           + draft_weight * distill(final -> exit readout)

where the weight of loop ``l`` is built from the recipe's fields

    w_l = exit_weight * [l == exit_loop] + all_loops_weight / (L - 1) + loop_weights[l - 1]

(the first two are the historical "exit" and "mean over all loops" terms)
and scaled by the schedule of the step:

* ``constant``: always 1;
* ``ramp``: 0 before the window, rising linearly to 1 across it, 1 after;
* ``curriculum`` (LayerSkip-style gradual curriculum): loop ``l`` is switched
  on at ``start + (end - start) * (L - 1 - l) / (L - 1)`` of the run, so the
  deepest readouts are supervised first and the exit last.

The ``window`` is ``[start, end]`` as fractions of the run (default the whole
run). The drafter term trains the model's exit readout (if it has one) to
match the final loop's distribution; the forward computes the readout from a
detached state and head, so the shared layers never see its gradient.

Targets equal to ``IGNORE_INDEX`` (padding of translation batches) are left
out of every term: each cross-entropy is the mean over the other targets.
The model only needs ``logits``, ``loop_logits`` (and ``draft_logits``) of a
decoder-only ``LoopedOutput`` or an encoder-decoder ``EncDecOutput``, and a
config with ``exit_loop`` and ``n_loops``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import LoopedOutput
from .config import SCHEDULES  # noqa: F401 (the schedules this module implements)

# Target id that marks a position without a target (padding): no loss there.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossWeights:
    """The weights of one step's loss terms (see the module docstring)."""

    # Weight of the cross-entropy at the model's exit loop.
    exit_weight: float = 0.5
    # Weight of the mean cross-entropy over every loop 1..L-1.
    all_loops_weight: float = 0.0
    # Extra weight of the readout after each loop 1..L-1 (entry l - 1); empty: none.
    loop_weights: tuple[float, ...] = ()
    # Weight of the exit readout's distillation towards the final distribution.
    draft_weight: float = 0.0
    # Factor applied to each intermediate loop's weight (entry l - 1; the
    # schedule of the step); empty: 1 everywhere.
    loop_scale: tuple[float, ...] = ()

    def loop_weight(self, config: ModelConfig, loop: int) -> float:
        """``w_l``: the weight of the cross-entropy read out after ``loop`` loops (1..L-1)."""
        L = config.n_loops
        weight = self.all_loops_weight / (L - 1) if L > 1 else 0.0
        if config.exit_loop is not None and loop == config.exit_loop:
            weight += self.exit_weight
        if self.loop_weights:
            weight += self.loop_weights[loop - 1]
        if self.loop_scale:
            weight *= self.loop_scale[loop - 1]
        return weight


@dataclass(frozen=True)
class LoopedLoss:
    # The weighted sum that is back-propagated (scalar).
    total: torch.Tensor
    # Cross-entropy after all loops (scalar).
    final: torch.Tensor
    # Cross-entropy at the exit loop; None when the loss does not read it.
    exit: torch.Tensor | None
    # Mean cross-entropy over loops 1..L-1; None unless every one of them is read.
    all_loops: torch.Tensor | None
    # Distillation loss of the exit readout (soft cross-entropy against the
    # final distribution); None without one.
    draft: torch.Tensor | None = None


@dataclass(frozen=True)
class LossSchedule:
    """The loss weights of every step of a run: the recipe's weights and schedule."""

    base: LossWeights
    # "constant", "ramp" or "curriculum".
    kind: str = "constant"
    # [start, end] of the schedule as fractions of the run.
    window: tuple[float, float] = (0.0, 1.0)
    total_steps: int = 1

    @classmethod
    def from_recipe(cls, recipe, model_config, total_steps: int) -> LossSchedule:
        """The schedule a :class:`~speedec.training.config.RecipeConfig` describes for a model."""
        has_readout = getattr(model_config, "exit_readout_rank", None) is not None
        base = LossWeights(exit_weight=recipe.exit_weight, all_loops_weight=recipe.all_loops_weight,
                           loop_weights=tuple(recipe.loop_weights or ()),
                           draft_weight=recipe.draft_weight if has_readout else 0.0)
        window = tuple(recipe.exit_schedule_window or (0.0, 1.0))
        return cls(base=base, kind=recipe.exit_schedule, window=window, total_steps=total_steps)

    def scale(self, loop: int, n_loops: int, step: int) -> float:
        """The schedule's factor for loop ``loop``'s readout at optimizer step ``step``."""
        if self.kind == "constant":
            return 1.0
        start, end = self.window
        progress = step / self.total_steps
        if self.kind == "ramp":
            return min(1.0, max(0.0, (progress - start) / (end - start)))
        switch_on = start + (end - start) * (n_loops - 1 - loop) / (n_loops - 1)
        return 1.0 if progress >= switch_on else 0.0

    def at(self, step: int, n_loops: int) -> LossWeights:
        """The weights of optimizer step ``step``."""
        if self.kind == "constant":
            return self.base
        return dataclasses.replace(self.base, loop_scale=tuple(self.scale(loop, n_loops, step)
                                                               for loop in range(1, n_loops)))


def loss_loops(config: ModelConfig, weights: LossWeights) -> tuple[int, ...]:
    """The early-exit loops whose logits the loss needs (``output_loops`` of the forward)."""
    return tuple(loop for loop in range(1, config.n_loops) if weights.loop_weight(config, loop) > 0)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [B, T, V]`` against ``targets [B, T]`` (in float32),
    over the targets that are not ``IGNORE_INDEX``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),  # [B*T, V]
                           targets.reshape(-1), ignore_index=IGNORE_INDEX)


def distillation(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean soft cross-entropy ``-sum p_teacher log p_student`` over the positions whose
    target is not ``IGNORE_INDEX``; the teacher's gradient is cut."""
    keep = (targets != IGNORE_INDEX).reshape(-1)  # [B*T]
    p = torch.softmax(teacher.detach().reshape(-1, teacher.shape[-1]).float(), dim=-1)[keep]
    log_q = torch.log_softmax(student.reshape(-1, student.shape[-1]).float(), dim=-1)[keep]
    return -(p * log_q).sum(-1).mean()


def looped_loss(output: LoopedOutput, targets: torch.Tensor, config: ModelConfig,
                weights: LossWeights) -> LoopedLoss:
    """The weighted loss of one forward; ``output`` must hold the loops of :func:`loss_loops`
    (and ``draft_logits`` when ``weights.draft_weight > 0``)."""
    final = cross_entropy(output.logits, targets)
    per_loop = {loop: cross_entropy(output.loop_logits[loop], targets)
                for loop in loss_loops(config, weights)}
    total = final
    for loop, ce in per_loop.items():
        total = total + weights.loop_weight(config, loop) * ce
    draft = None
    if weights.draft_weight > 0 and output.draft_logits is not None:
        draft = distillation(output.draft_logits, output.logits, targets)
        total = total + weights.draft_weight * draft
    exit_ce = per_loop.get(config.exit_loop) if config.exit_loop is not None else None
    all_loops = None
    if config.n_loops > 1 and len(per_loop) == config.n_loops - 1 and weights.all_loops_weight > 0:
        all_loops = torch.stack([per_loop[loop] for loop in range(1, config.n_loops)]).mean()
    return LoopedLoss(total=total, final=final, exit=exit_ce, all_loops=all_loops, draft=draft)
