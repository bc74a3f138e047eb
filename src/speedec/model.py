"""LoopedLM: a Llama-style decoder whose K unique layers are applied L times.

Two ways in:

* ``forward(tokens)`` — training and evaluation: whole sequences, causal
  self-attention, no cache; returns the final logits and, on request, the
  logits after every loop (for the early-exit loss and agreement metrics).
* ``run_loops(x, layout, cache, n_loops)`` — decoding engines: rows of hidden
  state arranged as G groups of T rows, each group at its own loop and its own
  positions, reading and writing the engine's :class:`~speedec.cache.KVCache`.
  One call = ``n_loops`` passes over the K unique layers; every weight matrix
  is applied to all G*T rows in one matmul.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, partial

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .kernels import fused_ops_available, linear

_HALF = (torch.float16, torch.bfloat16)


class KernelModule(nn.Module):
    """A module whose products go through :func:`speedec.kernels.linear` with the
    few-row kernel its model chose (:meth:`LoopedModelBase.set_kernel`), so that
    the choice belongs to the model, not to the process."""

    # The kernel (see speedec.kernels.linear); None: the process default.
    kernel: str | None = None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a gain; computes in at least float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding (no gradients) in float32 on the CPU: one fused op
        # (speedec_kernels::rms_norm, batch-invariant) instead of six.
        if (x.dtype == torch.float32 and not torch.is_grad_enabled() and x.device.type == "cpu"
                and self.weight.dtype == torch.float32 and fused_ops_available()):
            return torch.ops.speedec_kernels.rms_norm(x, self.weight, self.eps)
        # Written out: F.rms_norm measured 32 us against about 12 us for these
        # four ops on a few rows of 1024 (a per-layer cost at every step).
        if x.dtype in _HALF:
            # Half-precision inputs are normalised in float32 and cast back
            # before the gain: their mean square loses too much in 16 bits.
            y = x.float()
            return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_table(max_len: int, head_dim: int, theta: float) -> torch.Tensor:
    """``[max_len, 2, head_dim]``: cos, and sin with its first half negated (float64).

    Folding the sign of the rotation into the table turns rotate-half into a
    roll, one op fewer per rotation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)  # [max_len, head_dim], halves repeated
    sign = torch.ones(head_dim, dtype=torch.float64)
    sign[: head_dim // 2] = -1.0
    return torch.stack((angles.cos(), angles.sin() * sign), dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., heads, hd]`` by per-row angles ``[..., 1, hd]`` (half-split pairs).

    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``
    written as ``roll(x) * [-sin, sin]``.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


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


def step_layout(rope: torch.Tensor, positions, loops, *, rep: int, dtype: torch.dtype) -> StepLayout:
    """A :class:`StepLayout` over a rotary table ``rope [max_len, 2, hd]``; ``rep`` is
    the number of query heads per kv head."""
    flat = tuple(int(p) for row in positions for p in row)
    shape = (len(positions), len(positions[0]))
    return StepLayout(loops=tuple(loops), shape=shape, kv_len=max(flat) + 1, rep=rep, position_list=flat,
                      rope=rope, dtype=dtype)


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


def weight_factory(config):
    """How a model of ``config`` holds a product's weight ``[out, in]``: a float
    parameter, or a :class:`~speedec.quant.Q8Weight` when the config says ``q8_0``."""
    if getattr(config, "quantization", None) == "q8_0":
        from .quant import Q8Weight

        return Q8Weight
    return lambda out_features, in_features: nn.Parameter(torch.empty(out_features, in_features))


class LoopedLayer(KernelModule):
    """One unique Llama-style layer: RMSNorm, GQA attention with RoPE, SwiGLU MLP.

    q/k/v and gate/up are stored fused so that a step issues one matmul per
    weight matrix for all rows in flight. The two residual branches are
    methods, so that a layer with more branches (the translator's decoder
    layer adds cross-attention) or a variant that normalises a branch's
    output composes them instead of writing the layer again.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.ffn_dim = c.ffn_dim
        weight = weight_factory(c)
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.wqkv = weight((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.d_model)
        self.wo = weight(c.d_model, c.n_heads * c.head_dim)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.w_gate_up = weight(2 * c.ffn_dim, c.d_model)
        self.w_down = weight(c.d_model, c.ffn_dim)

    def attention_branch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         attend) -> torch.Tensor:
        """The self-attention branch's update of ``x [G, T, D]``: ``[G, T, D]``.
        ``attend(q, k, v)`` maps per-row q/k/v to attention output ``[G, T, H * hd]``."""
        G, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = linear(self.attn_norm(x), self.wqkv, self.kernel)  # [G, T, (H + 2 Hkv) hd]
        if getattr(attend, "rotates", False):  # the fused decoding path rotates q and k itself
            return linear(attend.from_qkv(qkv, H), self.wo, self.kernel)
        # q and k rotated together: [G, T, H + Hkv, hd]
        qk = apply_rope(qkv[..., : (H + Hkv) * hd].reshape(G, T, H + Hkv, hd), cos, sin)
        q, k = qk[:, :, :H], qk[:, :, H:]
        v = qkv[..., (H + Hkv) * hd:].reshape(G, T, Hkv, hd)
        return linear(attend(q, k, v), self.wo, self.kernel)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The SwiGLU MLP branch's update of ``x [..., D]``."""
        gate_up = linear(self.mlp_norm(x), self.w_gate_up, self.kernel)  # [..., 2 F]
        hidden = F.silu(gate_up[..., : self.ffn_dim]) * gate_up[..., self.ffn_dim:]
        return linear(hidden, self.w_down, self.kernel)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend) -> torch.Tensor:
        """``x [G, T, D]``; ``attend(q, k, v)`` maps per-row q/k/v to attention output."""
        x = x + self.attention_branch(x, cos, sin, attend)
        return x + self.mlp_branch(x)


