"""The looped decoder, one concern per module:

* ``norms``      :class:`RMSNorm`;
* ``rotary``     rotary tables (:func:`rope_table`, :func:`float32_rope_table`) and :func:`apply_rope`;
* ``layout``     where a decoding call's rows sit: :class:`StepLayout`, :class:`SpareRows`;
* ``attention``  their self-attention against the engine's KV cache (:func:`step_attention`, ...);
* ``layer``      one unique Llama-style layer (:class:`LoopedLayer`), :class:`KernelModule`;
* ``readout``    the exit readout (:class:`ExitReadout`) and :class:`LoopedOutput`;
* ``base``       what the decoder-only and encoder-decoder models share (:class:`LoopedModelBase`);
* ``looped``     the decoder-only model, :class:`LoopedLM`.

Architectures other than plain Llama (their layer variants, hooks and checkpoint
tables) live in :mod:`speedec.architectures`, one file each. This package's
modules import one another directly (never this ``__init__``); it re-exports
their names so that ``from speedec.model import LoopedLM`` keeps working.
"""

from ..kernels import linear
from .attention import (
    CachedSelfAttention,
    LayerAttention,
    SegmentAttention,
    SpareAttention,
    causal_attention,
    split_attention,
    step_attention,
    step_rope,
)
from .base import LoopedModelBase
from .layer import KernelModule, LoopedLayer, weight_factory
from .layout import SpareRows, StepLayout, row_loops, step_layout
from .looped import LoopedLM, model_rope_table
from .norms import RMSNorm
from .readout import ExitReadout, LoopedOutput
from .rotary import apply_rope, float32_rope_table, rope_table

__all__ = [
    "CachedSelfAttention", "ExitReadout", "KernelModule", "LayerAttention", "LoopedLM", "LoopedLayer",
    "LoopedModelBase", "LoopedOutput", "RMSNorm", "SegmentAttention", "SpareAttention", "SpareRows",
    "StepLayout", "apply_rope", "causal_attention", "float32_rope_table", "linear", "model_rope_table",
    "rope_table", "row_loops",
    "split_attention", "step_attention", "step_layout", "step_rope", "weight_factory",
]
