"""The KV cache of a looped decoder, owned by an engine.

One entry per virtual layer (K unique layers x L loops), indexed by token
position. A cache hung on a shared layer module would be shared by every loop
of that layer, which is wrong; this one lives outside the model.

Layout ``[K, L, n_kv_heads, max_len, head_dim]``: each head's keys are
contiguous rows, and for consecutive loops the (loop, head) dimensions merge,
which keeps attention on views. Because entries are indexed by
position, a flushed (mis-speculated) token costs nothing to roll back: the
stale entries sit at positions no reader attends to until the correct token
overwrites them.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def _recurrent_depth(config: ModelConfig) -> bool:
    from .architectures import architecture  # (the architectures import modules that import this one)

    return architecture(config.architecture).recurrent_depth


class KVCache:
    """The cache of ``config``'s virtual layers for ``max_len`` positions. A recurrent-depth
    model's (``prelude_layers`` / ``coda_layers``) also holds the cache of its prelude and
    of its coda (:attr:`prelude`, :attr:`coda`: a ``KVCache`` of one loop each) and which
    positions' coda entries belong to a token that completed the full depth
    (:attr:`coda_ready`, see :class:`speedec.model.recurrent.RecurrentDepthLM`)."""

    def __init__(self, config: ModelConfig, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu", layers: int | None = None,
                 loops: int | None = None) -> None:
        shape = (config.n_unique_layers if layers is None else layers,
                 config.n_loops if loops is None else loops, config.n_kv_heads, max_len, config.head_dim)
        self.max_len = max_len
        # The early exit of the model (view) the cache was made for (its depth is :attr:`loops`):
        # a recurrent-depth model reads both to know which rows finish in a step shared by
        # requests of several depths.
        self.exit_loop = config.exit_loop
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.prelude = self.coda = self.coda_ready = None
        if layers is None and _recurrent_depth(config):
            self.prelude = KVCache(config, max_len, dtype=dtype, device=device, layers=config.prelude_layers, loops=1)
            self.coda = KVCache(config, max_len, dtype=dtype, device=device, layers=config.coda_layers, loops=1)
            self.coda_ready = torch.zeros(max_len, dtype=torch.bool, device=device)

    @property
    def loops(self) -> int:
        """The loops (virtual layers per unique layer) the cache holds: its model's depth."""
        return self.keys.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held, the prelude's and coda's included."""
        own = self.keys.nbytes + self.values.nbytes
        return own + sum(part.nbytes for part in (self.prelude, self.coda) if part is not None)

    def write(self, unique_layer: int, loop_ids: torch.Tensor, pos_ids: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values ``[N, n_kv, hd]`` of N rows at (their loop, their position)."""
        # Advanced indices around a slice: the indexed result is [N, n_kv, hd].
        self.keys[unique_layer, loop_ids, :, pos_ids] = k
        self.values[unique_layer, loop_ids, :, pos_ids] = v

    def read(self, unique_layer: int, loops: slice | torch.Tensor,
             kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[G, n_kv, kv_len, hd]`` of G loops.

        A slice (loops in arithmetic progression, the SPEED pipeline's normal
        case) gives views, no copy; a tensor of loop ids gathers.
        """
        return (self.keys[unique_layer, loops, :, :kv_len],
                self.values[unique_layer, loops, :, :kv_len])
