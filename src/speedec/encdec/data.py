"""Parallel data for translation: sentence pairs -> cached token arrays -> padded batches.

A corpus is what ``speedec data prepare-parallel`` writes: a directory with
``train.jsonl``, ``validation.jsonl`` and ``test.jsonl``, one
``{"src": ..., "tgt": ...}`` object a line (source language first, English
as target). Source and target share one byte-level BPE trained on both sides
of the training split (:func:`train_joint_tokenizer`).

Language pairs: the target is always English, so no target-language tag is
needed. One corpus trains one model; build it with ``--pairs de-en`` for the
German-English setting of the SPEED paper (the shipped translation configs
do). A corpus that mixes de-en and es-en trains a many-to-English model whose
source language is implicit in the text.

Token ids are computed once per split and tokenizer and cached next to the
split as ``<split>.jsonl.tokens-<key>.npz`` (the key hashes both files).
A split in memory is two flat id arrays with offsets (:class:`TokenizedPairs`),
so a batch is a few slices, not a Python list per sentence.

Training batches hold ``batch_size`` sentence pairs. To keep padding low,
each epoch's random order is cut into chunks of ``BUCKET_BATCHES`` batches,
each chunk sorted by length and cut into batches, and the batches shuffled
(:class:`BucketSampler`). The batch of a step is a pure function of
``(seed, step)``, so a resumed run needs no data-loader state.

Decoder input and targets of a pair with target ids ``t``: the decoder reads
``[bos] + t`` and must predict ``t + [eos]``; padding positions hold the
pad id in the inputs and ``IGNORE_INDEX`` in the targets (no loss there), and
the source key mask is False at source padding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.parallel import Pair
from ..errors import DataError, TrainingError
from ..storage import atomic_write
from ..tokenizer import BPETokenizer, train_bpe_from_texts
from ..training.data import cache_path
from ..training.loss import IGNORE_INDEX

# Batches per length bucket: larger means less padding but less randomness in a batch.
BUCKET_BATCHES = 32


# ------------------------------------------------------------------- text
def split_path(data: str | Path, split: str) -> Path:
    """The JSONL file of ``split`` in the corpus directory ``data``, or ``data`` itself if it is a file."""
    data = Path(data)
    if data.is_file():
        return data
    if not data.is_dir():
        raise DataError(f"parallel data {data} does not exist")
    path = data / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist (a parallel corpus directory holds train.jsonl, "
                        "validation.jsonl and test.jsonl: see speedec data prepare-parallel)")
    return path


def read_pairs(path: str | Path) -> list[Pair]:
    """The sentence pairs of a JSONL split; blank lines are skipped, anything else malformed is an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if (not isinstance(record, dict) or not isinstance(record.get("src"), str)
                or not isinstance(record.get("tgt"), str)):
            raise DataError(f"{path}:{lineno}: expected an object with string fields \"src\" and \"tgt\"")
        refs = record.get("refs", [])
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{path}:{lineno}: \"refs\" must be a list of strings (the English references)")
        pairs.append(Pair(record["src"], record["tgt"], tuple(refs)))
    return pairs


def train_joint_tokenizer(data: str | Path, out_path: str | Path, *, vocab_size: int = 8192,
                          min_frequency: int = 2, split: str = "train") -> BPETokenizer:
    """One byte-level BPE for both languages, trained on the source and target
    sentences of ``split`` of the corpus ``data`` (a directory or a JSONL file)."""
    pairs = read_pairs(split_path(data, split))
    if not pairs:
        raise DataError(f"{split_path(data, split)} holds no sentence pairs")

    def texts() -> Iterator[str]:
        for pair in pairs:
            yield pair.src
            yield pair.tgt

    return train_bpe_from_texts(texts(), out_path, vocab_size=vocab_size, min_frequency=min_frequency)


