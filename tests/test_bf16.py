"""bfloat16 weights: the few-row kernel's bf16 path (accuracy, batch invariance,
fallback), a bf16 model under every engine (the bf16 near-tie rule of
docs/design.md section 5), and the dtype a checkpoint loads in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import test_kernels
from helpers import random_model, small_config
from speedec import LoopedLM, kernels
from speedec.cli import cli
from speedec.engines import ENGINES, generate

HAS_AVX2 = test_kernels.HAS_AVX2
kernel = test_kernels.kernel  # the fixture that selects SPEEDEC_KERNEL for one test
FIXTURE = Path(__file__).parent / "data" / "ouro-tiny"
# The bf16 near-tie rule: with bf16 weights an engine may leave plain decoding only
# where plain decoding's top two logits are within BF16_TIE of the top logit's size
# (8 units of bf16's rounding, 2^-8 relative: a few roundings of the state through
# the layers). Measured: on 20 random models x 60 tokens with the AVX2, F.linear and
# W @ x.T kernels, speed and self-speculative never left plain decoding at all.
BF16_TIE = 8 * 2.0 ** -8


@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2")
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13])
@pytest.mark.parametrize("k_dim,n_out", [(64, 96), (1003, 77), (16, 1)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_kernel_matches_float32_of_the_same_weights_and_is_batch_invariant(rows, k_dim, n_out, x_dtype):
    assert kernels.avx2_kernel_available(), kernels._AVX2_ERROR
    gen = torch.Generator().manual_seed(rows * 1000 + k_dim)
    x = torch.randn(rows, k_dim, generator=gen).to(x_dtype)
    w = torch.randn(n_out, k_dim, generator=gen).bfloat16()
    out = torch.ops.speedec_kernels.few_rows_linear(x, w)
    assert out.shape == (rows, n_out) and out.dtype == x_dtype
    # The reference: the same bf16 weights (and rows) widened to float32, exact in float64;
    # the kernel differs only by float32 accumulation (and the final rounding to x's dtype).
    exact = x.double() @ w.double().T
    if x_dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4 * k_dim ** 0.5)
        # The float32 path on the widened weights gives the same bits: one arithmetic.
        assert torch.equal(out, torch.ops.speedec_kernels.few_rows_linear(x, w.float()))
    else:
        assert torch.equal(out, torch.ops.speedec_kernels.few_rows_linear(x.float(), w.float()).bfloat16())
        torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-4 * k_dim ** 0.5)
    alone = torch.cat([torch.ops.speedec_kernels.few_rows_linear(x[i:i + 1], w) for i in range(rows)])
    assert torch.equal(out, alone)


@pytest.mark.parametrize("name", ["avx2", "onednn", "torch", "auto"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_linear_with_bf16_weights_under_every_kernel(kernel, name, x_dtype):
    if name == "avx2" and not HAS_AVX2:
        pytest.skip("the CPU has no AVX2")
    if name == "onednn" and not kernels._ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN linear")
    kernel(name)
    x = torch.randn(2, 3, 40).to(x_dtype)
    w = torch.randn(24, 40).bfloat16()
    with torch.inference_mode():
        out = kernels.linear(x, w)
    assert out.shape == (2, 3, 24) and out.dtype == x_dtype
    exact = (x.double() @ w.double().T)
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -7, atol=0.05)


def _top2(model, ids) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1]), float(top[0].abs())


@pytest.mark.parametrize("seed", range(4))
def test_bf16_model_generates_with_every_engine_within_the_near_tie_rule(kernel, seed):
    kernel("auto")
    config = small_config(vocab_size=64, n_loops=4, exit_loop=1)
    model = random_model(config, seed=seed, std=0.7, residual_scale=4.0, dtype=torch.bfloat16)
    kernels.prepare_kernel(model)
    prompt = list(range(1, 9))
    ref = generate(model, prompt, 40, engine="autoregressive").tokens
    assert len(set(ref)) > 3  # a real sequence, not one repeated token
    for engine in ENGINES:
        out = generate(model, prompt, 40, engine=engine).tokens
        for i, (a, b) in enumerate(zip(ref, out)):
            if a != b:
                gap, size = _top2(model, prompt + ref[:i])
                assert gap <= BF16_TIE * max(size, 1.0), (
                    f"{engine}: divergence at token {i} with a top-2 gap of {gap} (top logit {size})")
                break
        else:
            assert out == ref, engine


def _bf16_checkpoint(tmp_path: Path) -> Path:
    """tests/data/ouro-tiny with its tensors (and config dtype) in bfloat16."""
    directory = tmp_path / "ouro-bf16"
    shutil.copytree(FIXTURE, directory)
    tensors = {name: t.bfloat16() if t.is_floating_point() else t
               for name, t in load_file(str(FIXTURE / "model.safetensors")).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_imported_bf16_checkpoint_loads_in_bf16_by_default(tmp_path):
    directory = _bf16_checkpoint(tmp_path)
    model = LoopedLM.from_pretrained(directory)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = LoopedLM.from_pretrained(directory, dtype=torch.float32)
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        if name != "rope":
            assert torch.equal(a.float(), b), name  # the same values, bf16 exactly widened
    assert LoopedLM.from_pretrained(FIXTURE).dtype == torch.float32  # a float32 checkpoint stays float32
    ids = generate(model, [1, 2, 3, 4], 6, engine="speed").tokens
    assert ids == generate(model, [1, 2, 3, 4], 6, engine="autoregressive").tokens


def test_cli_dtype_default_is_the_checkpoints(tmp_path, monkeypatch):
    import speedec.cli.common as common

    seen = []
    real = common.LoopedLM.from_pretrained

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append(model.dtype)
        return model

    monkeypatch.setattr(common.LoopedLM, "from_pretrained", spy)
    directory = _bf16_checkpoint(tmp_path)
    runner = CliRunner()
    for extra, expected in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        result = runner.invoke(cli, ["generate", "--model", str(directory), "--prompt-ids", "1,2,3",
                                     "--max-new-tokens", "3", *extra])
        assert result.exit_code == 0, result.output
        assert seen[-1] == expected
    own = tmp_path / "own"
    random_model(small_config(), dtype=torch.float32).save_pretrained(own)
    result = runner.invoke(cli, ["generate", "--model", str(own), "--prompt-ids", "1,2,3",
                                 "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == torch.float32


def test_kernels_command_times_the_bf16_path(tmp_path):
    result = CliRunner().invoke(cli, ["kernels", "--preset", "tiny", "--dtype", "bfloat16", "--max-rows", "2",
                                      "--rounds", "1", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "weights bfloat16" in result.output and "rows" in result.output
