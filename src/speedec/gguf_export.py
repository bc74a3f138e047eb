"""Export to GGUF, llama.cpp's file format, as a plain llama model.

Like the Hugging Face export (:mod:`speedec.hf`), a looped model with K unique
layers and L loops is written as a plain llama with K * L layers whose weights
repeat with period K; the tensors are those of the Hugging Face export's
table, renamed to llama.cpp's names (:class:`GGUFLlamaConversion`) and read
by :meth:`Conversion.from_ours` like any other export. What GGUF adds:

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
* **Looped.** ``looped=True`` writes llama.cpp's looped llama
  (:data:`LOOPED_ARCH`): the K unique blocks once, the loop count, and the
  final norm once before the head, instead of K * L unrolled blocks.
* **Tokenizer.** A ``tokenizer.json`` (byte-level BPE) next to the model is
  written as GGUF's ``gpt2`` tokenizer: tokens by id, merges, token types
  (added special tokens are control tokens; ids past the tokenizer up to the
  model's vocabulary are unused ``[PAD{id}]`` tokens), and ``<|endoftext|>``
  as eos and bos when the tokenizer has it. A model without one (one token
  per byte) gets no vocabulary: ``tokenizer.ggml.model = "no_vocab"`` with
  ``llama.vocab_size`` set, so llama.cpp runs it on token ids.

Models llama cannot represent are refused with a :class:`ConfigError`: an
``architecture`` other than ``llama`` (Ouro's sandwich norms), a
``loop_embedding`` (llama has no per-loop input), and any tensor the table has
no place for. The exit readout (the drafter) is left out, as the final output
does not use it. The file is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .conversion import Conversion, Fused
from .errors import ConfigError, ModelLoadError, TokenizerError
from .hf import LlamaConversion
from .model import LoopedLM
from .storage import atomic_write
from .tokenizer import EOS_TOKEN

DTYPES = ("f32", "f16", "q8_0")
# llama.cpp's architecture for a looped pre-norm llama (K blocks run L times, weights
# shared, a KV cache per loop and block), as its nanbeige loader reads it: with
# "skip_loop_final_norm" true, the final norm runs once, before the head, as in
# speedec's "llama" architecture. Its keys are written by name (the gguf package has
# no constants for them).
LOOPED_ARCH = "nanbeige"
# Rows of a q8_0 block.
Q8_BLOCK = 32


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


def check_exportable(model: LoopedLM) -> None:
    """Raise a ConfigError when llama cannot represent ``model``."""
    if not isinstance(model, LoopedLM):
        raise ConfigError(f"only looped decoders export to GGUF llama, not {type(model).__name__}")
    architecture = getattr(model.config, "architecture", "llama")
    if architecture != "llama":
        raise ConfigError(f"this is a {architecture} model, whose layers llama cannot represent; "
                          "it cannot be exported to GGUF")
    if getattr(model.config, "loop_embedding", False):
        raise ConfigError("this model adds a loop embedding at every loop, which llama cannot represent; "
                          "it cannot be exported to GGUF")


class _StateView:
    """A config and a state dict, as :meth:`Conversion.from_ours` reads a model."""

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _placed(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under GGUF names, q/k rows in ggml's rope layout (any dtype: only rows move)."""
    c = model.config
    tensors = GGUFLlamaConversion.from_ours(_StateView(c, state))
    for name, tensor in tensors.items():
        heads = GGUFLlamaConversion.rope_rows.get(".".join(name.split(".")[-2:]))
        tensors[name] = interleave_rope_rows(tensor, heads(c)) if heads else tensor
    return tensors


def gguf_tensors(model: LoopedLM) -> dict[str, torch.Tensor]:
    """The model's tensors under their GGUF names, float32, q/k rows in ggml's rope layout
    (a q8_0 model's 8-bit weights dequantized)."""
    check_exportable(model)
    if getattr(model.config, "quantization", None) is not None:
        floats, values, scales = q8_gguf_tensors(model)
        return {**floats, **{name: _dequantized(model, name, values[name], scales[name]) for name in values}}
    return {name: t.to(torch.float32) for name, t in _placed(model, model.state_dict()).items()}


def q8_gguf_tensors(model: LoopedLM) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                             dict[str, torch.Tensor]]:
    """A q8_0 model's tensors under their GGUF names: ``(floats, values, scales)``: the
    float tensors (float32), and the 8-bit weights' int8 values ``[N, K]`` and float16
    scales ``[N, K / 32]``. Fused projections are split and q/k rows reordered exactly
    as float weights are: blocks run along rows, so moving whole rows moves whole
    blocks and nothing is quantized again."""
    state = model.state_dict()
    floats = {name: t for name, t in state.items() if not name.endswith((".qs", ".d"))}
    placed = {}
    for leaf in ("qs", "d"):
        quantized = {name.removesuffix("." + leaf): t for name, t in state.items() if name.endswith("." + leaf)}
        placed[leaf] = _placed(model, {**floats, **quantized})
    values = {name: t for name, t in placed["qs"].items() if t.dtype == torch.int8}
    scales = {name: placed["d"][name] for name in values}
    return {name: t.to(torch.float32) for name, t in placed["qs"].items() if name not in values}, values, scales


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


def _add_tensor(writer, gguf, name: str, tensor: torch.Tensor, dtype: str) -> None:
    array = tensor.numpy()
    if array.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    elif dtype == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, _q8_0(gguf)(np.ascontiguousarray(array)), raw_dtype=qtype)
    else:
        writer.add_tensor(name, array.astype(np.float16))


