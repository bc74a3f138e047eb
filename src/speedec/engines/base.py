"""What every decoding engine shares: results, request validation, prefill, output."""

from __future__ import annotations

import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from ..cache import KVCache
from ..errors import GenerationError
from ..sampling import Sampler, SamplingParams
from .protocol import DecodingModel

TokenCallback = Callable[[int], None]


@dataclass
class GenerationStats:
    """Counters of one ``generate`` call. A *step* is one pass over the K unique
    layers (one read of the shared weights), whatever the number of rows."""

    # Tokens of the prompt.
    prompt_tokens: int = 0
    # Tokens generated (verified) and returned.
    new_tokens: int = 0
    # Passes over the unique layers after prefill.
    steps: int = 0
    # Guessed tokens started in the pipeline.
    drafts_launched: int = 0
    # Guesses that the full-depth prediction confirmed.
    drafts_accepted: int = 0
    # Guesses that the full-depth prediction contradicted (each causes a flush).
    drafts_rejected: int = 0
    # Guesses thrown away unverified (behind a rejected one, or left at the end).
    drafts_discarded: int = 0
    # Pipeline flushes.
    flushes: int = 0
    # Guesses replaced before verification because a later loop predicted otherwise
    # (speed with early_correction).
    corrections: int = 0
    # Guess opportunities the adaptive policy let pass (speed with adaptive).
    guesses_skipped: int = 0
    # Alternative candidates launched next to a guess, and those that held the
    # verified token (speed with guesses > 1).
    spares_launched: int = 0
    spare_hits: int = 0
    # LM-head matmuls after prefill (each reads the vocabulary x d_model head once).
    lm_head_calls: int = 0
    # Mean rows (tokens in flight) per step.
    mean_in_flight: float = 0.0
    # Seconds spent in prefill, in decoding after it, and in total.
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wall_s: float = 0.0

    @property
    def acceptance(self) -> float | None:
        """Accepted / verified guesses; None when no guess was verified."""
        verified = self.drafts_accepted + self.drafts_rejected
        return self.drafts_accepted / verified if verified else None

    @property
    def steps_per_token(self) -> float | None:
        """Steps per generated token after the first (which prefill produces)."""
        return self.steps / (self.new_tokens - 1) if self.new_tokens > 1 else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance": self.acceptance,
                "steps_per_token": self.steps_per_token, "tokens_per_s": self.tokens_per_s}


@dataclass
class GenerationResult:
    # The new token ids (EOS included when it stopped generation).
    tokens: list[int]
    # Why generation stopped: "length" (max_new_tokens) or "eos".
    stop_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


class Output:
    """Collects verified tokens; knows when generation must stop."""

    def __init__(self, max_new_tokens: int, eos_token_id: int | None,
                 on_token: TokenCallback | None) -> None:
        self.tokens: list[int] = []
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.on_token = on_token
        self.stop_reason: str | None = None

    def emit(self, token: int) -> None:
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(token)
        if token == self.eos_token_id:
            self.stop_reason = "eos"
        elif len(self.tokens) >= self.max_new_tokens:
            self.stop_reason = "length"

    @property
    def done(self) -> bool:
        return self.stop_reason is not None


