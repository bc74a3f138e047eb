"""Dtype names and device parsing shared by the command-line front ends."""

from __future__ import annotations

import torch

from .errors import SpeedecError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# The weights' dtypes of a decoder-only model: the float ones, and "int8" for
# q8_0 weights (8-bit blocks with a float16 scale; float32 activations; speedec.quant).
MODEL_DTYPES = {**DTYPES, "int8": torch.int8}


def parse_device(name: str) -> torch.device:
    """``name`` as a torch device; a clear error for an unknown name or a missing GPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpeedecError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpeedecError("--device cuda was asked for but no CUDA device is available")
    return device
