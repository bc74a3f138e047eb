"""Rotary position embeddings: the tables (float64 for speedec's own models, float32
as the imported architectures' references compute them) and the rotation."""

from __future__ import annotations

import torch


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


def float32_rope_table(max_len: int, head_dim: int, theta: float) -> torch.Tensor:
    """:func:`rope_table` as the Hugging Face reference implementations of the imported
    architectures compute their rotary angles: inverse frequencies, angles, cos and sin
    all in float32 (``[max_len, 2, head_dim]`` float32), so that an imported model
    rotates by exactly the reference's angles in every dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    sign = torch.ones(head_dim)
    sign[: head_dim // 2] = -1.0
    return torch.stack((angles.cos(), angles.sin() * sign), dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., heads, hd]`` by per-row angles ``[..., 1, hd]`` (half-split pairs).

    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``
    written as ``roll(x) * [-sin, sin]``.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
