"""8-bit weights: llama.cpp's ``q8_0`` scheme for the products of a looped model.

A weight ``W [N, K]`` (the nn.Linear layout) is stored as ``qs`` int8 ``[N, K]``
(values in -127..127) and ``d`` float16 ``[N, K / 32]``: one scale per block of
32 consecutive weights along ``K``, ``W ~ qs * d`` (symmetric, no offset). That
is byte for byte the block of a GGUF ``q8_0`` tensor, so exporting a quantized
model to llama.cpp writes the same numbers (no second rounding). An input
dimension that is not a multiple of 32 (the bundled model's ``ffn_dim`` is 688)
is padded with zero weights to the next multiple, and the rows with zeros:
the product is unchanged (GGUF, whose q8_0 rows must split into whole blocks,
gets such a matrix as float32).

What is 8-bit: every unique layer's projections (q/k/v, output, gate/up, down),
the LM head (for a model with a tied head: a quantized copy) and the token
embedding (:class:`Q8Embedding`, read by row, as llama.cpp's ``q8_0`` files
store ``token_embd``: at Nanbeige4.2-3B's vocabulary a float32 embedding
would be 2 GB of the model's 5.4). Norms, the loop embedding, Ouro's exit
gate and the exit readout's small adapter stay float32, and so do the
activations and the KV cache.

Products (:meth:`Q8Weight.forward`) quantize each activation row per block of
32 and sum int8 x int8 blocks exactly in int32, then combine the blocks in
float32 (as llama.cpp's ``q8_0`` dot products do); the kernel for the CPU at
hand is chosen by :mod:`speedec.q8_kernels` (AVX512-VNNI, AVX-VNNI, AVX2, or a
PyTorch reference). Every path computes a row on its own, whatever else shares
the call, and all rows of a call (prefill included) go through it in chunks of
at most :data:`speedec.kernels.FEW_ROWS`, so an int8 model's logits do not
depend on how rows are grouped: every engine equals the int8
``autoregressive`` engine bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import FEW_ROWS
from .q8_kernels import best_path, linear_q8

# The quantization schemes a model config may name (ModelConfig.quantization).
QUANTIZATIONS = ("q8_0",)
BLOCK = 32
# Elements of float weight quantized at once by Q8Weight.fill.
FILL_ELEMENTS = 1 << 20


class Q8Weight(nn.Module):
    """A weight matrix ``[out_features, in_features]`` in ``q8_0``: buffers ``qs``
    (int8) and ``d`` (float16 scales, one per 32 inputs). Called on rows
    ``x [..., in]`` (float32) it returns ``x @ W.T`` ``[..., out]`` (float32).

    ``path``: the kernel path its model chose (:func:`speedec.kernels.prepare_kernel`);
    None: the best this CPU runs."""

    path: str | None = None

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        # An input dimension that is not a multiple of the block is padded with zero
        # weights to the next one (its rows padded with zeros too: the same product).
        padded = -(-in_features // BLOCK) * BLOCK
        self.register_buffer("qs", torch.zeros(out_features, padded, dtype=torch.int8))
        self.register_buffer("d", torch.zeros(out_features, padded // BLOCK, dtype=torch.float16))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Q8Weight:
        module = cls(*weight.shape)
        module.fill(weight)
        return module.to(weight.device)

    def fill(self, weight: torch.Tensor) -> None:
        """Make this the ``q8_0`` of the float ``weight`` ``[out, in]``, a few rows at a time
        (blocks run along rows: the same values and scales as quantizing it whole, with
        temporaries of :data:`FILL_ELEMENTS` elements, not of the whole matrix)."""
        from .q8_kernels import quantize_q8_0

        rows = max(1, FILL_ELEMENTS // max(1, weight.shape[1]))
        with torch.no_grad():
            for i in range(0, weight.shape[0], rows):
                chunk = F.pad(weight[i:i + rows].detach().to(device="cpu", dtype=torch.float32), (0, self.padding))
                self.qs[i:i + rows], self.d[i:i + rows] = quantize_q8_0(chunk)  # zeros: no block's amax moves

    @property
    def padding(self) -> int:
        """Zero columns after the ``in_features`` real ones (0 when a multiple of 32)."""
        return self.qs.shape[1] - self.in_features

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.qs.shape[0], self.in_features))

    @property
    def nbytes(self) -> int:
        return self.qs.numel() * self.qs.element_size() + self.d.numel() * self.d.element_size()

    def dequantize(self) -> torch.Tensor:
        """``[out, in]`` float32: ``qs * d`` (exact: every product is a float32)."""
        from .q8_kernels import dequantize_q8_0

        return dequantize_q8_0(self.qs, self.d)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise ConfigError("a q8_0 model is for inference; train the float model and quantize it")
        if self.path is None:  # no model's choice yet: this CPU's best, resolved once
            self.path = best_path() or "torch"
        path = self.path
        if x.device.type != "cpu":
            path = "torch"
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.to(torch.float32)
        if self.padding:
            x = F.pad(x, (0, self.padding))
        x = x.contiguous()
        rows = x.numel() // x.shape[-1]
        if rows <= FEW_ROWS:
            out = self._product(x, path)
        else:  # prefill: chunks of FEW_ROWS rows, each row computed as it would be alone
            flat = x.reshape(rows, x.shape[-1])
            out = torch.cat([self._product(flat[i:i + FEW_ROWS], path) for i in range(0, rows, FEW_ROWS)])
            out = out.reshape(*x.shape[:-1], self.qs.shape[0])
        return out if dtype == torch.float32 else out.to(dtype)

    def _product(self, x: torch.Tensor, path: str) -> torch.Tensor:
        if path == "torch":
            return linear_q8(x, self.qs, self.d, "torch")
        # A kernel path: straight to the op (it checks its operands and that the path
        # runs here); linear_q8's Python checks cost as much as a small model's product.
        return torch.ops.speedec_q8.linear(x, self.qs, self.d, path)

    def _apply(self, fn, recurse: bool = True):
        # Model.to(dtype) casts floating buffers: the scales stay float16 and the
        # values int8 whatever dtype the rest of the model moves to (devices still move).
        super()._apply(fn, recurse)
        if self.qs.dtype != torch.int8:
            raise ConfigError("q8_0 values must stay int8")
        if self.d.dtype != torch.float16:
            self.d = self.d.to(torch.float16)
        return self

    def extra_repr(self) -> str:
        return f"q8_0, out_features={self.qs.shape[0]}, in_features={self.in_features}"


class Q8Embedding(Q8Weight):
    """The token embedding ``[vocab, d_model]`` in ``q8_0``, as llama.cpp stores a
    ``q8_0`` model's ``token_embd``: the same blocks as :class:`Q8Weight`, read by row.
    Called on token ids ``[...]`` it returns their rows ``[..., d_model]`` in float32
    (``qs * d``, exact)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qs[ids].to(torch.float32).unflatten(-1, (-1, BLOCK)) * self.d[ids].to(torch.float32)[..., None]
        rows = rows.flatten(-2)
        return rows if not self.padding else rows[..., : self.in_features].contiguous()

    def extra_repr(self) -> str:
        return f"q8_0, num_embeddings={self.qs.shape[0]}, embedding_dim={self.in_features}"


