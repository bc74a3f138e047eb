"""EncDecLM: a T5-style translator whose decoder is looped (the SPEED paper's setting).

* Encoder — ``n_encoder_layers`` bidirectional Llama-style layers (RMSNorm,
  RoPE, grouped-query attention, SwiGLU, no biases), applied
  ``n_encoder_loops`` times, then a final RMSNorm. These are
  :class:`speedec.model.LoopedLayer` driven with a non-causal attention.
* Decoder — K unique :class:`DecoderLayer` applied L times (virtual layer
  ``v`` uses unique layer ``v mod K``): causal self-attention with RoPE,
  cross-attention over the encoder output (no RoPE: source and target
  positions are unrelated), SwiGLU MLP: the decoder-only layer's two
  branches with a cross-attention branch between them. Final norm and LM
  head, tied to the shared embedding by default; the same head read after
  ``exit_loop`` loops is the early exit.

Cross-attention keys and values are a function of the encoder output and the
*unique* layer's ``wkv_cross`` only, never of the loop or the target token,
so :meth:`EncDecLM.encode` computes them once per unique layer per source
(K products, not K * L per token) and returns them as an
:class:`EncoderMemory` that the caller (training step or engine) keeps.

Two ways in, as for :class:`speedec.model.LoopedLM`:

* ``forward(src, src_mask, tgt_in)`` — training and evaluation with teacher
  forcing; final logits and, on request, per-loop early-exit logits.
* ``run_decoder_loops(x, layout, cache, memory, n_loops)`` — decoding engines:
  rows of decoder state grouped by loop (a :class:`~speedec.model.StepLayout`),
  self-attention through the engine's :class:`~speedec.cache.KVCache`,
  cross-attention over the memory; one matmul per weight for all rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..model import (
    LoopedLayer,
    LoopedModelBase,
    RMSNorm,
    SpareRows,
    StepLayout,
    causal_attention,
    linear,
    rope_table,
    row_loops,
    step_attention,
    step_layout,
    step_rope,
)
from .config import EncDecConfig


def attend_keys(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
    """Non-causal grouped-query attention: ``q [B, N, H, hd]`` over ``keys/values
    [B, Hkv, S, hd]`` with an optional key mask ``[B, 1, 1, S]`` -> ``[B, N, H*hd]``.

    The ``rep = H / Hkv`` query heads that share a kv head are folded into the
    query length, so keys and values are read in place, never repeated.
    """
    B, N, H, hd = q.shape
    Hkv = keys.shape[1]
    rep = H // Hkv
    # [B, N, Hkv, rep, hd] -> [B, Hkv, rep*N, hd]
    q = q.reshape(B, N, Hkv, rep, hd).permute(0, 2, 3, 1, 4).reshape(B, Hkv, rep * N, hd)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask)
    # [B, Hkv, rep*N, hd] -> [B, N, H*hd]
    return out.reshape(B, Hkv, rep, N, hd).permute(0, 3, 1, 2, 4).reshape(B, N, H * hd)


@dataclass(frozen=True)
class EncoderMemory:
    """A batch of encoded source sentences, as the decoder reads them.

    Keys and values are per *unique* decoder layer: every loop of that layer,
    and every token in flight, reads the same tensors (no copy per slot).
    """

    # K tensors [B, Hkv, S, hd], one per unique decoder layer (SDPA's layout).
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    # [B, 1, 1, S] bool (True = real source token), or None: no padding.
    mask: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def attend(self, unique_layer: int, q: torch.Tensor) -> torch.Tensor:
        """Cross-attention of queries ``q [..., H, hd]`` -> ``[..., H*hd]``.

        The leading dims of ``q`` flatten to ``B * N``, rows grouped by source:
        training passes ``[B, T]``; an engine with one source passes its
        ``[G, T]`` slots, which all become one query block of that source.
        """
        *lead, H, hd = q.shape
        out = attend_keys(q.reshape(self.batch_size, -1, H, hd),  # [B, N, H, hd]
                          self.keys[unique_layer], self.values[unique_layer], self.mask)
        return out.reshape(*lead, H * hd)


class DecoderLayer(LoopedLayer):
    """One unique decoder layer: the decoder-only layer's self-attention and MLP
    branches with a cross-attention branch between them (pre-norm).

    Self-attention q/k/v and gate/up are fused as in LoopedLayer, so a step
    issues one matmul per weight matrix for all rows in flight. The cross
    attention's query and key/value projections are separate because they
    read different inputs: ``wq_cross`` runs every step, ``wkv_cross`` only
    when a source is encoded.
    """

    def __init__(self, config: EncDecConfig) -> None:
        super().__init__(config.decoder_config)
        c = config
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        self.cross_norm = RMSNorm(c.d_model, c.norm_eps)
        self.wq_cross = nn.Parameter(torch.empty(H * hd, c.d_model))
        self.wkv_cross = nn.Parameter(torch.empty(2 * Hkv * hd, c.d_model))
        self.wo_cross = nn.Parameter(torch.empty(c.d_model, H * hd))
        # The parameters in the order of the layer written out before it reused
        # LoopedLayer (self-attention, cross-attention, MLP): an optimizer state
        # saved in a training checkpoint is matched to the parameters by position.
        for name in ("w_gate_up", "w_down"):
            self._parameters[name] = self._parameters.pop(name)
        self._modules["mlp_norm"] = self._modules.pop("mlp_norm")

    def cross_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, Hkv, S, hd]`` of the normed encoder output ``states [B, S, D]``."""
        B, S, _ = states.shape
        Hkv, hd = self.n_kv_heads, self.head_dim
        kv = linear(states, self.wkv_cross, self.kernel)  # [B, S, 2 Hkv hd]
        # [B, S, Hkv, hd] -> [B, Hkv, S, hd], made contiguous once for all later reads.
        k = kv[..., : Hkv * hd].reshape(B, S, Hkv, hd).transpose(1, 2).contiguous()
        v = kv[..., Hkv * hd:].reshape(B, S, Hkv, hd).transpose(1, 2).contiguous()
        return k, v

    def cross_branch(self, x: torch.Tensor, cross_attend) -> torch.Tensor:
        """The cross-attention branch's update of ``x [G, T, D]``; ``cross_attend(q)``
        maps per-row queries to attention output ``[G, T, H*hd]``."""
        G, T, _ = x.shape
        q = linear(self.cross_norm(x), self.wq_cross, self.kernel).reshape(G, T, self.n_heads, self.head_dim)
        return linear(cross_attend(q), self.wo_cross, self.kernel)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                self_attend, cross_attend) -> torch.Tensor:
        """``x [G, T, D]``; ``self_attend(q, k, v)`` and ``cross_attend(q)`` map
        per-row queries (and keys/values) to attention outputs ``[G, T, H*hd]``."""
        x = x + self.attention_branch(x, cos, sin, self_attend)
        x = x + self.cross_branch(x, cross_attend)
        return x + self.mlp_branch(x)