def token_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int, *, name: str = "prompt",
              whole: str = "the prompt") -> list[int]:
    """``ids`` as a list of token ids; a GenerationError names the first bad one.
    ``name`` and ``whole`` word the messages (``source``, ``the source sentence``)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    tokens = list(ids)
    if not tokens:
        raise GenerationError(f"{whole} is empty: give at least one token")
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int):
            raise GenerationError(f"{name} token ids must be integers, got {t!r}")
        if not 0 <= t < vocab_size:
            raise GenerationError(f"{name} token id {t} is outside the vocabulary (0..{vocab_size - 1})")
    return tokens


def check_max_new_tokens(max_new_tokens: object) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def check_token_id(name: str, value: object, vocab_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise GenerationError(f"{name} {value!r} is outside the vocabulary (0..{vocab_size - 1})")


def validate_request(model: DecodingModel, prompt_ids: Sequence[int], max_new_tokens: int,
                     eos_token_id: int | None) -> list[int]:
    c = model.config
    prompt = token_ids(prompt_ids, c.vocab_size)
    check_max_new_tokens(max_new_tokens)
    if len(prompt) + max_new_tokens > c.max_seq_len:
        raise GenerationError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's max_seq_len ({c.max_seq_len})")
    if eos_token_id is not None:
        check_token_id("eos_token_id", eos_token_id, c.vocab_size)
    return prompt


def prefill(model: DecodingModel, cache: KVCache, prompt: list[int]) -> torch.Tensor:
    """Run the prompt through all L loops in one batched pass; return the final
    logits ``[V]`` of its last position (they give the first new token)."""
    return model.head(prefill_hidden(model, cache, prompt)[0, -1])


def prefill_hidden(model: DecodingModel, cache: KVCache, prompt: list[int]) -> torch.Tensor:
    """:func:`prefill`'s pass: the final loop's states ``[1, T, D]`` of every prompt position."""
    layout = model.layout([list(range(len(prompt)))], [0])
    x = model.embed_rows(torch.tensor([prompt], device=model.device))  # [1, T, D]
    return model.run_loops(x, layout, cache, model.config.n_loops)


class Engine(ABC):
    """A decoding strategy. Engines know nothing about text: ids in, ids out, and
    of the model only what :class:`~speedec.engines.protocol.DecodingModel` declares."""

    name: ClassVar[str]

    def __init__(self, model: DecodingModel) -> None:
        self.model = model

    @classmethod
    def option_names(cls) -> frozenset[str] | None:
        """The options the engine takes: the keyword parameters of its constructor
        after the model (None: any, when the constructor takes ``**options``)."""
        parameters = list(inspect.signature(cls.__init__).parameters.values())[2:]  # after self, model
        if any(p.kind is p.VAR_KEYWORD for p in parameters):
            return None
        return frozenset(p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))

    @classmethod
    def create(cls, model: DecodingModel, **options) -> Engine:
        """Build the engine; an option it does not take is a GenerationError."""
        accepted = cls.option_names()
        if accepted is not None:
            for name in options:
                if name not in accepted:
                    raise GenerationError(f"engine {cls.name!r} takes no option {name!r}")
        return cls(model, **options)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *,
                 eos_token_id: int | None = None, on_token: TokenCallback | None = None,
                 sampling: SamplingParams | None = None) -> GenerationResult:
        prompt = validate_request(self.model, prompt_ids, max_new_tokens, eos_token_id)

        def start() -> tuple[KVCache, torch.Tensor, int]:
            cache = KVCache(self.model.config, len(prompt) + max_new_tokens,
                            dtype=self.model.dtype, device=self.model.device)
            return cache, prefill(self.model, cache, prompt), len(prompt)

        return self.run(start, len(prompt), max_new_tokens, eos_token_id=eos_token_id,
                        on_token=on_token, sampling=sampling)

    def run(self, start: Callable[[], tuple[KVCache, torch.Tensor, int]], prompt_tokens: int,
            max_new_tokens: int, *, eos_token_id: int | None, on_token: TokenCallback | None,
            sampling: SamplingParams | None) -> GenerationResult:
        """Time and drive one request: ``start()`` allocates the cache and prefills,
        returning (cache, logits of the first new token, its position)."""
        sampler = Sampler(sampling or SamplingParams(), device=self.model.device)
        out = Output(max_new_tokens, eos_token_id, on_token)
        stats = GenerationStats(prompt_tokens=prompt_tokens)
        begin = time.perf_counter()
        with torch.inference_mode():
            cache, logits, first_pos = start()
            out.emit(sampler.pick(logits))  # deliberate host sync: the first token
            stats.prefill_s = time.perf_counter() - begin
            if not out.done:
                self.decode(cache, first_pos, out, stats, sampler)
        stats.wall_s = time.perf_counter() - begin
        stats.decode_s = stats.wall_s - stats.prefill_s
        stats.new_tokens = len(out.tokens)
        return GenerationResult(tokens=out.tokens, stop_reason=out.stop_reason or "length",
                                stats=stats)

    @abstractmethod
    def decode(self, cache: KVCache, first_pos: int, out: Output, stats: GenerationStats,
               sampler: Sampler) -> None:
        """Generate until ``out.done``; ``out.tokens[0]`` (at ``first_pos``) is already known."""
