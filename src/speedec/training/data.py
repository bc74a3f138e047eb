"""Training data: a text file as one flat token array, and windows drawn from it.

The whole split is tokenised once into a flat array and cached next to the
text as ``.npy``; the cache name carries hashes of the tokenizer and of the
text, so a different tokenizer or an edited file never reads stale tokens.

Training windows are drawn at random positions, but the randomness is a
pure function of ``(seed, step)``: the "data position" of a run is its step
counter, so resuming needs no data-loader state and every data-parallel
layout sees the same global batch (rank r takes its slice of it).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import TokenizerError, TrainingError
from ..storage import atomic_write
from ..tokenizer import BPETokenizer, Tokenizer

# Text is encoded in chunks of about this many characters (batched across
# threads, and without one huge encoding object in memory).
CHUNK_CHARS = 1 << 20

# A chunk may end only before " word" that follows a non-space: the byte-level
# pre-tokenizer always starts a new piece there (" ?letters"), so chunked and
# whole-text encodings are identical.
_CHUNK_BOUNDARY = re.compile(r"(?<=\S) (?=[A-Za-z])")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_chunks(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut into pieces of about ``chunk_chars`` at token-safe boundaries."""
    chunks, start = [], 0
    while len(text) - start > chunk_chars:
        match = _CHUNK_BOUNDARY.search(text, start + chunk_chars)
        if match is None:
            break
        chunks.append(text[start:match.start()])
        start = match.start()
    chunks.append(text[start:])
    return chunks


def encode_text(text: str, tokenizer: Tokenizer, chunk_chars: int = CHUNK_CHARS) -> np.ndarray:
    """Token ids of ``text`` as a flat int array (uint16 when the vocabulary allows)."""
    chunks = split_chunks(text, chunk_chars)
    if isinstance(tokenizer, BPETokenizer):
        from tokenizers import Tokenizer as HFTokenizer

        # The library's batch encoder spreads chunks over threads.
        hf = HFTokenizer.from_file(str(tokenizer.path))
        pieces = [enc.ids for enc in hf.encode_batch(chunks, add_special_tokens=False)]
    else:
        pieces = [tokenizer.encode(chunk) for chunk in chunks]
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    return np.concatenate([np.asarray(piece, dtype=dtype) for piece in pieces])


def cache_path(text_file: Path, tokenizer_file: Path, suffix: str = ".npy") -> Path:
    """Where the tokens of ``text_file`` under ``tokenizer_file`` are cached (a name that
    changes with either file's content)."""
    key = f"{file_digest(tokenizer_file)[:12]}-{file_digest(text_file)[:12]}"
    return text_file.with_name(f"{text_file.name}.tokens-{key}{suffix}")


def load_tokens(text_file: str | Path, tokenizer: Tokenizer, *, cache: bool = True) -> np.ndarray:
    """The tokens of a text file; cached as ``.npy`` next to it for a BPE tokenizer.

    The cache is written atomically, so concurrent or interrupted writers
    never leave a torn file; an unwritable directory just means no cache.
    """
    text_file = Path(text_file)
    if not text_file.is_file():
        raise TrainingError(f"text file {text_file} does not exist")
    use_cache = cache and isinstance(tokenizer, BPETokenizer)
    if use_cache:
        path = cache_path(text_file, tokenizer.path)
        if path.is_file():
            try:
                return np.load(path)
            except (OSError, ValueError):
                pass  # unreadable cache: rebuild it below
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrainingError(f"{text_file} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        tokens = encode_text(text, tokenizer)
    except TokenizerError as exc:
        raise TrainingError(f"cannot tokenise {text_file}: {exc}") from None
    if use_cache:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a name
                np.save(fh, tokens)
        try:
            atomic_write(path, write)
        except OSError:
            pass
    return tokens


def check_tokens(tokens: np.ndarray, seq_len: int, name: str) -> None:
    if len(tokens) < seq_len + 1:
        raise TrainingError(f"{name} has {len(tokens)} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}")


def window_starts(n_tokens: int, seq_len: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """``[batch_size]`` start offsets of the global batch of ``step``: a function of (seed, step)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step])))
    return rng.integers(0, n_tokens - seq_len, size=batch_size)


def gather_windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """``[len(starts), seq_len + 1]`` long tensor of the windows at ``starts``."""
    index = starts[:, None] + np.arange(seq_len + 1)[None, :]  # [N, seq_len + 1]
    return torch.from_numpy(tokens[index].astype(np.int64))


def training_batch(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, step: int,
                   rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's share ``[batch_size / world_size, seq_len + 1]`` of the global batch of ``step``."""
    if batch_size % world_size:
        raise TrainingError(f"batch_size ({batch_size}) must be divisible by the number of "
                            f"processes ({world_size})")
    share = batch_size // world_size
    starts = window_starts(len(tokens), seq_len, batch_size, seed=seed, step=step)
    return gather_windows(tokens, starts[rank * share:(rank + 1) * share], seq_len)


def evaluation_windows(tokens: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """``[n, seq_len + 1]``: up to ``count`` windows spread evenly over the split.

    Fixed positions (no randomness) so every evaluation of every run scores
    the same text; never more windows than fit without overlap.
    """
    count = max(1, min(count, len(tokens) // (seq_len + 1)))
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
    return gather_windows(tokens, starts, seq_len)
