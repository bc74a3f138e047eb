"""Typed exceptions of speedec.

Every error a user can cause is one of these, with a one-line message that
names what is wrong. The CLI turns them into ``error: ...`` and exit code 2.
"""

from __future__ import annotations


class SpeedecError(Exception):
    """Base class of every error speedec raises on purpose."""


class ConfigError(SpeedecError, ValueError):
    """A configuration is impossible or malformed."""


class ModelLoadError(SpeedecError, OSError):
    """A model directory or one of its files is missing, unreadable or inconsistent."""


class GenerationError(SpeedecError, ValueError):
    """A generation request is invalid (bad prompt, too long, unknown engine...)."""


class TokenizerError(SpeedecError, ValueError):
    """Text or token ids cannot be encoded or decoded by the tokenizer."""


class DataError(SpeedecError, RuntimeError):
    """A corpus could not be downloaded, extracted or prepared."""


class TrainingError(SpeedecError, RuntimeError):
    """A training run cannot start or resume (bad checkpoint, bad options...)."""