class SandwichLayer(LoopedLayer):
    """A layer whose branch outputs are normalised before they join the residual
    stream (sandwich norms, the ``"ouro"`` architecture):
    ``x + attn_out_norm(attention)``, then ``x + mlp_out_norm(mlp)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.attn_out_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp_out_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend) -> torch.Tensor:
        x = x + self.attn_out_norm(self.attention_branch(x, cos, sin, attend))
        return x + self.mlp_out_norm(self.mlp_branch(x))


class ExitReadout(KernelModule):
    """The drafter: parameters used only at the early exit.

    ``features(h) = out_norm(h + up(silu(down(norm(h)))))``, then the shared LM
    head. A low-rank residual adapter (``2 * rank * d_model`` weights) lets the
    exit's prediction move towards the final loop's without asking the shared
    layers to make loop ``exit_loop`` a finished answer. ``up`` starts at zero
    and ``out_norm`` as a copy of the final norm (:meth:`start_from`), so a
    fresh readout reads exactly what the shared exit reads. Verification is
    always against the final loop, so exactness never depends on it.
    """

    def __init__(self, d_model: int, rank: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.down = nn.Parameter(torch.empty(rank, d_model))
        self.up = nn.Parameter(torch.zeros(d_model, rank))
        self.out_norm = RMSNorm(d_model, eps)

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
            self.out_norm.weight.copy_(final_norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` hidden state after the exit loop -> ``[..., D]`` features for the head."""
        # The adapter: [..., D] -> [..., rank] -> [..., D].
        adapter = linear(F.silu(linear(self.norm(x), self.down, self.kernel)), self.up, self.kernel)
        return self.out_norm(x + adapter)


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


