"""DecodingModel: what the engines use of a model, declared once.

A decoder-only :class:`speedec.model.LoopedLM` offers it directly; an
encoder-decoder's decoder bound to one encoded source
(:class:`speedec.encdec.engines.ConditionedDecoder`) offers it by adding the
cross-attention over that source inside ``run_loops``. Every engine is
written against this interface only, so every engine decodes both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from ..cache import KVCache
from ..config import ModelConfig
from ..model import SpareRows, StepLayout


@runtime_checkable
class DecodingModel(Protocol):
    """A looped decoder as the decoding engines drive it (docs/design.md §2)."""

    # The decoder's shape: K unique layers, L loops, the exit loop, widths,
    # vocabulary and longest sequence (what KVCache and the engines size by).
    config: ModelConfig
    # Token ids [..] -> embeddings [.., D]. Also the identity of the model for
    # per-model caches (decoders bound to different sources share it).
    embed: Callable[[torch.Tensor], torch.Tensor]

    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[..]`` -> the rows ``[.., W]`` they enter their first pass as (the
        embeddings, W = D, for most models)."""
        ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def layout(self, positions: Sequence[Sequence[int]], loops: Sequence[int]) -> StepLayout:
        """Rows as G groups of T: ``positions[g][t]``, group g at loop ``loops[g]``."""
        ...

    def run_loops(self, x: torch.Tensor, layout: StepLayout, cache: KVCache, n_loops: int,
                  spares: SpareRows | None = None) -> torch.Tensor:
        """``n_loops`` passes over the unique layers for rows ``x [G(+S), T, D]``."""
        ...

    def spare_rows(self, positions: list[int], loops: list[int], index: list[int],
                   side: tuple[torch.Tensor, torch.Tensor]) -> SpareRows:
        """Spare rows (alternative guesses) for :meth:`run_loops`."""
        ...

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, ``[..., D] -> [..., V]``: the final loop's readout
        (and the shared readout of any loop)."""
        ...

    def exit_head(self, x: torch.Tensor) -> torch.Tensor:
        """The early exit's readout (the drafts): the exit readout when the model has one."""
        ...

    def head_and_exit(self, final: torch.Tensor, exit_rows: torch.Tensor) -> torch.Tensor:
        """``[n, D]`` rows by :meth:`head` and ``[m, D]`` rows by :meth:`exit_head` in
        one LM-head matmul: ``[n + m, V]``."""
        ...
