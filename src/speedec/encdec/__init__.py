"""The encoder-decoder setting of the SPEED paper: translation with a looped decoder.

``EncDecConfig`` describes the model, ``EncDecLM`` implements it (training
forward and the decoder's engine path), and ``translate_ids`` decodes one
source sentence with the decoder-only engines (``autoregressive``, ``speed``,
``self-speculative``) after a single encoder pass.

Around them: ``translate`` / ``load_translator`` (text in, text out with the
model's shared tokenizer), ``TranslationConfig`` / ``train_translation``
(the decoder-only training recipe on a parallel corpus, module ``trainer``),
``evaluate_translation`` (BLEU and chrF with sacrebleu, engine speed and
acceptance) and ``data`` (corpus reading, joint tokenizer, cached tokens,
length-bucketed batches). The commands are in :mod:`speedec.cli.translate`.
"""

from .config import EncDecConfig
from .engines import TRANSLATION_ENGINES, ConditionedDecoder, translate_ids
from .evaluate import TranslationEval, evaluate_translation, validation_metrics
from .model import EncDecLM, EncDecOutput, EncoderMemory
from .train_config import TranslationConfig
from .trainer import train_translation
from .translate import Translation, load_translator, translate

__all__ = ["TRANSLATION_ENGINES", "ConditionedDecoder", "EncDecConfig", "EncDecLM", "EncDecOutput",
           "EncoderMemory", "Translation", "TranslationConfig", "TranslationEval", "evaluate_translation",
           "load_translator", "train_translation", "translate", "translate_ids", "validation_metrics"]