@dataclass(frozen=True)
class EncDecOutput:
    """Result of the training/evaluation forward."""

    # [B, T, V] logits after all decoder loops.
    logits: torch.Tensor
    # Loop count -> [B, T, V] early-exit logits after that many decoder loops,
    # for the loops requested.
    loop_logits: dict[int, torch.Tensor]
    # [B, T, V] the exit readout's (drafter's) logits when requested and the model has
    # one, from the detached exit-loop state and head: its loss trains the readout alone.
    draft_logits: torch.Tensor | None = None


class EncDecLM(LoopedModelBase):
    def __init__(self, config: EncDecConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        # LoopedLayer takes only its widths from the config, and the encoder
        # has the decoder's widths.
        self.encoder_layers = nn.ModuleList(
            LoopedLayer(c.decoder_config) for _ in range(c.n_encoder_layers))
        self.encoder_norm = RMSNorm(c.d_model, c.norm_eps)
        self.decoder_layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.n_unique_layers))
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Parameter(torch.empty(c.vocab_size, c.d_model))
        self.init_loop_parameters(c)  # the decoder's loop embedding and exit readout, when configured
        self.register_buffer("encoder_rope", rope_table(c.max_source_len, c.head_dim, c.rope_theta),
                             persistent=False)
        self.register_buffer("decoder_rope", rope_table(c.max_target_len, c.head_dim, c.rope_theta),
                             persistent=False)
        self.reset_parameters()

    # ----------------------------------------------------------------- setup
    def reset_parameters(self, *, std: float = 0.02, residual_scale: float = 1.0,
                         generator: torch.Generator | None = None) -> None:
        """Random init: normal(0, std); the output projections of residual
        branches also scaled by ``residual_scale / sqrt(2 * depth)``, depth being
        the layer applications of their stack (encoder layers x loops, K x L)."""
        c = self.config
        enc_scale = std * residual_scale / math.sqrt(2 * c.n_encoder_layers * c.n_encoder_loops)
        dec_scale = std * residual_scale / math.sqrt(2 * c.n_virtual_layers)
        with torch.no_grad():
            self.embed.weight.normal_(0.0, std, generator=generator)
            if self.lm_head is not None:
                self.lm_head.normal_(0.0, std, generator=generator)
            for layer in self.encoder_layers:
                for w in (layer.wqkv, layer.w_gate_up):
                    w.normal_(0.0, std, generator=generator)
                for w in (layer.wo, layer.w_down):
                    w.normal_(0.0, enc_scale, generator=generator)
            for layer in self.decoder_layers:
                for w in (layer.wqkv, layer.wq_cross, layer.wkv_cross, layer.w_gate_up):
                    w.normal_(0.0, std, generator=generator)
                for w in (layer.wo, layer.wo_cross, layer.w_down):
                    w.normal_(0.0, dec_scale, generator=generator)
            if self.loop_embedding is not None:
                self.loop_embedding.normal_(0.0, std, generator=generator)
        self.reset_norms()
        if self.exit_readout is not None:
            self.exit_readout.reset_parameters(self.norm, std=std, generator=generator)

    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (atomically)."""
        from ..storage import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> EncDecLM:
        """Load a model saved by :meth:`save_pretrained`; errors name the bad file."""
        from ..storage import ENCDEC_LM, from_pretrained

        return from_pretrained(directory, ENCDEC_LM, dtype=dtype, device=device)


    # ---------------------------------------------------------------- encoder
    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> EncoderMemory:
        """Encode ``src [B, S]`` (``src_mask [B, S]``: True at real tokens, or None
        for no padding) and project it to every unique decoder layer's
        cross-attention keys and values: K products, once per source."""
        c = self.config
        B, S = src.shape
        if S > c.max_source_len:
            raise ValueError(f"source length {S} exceeds max_source_len {c.max_source_len}")
        rope = self.encoder_rope[:S].to(self.dtype)
        cos, sin = rope[None, :, 0, None, :], rope[None, :, 1, None, :]  # [1, S, 1, hd]
        key_mask = None if src_mask is None else src_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, S]

        def attend(q, k, v):
            # Bidirectional: every source position reads every real source token.
            return attend_keys(q, k.transpose(1, 2), v.transpose(1, 2), key_mask)  # [B, S, H*hd]

        x = self.embed(src)  # [B, S, D]
        for _ in range(c.n_encoder_loops):
            for layer in self.encoder_layers:
                x = layer(x, cos, sin, attend)
        states = self.encoder_norm(x)
        kv = [layer.cross_kv(states) for layer in self.decoder_layers]
        return EncoderMemory(keys=tuple(k for k, _ in kv), values=tuple(v for _, v in kv),
                             mask=key_mask)

    # --------------------------------------------------------------- training
    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None, tgt_in: torch.Tensor, *,
                output_loops: tuple[int, ...] = (), output_draft: bool = False) -> EncDecOutput:
        """Teacher-forced decoding of ``tgt_in [B, T]`` (start token first, padding
        at the end) against ``src [B, S]``; causal, no cache.

        Target padding needs no mask: it sits after the real tokens, which
        causal attention never lets read it; leave it out of the loss.
        ``output_loops``: decoder loop counts (1..L-1) after which to also read
        out logits (the early exits of the training loss). ``output_draft``: also
        the exit readout's logits (models with one), from the exit loop's state and
        the head with gradients cut.
        """
        c = self.config
        B, T = tgt_in.shape
        if T > c.max_target_len:
            raise ValueError(f"target length {T} exceeds max_target_len {c.max_target_len}")
        for n in output_loops:
            if not 1 <= n < c.n_loops:
                raise ValueError(f"output_loops entries must be in 1..{c.n_loops - 1}, got {n}")
        memory = self.encode(src, src_mask)
        rope = self.decoder_rope[:T].to(self.dtype)
        cos, sin = rope[None, :, 0, None, :], rope[None, :, 1, None, :]  # [1, T, 1, hd]
        self_attend = causal_attention(B, T, c.n_heads, c.n_kv_heads, c.head_dim)
        x = self.embed(tgt_in)  # [B, T, D]
        loop_logits = {}
        draft_logits = None
        for loop in range(c.n_loops):
            x = self.begin_loop(x, loop)
            for k_unique, layer in enumerate(self.decoder_layers):
                x = layer(x, cos, sin, self_attend, partial(memory.attend, k_unique))
            x = self.end_of_loop(x)
            if loop + 1 in output_loops:
                loop_logits[loop + 1] = self.head(x)
            if output_draft and self.exit_readout is not None and loop + 1 == c.exit_loop:
                # The trunk and the head get no gradient from the drafter's loss.
                draft_logits = linear(self.exit_readout(x.detach()), self.head_weight.detach(), self.kernel)
        return EncDecOutput(logits=self.head(x), loop_logits=loop_logits, draft_logits=draft_logits)

    # ---------------------------------------------------------------- engines
    def decoder_layout(self, positions: Sequence[Sequence[int]], loops: Sequence[int]) -> StepLayout:
        """Describe G groups of T decoder rows: ``positions[g][t]``, group g at loop ``loops[g]``.

        Same rules as :meth:`speedec.model.LoopedLM.layout`, over the decoder's
        rotary table.
        """
        c = self.config
        return step_layout(self.decoder_rope, positions, loops, rep=c.n_heads // c.n_kv_heads,
                           dtype=self.dtype)

    def run_decoder_loops(self, x: torch.Tensor, layout: StepLayout, cache: KVCache,
                          memory: EncoderMemory, n_loops: int, spares: SpareRows | None = None) -> torch.Tensor:
        """``n_loops`` passes over the K unique decoder layers for rows ``x [G, T, D]``.

        Self-attention: each row writes its key/value at (its virtual layer, its
        position) and reads its own virtual layer's cache up to its position
        (strided views, no gather, when the loops are evenly spaced).
        Cross-attention: all G*T rows read unique layer k's memory together.
        With ``spares`` (see :class:`speedec.model.SpareRows`) the last rows
        of ``x`` are spare rows.
        """
        cos, sin = step_rope(layout, spares)
        loops = None if self.loop_embedding is None else row_loops(layout, spares, x.device)
        for shift in range(n_loops):
            if loops is not None:
                x = self.begin_loop(x, loops + shift)
            self_attention = step_attention(cache, layout, shift, spares)
            for k_unique, layer in enumerate(self.decoder_layers):
                x = layer(x, cos, sin, partial(self_attention, k_unique),
                          partial(memory.attend, k_unique))
            x = self.end_of_loop(x)
        return x
