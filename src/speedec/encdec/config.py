"""EncDecConfig: a frozen, validated description of an encoder-decoder translator.

The SPEED paper's setting: a T5-style model whose *decoder* is looped. The
encoder is a plain stack of ``n_encoder_layers`` bidirectional Llama-style
layers (run ``n_encoder_loops`` times; 1, i.e. unshared, by default). The
decoder has ``n_unique_layers`` (K) layers applied ``n_loops`` (L) times, each
with causal self-attention, cross-attention over the encoder output and an
MLP; an early exit after ``exit_loop`` loops feeds SPEED's drafts. Source and
target share one vocabulary and one embedding table.

The decoder alone, with the source fixed, is exactly the looped decoder that
:class:`speedec.config.ModelConfig` describes; :attr:`EncDecConfig.decoder_config`
gives that view, and the decoder-side fields are validated through it so the
two configs can never disagree about what a valid looped decoder is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import JsonConfig, ModelConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class EncDecConfig(JsonConfig):
    # Shared source/target vocabulary.
    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    # Encoder: distinct layers, and how many times the stack is applied.
    n_encoder_layers: int
    # Decoder: K unique layers applied L times (virtual layer v uses v mod K).
    n_unique_layers: int
    n_loops: int
    # Decoder loops completed before the early exit; None only when n_loops == 1.
    exit_loop: int | None = 1
    n_encoder_loops: int = 1
    # Longest source sentence, and longest decoder input (start token included).
    max_source_len: int = 256
    max_target_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # LM head tied to the shared embedding.
    tie_embeddings: bool = True
    # Decoder start token, and the padding id of training batches.
    bos_token_id: int = 1
    pad_token_id: int = 0
    # The decoder-side recipe knobs of speedec's looped decoders (ModelConfig's): a learned
    # vector per decoder loop added as the loop begins, and the rank of the exit readout
    # (the drafter: parameters read only at the early exit, trained with the trunk's and
    # the head's gradient cut).
    loop_embedding: bool = False
    exit_readout_rank: int | None = None

    OMIT_AT_DEFAULT = ("loop_embedding", "exit_readout_rank")

    def __post_init__(self) -> None:
        for name in ("n_encoder_layers", "n_encoder_loops", "max_source_len", "max_target_len",
                     "bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        for name in ("n_encoder_layers", "n_encoder_loops", "max_source_len", "max_target_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        # Widths, decoder shape, exit loop, rope and norm: the looped decoder's rules.
        decoder = self.decoder_config
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < decoder.vocab_size:
                raise ConfigError(f"{name} {value} is outside the vocabulary (0..{decoder.vocab_size - 1})")

    @property
    def decoder_config(self) -> ModelConfig:
        """The decoder as a looped decoder-only model (what KVCache and the engines see)."""
        return ModelConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, ffn_dim=self.ffn_dim, n_unique_layers=self.n_unique_layers,
            n_loops=self.n_loops, exit_loop=self.exit_loop, max_seq_len=self.max_target_len,
            rope_theta=self.rope_theta, norm_eps=self.norm_eps, tie_embeddings=self.tie_embeddings,
            loop_embedding=self.loop_embedding, exit_readout_rank=self.exit_readout_rank)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_virtual_layers(self) -> int:
        """Decoder virtual layers (K * L)."""
        return self.n_unique_layers * self.n_loops

    @property
    def has_early_exit(self) -> bool:
        return self.exit_loop is not None