# ----------------------------------------------------------------- tokens
@dataclass(frozen=True)
class TokenizedPairs:
    """Token ids of N sentence pairs: each side concatenated, with ``[N + 1]`` offsets."""

    src: np.ndarray
    src_offsets: np.ndarray
    tgt: np.ndarray
    tgt_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    @property
    def src_lengths(self) -> np.ndarray:
        return np.diff(self.src_offsets)

    @property
    def tgt_lengths(self) -> np.ndarray:
        return np.diff(self.tgt_offsets)

    def source(self, i: int) -> np.ndarray:
        return self.src[self.src_offsets[i]:self.src_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self.tgt[self.tgt_offsets[i]:self.tgt_offsets[i + 1]]

    @classmethod
    def from_lists(cls, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]],
                   dtype: np.dtype) -> TokenizedPairs:
        """Pairs from per-sentence id lists, stored as ``dtype``."""

        def flat(lists):
            offsets = np.zeros(len(lists) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(ids) for ids in lists])
            ids = np.fromiter((t for ids in lists for t in ids), dtype=dtype, count=int(offsets[-1]))
            return ids, offsets

        (s, so), (t, to) = flat(src), flat(tgt)
        return cls(src=s, src_offsets=so, tgt=t, tgt_offsets=to)

    def subset(self, indices: np.ndarray) -> TokenizedPairs:
        """The pairs at ``indices``, in that order."""
        return TokenizedPairs.from_lists([self.source(i) for i in indices], [self.target(i) for i in indices],
                                         self.src.dtype)


def tokenize_pairs(pairs: Sequence[Pair], tokenizer: BPETokenizer) -> TokenizedPairs:
    """Both sides of ``pairs`` encoded (in batches, across the library's threads)."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    return TokenizedPairs.from_lists(tokenizer.encode_batch([p.src for p in pairs]),
                                     tokenizer.encode_batch([p.tgt for p in pairs]), dtype)


def load_pairs(path: str | Path, tokenizer: BPETokenizer, *, cache: bool = True) -> TokenizedPairs:
    """The tokenised pairs of a JSONL split, cached as ``.npz`` next to it (written
    atomically; an unwritable directory just means no cache)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    cached = cache_path(path, tokenizer.path, ".npz") if cache else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached) as arrays:
                return TokenizedPairs(**{name: arrays[name] for name in
                                         ("src", "src_offsets", "tgt", "tgt_offsets")})
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it below
    tokens = tokenize_pairs(read_pairs(path), tokenizer)
    if cached is not None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
                np.savez(fh, src=tokens.src, src_offsets=tokens.src_offsets, tgt=tokens.tgt,
                         tgt_offsets=tokens.tgt_offsets)
        try:
            atomic_write(cached, write)
        except OSError:
            pass
    return tokens


def fit_lengths(pairs: TokenizedPairs, max_source_len: int, max_target_len: int) -> tuple[TokenizedPairs, int]:
    """The pairs a model with these limits can train on (source of 1..max_source_len tokens,
    target + end token within max_target_len), and how many were dropped."""
    src, tgt = pairs.src_lengths, pairs.tgt_lengths
    keep = (src >= 1) & (src <= max_source_len) & (tgt + 1 <= max_target_len)
    if keep.all():
        return pairs, 0
    return pairs.subset(np.flatnonzero(keep)), int((~keep).sum())


def tokens_per_pair(pairs: TokenizedPairs) -> float:
    """Mean tokens a pair puts through the model: source + target + end token."""
    return float((pairs.src_lengths + pairs.tgt_lengths + 1).mean())


# ---------------------------------------------------------------- batches
@dataclass(frozen=True)
class PairBatch:
    """B padded sentence pairs, as the encoder-decoder's training forward takes them."""

    # [B, S] source ids (pad id after the end) and [B, S] key mask (True at real tokens).
    src: torch.Tensor
    src_mask: torch.Tensor
    # [B, T] decoder input: start token, then the target (pad id after the end).
    tgt_in: torch.Tensor
    # [B, T] what each decoder position must predict: target then end token, IGNORE_INDEX after.
    targets: torch.Tensor
    # Real (non-padding) tokens in the batch: source + target + end tokens.
    tokens: int

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(src=self.src.to(device), src_mask=self.src_mask.to(device),
                         tgt_in=self.tgt_in.to(device), targets=self.targets.to(device), tokens=self.tokens)


