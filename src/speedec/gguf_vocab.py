"""The vocabulary of a GGUF export (:func:`speedec.gguf_export.export_gguf`).

A ``tokenizer.json`` (byte-level BPE) next to the model is written as GGUF's
``gpt2`` tokenizer: tokens by id, merges, token types (added special tokens
are control tokens; ids past the tokenizer up to the model's vocabulary are
unused ``[PAD{id}]`` tokens), and ``<|endoftext|>`` as eos and bos when the
tokenizer has it. A model without one gets ``tokenizer.ggml.model =
"no_vocab"``, so llama.cpp runs it on token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import TokenizerError
from .tokenizer import EOS_TOKEN


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


def add_tokenizer(writer, tokenizer: dict[str, Any] | None) -> None:
    """Write ``tokenizer`` (:func:`read_tokenizer_json`; None: no vocabulary) to a GGUF writer."""
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
