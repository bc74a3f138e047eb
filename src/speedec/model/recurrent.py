"""RecurrentDepthLM: a recurrent-depth decoder (Huginn-0125 and its kind).

A token runs the prelude's layers once; their output ``e`` is injected before
every recurrence of the core: ``state = adapter([state, e])``, then the core's
K layers; after r recurrences (``n_loops``) the final norm, the coda's layers,
the final norm again and the head. In speedec's terms the core is the looped
decoder (K unique layers, r loops, its KV cache the virtual layers'), and the
prelude and the coda run once per token around it, each with a KV cache of its
own (:attr:`speedec.cache.KVCache.prelude`, ``.coda``).

Decoding rows are ``[state | e | features]`` (width 3D): the core's state, the
prelude's output, and what the head reads (:meth:`head_features`). In a call
of :meth:`run_loops`:

* a row that starts its first recurrence runs the prelude first (from its
  token's scaled embedding, which :meth:`embed_rows` puts in the ``e`` part),
  writing the prelude's cache at its position; its state starts at zero (or at
  the reference's random start, drawn per position: ``state_init_scale``);
* every pass is one recurrence for all rows: one adapter product and one pass
  over the core's layers, whatever recurrence each row is at;
* after the passes, a row that has completed all r recurrences runs the coda
  and writes the coda's cache at its position (its token is the verified one,
  or a draft whose entry a later token at that position overwrites, as in the
  core's cache); a row that has completed the early exit's ``exit_loop``
  recurrences (a draft) runs the coda *read-only*: its queries attend to the
  coda cache of the positions whose current token has completed the full
  depth (``cache.coda_ready``: set by a full-depth coda, cleared when a new
  token enters the prelude at that position) and to its own key; tokens still
  in flight have no coda entry yet and are left out. Drafts only decide what
  is tried, never what is emitted, so every engine equals ``autoregressive``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..cache import KVCache
from ..errors import ConfigError, GenerationError
from ..kernels import linear
from .attention import CachedSelfAttention, LayerAttention, SegmentAttention, step_attention
from .layer import weight_factory
from .layout import SpareRows, StepLayout, step_layout
from .looped import LoopedLM


def default_exit_loop(loops: int) -> int | None:
    """The recurrence SPEED drafts from unless told otherwise: a quarter of the depth
    (none for a single recurrence)."""
    return max(1, loops // 4) if loops > 1 else None


class PeekAttention:
    """Read-only attention of single rows (``[S, 1, ...]``) at ``positions`` over one loop
    of ``store``: keys ``j < position`` with ``ready[j]``, and the row's own key."""

    rotates = False

    def __init__(self, store: KVCache, ready: torch.Tensor, positions: list[int]) -> None:
        self.store = store
        self.kv_len = max(positions)
        pos = torch.tensor(positions, device=ready.device)
        keys = torch.arange(self.kv_len, device=ready.device)
        self.mask = (keys[None, :] < pos[:, None]) & ready[None, : self.kv_len]  # [S, P]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        S, _, H, hd = q.shape
        Hkv = k.shape[2]
        keys = self.store.keys[layer, 0, :, : self.kv_len]  # [Hkv, P, hd]
        values = self.store.values[layer, 0, :, : self.kv_len]
        q = q.reshape(S, Hkv, H // Hkv, hd) * hd ** -0.5
        scores = torch.matmul(q, keys.transpose(-1, -2))  # [S, Hkv, rep, P]
        scores = scores.masked_fill(~self.mask[:, None, None, :], float("-inf"))
        own = (q * k.reshape(S, Hkv, 1, hd)).sum(-1, keepdim=True)  # [S, Hkv, rep, 1]
        probs = torch.softmax(torch.cat((scores, own), dim=-1), dim=-1)
        out = torch.matmul(probs[..., :-1], values) + probs[..., -1:] * v.reshape(S, Hkv, 1, hd)
        return out.reshape(S, 1, H * hd)


class RecurrentDepthLM(LoopedLM):
    """The recurrent-depth decoder (see the module docstring); ``n_unique_layers`` is the
    core's, ``n_loops`` the number of recurrences r (any r >= 1 runs the same weights),
    ``prelude_layers`` and ``coda_layers`` the layers around it."""

    # The speed engine's early_correction and spare guesses read rows at every loop;
    # this model reads a row through its coda only at the exit and at full depth.
    reads_any_loop = False
    # Runs at any number of recurrences (the server accepts NAME@loops=d for any d >= 1).
    any_depth = True

    def init_architecture_modules(self, config) -> None:
        from ..architectures import architecture

        arch = architecture(config.architecture)
        self.prelude = nn.ModuleList(arch.layer(config) for _ in range(config.prelude_layers))
        self.coda = nn.ModuleList(arch.layer(config) for _ in range(config.coda_layers))
        # Input injection: [state, e] (2D) -> D.
        self.adapter = weight_factory(config)(config.d_model, 2 * config.d_model)
        self.embed_scale = math.sqrt(config.d_model)

    def weight_layers(self) -> list[nn.Module]:
        return [*self.prelude, *self.layers, *self.coda]

    def reset_parameters(self, *, std: float = 0.02, residual_scale: float = 1.0,
                         generator: torch.Generator | None = None) -> None:
        """:meth:`LoopedLM.reset_parameters` for every layer (query/key biases zero); the
        adapter reads the state as half of it plus normal(0, std * residual_scale) noise and
        the prelude's output through normal(0, std), so that the recurrences contract
        towards a fixed point as a trained model's converge (how fast, ``residual_scale``
        says, with the layers' output projections)."""
        super().reset_parameters(std=std, residual_scale=residual_scale, generator=generator)
        with torch.no_grad():
            for layer in self.weight_layers():
                if getattr(layer, "qk_bias", None) is not None:
                    layer.qk_bias.zero_()
        if isinstance(self.adapter, nn.Parameter):
            with torch.no_grad():
                D = self.config.d_model
                self.adapter.normal_(0.0, std, generator=generator)
                self.adapter[:, :D] *= residual_scale
                self.adapter[:, :D] += 0.5 * torch.eye(D, dtype=self.adapter.dtype, device=self.adapter.device)

    def at_depth(self, n_loops: int) -> RecurrentDepthLM:
        """This model run for ``n_loops`` recurrences, any r >= 1 (the same weights, deeper or
        shallower): a view sharing every module (see :meth:`LoopedLM.at_depth`), whose early
        exit is the model's when it is below r, else a quarter of r. ConfigError: r < 1."""
        c = self.config
        if isinstance(n_loops, bool) or not isinstance(n_loops, int) or n_loops < 1:
            raise ConfigError(f"loops must be an integer >= 1 (recurrences), got {n_loops!r}")
        if n_loops == c.n_loops:
            return self
        exit_loop = c.exit_loop if c.exit_loop is not None and c.exit_loop < n_loops else default_exit_loop(n_loops)
        return self.view(n_loops=n_loops, exit_loop=exit_loop)

    # ------------------------------------------------------------ rows
    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., 3D]``: a zero state, the token's embedding times sqrt(D) (the prelude's
        input, turned into its output by the row's first pass), zero features."""
        e = self.embed(tokens) * self.embed_scale
        zeros = torch.zeros_like(e)
        return torch.cat((zeros, e, zeros), dim=-1)

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads of a row: the features the coda left (final norm included)."""
        return x[..., 2 * self.config.d_model:]

    def initial_state(self, positions: list[int]) -> torch.Tensor:
        """``[len(positions), D]``: the state the first recurrence of a token at each position
        starts from (``config.state_init_scale``: zeros, or the reference's truncated normal
        drawn per position from ``state_init_seed``)."""
        c = self.config
        D = c.d_model
        if not c.state_init_scale:
            return torch.zeros(len(positions), D, dtype=self.dtype, device=self.device)
        std = math.sqrt(2 / (5 * D)) * c.state_init_scale
        rows = []
        for position in positions:
            generator = torch.Generator().manual_seed(c.state_init_seed * 1_000_003 + position)
            rows.append(nn.init.trunc_normal_(torch.empty(D), 0.0, std, -3 * std, 3 * std, generator=generator))
        return (torch.stack(rows) * self.embed_scale).to(dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------ whole sequences
    def _loops(self, tokens: torch.Tensor):
        """The rows ``[B, T, 3D]`` of ``tokens`` after each recurrence, each with the coda's
        readout of that recurrence (the coda attending over the same recurrence)."""
        cos, sin, attend = self.sequence_attention(*tokens.shape)
        inject = self.embed(tokens) * self.embed_scale
        for layer in self.prelude:
            inject = layer(inject, cos, sin, attend)
        state = self.initial_state(list(range(tokens.shape[1])))[None].expand_as(inject)
        for _ in range(self.config.n_loops):
            state = linear(torch.cat((state, inject), dim=-1), self.adapter, self.kernel)
            for layer in self.layers:
                state = layer(state, cos, sin, attend)
            features = self.norm(state)
            for layer in self.coda:
                features = layer(features, cos, sin, attend)
            yield torch.cat((state, inject, self.norm(features)), dim=-1)

    # ------------------------------------------------------------ engines
    def run_loops(self, x: torch.Tensor, layout: StepLayout, cache: KVCache,
                  n_loops: int, spares: SpareRows | None = None) -> torch.Tensor:
        """``n_loops`` recurrences for rows ``x [G, T, 3D]`` (see the module docstring)."""
        if spares is not None:
            raise GenerationError("a recurrent-depth model runs no spare rows (speed with guesses > 1)")
        return self._passes(x, [(layout, cache)], n_loops)

    def run_segments(self, x: torch.Tensor,
                     segments: Sequence[tuple[StepLayout, KVCache, SpareRows | None]]) -> torch.Tensor:
        """One recurrence for the rows of several requests, each segment with its own cache."""
        if any(spares is not None for _, _, spares in segments):
            raise GenerationError("a recurrent-depth model runs no spare rows (speed with guesses > 1)")
        return self._passes(x, [(layout, cache) for layout, cache, _ in segments], 1)

    def spare_rows(self, positions, loops, index, side) -> SpareRows:
        raise GenerationError("a recurrent-depth model runs no spare rows (speed with guesses > 1)")

    def _sub_layout(self, positions: list[list[int]]) -> StepLayout:
        c = self.config
        return step_layout(self.rope, positions, [0] * len(positions), rep=c.n_heads // c.n_kv_heads,
                           dtype=self.dtype)

    def _through(self, layers, rows: torch.Tensor, parts: list[tuple[object, int, torch.Tensor, torch.Tensor]]):
        """``rows`` through ``layers``, part by part of ``(attention, groups, cos, sin)``."""
        attention = parts[0][0] if len(parts) == 1 else SegmentAttention([p[0] for p in parts],
                                                                         [p[1] for p in parts])
        cos = sin = None
        if not getattr(attention, "rotates", False):
            cos, sin = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
        for k, layer in enumerate(layers):
            rows = layer(rows, cos, sin, LayerAttention(attention, k))
        return rows

    def _passes(self, x: torch.Tensor, segments: list[tuple[StepLayout, KVCache]], n_loops: int) -> torch.Tensor:
        c = self.config
        D = c.d_model
        T = x.shape[1]
        state, inject = x[..., :D], x[..., D: 2 * D]
        starts, offset = [], 0
        for layout, _ in segments:
            starts.append(offset)
            offset += layout.groups

        def positions(layout: StepLayout, g: int) -> list[int]:
            return list(layout.position_list[g * T: (g + 1) * T])

        # The prelude, for the rows entering their first recurrence.
        index, parts, started = [], [], []
        for (layout, cache), start in zip(segments, starts):
            fresh = [g for g in range(layout.groups) if layout.loops[g] == 0]
            started += [p for g in fresh for p in positions(layout, g)]
            if fresh:
                sub = self._sub_layout([positions(layout, g) for g in fresh])
                cache.coda_ready[sub.flat_positions] = False  # a new token at these positions
                parts.append((CachedSelfAttention(cache.prelude, sub, 0), len(fresh), sub.cos, sub.sin))
                index += [start + g for g in fresh]
        if index:
            rows = torch.tensor(index, device=x.device)
            inject = inject.index_copy(0, rows, self._through(self.prelude, inject[rows], parts))
            state = state.index_copy(0, rows, self.initial_state(started).view(len(index), T, D))

        # The recurrences: every row through the adapter and the core once per pass.
        cos = sin = None
        for shift in range(n_loops):
            attentions = [step_attention(cache, layout, shift, None) for layout, cache in segments]
            attention = attentions[0] if len(attentions) == 1 else SegmentAttention(
                attentions, [layout.groups for layout, _ in segments])
            if cos is None and not getattr(attention, "rotates", False):
                cos = torch.cat([layout.cos for layout, _ in segments])
                sin = torch.cat([layout.sin for layout, _ in segments])
            h = linear(torch.cat((state, inject), dim=-1), self.adapter, self.kernel)
            for k, layer in enumerate(self.layers):
                h = layer(h, cos, sin, LayerAttention(attention, k))
            state = h

        # The coda, for the rows at full depth (writing) and at the exit (read-only).
        features = x[..., 2 * D:]
        index, parts = [], []
        for (layout, cache), start in zip(segments, starts):
            # (the depth and exit of the request the cache belongs to: a shared step may
            # carry requests at several depths, decoded by views of this model)
            done = [loop + n_loops for loop in layout.loops]
            full = [g for g in range(layout.groups) if done[g] == cache.loops]
            peek = [g for g in range(layout.groups) if done[g] == cache.exit_loop]
            if full:
                sub = self._sub_layout([positions(layout, g) for g in full])
                cache.coda_ready[sub.flat_positions] = True  # (read by this call's drafts too)
                parts.append((CachedSelfAttention(cache.coda, sub, 0), len(full), sub.cos, sub.sin))
                index += [start + g for g in full]
            if peek:
                if T != 1:
                    raise GenerationError("drafts are read one row per group")
                where = [layout.position_list[g] for g in peek]
                angles = self.rope[torch.tensor(where, device=x.device)].to(self.dtype)  # [S, 2, hd]
                parts.append((PeekAttention(cache.coda, cache.coda_ready, where), len(peek),
                              angles[:, None, 0, None, :], angles[:, None, 1, None, :]))
                index += [start + g for g in peek]
        if index:
            rows = torch.tensor(index, device=x.device)
            read = self.norm(self._through(self.coda, self.norm(state[rows]), parts))
            features = features.index_copy(0, rows, read)
        return torch.cat((state, inject, features), dim=-1)