def make_batch(pairs: TokenizedPairs, indices: Sequence[int], *, bos: int, eos: int, pad: int) -> PairBatch:
    """The pairs at ``indices`` padded to the longest source and the longest target of the batch."""
    src_len = pairs.src_lengths[indices]
    tgt_len = pairs.tgt_lengths[indices]
    B, S, T = len(indices), int(src_len.max()), int(tgt_len.max()) + 1
    src = np.full((B, S), pad, dtype=np.int64)
    tgt_in = np.full((B, T), pad, dtype=np.int64)
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    tgt_in[:, 0] = bos
    for row, i in enumerate(indices):
        s, t = pairs.source(i), pairs.target(i)
        src[row, :len(s)] = s
        tgt_in[row, 1:len(t) + 1] = t
        targets[row, :len(t)] = t
        targets[row, len(t)] = eos
    src_mask = np.arange(S)[None, :] < src_len[:, None]
    return PairBatch(src=torch.from_numpy(src), src_mask=torch.from_numpy(src_mask),
                     tgt_in=torch.from_numpy(tgt_in), targets=torch.from_numpy(targets),
                     tokens=int(src_len.sum() + tgt_len.sum() + B))


def length_order(pairs: TokenizedPairs, indices: np.ndarray) -> np.ndarray:
    """``indices`` sorted by target length, then source length (stable)."""
    return indices[np.lexsort((pairs.src_lengths[indices], pairs.tgt_lengths[indices]))]


class BucketSampler:
    """Which pairs form the batch of each step: length-bucketed, a pure function of (seed, step).

    An epoch is ``len(pairs) // batch_size`` batches; the pairs left over by
    an epoch's random order wait for a later epoch. The plan of the current
    epoch is computed once and kept.
    """

    def __init__(self, pairs: TokenizedPairs, batch_size: int, seed: int,
                 bucket_batches: int = BUCKET_BATCHES) -> None:
        if len(pairs) < batch_size:
            raise TrainingError(f"the training split has {len(pairs)} usable pairs, fewer than one "
                                f"batch of {batch_size}")
        self.pairs = pairs
        self.batch_size = batch_size
        self.seed = seed
        self.bucket_batches = bucket_batches
        self.batches_per_epoch = len(pairs) // batch_size
        self._epoch: int | None = None
        self._plan: np.ndarray | None = None

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """``[batches_per_epoch, batch_size]`` pair indices of every batch of ``epoch``, in order."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        n_batches, size = self.batches_per_epoch, self.batch_size
        order = rng.permutation(len(self.pairs))[:n_batches * size]
        chunk = self.bucket_batches * size  # a multiple of the batch size: no batch spans two chunks
        order = np.concatenate([length_order(self.pairs, order[start:start + chunk])
                                for start in range(0, len(order), chunk)])
        return order.reshape(n_batches, size)[rng.permutation(n_batches)]

    def indices(self, step: int) -> np.ndarray:
        """The pair indices of the batch of optimizer step ``step`` (0-based)."""
        epoch, index = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._plan, self._epoch = self.epoch_plan(epoch), epoch
        return self._plan[index]


def fitting_split(data: str | Path, split: str, tokenizer: BPETokenizer, config) -> TokenizedPairs:
    """The tokenised pairs of ``split`` of the corpus ``data`` that fit a translator of
    ``config``'s lengths; none is a TrainingError."""
    path = split_path(data, split)
    pairs, _ = fit_lengths(load_pairs(path, tokenizer), config.max_source_len, config.max_target_len)
    if len(pairs) == 0:
        raise TrainingError(f"{path} has no sentence pair that fits the model's lengths "
                            f"(source <= {config.max_source_len}, target < {config.max_target_len} tokens)")
    return pairs


def fixed_batches(pairs: TokenizedPairs, count: int, batch_size: int, *, bos: int, eos: int,
                  pad: int) -> list[PairBatch]:
    """Evaluation batches of the first ``count`` pairs (file order, so every evaluation of
    every run scores the same pairs), sorted by length to keep padding low."""
    order = length_order(pairs, np.arange(min(count, len(pairs))))
    return [make_batch(pairs, order[start:start + batch_size], bos=bos, eos=eos, pad=pad)
            for start in range(0, len(order), batch_size)]


def steps_for_tokens(max_tokens: int, batch_size: int, pairs: TokenizedPairs) -> int:
    """Optimizer steps of a token budget: batches of ``batch_size`` average pairs, rounded up."""
    return math.ceil(max_tokens / (batch_size * tokens_per_pair(pairs)))
