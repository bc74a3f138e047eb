"""The encoder-decoder setting of the SPEED paper: translation with a looped decoder.

``EncDecConfig`` describes the model, ``EncDecLM`` implements it (training
forward and the decoder's engine path), and ``translate_ids`` decodes one
source sentence with the decoder-only engines (``autoregressive``, ``speed``,
``self-speculative``) after a single encoder pass.
"""

from .config import EncDecConfig
from .engines import TRANSLATION_ENGINES, ConditionedDecoder, translate_ids
from .model import EncDecLM, EncDecOutput, EncoderMemory

__all__ = ["TRANSLATION_ENGINES", "ConditionedDecoder", "EncDecConfig", "EncDecLM", "EncDecOutput",
           "EncoderMemory", "translate_ids"]