class LoopedModelBase(KernelModule):
    """What the decoder-only and encoder-decoder models share: reproducible
    random construction, the dtype/device/LM-head accessors engines use, and
    the architecture hooks of a loop (:meth:`begin_loop`, :meth:`end_of_loop`).
    Subclasses define ``reset_parameters``, ``embed``, ``norm`` and ``lm_head``,
    and may set ``exit_readout`` (an :class:`ExitReadout`) and
    ``loop_embedding`` (``[L, D]``)."""

    def init_loop_parameters(self, config) -> None:
        """Create the optional per-loop parameters ``config`` asks for (absent: None)."""
        if getattr(config, "loop_embedding", False):
            self.loop_embedding = nn.Parameter(torch.zeros(config.n_loops, config.d_model))
        else:
            self.register_parameter("loop_embedding", None)
        rank = getattr(config, "exit_readout_rank", None)
        self.exit_readout = None if rank is None else ExitReadout(config.d_model, rank, config.norm_eps)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``[..., D] -> [..., V]`` (also the shared readout of any loop)."""
        return linear(self.norm(x), self.head_weight, self.kernel)

    def exit_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the early exit (the drafts): through the exit readout when the
        model has one, else the same as :meth:`head`."""
        if self.exit_readout is None:
            return self.head(x)
        return linear(self.exit_readout(x), self.head_weight, self.kernel)

    def head_and_exit(self, final: torch.Tensor, exit_rows: torch.Tensor) -> torch.Tensor:
        """``[n, D]`` rows read by the shared head and ``[m, D]`` rows read at the exit,
        in one LM-head matmul: ``[n + m, V]``."""
        if not len(exit_rows):
            return self.head(final)
        if not len(final):
            return self.exit_head(exit_rows)
        if self.exit_readout is None:
            return self.head(torch.cat((final, exit_rows)))
        features = torch.cat((self.norm(final), self.exit_readout(exit_rows)))
        return linear(features, self.head_weight, self.kernel)

    def end_of_loop(self, x: torch.Tensor) -> torch.Tensor:
        """The state leaving a pass over the unique layers (every loop, in training
        and in decoding alike): unchanged here; an architecture that normalises
        the state after every loop does it in this hook."""
        return x

    def set_kernel(self, name: str | None) -> None:
        """Make every product of the model use few-row kernel ``name`` (None: the
        process default); :func:`speedec.kernels.prepare_kernel` chooses it."""
        for module in self.modules():
            if isinstance(module, KernelModule):
                module.kernel = name

    def reset_norms(self) -> None:
        """Every :class:`RMSNorm` of the model starts as the identity (gain 1)."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)

    def begin_loop(self, x: torch.Tensor, loops: torch.Tensor | int) -> torch.Tensor:
        """The state entering a loop: plus that loop's embedding when the model has one.
        ``loops``: the loop index (0-based) of the rows, an int or ``[G, 1, 1]``."""
        if self.loop_embedding is None:
            return x
        return x + self.loop_embedding[loops]

    @classmethod
    def random(cls, config, *, seed: int = 0, residual_scale: float = 1.0,
               std: float = 0.02):
        """A model with reproducible random weights (see :meth:`reset_parameters`)."""
        model = cls(config)
        model.reset_parameters(std=std, residual_scale=residual_scale,
                               generator=torch.Generator().manual_seed(seed))
        return model.eval()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device


class LoopedLM(LoopedModelBase):
    """The decoder-only looped model. ``config.architecture`` picks the layer
    and loop variant: ``"llama"`` (the default) or ``"ouro"``, whose layers
    normalise their branch outputs (:class:`SandwichLayer`), whose final norm
    runs at the end of every loop (:meth:`end_of_loop`) so that the head reads
    the state without a second norm, and which has an early-exit gate
    (:meth:`exit_probabilities`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.ouro = config.architecture == "ouro"
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        layer_class = SandwichLayer if self.ouro else LoopedLayer
        self.layers = nn.ModuleList(layer_class(config) for _ in range(config.n_unique_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        if config.quantization is not None:  # an 8-bit head, also when the float model ties it
            self.lm_head = weight_factory(config)(config.vocab_size, config.d_model)
        elif config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Parameter(torch.empty(config.vocab_size, config.d_model))
        # The early-exit gate (ouro): hidden state -> logit of exiting after this loop.
        self.exit_gate = nn.Linear(config.d_model, 1) if self.ouro else None
        self.init_loop_parameters(config)
        self.register_buffer(
            "rope", rope_table(config.max_seq_len, config.head_dim, config.rope_theta),
            persistent=False)
        self.reset_parameters()

    # ----------------------------------------------------------------- setup
    def reset_parameters(self, *, std: float = 0.02, residual_scale: float = 1.0,
                         generator: torch.Generator | None = None) -> None:
        """Random init: normal(0, std); output projections of the residual
        branches also scaled by ``residual_scale / sqrt(2 * virtual layers)``."""
        n_virtual = self.config.n_virtual_layers
        with torch.no_grad():
            self.embed.weight.normal_(0.0, std, generator=generator)
            if isinstance(self.lm_head, nn.Parameter):  # (8-bit weights are made by quantizing)
                self.lm_head.normal_(0.0, std, generator=generator)
            for layer in self.layers:
                for w in (layer.wqkv, layer.w_gate_up):
                    if isinstance(w, nn.Parameter):
                        w.normal_(0.0, std, generator=generator)
                for w in (layer.wo, layer.w_down):
                    if isinstance(w, nn.Parameter):
                        w.normal_(0.0, std * residual_scale / math.sqrt(2 * n_virtual),
                                  generator=generator)
            if self.loop_embedding is not None:
                self.loop_embedding.normal_(0.0, std, generator=generator)
            if self.exit_gate is not None:
                self.exit_gate.weight.normal_(0.0, std, generator=generator)
                self.exit_gate.bias.zero_()
        self.reset_norms()
        if self.exit_readout is not None:
            self.exit_readout.reset_parameters(self.norm, std=std, generator=generator)

    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (atomically)."""
        from .storage import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", exit_loop: int | None = None) -> LoopedLM:
        """Load a model saved by :meth:`save_pretrained`, or a Hugging Face checkpoint of an
        architecture speedec imports (Ouro); errors name the bad file. ``exit_loop``: the
        early exit SPEED drafts from (default: the saved one; 1 for an imported model).
        ``dtype``: default (None) the checkpoint's own for an imported checkpoint (bf16
        stays bf16), float32 for speedec's own models."""
        from .storage import from_pretrained

        return from_pretrained(directory, dtype=dtype, device=device, exit_loop=exit_loop)

    # ------------------------------------------------------------ architecture
    def end_of_loop(self, x: torch.Tensor) -> torch.Tensor:
        """ouro: the final norm closes every loop (the next loop reads the normed state)."""
        return self.norm(x) if self.ouro else x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """ouro: the state is already normed at the end of every loop, so the head is the
        LM head alone."""
        if self.ouro:
            return linear(x, self.head_weight, self.kernel)
        return super().head(x)

    def exit_probabilities(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The early-exit gate (ouro) on the states after every loop ``[L, ..., D]``
        (:meth:`loop_states`): ``(lam, p)``, both ``[L, ...]``, with
        ``lam_e = sigmoid(gate(h_e))`` and ``p_e = lam_e * prod_{j<e}(1 - lam_j)`` for
        ``e < L - 1``; the last loop takes the remaining probability."""
        if self.exit_gate is None:
            raise ValueError("this model has no early-exit gate (architecture 'ouro' has one)")
        lam = torch.sigmoid(self.exit_gate(states).squeeze(-1))
        survive = torch.cumprod(1 - lam, dim=0)
        remain = torch.cat((torch.ones_like(survive[:1]), survive[:-1]))
        p = torch.cat((lam[:-1] * remain[:-1], remain[-1:]))
        return lam, p

    def loop_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[L, B, T, D]``: the state after every loop of ``tokens [B, T]`` (what each
        loop's readout reads), as :meth:`forward` computes it."""
        return torch.stack(list(self._loops(tokens)))

    # --------------------------------------------------------------- training
    def forward(self, tokens: torch.Tensor, *, output_loops: tuple[int, ...] = (),
                output_draft: bool = False) -> LoopedOutput:
        """Whole sequences ``tokens [B, T]`` at positions 0..T-1, causal, no cache.

        ``output_loops``: loop counts (1..L-1) after which to also read out
        logits through the shared head (the early exits used by the training
        loss). ``output_draft``: also the exit readout's logits (models with
        one), from the exit loop's state and the head with gradients cut.
        """
        c = self.config
        for n in output_loops:
            if not 1 <= n < c.n_loops:
                raise ValueError(f"output_loops entries must be in 1..{c.n_loops - 1}, got {n}")
        loop_logits = {}
        draft_logits = None
        for loop, x in enumerate(self._loops(tokens)):
            if loop + 1 in output_loops:
                loop_logits[loop + 1] = self.head(x)
            if output_draft and self.exit_readout is not None and loop + 1 == c.exit_loop:
                # The trunk and the head get no gradient from the drafter's loss.
                head = self.head_weight
                head = head.detach() if isinstance(head, torch.Tensor) else head  # (8-bit heads have no gradient)
                draft_logits = linear(self.exit_readout(x.detach()), head, self.kernel)
        return LoopedOutput(logits=self.head(x), loop_logits=loop_logits, draft_logits=draft_logits)

    def _loops(self, tokens: torch.Tensor):
        """The state of ``tokens [B, T]`` after each loop, one loop at a time."""
        c = self.config
        B, T = tokens.shape
        if T > c.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {c.max_seq_len}")
        rope = self.rope[:T].to(self.dtype)
        cos, sin = rope[None, :, 0, None, :], rope[None, :, 1, None, :]  # [1, T, 1, hd]
        rep = c.n_heads // c.n_kv_heads

        def attend(q, k, v):
            # [B, T, heads, hd] -> [B, heads, T, hd]; kv heads repeated for GQA.
            q = q.transpose(1, 2)
            k = k.transpose(1, 2).repeat_interleave(rep, dim=1)
            v = v.transpose(1, 2).repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return out.transpose(1, 2).reshape(B, T, c.n_heads * c.head_dim)

        x = self.embed(tokens)
        for loop in range(c.n_loops):
            x = self.begin_loop(x, loop)
            for layer in self.layers:
                x = layer(x, cos, sin, attend)
            x = self.end_of_loop(x)
            yield x

    # ---------------------------------------------------------------- engines

    def layout(self, positions: list[list[int]], loops: list[int] | tuple[int, ...]) -> StepLayout:
        """Describe G groups of T rows: ``positions[g][t]``, group g at loop ``loops[g]``."""
        c = self.config
        return step_layout(self.rope, positions, loops, rep=c.n_heads // c.n_kv_heads, dtype=self.dtype)

    def run_loops(self, x: torch.Tensor, layout: StepLayout, cache: KVCache,
                  n_loops: int, spares: SpareRows | None = None) -> torch.Tensor:
        """``n_loops`` passes over the K unique layers for rows ``x [G, T, D]``.

        Each row writes its key/value at (its virtual layer, its position) and
        attends over its own virtual layer's cache up to its own position.
        With ``spares`` (T = 1 only), ``x`` holds G + S rows: the last S are
        spare rows (see :class:`SpareRows`), in the same matmuls.
        """
        loops = None
        if self.loop_embedding is not None:
            loops = torch.tensor(layout.loops, device=x.device).repeat_interleave(layout.rows)  # [G*T]
            loops = loops.view(layout.groups, layout.rows)  # [G, T]
            if spares is not None:
                loops = torch.cat((loops, spares.loops[:, None]))  # [G + S, 1]
        cos = sin = None  # built only if a pass needs them (the fused path does not)
        for shift in range(n_loops):
            if loops is not None:
                x = self.begin_loop(x, loops + shift)  # [G, T, D] + [G, T, D]
            attention = step_attention(cache, layout, shift, spares)
            if cos is None and not getattr(attention, "rotates", False):
                cos, sin = step_rope(layout, spares)
            for k_unique, layer in enumerate(self.layers):
                x = layer(x, cos, sin, LayerAttention(attention, k_unique))
            x = self.end_of_loop(x)
        return x

    def spare_rows(self, positions: list[int], loops: list[int], index: list[int],
                   side: tuple[torch.Tensor, torch.Tensor]) -> SpareRows:
        """Describe spare rows (see :class:`SpareRows`) for :meth:`run_loops`."""
        return SpareRows.build(self.rope, positions, loops, index, side)

    def run_segments(self, x: torch.Tensor,
                     segments: Sequence[tuple[StepLayout, KVCache, SpareRows | None]]) -> torch.Tensor:
        """One pass over the K unique layers for the rows of several requests at once
        (the server's step): ``x [N, 1, D]`` holds each segment's rows in turn (its
        layout's G rows, then its S spares), each segment with its own cache.

        Every weight matrix is applied once to all N rows; attention runs per
        segment, exactly as :meth:`run_loops` runs it for that segment alone, so
        with a batch-invariant kernel a row's result does not depend on which
        other requests share the step.
        """
        if len(segments) == 1:
            layout, cache, spares = segments[0]
            return self.run_loops(x, layout, cache, 1, spares=spares)
        sizes = [layout.groups + (0 if spares is None else spares.loops.shape[0])
                 for layout, _, spares in segments]
        if self.loop_embedding is not None:
            loops = torch.cat([torch.tensor(layout.loops, device=x.device) if spares is None
                               else torch.cat((torch.tensor(layout.loops, device=x.device), spares.loops))
                               for layout, _, spares in segments])
            x = self.begin_loop(x, loops[:, None])  # [N, 1]
        attention = SegmentAttention([step_attention(cache, layout, 0, spares)
                                      for layout, cache, spares in segments], sizes)
        cos = sin = None
        if not attention.rotates:
            ropes = [step_rope(layout, spares) for layout, _, spares in segments]
            cos, sin = torch.cat([c for c, _ in ropes]), torch.cat([s for _, s in ropes])
        for k_unique, layer in enumerate(self.layers):
            x = layer(x, cos, sin, LayerAttention(attention, k_unique))
        return self.end_of_loop(x)
