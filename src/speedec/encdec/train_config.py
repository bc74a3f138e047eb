"""TranslationConfig: a frozen, validated description of one translation training run.

The recipe (AdamW, warmup + cosine, gradient clipping, early-exit loss,
budget, logging, evaluation and checkpoint cadence, seed, threads) is the
decoder-only one: the fields and checks of
:class:`speedec.training.config.RecipeConfig`. What differs:

* ``model`` is an :class:`EncDecConfig` (or ``init_from`` a saved
  encoder-decoder directory);
* ``data`` is a parallel corpus directory (``speedec data prepare-parallel``)
  and ``batch_size`` counts *sentence pairs* per step;
* a ``max_tokens`` budget counts source + target + end tokens and becomes
  ``ceil(max_tokens / (batch_size * mean tokens per training pair))`` steps
  once the corpus is tokenised (a fixed number for a given corpus and tokenizer);
* ``eval_batches`` batches of validation pairs are scored per loop.

The decoder start token is the model's ``bos_token_id`` and the end token is
the tokenizer's ``<|endoftext|>``. Speedec's BPE tokenizers have
``<|endoftext|>`` at id 0, and the shipped configs use it as start, end and
padding id alike (``bos_token_id: 0, pad_token_id: 0``): padding is never
attended to or scored, and the decoder start token plays the role of the end
of the previous sentence, as in BART.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import TrainingError
from ..training.config import RecipeConfig, check_model_sources, check_path
from .config import EncDecConfig


@dataclass(frozen=True, kw_only=True)
class TranslationConfig(RecipeConfig):
    MODEL_CLASS: ClassVar[type] = EncDecConfig

    # Parallel corpus: a directory with <split>.jsonl files.
    data: str
    # Where the model comes from: exactly one of a shape (random init) or a
    # saved encoder-decoder directory (its weights).
    model: EncDecConfig | None = None
    init_from: str | None = None
    # Splits of the corpus to train and validate on.
    train_split: str = "train"
    val_split: str = "validation"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_path("data", self.data)
        check_model_sources(self, ("model", "init_from"), EncDecConfig)
        for name in ("train_split", "val_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise TrainingError(f"{name} must be a non-empty split name, got {value!r}")
        if self.max_steps is not None:
            self.check_warmup(self.max_steps)

    def resolve_model_config(self) -> EncDecConfig:
        """The shape of the model to train, checked against the loss terms."""
        if self.model is not None:
            config = self.model
        else:
            from ..storage import ENCDEC_LM, load_config

            try:
                config = load_config(self.init_from, ENCDEC_LM)
            except Exception as exc:  # ModelLoadError: a user's bad path
                raise TrainingError(f"init_from: {exc}") from None
        self.check_loss_weights(config)
        return config
