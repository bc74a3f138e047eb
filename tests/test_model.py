"""The model's architecture hooks: norms, the end-of-loop hook, the layer's branches."""

from __future__ import annotations

import pytest
import torch

from helpers import random_model, small_config
from speedec.cache import KVCache
from speedec.encdec import EncDecConfig, EncDecLM
from speedec.model import LoopedLM, RMSNorm


def _norm(dim: int = 16) -> RMSNorm:
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(1))
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_in_float32_and_float64_is_the_plain_formula(dtype):
    """The plain formula; decoding in float32 (no gradients) takes the fused op,
    equal to it within float32 rounding and batch-invariant."""
    norm = _norm(37).to(dtype)
    x = torch.randn(5, 37, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.equal(norm(x), expected)  # gradients on: always the plain formula
    with torch.no_grad():
        if dtype == torch.float64:
            assert torch.equal(norm(x), expected)
        else:
            torch.testing.assert_close(norm(x), expected, rtol=2e-6, atol=2e-6)
            assert torch.equal(torch.cat([norm(x[i:i + 1]) for i in range(5)]), norm(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_of_half_inputs_computes_in_float32(dtype):
    norm = _norm().to(dtype)
    # Large values: their squares overflow float16 and lose digits in bfloat16.
    x = (torch.randn(4, 16, generator=torch.Generator().manual_seed(2)) * 300).to(dtype)
    with torch.no_grad():
        y = x.float()
        expected = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.weight
        out = norm(x)
    assert out.dtype == dtype and torch.equal(out, expected) and torch.isfinite(out).all()


def test_reset_parameters_sets_every_norm_to_one():
    lm = LoopedLM(small_config(exit_readout_rank=4))
    ed = EncDecLM(EncDecConfig(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=48,
                               n_encoder_layers=2, n_unique_layers=2, n_loops=3))
    for model in (lm, ed):
        norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
        with torch.no_grad():
            for norm in norms:
                norm.weight.fill_(3.0)
        model.reset_parameters()
        assert norms and all(bool((n.weight == 1).all()) for n in norms)


class _Damped(LoopedLM):
    """A model whose state is scaled after every loop, counting the calls."""

    calls = 0

    def end_of_loop(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return x * 0.5


def test_end_of_loop_runs_after_every_pass_in_training_and_decoding():
    config = small_config(n_loops=3, exit_loop=1)
    plain = random_model(config, seed=4)
    damped = _Damped(config).to(torch.float64)
    damped.load_state_dict(plain.state_dict())
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert not torch.allclose(damped(tokens).logits, plain(tokens).logits)
    _Damped.calls = 0
    with torch.no_grad():
        logits = damped(tokens).logits[0]
    assert _Damped.calls == config.n_loops
    # The engines' path applies it after every pass too, and agrees with the forward.
    cache = KVCache(config, 8, dtype=torch.float64)
    _Damped.calls = 0
    with torch.inference_mode():
        x = damped.run_loops(damped.embed(tokens), damped.layout([list(range(5))], [0]), cache, 3)
        torch.testing.assert_close(damped.head(x[0]), logits, rtol=1e-10, atol=1e-10)
    assert _Damped.calls == config.n_loops


def test_layer_is_its_two_residual_branches():
    model = random_model(small_config(), seed=2)
    layer = model.layers[0]
    x = torch.randn(1, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rope = model.rope[:5].to(x.dtype)
    cos, sin = rope[None, :, 0, None, :], rope[None, :, 1, None, :]

    def attend(q, k, v):  # every row reads only itself: softmax of one score is 1
        return v.repeat_interleave(q.shape[2] // v.shape[2], dim=2).flatten(2)

    with torch.no_grad():
        h = x + layer.attention_branch(x, cos, sin, attend)
        assert torch.equal(layer(x, cos, sin, attend), h + layer.mlp_branch(h))
