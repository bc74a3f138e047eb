"""Translation: encode the source once, then decode greedily with a decoding engine.

Once a source sentence is encoded, the decoder of an :class:`EncDecLM` is a
looped decoder-only model in every respect that decoding touches: K unique
layers applied L times, a self-attention KV cache addressed by virtual layer
and position, an early exit after ``exit_loop`` loops. The only difference is
cross-attention, and its keys and values (the :class:`EncoderMemory`) are
fixed for the whole request. :class:`ConditionedDecoder` binds the two and
presents the decoder through the interface the decoder-only engines drive,
so the very same autoregressive, SPEED and self-speculative engines of
:mod:`speedec.engines` decode translations: one pipeline implementation,
statistics with one meaning, exactness proven once for both settings.

A request runs: validate -> encode (encoder pass + K cross-attention K/V
products) -> prefill the start token through all L decoder loops -> the
engine's ``decode``. The memory lives exactly as long as the request, next
to the self-attention cache, and is never recomputed per loop or per slot.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..cache import KVCache
from ..config import ModelConfig
from ..engines import ENGINES, engine_class
from ..engines.base import (
    GenerationResult,
    TokenCallback,
    check_max_new_tokens,
    check_token_id,
    prefill,
    token_ids,
)
from ..errors import GenerationError
from ..model import SpareRows, StepLayout
from ..sampling import SamplingParams
from .model import EncDecLM, EncoderMemory

# Every engine decodes translations: engines use only the DecodingModel
# interface, which ConditionedDecoder offers.
TRANSLATION_ENGINES = ENGINES


class ConditionedDecoder:
    """The decoder of ``model`` bound to one encoded source sentence: a
    :class:`~speedec.engines.protocol.DecodingModel`.

    ``config`` is the decoder as a :class:`ModelConfig`; ``run_loops`` adds
    the cross-attention over the bound memory; the heads are the model's.
    """

    def __init__(self, model: EncDecLM, memory: EncoderMemory) -> None:
        if memory.batch_size != 1:
            raise GenerationError(f"a decoder is bound to one source sentence, got {memory.batch_size}")
        self.model = model
        self.memory = memory
        self.config: ModelConfig = model.config.decoder_config
        self.embed = model.embed

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def layout(self, positions: Sequence[Sequence[int]], loops: Sequence[int]) -> StepLayout:
        return self.model.decoder_layout(positions, loops)

    def run_loops(self, x: torch.Tensor, layout: StepLayout, cache: KVCache, n_loops: int,
                  spares: SpareRows | None = None) -> torch.Tensor:
        return self.model.run_decoder_loops(x, layout, cache, self.memory, n_loops, spares)

    def spare_rows(self, positions: list[int], loops: list[int], index: list[int],
                   side: tuple[torch.Tensor, torch.Tensor]) -> SpareRows:
        return SpareRows.build(self.model.decoder_rope, positions, loops, index, side)

    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(x)

    def exit_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.exit_head(x)

    def head_and_exit(self, final: torch.Tensor, exit_rows: torch.Tensor) -> torch.Tensor:
        return self.model.head_and_exit(final, exit_rows)


def validate_translation(model: EncDecLM, src_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                         eos_token_id: int | None, bos_token_id: int) -> list[int]:
    """The source as a list of ids; a GenerationError naming the first problem.
    The checks of :func:`speedec.engines.base.validate_request`, with the
    translator's limits (source and target lengths) and its start token."""
    c = model.config
    src = token_ids(src_ids, c.vocab_size, name="source", whole="the source sentence")
    if len(src) > c.max_source_len:
        raise GenerationError(
            f"the source ({len(src)} tokens) exceeds the model's max_source_len ({c.max_source_len})")
    check_max_new_tokens(max_new_tokens)
    if 1 + max_new_tokens > c.max_target_len:
        raise GenerationError(
            f"the start token + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_target_len ({c.max_target_len})")
    check_token_id("bos_token_id", bos_token_id, c.vocab_size)
    if eos_token_id is not None:
        check_token_id("eos_token_id", eos_token_id, c.vocab_size)
    return src


def translate_ids(model: EncDecLM, src_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, *,
                  engine: str = "speed", eos_token_id: int | None = None,
                  bos_token_id: int | None = None, on_token: TokenCallback | None = None,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, **engine_options) -> GenerationResult:
    """Translation of one source sentence: up to ``max_new_tokens`` target ids
    (greedy, or sampled with ``temperature > 0`` as in :func:`speedec.generate`).

    Greedy, all engines return the same tokens (exactly, in float64); sampling, the
    same distribution; they differ in
    speed. ``bos_token_id`` is the decoder start token (the config's when
    None); it is not part of the result. ``on_token`` sees each token as soon as
    it is verified; ``engine_options`` go to the engine (``draft_tokens`` for
    ``self-speculative``). In the stats, ``prompt_tokens`` counts source tokens
    and ``prefill_s`` covers the encoder, the cross-attention keys/values and
    the start token's pass through the decoder.
    """
    engine_cls = engine_class(engine)
    bos = model.config.bos_token_id if bos_token_id is None else bos_token_id
    src = validate_translation(model, src_ids, max_new_tokens, eos_token_id, bos)
    begin = time.perf_counter()
    with torch.inference_mode():
        memory = model.encode(torch.tensor([src], device=model.device))  # one source, no padding
    decoder = ConditionedDecoder(model, memory)
    encode_s = time.perf_counter() - begin
    # Outside the timings: an engine may measure the model when it is built (speed's adaptive step costs).
    decoding = engine_cls.create(decoder, **engine_options)

    def start() -> tuple[KVCache, torch.Tensor, int]:
        cache = KVCache(decoder.config, 1 + max_new_tokens, dtype=model.dtype, device=model.device)
        return cache, prefill(decoder, cache, [bos]), 1

    result = decoding.run(start, len(src), max_new_tokens, eos_token_id=eos_token_id, on_token=on_token,
                          sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                  seed=seed))
    # prefill covers the encoder and the cross-attention keys/values too
    result.stats.prefill_s += encode_s
    result.stats.wall_s += encode_s
    return result
