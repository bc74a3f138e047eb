"""Training and evaluation of looped decoders with an early-exit loss.

Layout, one concern per module:

* ``config``      TrainConfig: the frozen, validated description of a run;
* ``data``        text -> cached token array; windows drawn as a function of (seed, step);
* ``loss``        final + exit (+ all-loops) cross-entropy;
* ``schedule``    linear warmup + cosine decay, a function of the step;
* ``checkpoint``  atomic checkpoints (write a directory, then switch a pointer);
* ``distributed`` single process or torchrun data parallelism;
* ``loop``        the training loop any kind of run shares: :func:`~speedec.training.loop.run_training`;
* ``trainer``     the decoder-only run: :func:`train`;
* ``evaluate``    per-loop perplexity, exit agreement, SPEED acceptance: :func:`evaluate_model`.

The commands that drive them (``speedec train``, ``eval``, ``train-exit``) are in :mod:`speedec.cli.train`.
"""

from .config import TrainConfig
from .evaluate import evaluate_model, loop_metrics
from .loss import LoopedLoss, LossWeights, looped_loss
from .schedule import CosineSchedule
from .trainer import TrainSummary, train

__all__ = ["CosineSchedule", "LoopedLoss", "LossWeights", "TrainConfig", "TrainSummary",
           "evaluate_model", "loop_metrics", "looped_loss", "train"]
