"""8-bit (q8_0) models: quantizing, saving and loading, the engines' exactness on them,
the server under load, GGUF export of their own blocks, and the errors users get."""

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import random_model, serve_requests, small_config
from speedec import generate
from speedec.cli import cli
from speedec.config import ModelConfig
from speedec.errors import ConfigError, ModelLoadError
from speedec.model import LoopedLM
from speedec.q8_kernels import dequantize_q8_0, quantize_q8_0, usable_paths
from speedec.quant import Q8Embedding, Q8Weight, q8_path, quantize_model, set_q8_path

OURO = Path(__file__).parent / "data" / "ouro-tiny"
# Every 8-bit product path this host runs, and the PyTorch reference.
PATHS = [*usable_paths(), "torch"]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _float_model(**overrides):
    fields = dict(vocab_size=96, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=96, n_loops=4, exit_loop=1,
                  max_seq_len=160)
    fields.update(overrides)
    return random_model(small_config(**fields), seed=3, std=0.5, residual_scale=4.0, dtype=torch.float32)


@pytest.fixture(scope="module")
def q8_model():
    return quantize_model(_float_model())


def test_quantized_model_holds_8_bit_weights(q8_model):
    float_model = _float_model()
    assert q8_model.config.quantization == "q8_0" and q8_model.dtype == torch.float32
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        weight = getattr(q8_model.layers[0], name)
        assert isinstance(weight, Q8Weight) and weight.qs.dtype == torch.int8 and weight.d.dtype == torch.float16
        original = getattr(float_model.layers[0], name).detach()
        # Rounded to nearest with the float32 scale, stored with the float16 one (q8_0's
        # rule): within half a step, plus at most 127 values times the scale's rounding.
        step = weight.d.float().repeat_interleave(32, dim=1)
        assert ((weight.dequantize() - original).abs() <= step * (0.5 + 127 / 2048) + 1e-7).all()
    assert isinstance(q8_model.lm_head, Q8Weight)  # tied in the float model: a quantized copy
    # The embedding is 8-bit too (as in llama.cpp's q8_0 files): its rows are the float rows' blocks.
    assert isinstance(q8_model.embed, Q8Embedding)
    ids = torch.tensor([[0, 5, 95, 5]])
    rows = Q8Weight.from_float(float_model.embed.weight).dequantize()[ids]
    assert q8_model.embed(ids).dtype == torch.float32 and torch.equal(q8_model.embed(ids), rows)
    assert torch.equal(q8_model.layers[0].attn_norm.weight, float_model.layers[0].attn_norm.weight)