def read_tokenizer_json(path: Path, vocab_size: int) -> dict[str, Any]:
    """GGUF ``gpt2`` tokenizer fields from a byte-level BPE ``tokenizer.json``:
    ``tokens``, ``types`` (:class:`gguf.TokenType` values), ``merges`` (``"a b"``),
    ``eos`` (an id or None) and ``pre``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab: dict[str, int] = model["vocab"]
        merges = model.get("merges", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from None
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path} is a {model.get('type')} tokenizer; GGUF export handles byte-level BPE")
    # Type values of gguf.TokenType, kept here so that reading needs no gguf.
    normal, control, user_defined, unused = 1, 3, 4, 5
    by_id: dict[int, tuple[str, int]] = {i: (tok, normal) for tok, i in vocab.items()}
    for added in data.get("added_tokens") or []:
        by_id[added["id"]] = (added["content"], control if added.get("special") else user_defined)
    size = max(by_id) + 1 if by_id else 0
    if size > vocab_size:
        raise TokenizerError(f"{path} has {size} tokens but the model's vocabulary has only {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        token, kind = by_id.get(i, (f"[PAD{i}]", unused))
        tokens.append(token)
        types.append(kind)
    pre = data.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    eos = next((i for i, (tok, _) in by_id.items() if tok == EOS_TOKEN), None)
    return {"tokens": tokens, "types": types, "eos": eos, "pre": "gpt2" if byte_level else "default",
            "merges": [m if isinstance(m, str) else " ".join(m) for m in merges]}


def _add_metadata(writer, gguf, model: LoopedLM, name: str, dtype: str, looped: bool) -> None:
    c = model.config
    writer.add_name(name)
    writer.add_file_type(_file_type(gguf, dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_unique_layers if looped else c.n_virtual_layers)
    if looped:  # llama.cpp's looped pre-norm llama: the K blocks run L times, one final norm
        writer.add_uint32(f"{LOOPED_ARCH}.num_loops", c.n_loops)
        writer.add_bool(f"{LOOPED_ARCH}.skip_loop_final_norm", True)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    # Where the blocks come from (llama.cpp ignores keys it does not know).
    writer.add_uint32("speedec.unique_layers", c.n_unique_layers)
    writer.add_uint32("speedec.loops", c.n_loops)


def _add_tokenizer(writer, tokenizer: dict[str, Any] | None) -> None:
    if tokenizer is None:
        writer.add_tokenizer_model("no_vocab")
        return
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    if tokenizer["merges"]:
        writer.add_token_merges(tokenizer["merges"])
    if tokenizer["eos"] is not None:
        writer.add_bos_token_id(tokenizer["eos"])
        writer.add_eos_token_id(tokenizer["eos"])
    # speedec encodes prompts without special tokens.
    writer.add_add_bos_token(False)


def export_gguf(model: LoopedLM, out: str | Path, *, dtype: str = "f32",
                tokenizer_json: str | Path | None = None, name: str | None = None,
                looped: bool = False) -> Path:
    """Write ``model`` to ``out`` as a llama GGUF (see the module docstring). ``looped``:
    as llama.cpp's looped llama (:data:`LOOPED_ARCH`): the K unique blocks once and the
    loop count, instead of K * L unrolled blocks (L times less memory in llama.cpp)."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    gguf = _gguf()
    quantized = getattr(model.config, "quantization", None)
    blocks: dict[str, np.ndarray] = {}
    if quantized is not None:
        if dtype != "q8_0":
            raise ConfigError(f"the model's weights are {quantized}; export it with --dtype q8_0 (its own blocks)")
        check_exportable(model)
        floats, values, scales = q8_gguf_tensors(model)
        # Rows padded to whole blocks (an input width that is not a multiple of 32) cannot be
        # GGUF q8_0 rows: those matrices are written as their exact float32 values.
        whole = {name for name in values if values[name].shape[1] == _input_width(model, name)}
        blocks = {name: q8_0_blocks(values[name], scales[name]) for name in whole}
        padded = {name: _dequantized(model, name, values[name], scales[name]) for name in values if name not in whole}
        tensors = {**floats, **padded, **dict.fromkeys(blocks)}
    else:
        if dtype == "q8_0":
            _q8_0(gguf)
        tensors = gguf_tensors(model)
    c = model.config
    if looped:  # the first K blocks are the unique layers; the loop count repeats them
        tensors = {n: t for n, t in tensors.items()
                   if not n.startswith("blk.") or int(n.split(".")[1]) < c.n_unique_layers}
    tokenizer = None if tokenizer_json is None else read_tokenizer_json(Path(tokenizer_json), c.vocab_size)
    out = Path(out)
    if name is None:
        name = f"speedec looped llama (K={c.n_unique_layers}, L={c.n_loops})"

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, LOOPED_ARCH if looped else "llama")
        _add_metadata(writer, gguf, model, name, dtype, looped)
        _add_tokenizer(writer, tokenizer)
        for tensor_name, tensor in tensors.items():
            if tensor_name in blocks:  # the model's own q8_0 blocks, byte for byte
                writer.add_tensor(tensor_name, blocks[tensor_name], raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            elif blocks:  # the rest of a q8_0 model is float32 in speedec: so in the file
                _add_tensor(writer, gguf, tensor_name, tensor, "f32")
            else:
                _add_tensor(writer, gguf, tensor_name, tensor, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    try:
        atomic_write(out, write)
    except OSError as exc:
        raise ModelLoadError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out
