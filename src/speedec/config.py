"""Model configuration: a frozen, validated description of a looped decoder.

A looped decoder has ``n_unique_layers`` (K) Llama-style layers applied
``n_loops`` (L) times; virtual layer ``v = loop * K + k`` uses unique layer
``k = v mod K``. An early exit after ``exit_loop`` loops reads the hidden state
through the final norm and LM head; SPEED drafts the next token from it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError


class JsonConfig:
    """Dict/JSON round trips for frozen config dataclasses, validated on the way in.

    Fields named in ``OMIT_AT_DEFAULT`` (added after the format was first
    written) are written only when they differ from their default, so the
    files of models that do not use them stay exactly as they were.
    """

    OMIT_AT_DEFAULT: tuple[str, ...] = ()

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in fields(self)}
        for name in self.OMIT_AT_DEFAULT:
            if data[name] == defaults[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Any):
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        required = {f.name for f in fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = required - set(data)
        if missing:
            raise ConfigError(f"missing config field(s): {', '.join(sorted(missing))}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path):
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None



@dataclass(frozen=True)
class ModelConfig(JsonConfig):
    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    n_unique_layers: int
    n_loops: int
    # Loops completed before the early exit; None only for single-loop models,
    # which have no early exit (and so cannot run the speculative engines).
    exit_loop: int | None = 1
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # A learned vector per loop added to the hidden state as each loop begins
    # (L x d_model parameters; lets the shared layers tell the loops apart).
    loop_embedding: bool = False
    # Rank of the exit readout (the drafter): parameters used only at the
    # early exit (its own norms and a low-rank residual adapter in front of
    # the shared LM head), trained to agree with the final loop. None: the
    # exit reads the hidden state through the final norm and head.
    exit_readout_rank: int | None = None
    # The layer and loop architecture, one of speedec.architectures.ARCHITECTURES
    # (a file each): "llama" (pre-norm layers, final norm once before the head)
    # or "ouro" (sandwich norms on both branch outputs, the final norm at the
    # end of every loop, a readout without a second norm, and an early-exit
    # gate) or "nanbeige" (Llama's pre-norm layers, the final norm at the end
    # of every loop as in ouro unless skip_loop_final_norm; see docs/nanbeige.md).
    architecture: str = "llama"
    # nanbeige only: the final norm runs once, before the head, instead of
    # closing every loop (Nanbeige's config switch of the same name).
    skip_loop_final_norm: bool = False
    # The width of one attention head when it is not d_model / n_heads
    # (Nanbeige4.2-3B: 128 with d_model 3072 and 48 heads, so the q and o
    # projections are not square); None: d_model / n_heads.
    attention_head_dim: int | None = None
    # How the layers' projections and the LM head are stored: None (the model's
    # float dtype) or "q8_0" (8-bit blocks of 32 with a float16 scale each,
    # llama.cpp's q8_0; see speedec.quant). Written by `speedec quantize`.
    quantization: str | None = None
    # Recurrent-depth models only (architecture "huginn", see docs/huginn.md): layers
    # run once per token before the looped core (the prelude, whose output is
    # injected before every recurrence) and after it (the coda, read by the head);
    # n_unique_layers is then the core's and n_loops the number of recurrences.
    prelude_layers: int = 0
    coda_layers: int = 0
    # A learned bias added to every head's queries and keys before the rotary
    # embedding (Huginn's qk_bias).
    qk_bias: bool = False
    # Recurrent-depth models: the state a token's first recurrence starts from. 0: zeros
    # (reproducible; the default). > 0: the reference's random start, a normal truncated at
    # 3 std with std sqrt(2 / (5 d_model)) * state_init_scale, times sqrt(d_model), drawn per
    # position from state_init_seed, so that every engine starts a position alike.
    state_init_scale: float = 0.0
    state_init_seed: int = 0

    OMIT_AT_DEFAULT = ("loop_embedding", "exit_readout_rank", "architecture", "quantization",
                       "skip_loop_final_norm", "attention_head_dim", "prelude_layers", "coda_layers", "qk_bias",
                       "state_init_scale", "state_init_seed")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "ffn_dim",
                     "n_unique_layers", "n_loops", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        scale = self.state_init_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
            raise ConfigError(f"state_init_scale must be a number >= 0, got {scale!r}")
        for name in ("prelude_layers", "coda_layers", "state_init_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("tie_embeddings", "loop_embedding", "skip_loop_final_norm", "qk_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.exit_readout_rank is not None:
            rank = self.exit_readout_rank
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.d_model:
                raise ConfigError(f"exit_readout_rank must be an integer from 1 to d_model "
                                  f"({self.d_model}) or null, got {rank!r}")
            if self.exit_loop is None:
                raise ConfigError("exit_readout_rank needs an early exit (exit_loop); set it to null")
        # (Imported here: the architectures' modules import this one.)
        from .architectures import architecture

        arch = architecture(self.architecture)  # a ConfigError names the known ones
        if self.quantization is not None:
            from .quant import QUANTIZATIONS

            if self.quantization not in QUANTIZATIONS:
                raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or null, "
                                  f"got {self.quantization!r}")
        if not arch.recurrent_depth and (self.prelude_layers or self.coda_layers or self.qk_bias
                                         or self.state_init_scale or self.state_init_seed):
            raise ConfigError(f"prelude_layers, coda_layers, qk_bias and state_init_* belong to recurrent-depth models "
                              f"(architecture huginn), not to the {self.architecture} architecture")
        arch.check_config(self)
        dim = self.attention_head_dim
        if dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ConfigError(f"attention_head_dim must be a positive integer or null, got {dim!r}")
        elif self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
                "or attention_head_dim must be given")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"the head width ({self.head_dim}) must be even for rotary embeddings")
        if self.exit_loop is None:
            if self.n_loops != 1:
                raise ConfigError(
                    f"exit_loop is required when n_loops > 1 (1 <= exit_loop < {self.n_loops})")
        else:
            if isinstance(self.exit_loop, bool) or not isinstance(self.exit_loop, int):
                raise ConfigError(f"exit_loop must be an integer or null, got {self.exit_loop!r}")
            if not 1 <= self.exit_loop < self.n_loops:
                raise ConfigError(
                    f"exit_loop must satisfy 1 <= exit_loop < n_loops = {self.n_loops}, "
                    f"got {self.exit_loop}" + (" (use exit_loop: null for a single-loop model)"
                                               if self.n_loops == 1 else ""))

    @property
    def head_dim(self) -> int:
        """The width of one attention head: attention_head_dim, else d_model / n_heads."""
        return self.attention_head_dim or self.d_model // self.n_heads

    @property
    def loop_norm(self) -> bool:
        """Whether the final norm closes every loop (the next loop reads the normed
        state, and the head reads it without a second norm): ouro, and nanbeige
        unless skip_loop_final_norm (the architecture's ``loop_norm``)."""
        from .architectures import architecture

        return architecture(self.architecture).loop_norm(self)

    @property
    def n_virtual_layers(self) -> int:
        return self.n_unique_layers * self.n_loops

    @property
    def has_early_exit(self) -> bool:
        return self.exit_loop is not None

# Named shapes for `speedec init --preset` and the benchmarks.
PRESETS: dict[str, ModelConfig] = {
    # Small enough for unit tests; byte-level vocabulary so text prompts work.
    "tiny": ModelConfig(vocab_size=256, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=160,
                        n_unique_layers=2, n_loops=3, exit_loop=1, max_seq_len=512),
    # Weights (~103 MB float32) far larger than the L3 cache: decoding is
    # memory-bound, the regime SPEED is made for.
    # The LM head is untied: a random head maps each token to a varied next
    # token (a tied one would echo the input token forever).
    "membound": ModelConfig(vocab_size=8192, d_model=1024, n_heads=16, n_kv_heads=16,
                            ffn_dim=2816, n_unique_layers=2, n_loops=4, exit_loop=1,
                            max_seq_len=1024, tie_embeddings=False),
    "membound-deep": ModelConfig(vocab_size=8192, d_model=1024, n_heads=16, n_kv_heads=16,
                                 ffn_dim=2816, n_unique_layers=2, n_loops=8, exit_loop=1,
                                 max_seq_len=1024, tie_embeddings=False),
    # Ouro-1.4B's shapes (its config.json: hidden 2048, 24 layers, 16 heads and
    # 16 kv heads of 128, intermediate 5632, vocab 49152, 4 loops, untied head,
    # rope_theta 1e6, rms_norm_eps 1e-6) with random weights: about 1.44B
    # parameters, 5.7 GB float32 / 2.9 GB bfloat16. Early exit after loop 1 as
    # for an imported Ouro; max_seq_len 4096 instead of 65536 (only the rotary
    # table's length: the weights are the same).
    "ouro-1.4b-shape": ModelConfig(vocab_size=49152, d_model=2048, n_heads=16, n_kv_heads=16,
                                   ffn_dim=5632, n_unique_layers=24, n_loops=4, exit_loop=1,
                                   max_seq_len=4096, rope_theta=1000000.0, norm_eps=1e-6,
                                   tie_embeddings=False, architecture="ouro"),
    # Nanbeige4.2-3B's shapes (its config.json: hidden 3072, 22 layers run twice, 48
    # heads and 8 kv heads of 128 (so q and o are not square), intermediate 10752,
    # vocab 166144, untied head, rope_theta 7e7, rms_norm_eps 1e-5, the final norm
    # closing every loop) with random weights: about 4.17B parameters, 16.7 GB
    # float32 / 8.3 GB bfloat16 / 4.4 GB int8 (q8_0, embedding included). Early
    # exit after loop 1 as for an imported Nanbeige; max_seq_len 4096 instead of
    # 262144 (only the rotary table's length: the weights are the same). int8 and
    # bfloat16 are built without a float32 copy (speedec.bench.setup.build_model).
    "nanbeige-4.2-3b-shape": ModelConfig(vocab_size=166144, d_model=3072, n_heads=48, n_kv_heads=8,
                                         attention_head_dim=128, ffn_dim=10752, n_unique_layers=22,
                                         n_loops=2, exit_loop=1, max_seq_len=4096, rope_theta=70000000.0,
                                         norm_eps=1e-5, tie_embeddings=False, architecture="nanbeige",
                                         skip_loop_final_norm=False),
    # Recurrent-depth presets (architecture "huginn", docs/huginn.md). Huginn-0125's shapes
    # (its config.json: n_embd 5280, 55 heads of 96, intermediate 17920, vocab 65536, tied
    # head, 2 prelude + 4 core + 2 coda blocks, mean_recurrence 32, rope_base 50000) with
    # random weights: about 3.56B parameters, 7.1 GB bfloat16; max_seq_len 4096 as its
    # block_size. The membound-scale one: membound's widths with 1 prelude, 2 core and 1
    # coda block and an untied head (a random tied head echoes its input), 32 recurrences
    # (--loops picks 8 or 16). Early exit at a quarter of the depth, as for an import.
    "huginn-3.5b-shape": ModelConfig(vocab_size=65536, d_model=5280, n_heads=55, n_kv_heads=55, ffn_dim=17920,
                                     n_unique_layers=4, n_loops=32, exit_loop=8, max_seq_len=4096,
                                     rope_theta=50000.0, norm_eps=1e-6, tie_embeddings=True,
                                     architecture="huginn", prelude_layers=2, coda_layers=2, qk_bias=True),
    "membound-recurrent": ModelConfig(vocab_size=8192, d_model=1024, n_heads=16, n_kv_heads=16, ffn_dim=2816,
                                      n_unique_layers=2, n_loops=32, exit_loop=8, max_seq_len=1024,
                                      tie_embeddings=False, norm_eps=1e-6, architecture="huginn",
                                      prelude_layers=1, coda_layers=1, qk_bias=True),
}

# Scale of the residual-branch output projections at init for each preset.
# Random networks with small residual branches keep the hidden state close to
# the embedding, so the early exit agrees with the final prediction often —
# a stand-in for a trained model's acceptance (measured, never assumed).
# Values chosen by measuring acceptance over seeded random prompts (BENCHMARKS.md).
# ouro-1.4b-shape: the sandwich norms normalise every branch's output, so there
# the scale is those norms' gain (speedec.bench.setup.random_model). Measured
# with the speed engine at the real shape, float32, seed 0, 4 seeded random
# prompts of 16 ids x 24 new tokens: acceptance 0.932 (82/88 drafts) at 0.002,
# 0.898 (79/88) at 0.003, 0.875 (77/88) at 0.004; at 0.01 the loop-1 argmax
# matched loop 4's on only 68% of teacher-forced positions, at 0.03 on 34%.
# nanbeige-4.2-3b-shape: the output projections as for llama; with the loop norm the
# second loop reads a state of RMS 1 (not the embedding's 0.02), so the scale that
# moves its argmax is ~20x llama's. Its branches' std falls as 1/sqrt(2 K L), so a
# loop's update barely depends on K: measured on a stand-in with the real widths and
# vocabulary but K = 2 (speed engine, seed 0, 8 seeded random prompts of 16 ids x 24
# new tokens, 176 drafts): int8 0.915 at 0.07, 0.852 at 0.085, 0.761 at 0.1; bf16
# 0.869, 0.824, 0.801. Teacher-forced exit/final argmax agreement (bf16, 512
# positions) at 0.1: 0.78 with K = 2, 0.84 with K = 6, 0.785 at the real shape
# (0.885 at 0.07); at 1.0 it is 0.06. At the real shape, int8, the same 8 prompts:
# acceptance 0.835 (147/176) at 0.09.
# huginn presets: the scale also sets how strongly the adapter's random part mixes the state
# (RecurrentDepthLM.reset_parameters); membound-recurrent, seed 0, one random prompt of 16
# ids + 16 greedy tokens, argmax after recurrence 1, 5, 9, ... agreeing with recurrence 32:
# 0.66 / 1.0 from 5 on at 0.1; 0.19 / 0.97 / 1.0 at 0.5; at 1.5 0.06 after 1, 0.28 after 5,
# 0.5 after 9, 0.75 after 16. 1.0 is between (benchmarks/results/huginn.md has the
# acceptance it gives by exit).
PRESET_RESIDUAL_SCALE: dict[str, float] = {"tiny": 1.0, "membound": 0.0045, "membound-deep": 0.0025,
                                           "ouro-1.4b-shape": 0.003, "nanbeige-4.2-3b-shape": 0.09,
                                           "huginn-3.5b-shape": 1.0, "membound-recurrent": 1.0}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