def test_weight_quantization_matches_the_q8_0_rule():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    w[3, :32] = 0.0  # an all-zero block: scale 0, values 0
    qs, d = quantize_q8_0(w)
    amax = w.abs().reshape(8, 2, 32).amax(-1)
    assert torch.equal(d, (amax / 127).to(torch.float16))
    assert qs.abs().max() <= 127 and (qs[3, :32] == 0).all()
    assert torch.equal(dequantize_q8_0(qs, d), qs.float() * d.float().repeat_interleave(32, dim=1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("engine,options", [("speed", {}), ("speed", {"early_correction": True}),
                                            ("speed", {"guesses": 2}), ("self-speculative", {"draft_tokens": 3})])
def test_engines_equal_int8_autoregressive_bit_for_bit(q8_model, path, engine, options):
    """Batch-invariant 8-bit products: every engine's tokens equal the int8 autoregressive
    engine's on every kernel path, on several prompts."""
    set_q8_path(q8_model, path)
    try:
        for seed in range(3):
            prompt = torch.randint(0, 96, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
            ref = generate(q8_model, prompt, 40, engine="autoregressive")
            got = generate(q8_model, prompt, 40, engine=engine, **options)
            assert got.tokens == ref.tokens
            if engine == "speed":
                assert got.stats.drafts_launched > 0
    finally:
        set_q8_path(q8_model, None)


def test_a_row_gets_the_same_product_alone_and_in_a_prefill_chunk(q8_model):
    """Prefill runs its rows through the 8-bit products in chunks of the few-row kernel:
    every row's product equals that row's product alone. (Logits of a prefilled position
    are not compared with a decoded one: prefill's attention is PyTorch's batched path,
    decoding's the fused one-row kernel, and the two may round differently; engines
    prefill alike and decode one row per group, so they stay equal.)"""
    weight = q8_model.layers[0].wqkv
    rows = torch.randn(1, 39, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole = weight(rows)[0]
        alone = torch.cat([weight(rows[:, i:i + 1])[0] for i in range(39)])
    assert torch.equal(whole, alone)


def test_int8_products_are_close_to_the_float_ones(q8_model):
    """Not an exactness claim (8-bit weights change the model): each 8-bit product is
    within 2% (relative Frobenius error) of the float32 weights' product."""
    float_model = _float_model()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for name in ("wqkv", "w_gate_up"):
            exact = x @ getattr(float_model.layers[1], name).T
            got = getattr(q8_model.layers[1], name)(x)
            assert float((got - exact).norm() / exact.norm()) < 0.02, name


def test_server_is_exact_under_load_on_int8(q8_model):
    import random

    from speedec.serve.requests import ServeRequest

    prompts = [[random.Random(i).randrange(96) for _ in range(1 + i % 9)] for i in range(8)]
    results, metrics = serve_requests(q8_model, [ServeRequest(p, 30) for p in prompts], concurrency=8,
                                      max_rows=6, step_costs=[1.0] * 16)
    for prompt, got in zip(prompts, results):
        assert got == generate(q8_model, prompt, 30, engine="autoregressive").tokens
    assert metrics["rows_total"] / metrics["steps_total"] > 1.5


def test_quantize_command_round_trip_and_generate(tmp_path):
    model = _float_model()
    model.save_pretrained(tmp_path / "float")
    code, out, err = run("quantize", tmp_path / "float", tmp_path / "q8")
    assert code == 0, err
    assert "q8_0" in out
    loaded = LoopedLM.from_pretrained(tmp_path / "q8")
    direct = quantize_model(model)
    assert loaded.config == direct.config and loaded.config.quantization == "q8_0"
    for (name, a), (_, b) in zip(loaded.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "q8" / "model.safetensors").stat().st_size < 0.5 * (
        tmp_path / "float" / "model.safetensors").stat().st_size
    # every command loads it as it is; --dtype int8 on the float model gives the same tokens
    code, out_q8, err = run("generate", "--model", tmp_path / "q8", "--prompt-ids", "1,2,3", "--max-new-tokens", 8)
    assert code == 0, err
    code, out_flag, err = run("generate", "--model", tmp_path / "float", "--dtype", "int8", "--prompt-ids", "1,2,3",
                              "--max-new-tokens", 8)
    assert code == 0, err
    assert out_q8 == out_flag
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_quantize_refusals_are_one_line(tmp_path):
    model = _float_model()
    model.save_pretrained(tmp_path / "float")
    assert run("quantize", tmp_path / "float", tmp_path / "q8")[0] == 0
    code, _, err = run("quantize", tmp_path / "q8", tmp_path / "again")
    assert code == 2 and "already quantized" in err and err.count("\n") == 1
    assert not (tmp_path / "again").exists()
    code, _, err = run("quantize", tmp_path / "float", tmp_path / "q8")
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    code, _, err = run("quantize", tmp_path / "float", tmp_path / "x", "--dtype", "int4")
    assert code == 2 and "int4" in err and err.count("\n") == 1
    code, _, err = run("generate", "--model", tmp_path / "float", "--dtype", "int3", "--prompt-ids", "1")
    assert code == 2 and "int3" in err and err.count("\n") == 1


def test_an_interrupted_quantize_leaves_nothing(tmp_path, monkeypatch):
    from speedec import storage

    _float_model().save_pretrained(tmp_path / "float")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "save_file", broken)
    code, _, err = run("quantize", tmp_path / "float", tmp_path / "q8")
    assert code == 2 and "No space left" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]


@pytest.mark.parametrize("corrupt,match", [
    (lambda t: t.__setitem__("layers.0.wo.d", torch.full_like(t["layers.0.wo.d"], float("nan"))),
     "layers.0.wo.d .*non-finite"),
    (lambda t: t.__setitem__("layers.1.wqkv.d", t["layers.1.wqkv.d"].float()), "layers.1.wqkv.d is float32"),
    (lambda t: t.__setitem__("lm_head.qs", t["lm_head.qs"].to(torch.int16)), "lm_head.qs is int16"),
    (lambda t: t["layers.0.w_down.qs"].view(-1).__setitem__(0, -128), "-128"),
    (lambda t: t.__setitem__("layers.0.w_down.d", t["layers.0.w_down.d"][:, :1].contiguous()), "shape"),
])
def test_a_corrupt_quantized_checkpoint_is_refused(tmp_path, corrupt, match):
    from safetensors.torch import load_file, save_file

    _float_model().save_pretrained(tmp_path / "float")
    assert run("quantize", tmp_path / "float", tmp_path / "q8")[0] == 0
    path = tmp_path / "q8" / "model.safetensors"
    tensors = load_file(str(path))
    corrupt(tensors)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ModelLoadError, match=match):
        LoopedLM.from_pretrained(tmp_path / "q8")
    code, _, err = run("generate", "--model", tmp_path / "q8", "--prompt-ids", "1")
    assert code == 2 and err.count("\n") == 1


def test_config_validates_quantization():
    base = dict(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=96, n_unique_layers=2, n_loops=2)
    ModelConfig(**base, quantization="q8_0")
    with pytest.raises(ConfigError, match="quantization must be one of q8_0"):
        ModelConfig(**base, quantization="q4_0")
    assert "quantization" not in ModelConfig(**base).to_dict()  # float models' files unchanged


def test_loading_a_quantized_model_in_another_float_dtype_is_refused(tmp_path):
    quantize_model(_float_model()).save_pretrained(tmp_path / "q8")
    with pytest.raises(ModelLoadError, match="q8_0 weights.*not bfloat16"):
        LoopedLM.from_pretrained(tmp_path / "q8", dtype=torch.bfloat16)
    assert LoopedLM.from_pretrained(tmp_path / "q8", dtype=torch.int8).config.quantization == "q8_0"


def test_training_a_quantized_model_is_refused(q8_model):
    tokens = torch.randint(0, 96, (1, 8))
    norm = q8_model.layers[0].attn_norm.weight  # (the 8-bit embedding has no gradient to ask for)
    norm.requires_grad_(True)
    try:
        with pytest.raises(ConfigError, match="for inference"):
            q8_model(tokens).logits.sum().backward()
    finally:
        norm.requires_grad_(False)


def test_ouro_checkpoint_at_int8_is_exact_across_engines():
    model = LoopedLM.from_pretrained(OURO, dtype=torch.int8)
    assert model.config.architecture == "ouro" and model.config.quantization == "q8_0"
    prompt = [5, 9, 2, 7, 1]
    ref = generate(model, prompt, 24, engine="autoregressive")
    assert generate(model, prompt, 24, engine="speed").tokens == ref.tokens
    assert generate(model, prompt, 24, engine="self-speculative", draft_tokens=2).tokens == ref.tokens


def test_kernel_path_is_chosen_per_model(q8_model):
    from speedec.kernels import prepare_kernel

    prepare_kernel(q8_model)
    assert q8_path(q8_model) == (usable_paths() or ["torch"])[0]
    set_q8_path(q8_model, None)


# ---------------------------------------------------------------------------- GGUF

gguf = pytest.importorskip("gguf")


def test_gguf_q8_0_export_writes_the_models_own_blocks(tmp_path):
    """No second rounding: every 8-bit tensor of the GGUF holds our values and scales
    (rows reordered for ggml's rotary layout, blocks intact)."""
    from speedec.gguf_export import GGUFLlamaConversion, export_gguf, q8_gguf_tensors, split_rope_rows

    model = quantize_model(_float_model(tie_embeddings=False))
    out = export_gguf(model, tmp_path / "m.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    _, values, scales = q8_gguf_tensors(model)
    assert set(values) <= set(tensors) and "output.weight" in values and "blk.7.ffn_down.weight" in values
    for name in values:
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        raw = np.asarray(t.data).reshape(values[name].shape[0], -1, 34)
        assert np.array_equal(raw[..., :2].copy().view(np.float16)[..., 0], scales[name].numpy()), name
        assert np.array_equal(raw[..., 2:].copy().view(np.int8), values[name].numpy().reshape(raw.shape[0], -1, 32))
    # and the values are the model's: layer 1's q projection, back in our row order
    heads = GGUFLlamaConversion.rope_rows["attn_q.weight"](model.config)
    q_rows = model.config.n_heads * model.config.head_dim
    ours = model.layers[1].wqkv.dequantize()[:q_rows]
    theirs = gguf.quants.dequantize(tensors["blk.1.attn_q.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    theirs = split_rope_rows(torch.from_numpy(np.asarray(theirs, dtype=np.float32)).reshape(ours.shape), heads)
    assert torch.equal(ours, theirs)


def test_gguf_export_of_a_quantized_model_needs_q8_0(tmp_path):
    from speedec.gguf_export import export_gguf

    with pytest.raises(ConfigError, match="q8_0"):
        export_gguf(quantize_model(_float_model()), tmp_path / "m.gguf", dtype="f16")


def test_input_widths_that_are_not_whole_blocks_are_padded_exactly():
    """d_model 48 and ffn_dim 80 (not multiples of 32): zero-padded to whole blocks, the
    product is that of the real columns; every engine still equals autoregressive."""
    from speedec.q8_kernels import quantize_rows

    float_model = _float_model(d_model=48, n_heads=4, ffn_dim=80)
    model = quantize_model(float_model)
    down = model.layers[0].w_down
    assert down.shape == (48, 80) and down.qs.shape == (48, 96) and (down.qs[:, 80:] == 0).all()
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(1))
    # the 8-bit product by hand: rows quantized per block (the last one padded), exact block sums
    xq, dx = quantize_rows(torch.nn.functional.pad(x, (0, 16)))
    sums = (xq.double().reshape(3, 1, 3, 32) * down.qs.double().reshape(1, 48, 3, 32)).sum(-1)  # [3, 48, 3]
    expected = (sums * dx.double()[:, None, :] * down.d.double()[None]).sum(-1)
    with torch.inference_mode():
        got = down(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(down.dequantize(), down.dequantize()[:, :80])
    prompt = [3, 1, 4, 1, 5]
    ref = generate(model, prompt, 30, engine="autoregressive").tokens
    assert generate(model, prompt, 30, engine="speed").tokens == ref
    assert generate(model, prompt, 30, engine="self-speculative", draft_tokens=2).tokens == ref


def test_gguf_writes_padded_matrices_as_their_float_values(tmp_path):
    from speedec.gguf_export import export_gguf

    model = quantize_model(_float_model(d_model=64, ffn_dim=80))
    reader = gguf.GGUFReader(str(export_gguf(model, tmp_path / "m.gguf", dtype="q8_0", looped=True)))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.ffn_down.weight"] == "F32" and kinds["blk.0.ffn_gate.weight"] == "Q8_0"
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert torch.equal(torch.from_numpy(np.array(down.data)).reshape(64, 80), model.layers[1].w_down.dequantize())


def test_kernels_and_bench_commands_at_int8():
    code, out, err = run("kernels", "--preset", "tiny", "--dtype", "int8", "--max-rows", 2, "--rounds", 1,
                         "--repeats", 1, "--threads", 1)
    assert code == 0, err
    assert "instruction sets: avx2" in out and "q8_0 path: " in out and "float paths here: " in out
    assert f"{PATHS[0]} ms" in out
    code, out, err = run("bench", "--preset", "tiny", "--dtype", "int8", "--engines", "autoregressive,speed",
                         "--repeats", 1, "--prompts", 1, "--max-new-tokens", 6, "--warmup", 0, "--threads", 1,
                         "--bandwidth-mb", 8)
    assert code == 0, err
    assert ", q8_0, 1 threads" in out and f"(q8_0: {PATHS[0]})" in out and "cpu " in out
