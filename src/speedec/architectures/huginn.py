"""Huginn (``architecture = "huginn"``; Hugging Face ``"model_type": "huginn_raven"``,
``RavenForCausalLM``): the recurrent-depth family, its block, its checkpoints.

A prelude of blocks run once per token, a core of K blocks run r times with
the prelude's output injected before every recurrence through a linear
adapter, a coda, a head tied to the embeddings; the model itself is
:class:`~speedec.model.recurrent.RecurrentDepthLM`, the block :class:`HuginnBlock`
(four norms: the second of each pair on the residual *sum*; a learned bias on
queries and keys before the rotary embedding). The reference rotates adjacent
pairs of a head's dimensions; speedec rotates the two halves, so the import
permutes every head's query and key rows (and biases) from pairs to halves
and the export permutes them back: the attention scores are the same sums of
the same products. The rotary table is read from the checkpoint's
``freqs_cis`` when it has one (the reference rotates by the stored table).
See ``docs/huginn.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import ModelConfig
from ..conversion import Conversion
from ..errors import ConfigError, ModelLoadError
from ..model.layer import LoopedLayer
from ..model.norms import RMSNorm
from ..model.recurrent import RecurrentDepthLM, default_exit_loop
from ..model.rotary import float32_rope_table
from .base import Architecture, hf_field

if TYPE_CHECKING:
    from ..model.looped import LoopedLM

MODEL_TYPE = "huginn_raven"
# What the reference's config may say and speedec runs (field -> accepted values).
REQUIRED = {"injection_type": ("linear",), "nonlin_name": ("SiLU",), "mlp_class_name": ("GatedMLP",),
            "block_class_name": ("SandwichBlock",), "norm_class_name": ("RMSNorm_llama",),
            "architecture_class_name": ("RecurrentGPT",), "bias": (False,), "test_time_noise": (0, 0.0)}


class HuginnBlock(LoopedLayer):
    """``x = norm_2(x + attn(norm_1(x)))``, ``x = norm_4(x + mlp(norm_3(x)))``, with the
    per-head query/key bias added to the projection before the rotary embedding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.attn_out_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp_out_norm = RMSNorm(config.d_model, config.norm_eps)
        width = (config.n_heads + config.n_kv_heads) * config.head_dim
        self.qk_bias = nn.Parameter(torch.zeros(width)) if config.qk_bias else None

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        qkv = super().project_qkv(x)
        if self.qk_bias is None:
            return qkv
        n = self.qk_bias.shape[0]
        return torch.cat((qkv[..., :n] + self.qk_bias, qkv[..., n:]), dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        x = self.attn_out_norm(x + self.attention_branch(x, cos, sin, attend))
        return self.mlp_out_norm(x + self.mlp_branch(x))


def _halves(head_dim: int) -> torch.Tensor:
    """Index of the reference's dimension at each of ours: pairs (2i, 2i+1) -> (i, i + hd/2)."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _permute_heads(rows: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    """``rows [n * hd, ...]``: every head's ``hd`` rows reordered by ``order``."""
    shape = rows.shape
    return rows.reshape(-1, head_dim, *shape[1:])[:, order].reshape(shape)


class HuginnConversion(Conversion):
    """``RavenForCausalLM``: prelude, core and coda blocks under their own prefixes, the
    stored rotary table, the head tied (not stored) or ``lm_head.weight``."""

    name = "huginn"
    globals = {"embed.weight": "transformer.wte.weight", "norm.weight": "transformer.ln_f.weight",
               "adapter": "transformer.adapter.weight", "lm_head": "lm_head.weight"}
    layer = {"attn_norm.weight": "norm_1.weight", "wqkv": "attn.Wqkv.weight", "wo": "attn.proj.weight",
             "attn_out_norm.weight": "norm_2.weight", "mlp_norm.weight": "norm_3.weight",
             "w_gate_up": "mlp.fc.weight", "w_down": "mlp.proj.weight", "mlp_out_norm.weight": "norm_4.weight",
             "qk_bias": "attn.qk_bias"}
    groups = (("prelude", "transformer.prelude"), ("layers", "transformer.core_block"), ("coda", "transformer.coda"))
    layer_prefix = "transformer.core_block.{i}."
    unrolled = False
    not_imported_suffixes = ("freqs_cis",)

    @classmethod
    def _counts(cls, config: ModelConfig) -> dict[str, int]:
        return {"prelude": config.prelude_layers, "layers": config.n_unique_layers, "coda": config.coda_layers}

    @classmethod
    def _reorder(cls, ours: str, tensor: torch.Tensor, config: ModelConfig, *, to_ours: bool) -> torch.Tensor:
        """``wqkv``'s query and key rows and ``qk_bias`` from the reference's rotary layout
        (pairs) to ours (halves), or back; any other tensor as it is."""
        hd = config.head_dim
        order = _halves(hd) if to_ours else torch.argsort(_halves(hd))
        if ours == "wqkv":
            n = (config.n_heads + config.n_kv_heads) * hd
            return torch.cat((_permute_heads(tensor[:n], hd, order), tensor[n:]))
        if ours == "qk_bias":
            flat = _permute_heads(tensor.reshape(-1), hd, order)
            return flat if to_ours else flat.reshape(2, 1, config.n_heads, hd)
        return tensor

    @classmethod
    def their_views(cls, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        config, state = model.config, model.state_dict()
        out = {theirs: state[ours] for ours, theirs in cls.globals.items() if ours in state}
        placed = set(cls.globals)
        for group, prefix in cls.groups:
            for i in range(cls._counts(config)[group]):
                for ours, theirs in cls.layer.items():
                    name = f"{group}.{i}.{ours}"
                    if name in state:
                        out[f"{prefix}.{i}.{theirs}"] = cls._reorder(ours, state[name], config, to_ours=False)
                        placed.add(name)
        unplaced = [n for n in state if n not in placed]
        if unplaced:
            raise ConfigError(f"a {cls.name} checkpoint has no place for {', '.join(unplaced)}")
        return out

    @classmethod
    def to_ours(cls, tensors, config: ModelConfig) -> dict[str, torch.Tensor]:
        out = {ours: tensors[theirs] for ours, theirs in cls.globals.items() if theirs in tensors}
        used = {cls.globals[ours] for ours in out}
        for group, prefix in cls.groups:
            for i in range(cls._counts(config)[group]):
                for ours, theirs in cls.layer.items():
                    name = f"{prefix}.{i}.{theirs}"
                    if ours == "qk_bias" and not config.qk_bias:
                        continue
                    if name not in tensors:
                        raise ModelLoadError(f"the {cls.name} checkpoint lacks {name}")
                    out[f"{group}.{i}.{ours}"] = cls._reorder(ours, tensors[name], config, to_ours=True)
                    used.add(name)
        unused = sorted(n for n in set(tensors) - used if not n.endswith(cls.not_imported_suffixes))
        if unused:
            raise ModelLoadError(f"no place in speedec for {cls.name} tensor(s) {', '.join(unused[:5])}")
        return out

    @classmethod
    def load(cls, model, directory: Path, *, dtype, device):
        model = super().load(model, directory, dtype=dtype, device=device)
        table = stored_rope(directory, model.config)
        if table is not None:
            model.rope = table.to(device)
        return model

    @classmethod
    def from_ours(cls, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors, and the rotary table as ``freqs_cis`` (the reference rotates by it)."""
        out = super().from_ours(model)
        out["freqs_cis"] = rope_from_table(model).contiguous().clone()
        return out


def stored_rope(directory: Path, config: ModelConfig) -> torch.Tensor | None:
    """The checkpoint's ``freqs_cis`` (``[1, T, 1, hd/2, 2]``: cos and sin of every pair) as
    speedec's table ``[T, 2, hd]`` in float32, or None when it has none; a table of another
    shape than the config's is a ModelLoadError."""
    from safetensors import safe_open

    from ..storage import INDEX_FILE, WEIGHTS_FILE

    path = directory / WEIGHTS_FILE
    if (directory / INDEX_FILE).is_file():
        shard = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"].get("freqs_cis")
        if shard is None:
            return None
        path = directory / shard
    with safe_open(str(path), "pt") as f:
        if "freqs_cis" not in f.keys():
            return None
        table = f.get_tensor("freqs_cis").float()
    half = config.head_dim // 2
    if table.shape != (1, config.max_seq_len, 1, half, 2):
        raise ModelLoadError(f"{path}: freqs_cis has shape {tuple(table.shape)}, the config says "
                             f"{(1, config.max_seq_len, 1, half, 2)}")
    cos, sin = table[0, :, 0, :, 0], table[0, :, 0, :, 1]
    return torch.stack((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), dim=1)


def rope_from_table(model: LoopedLM) -> torch.Tensor:
    """``freqs_cis`` of ``model`` (``[1, T, 1, hd/2, 2]`` float32), from its rotary table."""
    half = model.config.head_dim // 2
    table = model.rope.float()
    return torch.stack((table[:, 0, :half], table[:, 1, half:]), dim=-1)[None, :, None]


def check_config(config: ModelConfig) -> None:
    if config.loop_embedding or config.exit_readout_rank is not None:
        raise ConfigError("the huginn architecture has no loop_embedding or exit_readout_rank")
    if config.skip_loop_final_norm:
        raise ConfigError("skip_loop_final_norm is a nanbeige switch, not a huginn one")
    if config.qk_bias and config.n_kv_heads != config.n_heads:
        raise ConfigError("huginn's qk_bias needs as many kv heads as query heads")


def config_from_hf(data: dict, path: Path) -> ModelConfig:
    """Our config for a ``RavenForCausalLM`` ``config.json``; what speedec does not run is
    a ModelLoadError naming the file and the field."""
    for name, accepted in REQUIRED.items():
        value = data.get(name, accepted[0])
        if value not in accepted:
            raise ModelLoadError(f"{path}: {name} {value!r} is not supported (only {accepted[0]!r})")
    heads = hf_field(data, path, "n_heads", data.get("num_attention_heads"))
    kv_heads = data.get("num_key_value_heads", heads)
    if kv_heads != heads:
        raise ModelLoadError(f"{path}: num_key_value_heads {kv_heads!r} differs from n_heads {heads!r}")
    loops = hf_field(data, path, "mean_recurrence")
    try:
        return ModelConfig(
            vocab_size=hf_field(data, path, "padded_vocab_size", data.get("vocab_size")),
            d_model=hf_field(data, path, "n_embd"), n_heads=heads, n_kv_heads=heads,
            ffn_dim=hf_field(data, path, "intermediate_size"),
            n_unique_layers=hf_field(data, path, "n_layers_in_recurrent_block"),
            n_loops=loops, exit_loop=default_exit_loop(loops) if isinstance(loops, int) else None,
            max_seq_len=hf_field(data, path, "block_size"),
            rope_theta=float(hf_field(data, path, "rope_base", 50000.0)),
            norm_eps=float(hf_field(data, path, "norm_eps", 1e-6)),
            tie_embeddings=bool(data.get("tie_embeddings", data.get("tie_word_embeddings", True))),
            architecture="huginn", prelude_layers=hf_field(data, path, "n_layers_in_prelude"),
            coda_layers=hf_field(data, path, "n_layers_in_coda"), qk_bias=bool(data.get("qk_bias", True)))
    except (ConfigError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def hf_config(model: LoopedLM) -> dict:
    """A ``RavenForCausalLM`` ``config.json`` for ``model`` (its recurrences as the default)."""
    c = model.config
    dtype = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
             torch.float16: "float16"}.get(model.dtype, "float32")
    return {
        "architectures": ["RavenForCausalLM"], "model_type": MODEL_TYPE,
        "n_embd": c.d_model, "n_heads": c.n_heads, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "n_layers": c.prelude_layers + c.n_unique_layers + c.coda_layers, "block_size": c.max_seq_len,
        "vocab_size": c.vocab_size, "padded_vocab_size": c.vocab_size, "tie_embeddings": c.tie_embeddings,
        "intermediate_size": c.ffn_dim, "bias": False, "architecture_class_name": "RecurrentGPT",
        "block_class_name": "SandwichBlock", "norm_class_name": "RMSNorm_llama", "norm_eps": c.norm_eps,
        "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU", "injection_type": "linear",
        "n_layers_in_recurrent_block": c.n_unique_layers, "mean_recurrence": c.n_loops,
        "n_layers_in_prelude": c.prelude_layers, "n_layers_in_coda": c.coda_layers, "qk_bias": c.qk_bias,
        "rope_base": c.rope_theta, "state_init": "like-init", "torch_dtype": dtype,
    }


HUGINN = Architecture(name="huginn", layer=HuginnBlock, conversion=HuginnConversion, hf_config=hf_config,
                      checkpoint_title="a Huginn", rope_table=float32_rope_table, check_config=check_config,
                      model_type=MODEL_TYPE, config_from_hf=config_from_hf, recurrent_depth=True,
                      model_class=RecurrentDepthLM)
