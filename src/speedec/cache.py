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


class KVCache:
    def __init__(self, config: ModelConfig, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (config.n_unique_layers, config.n_loops, config.n_kv_heads, max_len,
                 config.head_dim)
        self.max_len = max_len
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

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
