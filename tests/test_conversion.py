"""The conversion table: Llama export and import read one table both ways."""

import pytest
import torch
from safetensors.torch import load_file

from speedec import PRESETS, ConfigError, LoopedLM, ModelLoadError
from speedec.architectures.llama import LlamaConversion
from speedec.hf import export_hf
from speedec.storage import WEIGHTS_FILE

TINY = PRESETS["tiny"]


@pytest.mark.parametrize("changes", [
    dict(),
    dict(tie_embeddings=False),
    dict(n_heads=4, n_kv_heads=1, n_unique_layers=1, n_loops=4, exit_loop=2),
])
def test_export_then_import_is_bit_identical(tmp_path, changes):
    config = TINY.replace(**changes)
    model = LoopedLM.random(config, seed=3)
    export_hf(model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    assert len([n for n in tensors if n.endswith("q_proj.weight")]) == config.n_virtual_layers
    assert ("lm_head.weight" in tensors) == (not config.tie_embeddings)
    ours = LlamaConversion.to_ours(tensors, config)
    state = model.state_dict()
    assert ours.keys() == state.keys()
    for name, tensor in state.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    loaded = LoopedLM(config)
    loaded.load_state_dict(ours)
    assert torch.equal(loaded(torch.tensor([[1, 2, 3]])).logits, model(torch.tensor([[1, 2, 3]])).logits)


def test_fused_tensors_split_in_order():
    config = TINY.replace(tie_embeddings=False)
    model = LoopedLM.random(config, seed=1)
    theirs = LlamaConversion.from_ours(model)
    layer = model.layers[1]
    q_rows = config.n_heads * config.head_dim
    kv_rows = config.n_kv_heads * config.head_dim
    # Virtual layer K + 1 is unique layer 1 in its second loop.
    prefix = f"model.layers.{config.n_unique_layers + 1}."
    assert torch.equal(theirs[prefix + "self_attn.q_proj.weight"], layer.wqkv[:q_rows])
    assert torch.equal(theirs[prefix + "self_attn.k_proj.weight"], layer.wqkv[q_rows:q_rows + kv_rows])
    assert torch.equal(theirs[prefix + "self_attn.v_proj.weight"], layer.wqkv[q_rows + kv_rows:])
    assert torch.equal(theirs[prefix + "mlp.gate_proj.weight"], layer.w_gate_up[:config.ffn_dim])
    assert torch.equal(theirs[prefix + "mlp.up_proj.weight"], layer.w_gate_up[config.ffn_dim:])
    assert torch.equal(theirs["lm_head.weight"], model.lm_head)
    # Separate storage for every name (safetensors refuses shared tensors).
    pointers = {t.untyped_storage().data_ptr() for t in theirs.values()}
    assert len(pointers) == len(theirs)


def test_import_refuses_what_the_table_cannot_place():
    model = LoopedLM.random(TINY, seed=2)
    theirs = LlamaConversion.from_ours(model)
    # A layer that is not a copy of its unique layer: not a looped model.
    changed = dict(theirs)
    changed["model.layers.2.mlp.down_proj.weight"] = changed["model.layers.2.mlp.down_proj.weight"] + 1
    with pytest.raises(ModelLoadError, match=r"model.layers.2.mlp.down_proj.weight differs from layer 0's"):
        LlamaConversion.to_ours(changed, TINY)
    missing = {n: t for n, t in theirs.items() if n != "model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(ModelLoadError, match="lacks model.layers.1.self_attn.v_proj.weight"):
        LlamaConversion.to_ours(missing, TINY)
    extra = {**theirs, "model.layers.0.self_attn.q_norm.weight": torch.ones(4)}
    with pytest.raises(ModelLoadError, match="no place in speedec for llama tensor"):
        LlamaConversion.to_ours(extra, TINY)
    # Too few unique layers for the checkpoint: the extra layers are unplaced.
    with pytest.raises(ModelLoadError, match="differs from layer|no place"):
        LlamaConversion.to_ours(theirs, TINY.replace(n_loops=2, exit_loop=1))
    # q/k/v rows that do not match the config's heads.
    wrong = TINY.replace(n_kv_heads=4)
    with pytest.raises(ModelLoadError, match="rows, the config says"):
        LlamaConversion.to_ours(theirs, wrong)


def test_export_refuses_tensors_without_a_place():
    model = LoopedLM.random(TINY, seed=0)
    model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ConfigError, match="a llama checkpoint has no place for extra"):
        LlamaConversion.from_ours(model)


class LoopedLlama(LlamaConversion):
    """A checkpoint that stores the K unique layers once, with a tensor speedec does not use."""

    name = "looped-llama"
    unrolled = False
    not_imported = ("model.early_exit_gate.",)


def test_a_table_of_unique_layers_round_trips():
    config = TINY.replace(tie_embeddings=False)
    model = LoopedLM.random(config, seed=4)
    theirs = LoopedLlama.from_ours(model)
    assert len([n for n in theirs if n.endswith("o_proj.weight")]) == config.n_unique_layers
    theirs["model.early_exit_gate.weight"] = torch.zeros(1, config.d_model)
    ours = LoopedLlama.to_ours(theirs, config)
    assert ours.keys() == model.state_dict().keys()
    assert all(torch.equal(ours[n], t) for n, t in model.state_dict().items())
    with pytest.raises(ModelLoadError, match="no place in speedec for llama tensor"):
        LlamaConversion.to_ours(LlamaConversion.from_ours(model) | {"model.early_exit_gate.weight": torch.zeros(1)},
                                config)
