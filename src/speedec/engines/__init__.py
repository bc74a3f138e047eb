"""Decoding engines behind one interface, selected by name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import GenerationError
from ..sampling import SamplingParams
from .autoregressive import AutoregressiveEngine
from .base import Engine, GenerationResult, GenerationStats, TokenCallback
from .protocol import DecodingModel
from .self_speculative import SelfSpeculativeEngine
from .speed import SpeedEngine

ENGINES: dict[str, type[Engine]] = {
    AutoregressiveEngine.name: AutoregressiveEngine,
    SpeedEngine.name: SpeedEngine,
    SelfSpeculativeEngine.name: SelfSpeculativeEngine,
}


def engine_class(name: str, engines: Mapping[str, type[Engine]] = ENGINES) -> type[Engine]:
    """The engine registered as ``name`` in ``engines``; an unknown name is a
    GenerationError that lists the choices."""
    try:
        return engines[name]
    except (KeyError, TypeError):
        raise GenerationError(
            f"unknown engine {name!r}; choose one of: {', '.join(engines)}") from None


def get_engine(name: str, model: DecodingModel, **options) -> Engine:
    return engine_class(name).create(model, **options)


def generate(model: DecodingModel, prompt_ids: Sequence[int], max_new_tokens: int, *,
             engine: str = "speed", eos_token_id: int | None = None,
             on_token: TokenCallback | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             **engine_options) -> GenerationResult:
    """Decode ``max_new_tokens`` tokens (fewer if EOS is generated).

    ``temperature=0`` (the default) is greedy: all engines return the same
    tokens (exactly, in float64). With ``temperature > 0`` tokens are sampled
    (after ``top_k`` / ``top_p`` filtering); the speculative engines keep the
    output distribution equal to plain sampling's, and a ``seed`` makes a run
    reproducible. Engines differ only in speed. ``on_token`` is called with each token as soon as it is verified.
    ``engine_options`` go to the engine (e.g. ``draft_tokens=4`` for
    ``self-speculative``).
    """
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return get_engine(engine, model, **engine_options).generate(
        prompt_ids, max_new_tokens, eos_token_id=eos_token_id, on_token=on_token, sampling=sampling)


__all__ = ["ENGINES", "DecodingModel", "Engine", "GenerationResult", "GenerationStats", "engine_class", "generate",
           "get_engine"]
