"""Export to GGUF, llama.cpp's file format: as a plain llama, or as llama.cpp's
looped ``nanbeige`` architecture.

Like the Hugging Face export (:mod:`speedec.hf`), a looped model with K unique
layers and L loops is written as a plain llama with K * L layers whose weights
repeat with period K; the tensors are those of the Hugging Face export's
table, renamed to llama.cpp's names (:class:`GGUFLlamaConversion`) and read
by :meth:`Conversion.their_views` like any other export. What GGUF adds:

* **Rotary layout.** speedec rotates half-split pairs (dims ``i`` and
  ``i + hd/2`` of a head, as transformers' Llama does); ggml's llama rope
  rotates adjacent pairs (``2i``, ``2i + 1``). The q and k projections' rows
  are reordered within every head so that row ``i`` lands at ``2i`` and row
  ``i + hd/2`` at ``2i + 1`` (:func:`interleave_rope_rows`); the attention
  scores, and so the model, are unchanged.
* **Dtypes.** ``f32``; ``f16`` (1-D tensors, the norms, stay f32 as llama.cpp
  expects); ``q8_0`` (blocks of 32 along a row, quantized with the ``gguf``
  package's own helpers; a matrix whose rows do not split into blocks of 32 is
  written f16 instead, and the norms stay f32). A model that is already q8_0
  (:mod:`speedec.quant`) is written with its own blocks, byte for byte, and
  everything else in float32 as speedec holds it (a matrix whose rows it pads
  to whole blocks: its exact float32 values).
* **Looped.** ``looped=True`` writes llama.cpp's looped architecture
  (:data:`LOOPED_ARCH`, ``nanbeige``): the K unique blocks once and the loop
  count, instead of K * L unrolled blocks. Its ``skip_loop_final_norm`` says
  where the final norm runs: ``true`` once before the head (speedec's
  ``llama``, and ``nanbeige`` with ``skip_loop_final_norm``), ``false`` also
  at the end of every loop but the last (speedec's loop norm: ``nanbeige``
  without it). A ``nanbeige`` model is exported looped by default; one with
  the loop norm cannot be written as a plain llama at all.
* **Head width.** ``attention.key_length`` / ``value_length`` and the rope
  dimension are the model's head width, which need not be ``d_model /
  n_heads`` (``attention_head_dim``: Nanbeige4.2-3B's q and o are not square).
* **Streaming.** Every tensor is converted (rows reordered, cast, quantized)
  only when it is written, one at a time: a multi-GB bfloat16 model is
  exported without a float32 copy of it.
* **Tokenizer.** A ``tokenizer.json`` (byte-level BPE) next to the model is
  written as GGUF's ``gpt2`` tokenizer (:mod:`speedec.gguf_vocab`); a model
  without one gets no vocabulary and runs on token ids. (A SentencePiece-style
  vocabulary such as Nanbeige's is written the same way, which llama.cpp does
  not tokenize as the checkpoint does: feed it token ids, or take the
  vocabulary from llama.cpp's own converter.)

Models GGUF cannot represent are refused with a :class:`ConfigError`: an
``architecture`` other than ``llama`` or ``nanbeige`` (Ouro's sandwich norms),
a ``loop_embedding`` (llama has no per-loop input), a plain (unrolled) llama
export of a model whose final norm closes every loop, and any tensor the table
has no place for. The exit readout (the drafter) is left out, as the final
output does not use it. The file is written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .architectures.llama import LlamaConversion
from .config import ModelConfig
from .conversion import Conversion, Fused
from .errors import ConfigError, ModelLoadError
from .gguf_vocab import add_tokenizer, read_tokenizer_json
from .model.looped import LoopedLM
from .storage import atomic_write

DTYPES = ("f32", "f16", "q8_0")
# llama.cpp's architecture for a looped pre-norm llama (K blocks run L times, weights
# shared, a KV cache per loop and block), as its nanbeige loader reads it: with
# "skip_loop_final_norm" true, the final norm runs once, before the head, as in
# speedec's "llama" architecture; with false, also at the end of every loop but the
# last (the next loop reads the normed state), as speedec's "nanbeige" does. Its keys
# are written by name (the gguf package has no constants for them).
LOOPED_ARCH = "nanbeige"
# Rows of a q8_0 block.
Q8_BLOCK = 32
# Values of a float matrix quantized to q8_0 at a time (bounds the quantizer's temporaries).
Q8_CHUNK = 1 << 24


# llama.cpp's name of every tensor of transformers' Llama (without ".weight").
GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    return GGUF_NAMES[hf_name.removesuffix(".weight")] + ".weight"


def _renamed(theirs: str | Fused) -> str | Fused:
    if isinstance(theirs, Fused):
        return Fused(tuple(_gguf_name(part) for part in theirs.parts), theirs.rows)
    return _gguf_name(theirs)


class GGUFLlamaConversion(Conversion):
    """llama.cpp's llama: :class:`LlamaConversion`'s table under llama.cpp's tensor names,
    every virtual layer stored as a block ``blk.{i}`` of its own."""

    name = "GGUF llama"
    globals = {ours: _renamed(theirs) for ours, theirs in LlamaConversion.globals.items()}
    layer_prefix = "blk.{i}."
    layer = {ours: _renamed(theirs) for ours, theirs in LlamaConversion.layer.items()}
    unrolled = LlamaConversion.unrolled
    not_exported = LlamaConversion.not_exported

    # Projections whose rows are reordered for ggml's rope, with their head counts.
    rope_rows: dict[str, Callable[[ModelConfig], int]] = {
        "attn_q.weight": lambda c: c.n_heads,
        "attn_k.weight": lambda c: c.n_kv_heads,
    }


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection ``[n_heads * hd, D]`` from half-split
    rotary pairs to adjacent ones: within each head, row ``i`` goes to ``2i`` and
    row ``i + hd/2`` to ``2i + 1``."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def split_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`interleave_rope_rows`."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'speedec[gguf]'") from None
    return gguf


def export_looped(model: LoopedLM, looped: bool | None = None) -> bool:
    """Whether ``model`` is written as llama.cpp's looped architecture: ``looped`` when
    given; by default (None) a ``nanbeige`` model is (its own architecture in llama.cpp)
    and a ``llama`` model is not (a plain llama with K * L blocks)."""
    if looped is None:
        return getattr(model.config, "architecture", "llama") == "nanbeige"
    return bool(looped)


def check_exportable(model: LoopedLM, looped: bool | None = None) -> None:
    """Raise a ConfigError when GGUF cannot represent ``model`` (as a plain llama when
    ``looped`` is False; None: the model's default layout, :func:`export_looped`)."""
    if not isinstance(model, LoopedLM):
        raise ConfigError(f"only looped decoders export to GGUF llama, not {type(model).__name__}")
    architecture = getattr(model.config, "architecture", "llama")
    if architecture not in ("llama", "nanbeige"):
        raise ConfigError(f"this is a {architecture} model, whose layers llama cannot represent; "
                          "it cannot be exported to GGUF")
    if getattr(model.config, "loop_embedding", False):
        raise ConfigError("this model adds a loop embedding at every loop, which llama cannot represent; "
                          "it cannot be exported to GGUF")
    if getattr(model.config, "loop_norm", False) and not export_looped(model, looped):
        raise ConfigError(f"this {architecture} model's final norm closes every loop, which a plain (unrolled) "
                          "llama cannot represent; export it looped (llama.cpp's nanbeige architecture)")


class _StateView:
    """A config and a state dict, as :meth:`Conversion.from_ours` reads a model."""

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _views(model, state: dict[str, torch.Tensor], looped: bool = False) -> dict[str, torch.Tensor]:
    """``state`` under GGUF names, as views in our own row order (any dtype); ``looped``:
    only the first K blocks (the unique layers, which the loop count repeats)."""
    c = model.config
    views = GGUFLlamaConversion.their_views(_StateView(c, state))
    if looped:
        views = {n: t for n, t in views.items() if not n.startswith("blk.") or int(n.split(".")[1]) < c.n_unique_layers}
    return views


def _ggml_rows(config: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The GGUF tensor ``name`` with q/k rows in ggml's rope layout (any dtype: only rows move)."""
    heads = GGUFLlamaConversion.rope_rows.get(".".join(name.split(".")[-2:]))
    return interleave_rope_rows(tensor, heads(config)) if heads else tensor


def _placed(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under GGUF names, q/k rows in ggml's rope layout (any dtype: only rows move)."""
    return {name: _ggml_rows(model.config, name, t) for name, t in _views(model, state).items()}


def gguf_tensors(model: LoopedLM) -> dict[str, torch.Tensor]:
    """The model's tensors under their GGUF names, float32, q/k rows in ggml's rope layout
    (a q8_0 model's 8-bit weights dequantized)."""
    check_exportable(model, looped=True)
    if getattr(model.config, "quantization", None) is not None:
        floats, values, scales = q8_gguf_tensors(model)
        return {**floats, **{name: _dequantized(model, name, values[name], scales[name]) for name in values}}
    return {name: t.to(torch.float32) for name, t in _placed(model, model.state_dict()).items()}


def _q8_views(model, looped: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                   dict[str, torch.Tensor]]:
    """A q8_0 model's tensors under their GGUF names as views in our row order: ``(floats,
    values, scales)`` (the float tensors; the 8-bit weights' int8 values and float16 scales).
    Fused projections split by rows: blocks run along rows, so whole blocks move."""
    state = model.state_dict()
    floats = {name: t for name, t in state.items() if not name.endswith((".qs", ".d"))}
    views = {}
    for leaf in ("qs", "d"):
        quantized = {_weight_name(name.removesuffix("." + leaf)): t
                     for name, t in state.items() if name.endswith("." + leaf)}
        views[leaf] = _views(model, {**floats, **quantized}, looped)
    values = {name: t for name, t in views["qs"].items() if t.dtype == torch.int8}
    scales = {name: views["d"][name] for name in values}
    return {name: t for name, t in views["qs"].items() if name not in values}, values, scales


def _weight_name(owner: str) -> str:
    """The float model's name of the 8-bit weight ``owner``: a module's own name stands for
    its weight where the float model holds a parameter (``lm_head``, ``layers.0.wqkv``);
    the embedding's is ``embed.weight``."""
    return f"{owner}.weight" if f"{owner}.weight" in GGUFLlamaConversion.globals else owner


def q8_gguf_tensors(model: LoopedLM) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                             dict[str, torch.Tensor]]:
    """A q8_0 model's tensors under their GGUF names: ``(floats, values, scales)``: the
    float tensors (float32), and the 8-bit weights' int8 values ``[N, K]`` and float16
    scales ``[N, K / 32]``. Fused projections are split and q/k rows reordered exactly
    as float weights are: blocks run along rows, so moving whole rows moves whole
    blocks and nothing is quantized again."""
    c = model.config
    floats, values, scales = _q8_views(model)
    return ({name: _ggml_rows(c, name, t).to(torch.float32) for name, t in floats.items()},
            {name: _ggml_rows(c, name, t) for name, t in values.items()},
            {name: _ggml_rows(c, name, t) for name, t in scales.items()})


def _input_width(model, name: str) -> int:
    """The real input dimension of the GGUF matrix ``name`` (8-bit rows may be padded)."""
    c = model.config
    return {"attn_output": c.n_heads * c.head_dim, "ffn_down": c.ffn_dim}.get(name.split(".")[-2], c.d_model)


def _dequantized(model, name: str, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``values * scales`` as float32 ``[N, K]``, without the padding columns."""
    full = (values.to(torch.float32).reshape(*scales.shape, Q8_BLOCK) * scales.to(torch.float32)[..., None])
    return full.reshape(values.shape)[:, : _input_width(model, name)]


def q8_0_blocks(values: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """GGUF's q8_0 bytes of int8 ``values [N, K]`` and float16 ``scales [N, K / 32]``:
    per block, the scale (2 bytes, little-endian) then its 32 values: ``[N, K / 32 * 34]`` uint8."""
    n, k = values.shape
    d = scales.contiguous().numpy().view(np.uint8).reshape(n, k // Q8_BLOCK, 2)
    qs = values.contiguous().numpy().view(np.uint8).reshape(n, k // Q8_BLOCK, Q8_BLOCK)
    return np.ascontiguousarray(np.concatenate((d, qs), axis=-1).reshape(n, -1))


def _file_type(gguf, dtype: str) -> int:
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]


def _q8_0(gguf) -> Callable[[np.ndarray], np.ndarray]:
    quants = getattr(gguf, "quants", None)
    qtype = getattr(gguf.GGMLQuantizationType, "Q8_0", None)
    if quants is None or qtype is None or not hasattr(quants, "quantize"):
        raise ConfigError("this version of the gguf package has no q8_0 quantizer; "
                          "use --dtype f32 or f16, or upgrade gguf")
    return lambda a: quants.quantize(a, qtype)


@dataclass(frozen=True)
class _Entry:
    """One tensor of the file: how it is stored (what its header says) and how to make
    its data, called once, as it is written."""

    # The array's numpy shape (q8_0: bytes, ``[rows, cols / 32 * 34]``) and dtype.
    shape: tuple[int, ...]
    dtype: type
    # GGUF's type when the array holds raw bytes (q8_0), else None.
    raw_dtype: Any
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _float32(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to(torch.float32).numpy())


def _q8_0_bytes_shape(shape: torch.Size) -> tuple[int, int]:
    return (shape[0], shape[1] // Q8_BLOCK * (Q8_BLOCK + 2))


def _quantized_rows(gguf, array: np.ndarray) -> np.ndarray:
    """gguf's q8_0 of a float32 matrix, a few rows at a time (blocks run along rows: the
    same bytes as quantizing it whole, with bounded temporaries)."""
    quantize = _q8_0(gguf)
    rows = max(1, Q8_CHUNK // max(1, array.shape[1]))
    if rows >= len(array):
        return quantize(array)
    return np.concatenate([quantize(np.ascontiguousarray(array[i:i + rows])) for i in range(0, len(array), rows)])


def _float_entry(gguf, config: ModelConfig, name: str, tensor: torch.Tensor, dtype: str) -> _Entry:
    """A float tensor of ours (any float dtype, our row order) written as ``dtype``."""
    def rows() -> torch.Tensor:
        return _ggml_rows(config, name, tensor)

    shape = tuple(tensor.shape)
    if tensor.dim() == 1 or dtype == "f32":
        return _Entry(shape, np.float32, None, lambda: _float32(rows()))
    if dtype == "q8_0" and shape[-1] % Q8_BLOCK == 0:
        return _Entry(_q8_0_bytes_shape(tensor.shape), np.uint8, gguf.GGMLQuantizationType.Q8_0,
                      lambda: _quantized_rows(gguf, _float32(rows())))
    return _Entry(shape, np.float16, None, lambda: _float32(rows()).astype(np.float16))


def _plan(gguf, model: LoopedLM, dtype: str, looped: bool) -> dict[str, _Entry]:
    """Every tensor of the file, in order, made when written (see :class:`_Entry`)."""
    c = model.config
    if getattr(c, "quantization", None) is None:
        views = _views(model, model.state_dict(), looped)
        return {name: _float_entry(gguf, c, name, t, dtype) for name, t in views.items()}
    floats, values, scales = _q8_views(model, looped)
    plan = {name: _float_entry(gguf, c, name, t, "f32") for name, t in floats.items()}
    for name in values:
        def placed(name=name) -> tuple[torch.Tensor, torch.Tensor]:
            return _ggml_rows(c, name, values[name]), _ggml_rows(c, name, scales[name])

        if values[name].shape[1] == _input_width(model, name):  # the model's own q8_0 blocks, byte for byte
            plan[name] = _Entry(_q8_0_bytes_shape(values[name].shape), np.uint8, gguf.GGMLQuantizationType.Q8_0,
                                lambda placed=placed: q8_0_blocks(*placed()))
        else:
            # Rows padded to whole blocks (an input width that is not a multiple of 32) cannot be
            # GGUF q8_0 rows: those matrices are written as their exact float32 values.
            plan[name] = _Entry((values[name].shape[0], _input_width(model, name)), np.float32, None,
                                lambda name=name, placed=placed: _float32(_dequantized(model, name, *placed())))
    return plan


def gguf_file_bytes(model: LoopedLM, dtype: str = "f32", looped: bool | None = None) -> int:
    """About the size of :func:`export_gguf`'s file (its tensors' bytes; the header and
    vocabulary add little), computed without converting anything."""
    gguf = _gguf()
    return sum(e.nbytes for e in _plan(gguf, model, dtype, export_looped(model, looped)).values())


def _add_metadata(writer, gguf, model: LoopedLM, name: str, dtype: str, looped: bool) -> None:
    c = model.config
    writer.add_name(name)
    writer.add_file_type(_file_type(gguf, dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_unique_layers if looped else c.n_virtual_layers)
    if looped:  # llama.cpp's looped pre-norm llama: the K blocks run L times
        writer.add_uint32(f"{LOOPED_ARCH}.num_loops", c.n_loops)
        # true: the final norm once, before the head; false: also closing every loop but the
        # last (with the one before the head, every loop's: speedec's loop norm).
        writer.add_bool(f"{LOOPED_ARCH}.skip_loop_final_norm", not getattr(c, "loop_norm", False))
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    # The head width, which need not be d_model / n_heads (llama.cpp's default).
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    # Where the blocks come from (llama.cpp ignores keys it does not know).
    writer.add_uint32("speedec.unique_layers", c.n_unique_layers)
    writer.add_uint32("speedec.loops", c.n_loops)


def export_gguf(model: LoopedLM, out: str | Path, *, dtype: str = "f32",
                tokenizer_json: str | Path | None = None, name: str | None = None,
                looped: bool | None = None) -> Path:
    """Write ``model`` to ``out`` as a GGUF (see the module docstring). ``looped``: as
    llama.cpp's looped architecture (:data:`LOOPED_ARCH`): the K unique blocks once and
    the loop count, instead of a plain llama with K * L unrolled blocks (L times less
    memory in llama.cpp); None: looped for a ``nanbeige`` model, unrolled for a ``llama``
    one (:func:`export_looped`). Tensors are converted one at a time as they are written."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    gguf = _gguf()
    check_exportable(model, looped)
    looped = export_looped(model, looped)
    quantized = getattr(model.config, "quantization", None)
    if quantized is not None and dtype != "q8_0":
        raise ConfigError(f"the model's weights are {quantized}; export it with --dtype q8_0 (its own blocks)")
    if quantized is None and dtype == "q8_0":
        _q8_0(gguf)
    plan = _plan(gguf, model, dtype, looped)
    c = model.config
    tokenizer = None if tokenizer_json is None else read_tokenizer_json(Path(tokenizer_json), c.vocab_size)
    out = Path(out)
    if name is None:
        kind = ("nanbeige" if c.architecture == "nanbeige" else "looped llama") if looped else "llama"
        name = f"speedec {kind} (K={c.n_unique_layers}, L={c.n_loops})"

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, LOOPED_ARCH if looped else "llama")
        _add_metadata(writer, gguf, model, name, dtype, looped)
        add_tokenizer(writer, tokenizer)
        for tensor_name, entry in plan.items():
            writer.add_tensor_info(tensor_name, entry.shape, np.dtype(entry.dtype), entry.nbytes,
                                   raw_dtype=entry.raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor_name, entry in plan.items():  # one tensor in memory at a time
            array = entry.make()
            if array.shape != entry.shape or array.dtype != np.dtype(entry.dtype):
                raise AssertionError(f"{tensor_name}: made {array.dtype} {array.shape}, "
                                     f"planned {np.dtype(entry.dtype)} {entry.shape}")
            writer.write_tensor_data(array)
            del array
        writer.close()

    try:
        atomic_write(out, write)
    except OSError as exc:
        raise ModelLoadError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out
