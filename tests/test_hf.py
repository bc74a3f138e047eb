"""The independent reference: Hugging Face transformers' Llama on exported weights."""

import pytest
import torch

from helpers import random_model, small_config
from speedec import generate
from speedec.hf import export_hf

transformers = pytest.importorskip("transformers")


def _load(path, dtype):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(n_heads=4, n_kv_heads=4, tie_embeddings=False),
    dict(n_heads=4, n_kv_heads=1, n_unique_layers=1, n_loops=4, exit_loop=2),
])
def test_hf_logits_and_greedy_match(tmp_path, overrides):
    config = small_config(**overrides)
    model = random_model(config, seed=5, std=0.5, residual_scale=3.0)
    export_hf(model, tmp_path)
    hf = _load(tmp_path, torch.float64)
    assert hf.config.num_hidden_layers == config.n_unique_layers * config.n_loops
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    # transformers' RMSNorm and rotary tables run in float32 even in a float64 model.
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    hf_tokens = hf.generate(ids, max_new_tokens=25, do_sample=False, pad_token_id=0,
                            attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    for engine in ("autoregressive", "speed"):
        assert generate(model, ids[0].tolist(), 25, engine=engine).tokens == hf_tokens, engine


def test_export_float32_loads_and_agrees(tmp_path):
    model = random_model(small_config(), dtype=torch.float32)
    export_hf(model, tmp_path)
    hf = _load(tmp_path, torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
