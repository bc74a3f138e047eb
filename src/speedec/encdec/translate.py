"""Text in, text out: translate a sentence with a trained :class:`EncDecLM` and its tokenizer.

``model, tokenizer = load_translator(model_dir)`` (no directory: the bundled
Spanish -> English translator) then ``translate(model, tokenizer, "Hola.", engine="speed")``. The text is
normalised as the corpus was (:func:`speedec.data.clean.normalize_text`, one
line), encoded with the model's shared BPE, and decoded by
:func:`~speedec.encdec.translate_ids` until the tokenizer's
``<|endoftext|>`` or the token limit. Greedy, every engine gives the same
tokens; sampling, every engine draws from the same distribution. They differ
in speed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.clean import normalize_text
from ..engines.base import GenerationStats, TokenCallback
from ..errors import GenerationError, ModelLoadError, TokenizerError
from ..tokenizer import TOKENIZER_FILE, BPETokenizer
from .config import EncDecConfig
from .engines import translate_ids
from .model import EncDecLM


@dataclass
class Translation:
    """One translated sentence."""

    # The translation, without the end token.
    text: str
    # Target ids as the engine returned them (the end token last when it stopped there).
    tokens: list[int]
    # The encoded source sentence.
    source_ids: list[int]
    # "eos" (the end token) or "length" (max_new_tokens).
    stop_reason: str
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "stats"}, "stats": self.stats.to_dict()}


def load_translator(model_dir: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[EncDecLM, BPETokenizer]:
    """A saved translator and its ``tokenizer.json`` (both required). ``model_dir`` None:
    the translator bundled with the package (Spanish -> English); a directory or a
    Hugging Face Hub id as :func:`speedec.bundled.resolve_model_dir` takes them."""
    from ..bundled import resolve_translator_dir

    model_dir = resolve_translator_dir(model_dir)
    model = EncDecLM.from_pretrained(model_dir, dtype=dtype, device=device)
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: a translator needs the tokenizer it was trained with")
    tokenizer = BPETokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TokenizerError(f"{path} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                             f"only {model.config.vocab_size}")
    return model, tokenizer


def encode_source(tokenizer: BPETokenizer, text: str) -> list[int]:
    """The ids of a source sentence, normalised like the corpus (one line, single spaces)."""
    if not isinstance(text, str):
        raise GenerationError(f"the text to translate must be a string, got {type(text).__name__}")
    ids = tokenizer.encode(" ".join(normalize_text(text).split()))
    if not ids:
        raise GenerationError("the text to translate is empty")
    return ids


def default_max_new_tokens(config: EncDecConfig, source_tokens: int) -> int:
    """Token limit when none is given: 2 x the source tokens + 10, within ``max_target_len``."""
    return max(1, min(config.max_target_len - 1, 2 * source_tokens + 10))


def translate_source(model: EncDecLM, tokenizer: BPETokenizer, source_ids: list[int], *,
                     engine: str = "speed", max_new_tokens: int | None = None,
                     on_token: TokenCallback | None = None, **options) -> Translation:
    """Translate already encoded source ids (see :func:`translate`)."""
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(model.config, len(source_ids))
    result = translate_ids(model, source_ids, max_new_tokens, engine=engine,
                           eos_token_id=tokenizer.eos_token_id, on_token=on_token, **options)
    tokens = result.tokens
    body = tokens[:-1] if result.stop_reason == "eos" else tokens
    return Translation(text=tokenizer.decode(body), tokens=tokens, source_ids=list(source_ids),
                       stop_reason=result.stop_reason, stats=result.stats)


def translate(model: EncDecLM, tokenizer: BPETokenizer, text: str, *, engine: str = "speed",
              max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int | None = None,
              top_p: float | None = None, seed: int | None = None, on_token: TokenCallback | None = None,
              **engine_options) -> Translation:
    """Translate one sentence of ``text``.

    ``engine``: ``autoregressive``, ``speed`` or ``self-speculative`` (with
    ``draft_tokens``); all give the same greedy output. ``max_new_tokens``
    None: 2 x source tokens + 10, within the model's ``max_target_len``.
    ``temperature > 0`` samples instead (``top_k``, ``top_p``, ``seed``), with
    the same distribution under every engine. ``on_token`` sees each target id
    as soon as it is verified.
    """
    return translate_source(model, tokenizer, encode_source(tokenizer, text), engine=engine,
                            max_new_tokens=max_new_tokens, on_token=on_token, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, **engine_options)
