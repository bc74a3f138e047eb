"""Self-attention of a decoding call's rows against the engine's KV cache: the rows
of a :class:`~speedec.model.layout.StepLayout` (fused on the CPU when speedec's
kernels are built), spare rows, and several requests' segments in one call."""

from __future__ import annotations

from functools import partial

import torch

from ..cache import KVCache
from ..kernels import fused_ops_available
from .layout import SpareRows, StepLayout


class CachedSelfAttention:
    """Self-attention of the rows of a layout against the engine's cache after
    ``shift`` passes of the call; the loop indices are built once per pass and
    shared by the K unique layers.

    Each row writes its key/value at (its virtual layer, its position) and
    attends over its own virtual layer's cache up to its own position; all
    groups go through one attention call.

    One row per group (every decoding step; prefill has more) in float32 on
    the CPU with speedec's kernels built: one fused call,
    ``speedec_kernels::slot_attention`` (csrc/few_rows.cpp), does the cache
    writes and every row's attention in place of about twenty PyTorch ops per
    layer, and computes each row on its own, so that a row's result does not
    depend on the other rows of the step (batch-invariant like the few-row
    products). Otherwise the batched PyTorch path below.
    """

    def __init__(self, cache: KVCache, layout: StepLayout, shift: int) -> None:
        self.cache, self.layout, self.shift = cache, layout, shift
        self.fused = (layout.rows == 1 and cache.keys.dtype == torch.float32
                      and cache.keys.device.type == "cpu" and fused_ops_available())
        # The fused path can also take the layer's q/k/v projection as it is and rotate
        # it (from_qkv), reading the rotary table (float64, or float32 in a cast model).
        self.rotates = (self.fused and layout.rope.dtype in (torch.float64, torch.float32)
                        and layout.rope.is_contiguous())
        if self.fused:
            self.loop_list = [loop + shift for loop in layout.loops]
        else:
            self.loop_ids = layout.loop_ids(shift)
            self.loop_index = layout.loop_index(shift)

    def from_qkv(self, unique_layer: int, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        """The fused path from the layer's unrotated projection ``qkv [G, 1, (H + 2 Hkv) hd]``:
        rotary embedding, cache writes and attention in one call -> ``[G, 1, H * hd]``
        (``speedec_kernels::slot_attention_rope``; only when :attr:`rotates`)."""
        hd = self.cache.keys.shape[-1]
        out = torch.ops.speedec_kernels.slot_attention_rope(
            qkv[:, 0], self.layout.rope, self.cache.keys, self.cache.values, unique_layer, self.loop_list,
            self.layout.position_list, heads, hd ** -0.5)
        return out[:, None]

    def __call__(self, unique_layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """``q [G, T, H, hd]``, ``k, v [G, T, Hkv, hd]`` -> ``[G, T, H * hd]``."""
        G, T, H, hd = q.shape
        if self.fused:
            out = torch.ops.speedec_kernels.slot_attention(
                q[:, 0], k[:, 0], v[:, 0], self.cache.keys, self.cache.values, unique_layer,
                self.loop_list, self.layout.position_list, hd ** -0.5)
            return out[:, None]
        Hkv = k.shape[2]
        rep = H // Hkv
        layout = self.layout
        self.cache.write(unique_layer, self.loop_ids, layout.flat_positions,
                         k.reshape(G * T, Hkv, hd), v.reshape(G * T, Hkv, hd))
        if T == 1:  # decoding: every row as a lone row (the same products whatever shares the call)
            return torch.cat([self._one_row(unique_layer, q[g: g + 1], layout.loops[g] + self.shift,
                                            layout.position_list[g]) for g in range(G)])
        keys, values = self.cache.read(unique_layer, self.loop_index, layout.kv_len)  # [G, Hkv, S, hd]
        S = layout.kv_len
        # Queries grouped by kv head: [G, T, Hkv, rep, hd] -> [G*Hkv, rep*T, hd], scaled.
        q = q.reshape(G, T, Hkv, rep, hd).permute(0, 2, 3, 1, 4).reshape(G * Hkv, rep * T, hd)
        q = q * hd ** -0.5
        # For consecutive loops (G, Hkv) merge into one batch dimension of the
        # cache view: plain batched matmuls, no copy. (Measured faster than
        # scaled_dot_product_attention for a step's few rows.)
        scores = torch.bmm(q, keys.reshape(G * Hkv, S, hd).transpose(1, 2))  # [G*Hkv, rep*T, S]
        if layout.mask is not None:
            scores = scores.view(G, Hkv, rep * T, S).masked_fill(~layout.mask, float("-inf"))
        probs = torch.softmax(scores.view(G * Hkv, rep * T, S), dim=-1)
        out = torch.bmm(probs, values.reshape(G * Hkv, S, hd))  # [G*Hkv, rep*T, hd]
        # [G, Hkv, rep, T, hd] -> [G, T, H*hd]
        return out.view(G, Hkv, rep, T, hd).permute(0, 3, 1, 2, 4).reshape(G, T, -1)


    def _one_row(self, unique_layer: int, q: torch.Tensor, loop: int, position: int) -> torch.Tensor:
        """The attention of one row ``q [1, 1, H, hd]`` at ``(loop, position)`` over its
        virtual layer's keys ``0..position`` -> ``[1, 1, H * hd]``. Every decoding row
        off the fused path goes through here, one at a time, so that its products have
        the same shapes and layout whichever engine runs it and whatever else shares the
        step: in bf16 a batched product of several rows can round differently."""
        _, _, H, hd = q.shape
        Hkv = self.cache.keys.shape[2]
        rep = H // Hkv
        keys = self.cache.keys[unique_layer, loop, :, : position + 1]  # [Hkv, S, hd] (a view)
        values = self.cache.values[unique_layer, loop, :, : position + 1]
        q = q.reshape(Hkv, rep, hd) * hd ** -0.5
        probs = torch.softmax(torch.bmm(q, keys.transpose(1, 2)), dim=-1)  # [Hkv, rep, S]
        return torch.bmm(probs, values).reshape(1, 1, H * hd)


class SpareAttention:
    """Self-attention of :class:`SpareRows` after ``shift`` passes of the call."""

    def __init__(self, cache: KVCache, spares: SpareRows, shift: int) -> None:
        self.cache, self.spares = cache, spares
        self.loops = spares.loops + shift

    def __call__(self, unique_layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """``q [S, 1, H, hd]``, ``k, v [S, 1, Hkv, hd]`` -> ``[S, 1, H * hd]``."""
        S, _, H, hd = q.shape
        Hkv = k.shape[2]
        sp = self.spares
        sp.side_keys[sp.index, unique_layer, self.loops] = k[:, 0]
        sp.side_values[sp.index, unique_layer, self.loops] = v[:, 0]
        keys = self.cache.keys[unique_layer, self.loops, :, : sp.kv_len]  # [S, Hkv, P, hd] (a gather)
        values = self.cache.values[unique_layer, self.loops, :, : sp.kv_len]
        q = q.reshape(S, Hkv, H // Hkv, hd) * hd ** -0.5
        scores = torch.matmul(q, keys.transpose(-1, -2)).masked_fill(~sp.mask, float("-inf"))
        own = (q * k.reshape(S, Hkv, 1, hd)).sum(-1, keepdim=True)  # [S, Hkv, rep, 1]
        probs = torch.softmax(torch.cat((scores, own), dim=-1), dim=-1)
        out = torch.matmul(probs[..., :-1], values) + probs[..., -1:] * v.reshape(S, Hkv, 1, hd)
        return out.reshape(S, 1, H * hd)


def causal_attention(B: int, T: int, heads: int, kv_heads: int, head_dim: int):
    """Causal self-attention of whole sequences (training and evaluation, no cache):
    ``attend(q [B, T, heads, hd], k, v [B, T, kv_heads, hd]) -> [B, T, heads * hd]``,
    kv heads repeated for grouped-query attention."""
    rep = heads // kv_heads

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = q.transpose(1, 2)  # [B, heads, T, hd]
        k = k.transpose(1, 2).repeat_interleave(rep, dim=1)
        v = v.transpose(1, 2).repeat_interleave(rep, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(B, T, heads * head_dim)

    return attend


def split_attention(main, spare, groups: int, unique_layer: int, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
    """The first ``groups`` rows through the cache's attention, the rest as spares."""
    return torch.cat((main(unique_layer, q[:groups], k[:groups], v[:groups]),
                      spare(unique_layer, q[groups:], k[groups:], v[groups:])))


def step_rope(layout: StepLayout, spares: SpareRows | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles of a call's rows: the layout's, then the spares'."""
    if spares is None:
        return layout.cos, layout.sin
    return torch.cat((layout.cos, spares.cos)), torch.cat((layout.sin, spares.sin))


def step_attention(cache: KVCache, layout: StepLayout, shift: int, spares: SpareRows | None):
    """Self-attention ``(unique_layer, q, k, v)`` of a call's rows after ``shift`` passes."""
    attention = CachedSelfAttention(cache, layout, shift)
    if spares is None:
        return attention
    return partial(split_attention, attention, SpareAttention(cache, spares, shift), layout.groups)


class LayerAttention:
    """A call's self-attention bound to unique layer ``layer``: ``attend(q, k, v)``
    (rotated queries and keys), and, where the fused path takes the projection
    as it is (``rotates``), ``attend.from_qkv(qkv, heads)`` with the rotary
    embedding inside the fused op (no rotary or slicing ops in Python)."""

    __slots__ = ("attention", "layer", "rotates")

    def __init__(self, attention, layer: int) -> None:
        self.attention, self.layer = attention, layer
        self.rotates = getattr(attention, "rotates", False)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attention(self.layer, q, k, v)

    def from_qkv(self, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        return self.attention.from_qkv(self.layer, qkv, heads)


class SegmentAttention:
    """The self-attention of several requests' rows in one call (a server step):
    each segment's rows against its own cache, outputs in row order."""

    def __init__(self, attentions: list, sizes: list[int]) -> None:
        self.attentions, self.sizes = attentions, sizes
        self.rotates = all(getattr(a, "rotates", False) for a in attentions)

    def __call__(self, unique_layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([attention(unique_layer, *parts) for attention, *parts in
                          zip(self.attentions, q.split(self.sizes), k.split(self.sizes), v.split(self.sizes))])

    def from_qkv(self, unique_layer: int, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        return torch.cat([attention.from_qkv(unique_layer, part, heads)
                          for attention, part in zip(self.attentions, qkv.split(self.sizes))])
