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

What differs between architectures (the layer class, whether the final norm
closes every loop, the early-exit gate, the rotary table) comes from the
architecture's description in :mod:`speedec.architectures`, looked up by
``config.architecture``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..cache import KVCache
from ..config import ModelConfig
from ..kernels import linear
from .attention import LayerAttention, SegmentAttention, causal_attention, step_attention, step_rope
from .base import LoopedModelBase
from .layer import weight_factory
from .layout import SpareRows, StepLayout, row_loops, step_layout
from .norms import RMSNorm
from .readout import LoopedOutput


def model_rope_table(config: ModelConfig) -> torch.Tensor:
    """The rotary table of a decoder of ``config``, as its architecture computes it:
    float32 angles for the imported architectures
    (:func:`~speedec.model.rotary.float32_rope_table`), float64 for speedec's own."""
    from ..architectures import architecture  # (the architectures import this package's modules)

    return architecture(config.architecture).rope(config)


class LoopedLM(LoopedModelBase):
    """The decoder-only looped model. ``config.architecture`` names the
    :class:`~speedec.architectures.base.Architecture` that picks the layer and
    loop variant: ``"llama"`` (the default, :mod:`speedec.architectures.llama`);
    ``"ouro"`` (:mod:`speedec.architectures.ouro`), whose layers normalise their
    branch outputs, whose final norm runs at the end of every loop
    (:meth:`end_of_loop`) so that the head reads the state without a second
    norm, and which has an early-exit gate (:meth:`exit_probabilities`);
    ``"nanbeige"`` (:mod:`speedec.architectures.nanbeige`): Llama's layers with
    ouro's norm at the end of every loop (unless ``skip_loop_final_norm``)."""

    def __new__(cls, config: ModelConfig | None = None, *args, **kwargs):
        # An architecture with its own model class (huginn) gets it from LoopedLM(config).
        if cls is LoopedLM and config is not None:
            from ..architectures import architecture

            cls = architecture(config.architecture).model_class or cls
        return super().__new__(cls)

    def __init__(self, config: ModelConfig) -> None:
        from ..architectures import architecture  # (the architectures import this package's modules)

        super().__init__()
        self.config = config
        arch = architecture(config.architecture)
        # The final norm closes every loop (ouro; nanbeige unless skip_loop_final_norm).
        self.loop_norm = arch.loop_norm(config)
        if config.quantization is not None:  # q8_0 rows, read by token
            from ..quant import Q8Embedding

            self.embed = Q8Embedding(config.vocab_size, config.d_model)
        else:
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(arch.layer(config) for _ in range(config.n_unique_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        if config.quantization is not None:  # an 8-bit head, also when the float model ties it
            self.lm_head = weight_factory(config)(config.vocab_size, config.d_model)
        elif config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Parameter(torch.empty(config.vocab_size, config.d_model))
        # The early-exit gate (ouro): hidden state -> logit of exiting after this loop.
        self.exit_gate = nn.Linear(config.d_model, 1) if arch.exit_gate else None
        self.init_loop_parameters(config)
        self.register_buffer("rope", arch.rope(config), persistent=False)
        self.init_architecture_modules(config)
        self.reset_parameters()

    def init_architecture_modules(self, config: ModelConfig) -> None:
        """Create the modules an architecture adds to the decoder (huginn's prelude, coda
        and adapter), before the first :meth:`reset_parameters`: none here."""

    # ----------------------------------------------------------------- setup
    def reset_parameters(self, *, std: float = 0.02, residual_scale: float = 1.0,
                         generator: torch.Generator | None = None) -> None:
        """Random init: normal(0, std); output projections of the residual
        branches also scaled by ``residual_scale / sqrt(2 * virtual layers)``."""
        n_virtual = self.config.n_virtual_layers
        with torch.no_grad():
            if isinstance(self.embed, nn.Embedding):  # (8-bit weights are made by quantizing)
                self.embed.weight.normal_(0.0, std, generator=generator)
            if isinstance(self.lm_head, nn.Parameter):  # (8-bit weights are made by quantizing)
                self.lm_head.normal_(0.0, std, generator=generator)
            for layer in self.weight_layers():
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

    def weight_layers(self) -> list[nn.Module]:
        """Every layer with projections (the K unique layers; huginn adds its prelude and coda)."""
        return list(self.layers)

    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (atomically)."""
        from ..storage import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", exit_loop: int | None = None,
                        loops: int | None = None) -> LoopedLM:
        """Load a model saved by :meth:`save_pretrained`, or a Hugging Face checkpoint of an
        architecture speedec imports (Ouro, Nanbeige, Huginn); errors name the bad file. ``loops``:
        run it for that many loops (:meth:`at_depth`; any number of recurrences for Huginn). ``exit_loop``: the
        early exit SPEED drafts from (default: the saved one; 1 for an imported model).
        ``dtype``: default (None) the checkpoint's own for an imported checkpoint (bf16
        stays bf16), float32 for speedec's own models."""
        from ..storage import from_pretrained

        return from_pretrained(directory, dtype=dtype, device=device, exit_loop=exit_loop, loops=loops)

    # ------------------------------------------------------------ architecture
    def end_of_loop(self, x: torch.Tensor) -> torch.Tensor:
        """ouro, nanbeige (unless skip_loop_final_norm): the final norm closes every loop
        (the next loop reads the normed state)."""
        return self.norm(x) if self.loop_norm else x

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """Where the final norm closes every loop, the state is already normed: the head
        reads it as it is."""
        return x if self.loop_norm else self.norm(x)

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

    def sequence_attention(self, B: int, T: int):
        """What the layers of a whole-sequence pass over ``[B, T]`` positions 0..T-1 attend
        with: ``(cos, sin, attend)``, the rotary angles ``[1, T, 1, hd]`` and causal
        self-attention ``attend(q, k, v)`` (no cache)."""
        c = self.config
        if T > c.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {c.max_seq_len}")
        rope = self.rope[:T].to(self.dtype)
        cos, sin = rope[None, :, 0, None, :], rope[None, :, 1, None, :]  # [1, T, 1, hd]
        return cos, sin, causal_attention(B, T, c.n_heads, c.n_kv_heads, c.head_dim)

    def _loops(self, tokens: torch.Tensor):
        """The state of ``tokens [B, T]`` after each loop, one loop at a time."""
        c = self.config
        cos, sin, attend = self.sequence_attention(*tokens.shape)
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
        loops = None if self.loop_embedding is None else row_loops(layout, spares, x.device)
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
