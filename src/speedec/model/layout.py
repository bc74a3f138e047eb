"""Where the rows of one decoding call sit: :class:`StepLayout` (G groups of T rows,
each group at its own loop and positions) and :class:`SpareRows` (alternative
guesses that share a position with a pipeline slot)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..cache import KVCache
from ..config import ModelConfig


@dataclass(frozen=True)
class StepLayout:
    """Where the rows of one ``run_loops`` call sit in the sequence and the cache.

    Rows are G groups of T rows. All rows of group g are at loop ``loops[g]`` at
    the start of the call and at their own positions. Only host ints are built
    up front; the tensors (positions, rotary angles, mask) are built on first
    use, because the fused decoding path (:class:`CachedSelfAttention`) needs
    none of them.
    """

    # Loop of each group at the start of the call (host ints, G of them).
    loops: tuple[int, ...]
    # (G, T).
    shape: tuple[int, int]
    # Keys read per group: max position + 1.
    kv_len: int
    # Query heads per kv head.
    rep: int
    # The position of every row, flat, as host ints (G * T of them).
    position_list: tuple[int, ...]
    # The rotary table ``[max_len, 2, hd]`` (rope_table: float64, float32 in a cast model), the model's dtype.
    rope: torch.Tensor
    dtype: torch.dtype

    @property
    def groups(self) -> int:
        return self.shape[0]

    @property
    def rows(self) -> int:
        return self.shape[1]

    @cached_property
    def positions(self) -> torch.Tensor:
        """``[G, T]`` long: the position of every row."""
        return torch.tensor(self.position_list, dtype=torch.long, device=self.rope.device).view(self.shape)

    @cached_property
    def flat_positions(self) -> torch.Tensor:
        """``[G*T]`` long: the position of every row, flat (for cache writes)."""
        return self.positions.reshape(-1)

    @cached_property
    def _angles(self) -> torch.Tensor:
        return self.rope[self.positions].to(self.dtype)  # [G, T, 2, hd]

    @property
    def cos(self) -> torch.Tensor:
        """``[G, T, 1, hd]``: rotary cosines of every row, in the model's dtype."""
        return self._angles[:, :, 0, None, :]

    @property
    def sin(self) -> torch.Tensor:
        """``[G, T, 1, hd]``: rotary signed sines of every row, in the model's dtype."""
        return self._angles[:, :, 1, None, :]

    @cached_property
    def mask(self) -> torch.Tensor | None:
        """``[G, 1, rep*T, kv_len]`` bool (True = attend), or None when every row may
        read all kv_len keys. Rows are ordered (kv-group member, t) to match the
        grouped-query layout of the queries."""
        G, T = self.shape
        if G == 1 and T == 1:
            return None  # one row reading exactly its kv_len keys
        keys = torch.arange(self.kv_len, device=self.rope.device)
        mask = keys[None, None, :] <= self.positions[:, :, None]  # [G, T, S]
        return mask[:, None, None].expand(G, 1, self.rep, T, self.kv_len).reshape(G, 1, self.rep * T, self.kv_len)

    def loop_index(self, shift: int) -> slice | torch.Tensor:
        """Cache index of the groups' loops after ``shift`` passes: a slice when it can be."""
        first = self.loops[0] + shift
        if len(self.loops) == 1:
            return slice(first, first + 1)
        stride = self.loops[1] - self.loops[0]
        if stride > 0 and all(b - a == stride for a, b in zip(self.loops, self.loops[1:])):
            return slice(first, first + stride * (len(self.loops) - 1) + 1, stride)
        return torch.tensor(self.loops, device=self.rope.device) + shift

    def loop_ids(self, shift: int) -> torch.Tensor:
        """``[G*T]`` loop of every row after ``shift`` passes (for cache writes)."""
        loops = torch.tensor(self.loops, device=self.rope.device) + shift
        return loops.repeat_interleave(self.rows)


def row_loops(layout: StepLayout, spares: SpareRows | None, device: torch.device) -> torch.Tensor:
    """``[G(+S), T]``: the loop every row of a call is at when it starts (the spares'
    after the layout's), for a per-loop parameter such as a loop embedding."""
    loops = torch.tensor(layout.loops, device=device).repeat_interleave(layout.rows)  # [G*T]
    loops = loops.view(layout.groups, layout.rows)  # [G, T]
    if spares is not None:
        loops = torch.cat((loops, spares.loops[:, None]))  # [G + S, 1]
    return loops


def step_layout(rope: torch.Tensor, positions, loops, *, rep: int, dtype: torch.dtype) -> StepLayout:
    """A :class:`StepLayout` over a rotary table ``rope [max_len, 2, hd]``; ``rep`` is
    the number of query heads per kv head."""
    flat = tuple(int(p) for row in positions for p in row)
    shape = (len(positions), len(positions[0]))
    return StepLayout(loops=tuple(loops), shape=shape, kv_len=max(flat) + 1, rep=rep, position_list=flat,
                      rope=rope, dtype=dtype)


@dataclass(frozen=True)
class SpareRows:
    """Rows that share a position with a pipeline slot: alternative guesses.

    A spare row at position P and loop l attends over the cache of its virtual
    layer at positions ``[0, P - 1]`` (written by tokens before it) and over
    its own key, which must not go to the cache: the pipeline's own guess for
    P owns that entry. Its keys and values go to side buffers
    ``[capacity, K, L, n_kv, hd]`` instead, at index ``index[s]``; a spare
    that turns out right is promoted by copying them into the cache
    (:meth:`promote`).
    """

    # [S] long: loop of every spare at the start of the call; [S] long: its side-buffer index.
    loops: torch.Tensor
    index: torch.Tensor
    # Keys read: max position (keys [0, P - 1] of each spare; P >= 1).
    kv_len: int
    # [S, 1, 1, kv_len] bool: key j < P of spare s.
    mask: torch.Tensor
    # [S, 1, 1, hd] rotary angles of the spares' positions.
    cos: torch.Tensor
    sin: torch.Tensor
    side_keys: torch.Tensor
    side_values: torch.Tensor

    @staticmethod
    def side_buffers(config: ModelConfig, capacity: int, *, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (capacity, config.n_unique_layers, config.n_loops, config.n_kv_heads, config.head_dim)
        return (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def build(cls, rope: torch.Tensor, positions: list[int], loops: list[int], index: list[int],
              side: tuple[torch.Tensor, torch.Tensor]) -> SpareRows:
        device = side[0].device
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        kv_len = int(max(positions))
        table = rope[pos].to(side[0].dtype)  # [S, 2, hd]
        mask = (torch.arange(kv_len, device=device)[None, :] < pos[:, None])[:, None, None, :]
        return cls(loops=torch.tensor(loops, dtype=torch.long, device=device),
                   index=torch.tensor(index, dtype=torch.long, device=device), kv_len=kv_len, mask=mask,
                   cos=table[:, None, 0, None, :], sin=table[:, None, 1, None, :],
                   side_keys=side[0], side_values=side[1])

    @staticmethod
    def promote(cache: KVCache, side: tuple[torch.Tensor, torch.Tensor], index: int, position: int,
                loops_done: int) -> None:
        """Copy spare ``index``'s keys/values of its first ``loops_done`` loops into the cache at ``position``."""
        cache.keys[:, :loops_done, :, position] = side[0][index, :, :loops_done]
        cache.values[:, :loops_done, :, position] = side[1][index, :, :loops_done]
