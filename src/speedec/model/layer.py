"""One unique Llama-style layer (:class:`LoopedLayer`), the modules whose products
go through speedec's few-row kernels (:class:`KernelModule`), and how a product's
weight is held (:func:`weight_factory`: float, or 8-bit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import linear
from .norms import RMSNorm
from .rotary import apply_rope


class KernelModule(nn.Module):
    """A module whose products go through :func:`speedec.kernels.linear` with the
    few-row kernel its model chose (:meth:`~speedec.model.base.LoopedModelBase.set_kernel`), so that
    the choice belongs to the model, not to the process."""

    # The kernel (see speedec.kernels.linear); None: the process default.
    kernel: str | None = None


def weight_factory(config):
    """How a model of ``config`` holds a product's weight ``[out, in]``: a float
    parameter, or a :class:`~speedec.quant.Q8Weight` when the config says ``q8_0``."""
    if getattr(config, "quantization", None) == "q8_0":
        from ..quant import Q8Weight

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
        qkv = self.project_qkv(x)  # [G, T, (H + 2 Hkv) hd]
        if getattr(attend, "rotates", False):  # the fused decoding path rotates q and k itself
            return linear(attend.from_qkv(qkv, H), self.wo, self.kernel)
        # q and k rotated together: [G, T, H + Hkv, hd]
        qk = apply_rope(qkv[..., : (H + Hkv) * hd].reshape(G, T, H + Hkv, hd), cos, sin)
        q, k = qk[:, :, :H], qk[:, :, H:]
        v = qkv[..., (H + Hkv) * hd:].reshape(G, T, Hkv, hd)
        return linear(attend(q, k, v), self.wo, self.kernel)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch's fused q/k/v projection of ``x [..., D]`` (before the
        rotary embedding): ``[..., (H + 2 Hkv) hd]``."""
        return linear(self.attn_norm(x), self.wqkv, self.kernel)

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
