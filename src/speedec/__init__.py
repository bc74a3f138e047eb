"""speedec: fast exact decoding for looped (weight-shared) decoders with SPEED."""

from .config import PRESETS, ModelConfig
from .engines import ENGINES, GenerationResult, GenerationStats, generate
from .errors import (
    ConfigError,
    DataError,
    GenerationError,
    ModelLoadError,
    SpeedecError,
    TokenizerError,
    TrainingError,
)
from .hf import export_hf
from .model import LoopedLM
from .tokenizer import chat_prompt

__version__ = "0.1.0"

__all__ = [
    "ENGINES", "PRESETS", "ConfigError", "DataError", "GenerationError", "GenerationResult",
    "GenerationStats", "LoopedLM", "ModelConfig", "ModelLoadError", "SpeedecError",
    "TokenizerError", "TrainingError", "chat_prompt", "export_hf", "generate",
]
