"""Tokenizers: a trained byte-level BPE (``tokenizer.json``) or plain bytes.

Engines never see text; the CLI and evaluation use these to go between text
and ids. A model directory with a ``tokenizer.json`` uses it; one without
falls back to one token per UTF-8 byte (needs ``vocab_size >= 256``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from .errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """One token per UTF-8 byte; no special tokens."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is not a byte (the byte tokenizer has 256 ids)")
        return bytes(ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE trained with the ``tokenizers`` library."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception on bad files
            raise TokenizerError(f"cannot load tokenizer {path}: {exc}") from None
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_token_id = self._tok.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of many texts at once (the library spreads them over threads)."""
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the tokenizer's vocabulary "
                                 f"(0..{self.vocab_size - 1})")
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(model_dir: str | Path | None, vocab_size: int) -> Tokenizer:
    """The model's ``tokenizer.json`` if present, else bytes (checked against ``vocab_size``)."""
    if model_dir is not None and (Path(model_dir) / TOKENIZER_FILE).is_file():
        tok = BPETokenizer(Path(model_dir) / TOKENIZER_FILE)
        if tok.vocab_size > vocab_size:
            raise TokenizerError(
                f"{Path(model_dir) / TOKENIZER_FILE} has {tok.vocab_size} tokens but the model's "
                f"vocabulary has only {vocab_size}")
        return tok
    if vocab_size < 256:
        raise TokenizerError(
            f"this model has no {TOKENIZER_FILE} and its vocabulary ({vocab_size}) is too small for "
            "byte-level text; pass token ids instead")
    return ByteTokenizer()


def train_bpe(files: Iterable[str | Path], out_path: str | Path, *, vocab_size: int = 8192,
              min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE on text files and save it (atomically) as ``out_path``."""
    files = [str(f) for f in files]
    for f in files:
        if not Path(f).is_file():
            raise TokenizerError(f"training file {f} does not exist")
    return _train(lambda tok, trainer: tok.train(files, trainer), out_path, vocab_size, min_frequency)


def train_bpe_from_texts(texts: Iterable[str], out_path: str | Path, *, vocab_size: int = 8192,
                         min_frequency: int = 2) -> BPETokenizer:
    """Like :func:`train_bpe`, on an iterable of strings (e.g. both sides of a parallel corpus)."""
    return _train(lambda tok, trainer: tok.train_from_iterator(texts, trainer), out_path, vocab_size,
                  min_frequency)


def _train(run_trainer, out_path: str | Path, vocab_size: int, min_frequency: int) -> BPETokenizer:
    """Set up the byte-level BPE and its trainer, let ``run_trainer(tok, trainer)`` feed it, save it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from .storage import atomic_write

    if vocab_size < 257:
        raise TokenizerError(f"vocab_size must be at least 257 (256 bytes + end-of-text), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    # No prefix space, so decode(encode(text)) == text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    run_trainer(tok, trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda tmp: tok.save(str(tmp)))
    return BPETokenizer(out_path)