def quantized_names(model) -> list[str]:
    """The names of ``model``'s 8-bit weights (:class:`Q8Weight` modules, the embedding's
    included), in state-dict order."""
    return [name for name, module in model.named_modules() if isinstance(module, Q8Weight)]


def quantize_model(model):
    """A ``q8_0`` copy of the float decoder-only ``model`` (float32 activations, the
    layers' projections and the LM head in 8 bits; see the module's doc)."""
    from .model import LoopedLM

    if not isinstance(model, LoopedLM):
        raise ConfigError(f"q8_0 quantization applies to decoder-only looped models, not "
                          f"{type(model).__name__}")
    config = model.config
    if config.quantization is not None:
        raise ConfigError(f"the model is already quantized ({config.quantization})")
    device = model.device
    quantized = LoopedLM(config.replace(quantization="q8_0"))
    source = model.state_dict()
    if config.tie_embeddings:
        source["lm_head"] = source["embed.weight"]
    targets = set(quantized_names(quantized))
    state = {}
    with torch.no_grad():
        for name in quantized.state_dict():
            owner, _, leaf = name.rpartition(".")
            if owner in targets:
                if leaf == "qs":  # (the embedding is "embed.weight" in the float model)
                    module = Q8Weight.from_float(source[owner] if owner in source else source[f"{owner}.weight"])
                    state[f"{owner}.qs"], state[f"{owner}.d"] = module.qs, module.d
            else:
                state[name] = source[name].to(torch.float32)
    quantized.load_state_dict(state)
    quantized.requires_grad_(False)  # for inference: its float parts are not trained either
    prepare = model.kernel
    quantized = quantized.to(device).eval()
    quantized.set_kernel(prepare)
    return quantized


def check_q8_tensors(tensors: dict[str, torch.Tensor], names: list[str], path) -> str | None:
    """What is wrong with the q8_0 tensors of a checkpoint (None: nothing): int8
    values within -127..127 and finite float16 scales."""
    for owner in names:
        qs, d = tensors.get(f"{owner}.qs"), tensors.get(f"{owner}.d")
        if qs is None or d is None:
            continue  # reported as missing by the loader
        if qs.dtype != torch.int8:
            return f"{path}: tensor {owner}.qs is {str(qs.dtype).replace('torch.', '')}, q8_0 values are int8"
        if d.dtype != torch.float16:
            return f"{path}: tensor {owner}.d is {str(d.dtype).replace('torch.', '')}, q8_0 scales are float16"
        if not torch.isfinite(d).all():
            return f"{path}: tensor {owner}.d (q8_0 scales) holds non-finite values: the file is corrupt"
        if (qs == -128).any():
            return f"{path}: tensor {owner}.qs holds -128, outside q8_0's -127..127: the file is corrupt"
    return None


def set_q8_path(model, path: str | None) -> None:
    """Make every 8-bit product of ``model`` use kernel path ``path`` (see
    :func:`speedec.q8_kernels.usable_paths`)."""
    for module in model.modules():
        if isinstance(module, Q8Weight):
            module.path = path


def q8_path(model) -> str | None:
    """The kernel path of ``model``'s 8-bit products (None: not quantized)."""
    return next((m.path or "auto" for m in model.modules() if isinstance(m, Q8Weight)), None)
