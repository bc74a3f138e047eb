"""What a looped model reads out: the drafter at the early exit (:class:`ExitReadout`)
and the training forward's result (:class:`LoopedOutput`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear
from .layer import KernelModule
from .norms import RMSNorm


class ExitReadout(KernelModule):
    """The drafter: parameters used only at the early exit.

    ``features(h) = out_norm(h + up(silu(down(norm(h)))))``, then the shared LM
    head. A low-rank residual adapter (``2 * rank * d_model`` weights) lets the
    exit's prediction move towards the final loop's without asking the shared
    layers to make loop ``exit_loop`` a finished answer. ``up`` starts at zero
    and ``out_norm`` as a copy of the final norm (:meth:`start_from`), so a
    fresh readout reads exactly what the shared exit reads. Verification is
    always against the final loop, so exactness never depends on it.

    ``normed_input``: the state at the exit is already the final norm's output
    (architectures whose final norm closes every loop), and the shared exit is
    the head alone; the readout is then ``h + up(silu(down(norm(h))))``, with
    no ``out_norm``, so that a fresh one again reads what the shared exit reads.
    """

    def __init__(self, d_model: int, rank: int, eps: float, *, normed_input: bool = False) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.down = nn.Parameter(torch.empty(rank, d_model))
        self.up = nn.Parameter(torch.zeros(d_model, rank))
        self.out_norm = None if normed_input else RMSNorm(d_model, eps)

    def reset_parameters(self, final_norm: RMSNorm, *, std: float,
                         generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.norm.weight.fill_(1.0)
            self.down.normal_(0.0, std, generator=generator)
            self.up.zero_()
        self.start_from(final_norm)

    def start_from(self, final_norm: RMSNorm) -> None:
        """Make the readout equal to the shared exit: adapter off, final norm's gains."""
        with torch.no_grad():
            self.up.zero_()
            if self.out_norm is not None:
                self.out_norm.weight.copy_(final_norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` hidden state after the exit loop -> ``[..., D]`` features for the head."""
        # The adapter: [..., D] -> [..., rank] -> [..., D].
        adapter = linear(F.silu(linear(self.norm(x), self.down, self.kernel)), self.up, self.kernel)
        return x + adapter if self.out_norm is None else self.out_norm(x + adapter)


@dataclass(frozen=True)
class LoopedOutput:
    """Result of the training/evaluation forward."""

    # [B, T, V] logits after all loops.
    logits: torch.Tensor
    # Loop count -> [B, T, V] logits read out after that many loops (early
    # exits through the shared norm and head), for the loops requested.
    loop_logits: dict[int, torch.Tensor]
    # [B, T, V] the exit readout's (drafter's) logits when requested and the
    # model has one; computed from a detached hidden state and head, so its
    # loss trains the readout alone.
    draft_logits: torch.Tensor | None = None
