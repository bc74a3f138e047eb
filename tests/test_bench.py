"""The benchmark's arithmetic, on a tiny model (no timing assertions)."""

import json

import pytest
import torch
from click.testing import CliRunner

from speedec import PRESETS, LoopedLM
from speedec.bench import measure_bandwidth, run_benchmark
from speedec.bench.report import cost_model_speedup, format_table, write_json, write_plots
from speedec.bench.runner import EngineSpec, RunRecord, _summarise, bytes_per_token, weight_bytes
from speedec.cli import cli
from speedec.engines import generate


@pytest.fixture(scope="module")
def tiny():
    return LoopedLM.random(PRESETS["tiny"], seed=2, std=0.5, residual_scale=5.0)


def test_weight_bytes(tiny):
    c = tiny.config
    per_layer = (4 * c.d_model  # two norms... and below the four matrices
                 + (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * c.d_model
                 + c.d_model * c.n_heads * c.head_dim + 3 * c.ffn_dim * c.d_model) * 4
    per_layer -= 2 * c.d_model * 4  # the norms hold d_model weights each, counted twice above
    layers, head = weight_bytes(tiny)
    assert layers == c.n_unique_layers * per_layer
    assert head == (c.vocab_size * c.d_model + c.d_model) * 4


def test_autoregressive_reads_all_loops_and_head_per_token(tiny):
    layers, head = weight_bytes(tiny)
    prompts = [[1, 2, 3], [4, 5, 6]]
    stats = [generate(tiny, p, 10, engine="autoregressive").stats for p in prompts]
    from speedec.bench.runner import _sum_stats

    total = _sum_stats(stats)
    bpt = bytes_per_token(EngineSpec("autoregressive", "ours", "autoregressive"), tiny, total, 2, 20)
    assert bpt == pytest.approx(tiny.config.n_loops * layers + head)
    hf = bytes_per_token(EngineSpec("hf-generate", "hf", "generate"), tiny, None, 2, 20)
    assert hf == tiny.config.n_loops * layers + head


def test_speed_reads_fewer_bytes_per_token(tiny):
    layers, head = weight_bytes(tiny)
    out = generate(tiny, [1, 2, 3], 30, engine="speed")
    s = out.stats
    bpt = bytes_per_token(EngineSpec("speed", "ours", "speed"), tiny, s, 1, 30)
    expected = (tiny.config.n_loops * layers + head + s.steps * layers + s.lm_head_calls * head) / 30
    assert bpt == pytest.approx(expected)
    assert bpt < tiny.config.n_loops * layers + head


def _record(label, rep, tokens, seconds):
    return RunRecord(label, rep, tokens, seconds, None, [[1] * tokens])


def test_speedup_is_median_of_paired_ratios(tiny):
    records = [
        _record("autoregressive", 0, 100, 10.0), _record("x", 0, 100, 5.0),    # 2.0
        _record("autoregressive", 1, 100, 20.0), _record("x", 1, 100, 5.0),    # 4.0 (noisy rep)
        _record("autoregressive", 2, 100, 10.0), _record("x", 2, 100, 4.0),    # 2.5
    ]
    s = _summarise(EngineSpec("x", "hf", "early-exit"), records, tiny, 1, None)
    assert s.speedup_vs_autoregressive == pytest.approx(2.5)
    assert s.tokens_per_s == pytest.approx(20.0)  # median of 20, 20, 25
    assert (s.tokens_per_s_min, s.tokens_per_s_max) == (20.0, 25.0)
    assert s.ms_per_token == pytest.approx(50.0)
    assert s.matches_autoregressive == 1.0


def test_speedup_over_plain_speed_is_paired_too(tiny):
    records = [
        _record("autoregressive", 0, 100, 10.0), _record("speed", 0, 100, 5.0), _record("v", 0, 100, 4.0),
        _record("autoregressive", 1, 100, 20.0), _record("speed", 1, 100, 10.0), _record("v", 1, 100, 5.0),
        _record("autoregressive", 2, 100, 10.0), _record("speed", 2, 100, 5.0), _record("v", 2, 100, 5.0),
    ]
    s = _summarise(EngineSpec("v", "ours", "speed", {"early_correction": True}), records, tiny, 1, None)
    assert s.speedup_vs_speed == pytest.approx(1.25)  # median of 1.25, 2.0, 1.0
    plain = _summarise(EngineSpec("speed", "ours", "speed"), records, tiny, 1, None)
    assert plain.speedup_vs_speed == pytest.approx(1.0)
    ar = _summarise(EngineSpec("autoregressive", "ours", "autoregressive"), records, tiny, 1, None)
    assert ar.speedup_vs_speed == pytest.approx(0.5)


def test_cost_model_matches_design_example():
    assert cost_model_speedup(0.85, 1, 4) == pytest.approx(4 / (0.85 + 0.15 * 4))
    assert round(cost_model_speedup(0.85, 1, 4), 2) == 2.76
    assert cost_model_speedup(0.0, 1, 4) == 1.0 and cost_model_speedup(1.0, 2, 4) == 2.0


def test_run_benchmark_end_to_end(tiny, tmp_path):
    bw = measure_bandwidth(buffer_mb=16, repeats=1)
    assert bw.read_gbps > 0 and bw.copy_gbps > 0
    specs = [EngineSpec("speed", "ours", "speed"),
             EngineSpec("self-speculative k=2", "ours", "self-speculative", {"draft_tokens": 2})]
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    report = run_benchmark(tiny, specs, prompts, max_new_tokens=12, repeats=2, warmup=0, bandwidth=bw,
                           preset="tiny")
    names = [s.engine for s in report.engines]
    assert names == ["autoregressive", "speed", "self-speculative k=2"]
    for s in report.engines:
        assert s.matches_autoregressive == 1.0
        assert s.floor_ms_per_token == pytest.approx(s.bytes_per_token / (bw.read_gbps * 1e9) * 1e3)
    speed = report.summary("speed")
    direct = [generate(tiny, p, 12, engine="speed").stats for p in prompts]
    verified = sum(d.drafts_accepted + d.drafts_rejected for d in direct)
    assert speed.acceptance == pytest.approx(sum(d.drafts_accepted for d in direct) / verified)
    assert report.summary("autoregressive").steps_per_token == tiny.config.n_loops
    assert "speed" in format_table(report)
    write_json(report, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["engines"][1]["engine"] == "speed" and data["bandwidth"]["copy_gbps"] > 0
    for path in write_plots(report, tmp_path / "plots"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_json(tmp_path):
    torch_threads = torch.get_num_threads()
    out = tmp_path / "b.json"
    result = CliRunner().invoke(cli, ["bench", "--preset", "tiny",
                                      "--engines", "autoregressive,speed,speed+correction+guesses=2+adaptive",
                                      "--repeats", "1", "--warmup", "0", "--prompts", "2",
                                      "--max-new-tokens", "8", "--threads", str(torch_threads),
                                      "--bandwidth-mb", "16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["preset"] == "tiny" and data["bandwidth"]["stream_gbps"] > 0
    from speedec.kernels import active_kernel

    assert data["machine"]["kernel"] == active_kernel()
    assert f"kernel {active_kernel()}" in result.stdout.splitlines()[0]
    for entry in data["engines"]:
        for key in ("engine", "tokens_per_s", "speedup_vs_autoregressive", "speedup_vs_speed", "acceptance",
                    "steps_per_token"):
            assert key in entry
    variant = data["engines"][2]
    assert variant["engine"] == "speed+correction+guesses=2+adaptive" and variant["matches_autoregressive"] == 1.0
    assert variant["speedup_vs_speed"] > 0
    bad = CliRunner().invoke(cli, ["bench", "--preset", "tiny", "--engines", "beam"])
    assert bad.exit_code == 2 and "unknown engine 'beam'" in bad.stderr
    bad = CliRunner().invoke(cli, ["bench", "--preset", "tiny", "--engines", "speed+beam"])
    assert bad.exit_code == 2 and "unknown speed option 'beam'" in bad.stderr
    bad = CliRunner().invoke(cli, ["bench", "--preset", "tiny", "--engines", "speed+guesses=x"])
    assert bad.exit_code == 2 and "guesses must be an integer" in bad.stderr


def test_kernels_cli_times_every_available_kernel():
    from speedec.kernels import available_kernels

    result = CliRunner().invoke(cli, ["kernels", "--preset", "tiny", "--max-rows", "3", "--rounds", "1",
                                      "--repeats", "1", "--threads", str(torch.get_num_threads())])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("active kernel: ")
    assert lines[1].startswith("float paths here: ")  # which paths run, and why
    header = lines[2].split()
    for name in available_kernels():
        assert name in header[1:]
    rows = lines[4:]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    for r in rows:  # (>= 0: a loaded machine's timer can round a tiny step's ratio to 0.00x)
        assert all(float(v.rstrip("x")) >= 0 for v in r.split()[1:])
    bad = CliRunner().invoke(cli, ["kernels", "--preset", "tiny", "--rounds", "0"])
    assert bad.exit_code == 2 and "--rounds must be >= 1" in bad.stderr
    bad = CliRunner().invoke(cli, ["kernels", "--preset", "tiny", "--max-rows", "17"])
    assert bad.exit_code == 2 and "--max-rows must be at most 16" in bad.stderr


# --------------------------------------------------------- the ouro-1.4b-shape preset

OURO_SHAPE = "ouro-1.4b-shape"


def test_ouro_shape_preset_has_ouro_1_4b_shapes():
    from speedec.config import PRESET_RESIDUAL_SCALE

    c = PRESETS[OURO_SHAPE]
    assert (c.d_model, c.n_unique_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size,
            c.n_loops, c.exit_loop) == (2048, 24, 16, 16, 128, 5632, 49152, 4, 1)
    assert c.architecture == "ouro" and c.tie_embeddings is False
    assert (c.rope_theta, c.norm_eps) == (1e6, 1e-6)
    assert 0 < PRESET_RESIDUAL_SCALE[OURO_SHAPE] < 0.1
    # Parameters from the config's arithmetic, checked against the model laid out on
    # the meta device (no memory): about 1.4B, as Ouro-1.4B.
    D, F, V, K = c.d_model, c.ffn_dim, c.vocab_size, c.n_unique_layers
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * D
    per_layer = qkv + c.n_heads * c.head_dim * D + 3 * F * D + 4 * D  # + attn/mlp norms and sandwich norms
    expected = K * per_layer + 2 * V * D + D + (D + 1)  # + embedding, untied head, final norm, exit gate
    with torch.device("meta"):
        skeleton = LoopedLM(c)
    assert sum(p.numel() for p in skeleton.parameters()) == expected
    assert 1.40e9 < expected < 1.47e9
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def _ouro_small(**changes):
    """The ouro-1.4b-shape preset scaled down (same architecture and code path)."""
    base = dict(vocab_size=300, d_model=64, n_heads=4, n_kv_heads=4, ffn_dim=96, n_unique_layers=2,
                max_seq_len=64)
    base.update(changes)
    return PRESETS[OURO_SHAPE].replace(**base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_model_builds_in_the_target_dtype(dtype):
    from speedec.bench.setup import random_model

    config = _ouro_small()
    model = random_model(config, seed=4, residual_scale=0.003, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not model.training and model.dtype == dtype
    assert torch.equal(model.rope, LoopedLM(config).rope)  # the rotary table is rebuilt, not left empty
    # ouro: the scale is the gain of the sandwich norms; the weights are LoopedLM.random's
    # (rounded to bf16: torch draws bf16 normals in float32 and rounds them).
    reference = LoopedLM.random(config, seed=4)
    with torch.no_grad():
        for layer in reference.layers:
            layer.attn_out_norm.weight.fill_(0.003)
            layer.mlp_out_norm.weight.fill_(0.003)
    ref_state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_state[name].to(dtype)), name
    assert model.layers[1].mlp_out_norm.weight[0].item() == pytest.approx(0.003, rel=1e-2)


def test_build_model_presets_keep_their_weights_and_take_a_dtype():
    from speedec.bench.setup import build_model

    model = build_model("tiny", seed=1, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config == PRESETS["tiny"]
    same = LoopedLM.random(PRESETS["tiny"], seed=1).to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    assert build_model("tiny").dtype == torch.float32


def test_bf16_build_never_holds_a_float32_copy():
    from speedec.bench.memory import model_bytes, peak_rss_bytes, reset_peak_rss
    from speedec.bench.setup import random_model

    config = _ouro_small(vocab_size=8192, d_model=512, n_heads=8, n_kv_heads=8, ffn_dim=1408,
                         n_unique_layers=8)  # about 34M parameters: 68 MB bf16, 136 MB float32
    random_model(_ouro_small(), dtype=torch.bfloat16)  # first use loads code pages (~150 MB of RSS)
    if not reset_peak_rss():
        pytest.skip("the peak resident memory cannot be reset here")
    before = peak_rss_bytes()
    model = random_model(config, dtype=torch.bfloat16)
    grown = peak_rss_bytes() - before
    size = model_bytes(model)
    assert size == pytest.approx(2 * sum(p.numel() for p in model.parameters()), rel=0.05)
    assert grown < 1.5 * size  # a float32 build first would add 3x the bf16 size


def test_memory_helpers():
    from speedec.bench.memory import MemoryUse, format_memory, model_bytes, peak_rss_bytes, rss_bytes

    model = LoopedLM.random(PRESETS["tiny"])  # tied embeddings: the shared weight counted once
    params = sum(p.numel() * 4 for p in model.parameters())
    assert model_bytes(model) == params + model.rope.numel() * 8
    assert peak_rss_bytes() >= (rss_bytes() or 0) > 0
    line = format_memory(MemoryUse(model_bytes=5_738_000_000, build_peak_rss_bytes=5_900_000_000,
                                   decode_peak_rss_bytes=6_100_000_000, decode_peak_is_reset=True), "float32")
    assert line == "memory: model 5.74 GB (float32); peak RSS 5.90 GB while building, 6.10 GB while decoding"
    line = format_memory(MemoryUse(model_bytes=151_000, build_peak_rss_bytes=None,
                                   decode_peak_rss_bytes=330_000_000, decode_peak_is_reset=False), "bfloat16")
    assert line == ("memory: model 0.2 MB (bfloat16); peak RSS 330.0 MB while decoding "
                    "(the process's peak: it could not be reset)")


def test_ouro_shape_preset_defaults_to_autoregressive_and_speed():
    from speedec.cli.bench import DEFAULT_ENGINES, bench_rows, default_engines

    assert default_engines(OURO_SHAPE, None) == "autoregressive,speed"
    assert default_engines("membound", None) == DEFAULT_ENGINES
    specs, _ = bench_rows(default_engines(OURO_SHAPE, None), "1")
    assert [s.label for s in specs] == ["autoregressive", "speed"]
    help_text = CliRunner().invoke(cli, ["bench", "--help"]).output
    assert OURO_SHAPE in help_text and "--dtype" in help_text


def test_bench_cli_bf16_reports_memory(tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(cli, ["bench", "--preset", "tiny", "--dtype", "bfloat16", "--engines",
                                      "autoregressive,speed", "--repeats", "1", "--warmup", "0",
                                      "--prompts", "1", "--max-new-tokens", "6", "--threads",
                                      str(torch.get_num_threads()), "--bandwidth-mb", "16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["dtype"] == "bfloat16"
    memory = data["memory"]
    assert memory["model_bytes"] > 0 and memory["decode_peak_rss_bytes"] > 0
    assert memory["build_peak_rss_bytes"] > 0
    assert [e["engine"] for e in data["engines"]][:2] == ["autoregressive", "speed"]
    assert "memory: model " in result.stdout and "while decoding" in result.stdout


# --------------------------------------------------- the nanbeige-4.2-3b-shape preset

NANBEIGE_SHAPE = "nanbeige-4.2-3b-shape"


def test_nanbeige_shape_preset_has_nanbeige_4_2_3b_shapes():
    """Its config (never built here: 16.7 GB float32): Nanbeige4.2-3B's shapes, the
    parameter count from the model laid out on the meta device."""
    from speedec.config import PRESET_RESIDUAL_SCALE

    c = PRESETS[NANBEIGE_SHAPE]
    assert (c.vocab_size, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.n_unique_layers,
            c.n_loops, c.exit_loop) == (166144, 3072, 48, 8, 128, 10752, 22, 2, 1)
    assert c.attention_head_dim == 128 and c.n_heads * c.head_dim != c.d_model  # q and o are not square
    assert c.architecture == "nanbeige" and c.skip_loop_final_norm is False and c.loop_norm
    assert c.tie_embeddings is False and c.max_seq_len == 4096
    assert (c.rope_theta, c.norm_eps) == (7e7, 1e-5)
    assert 0 < PRESET_RESIDUAL_SCALE[NANBEIGE_SHAPE] < 1
    D, F, V, K, hd = c.d_model, c.ffn_dim, c.vocab_size, c.n_unique_layers, c.head_dim
    per_layer = (c.n_heads + 2 * c.n_kv_heads) * hd * D + c.n_heads * hd * D + 3 * F * D + 2 * D
    expected = K * per_layer + 2 * V * D + D  # + embedding, untied head, final norm
    with torch.device("meta"):
        skeleton = LoopedLM(c)
    assert sum(p.numel() for p in skeleton.parameters()) == expected
    assert 4.1e9 < expected < 4.2e9


def _nanbeige_small(**changes):
    """The nanbeige-4.2-3b-shape preset scaled down (same architecture and code path:
    heads wider than d_model / n_heads, GQA, the loop norm)."""
    base = dict(vocab_size=300, d_model=64, n_heads=4, n_kv_heads=2, attention_head_dim=32, ffn_dim=96,
                n_unique_layers=2, max_seq_len=64)
    base.update(changes)
    return PRESETS[NANBEIGE_SHAPE].replace(**base)


@pytest.fixture
def small_nanbeige_preset(monkeypatch):
    """The small nanbeige shape registered as a preset, with a scale of its own."""
    from speedec.config import PRESET_RESIDUAL_SCALE

    monkeypatch.setitem(PRESETS, "nanbeige-small", _nanbeige_small())
    monkeypatch.setitem(PRESET_RESIDUAL_SCALE, "nanbeige-small", 0.5)
    return "nanbeige-small"


def test_nanbeige_builds_in_bf16_as_looped_lm_random(small_nanbeige_preset):
    from speedec.bench.setup import build_model

    model = build_model(small_nanbeige_preset, seed=3, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config.loop_norm
    reference = LoopedLM.random(PRESETS[small_nanbeige_preset], seed=3, residual_scale=0.5)
    assert torch.equal(model.rope, reference.rope)  # the constructor's rotary table (float32 for nanbeige)
    ref_state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_state[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("preset_name", ["tiny", "membound", "nanbeige-small"])
def test_int8_build_is_the_quantized_float32_model_without_it(preset_name, small_nanbeige_preset, monkeypatch):
    """build_model(dtype=int8) draws each 8-bit matrix in float32 and quantizes it at once:
    the same model, bit for bit (so the same tokens), as quantize_model of the float32
    model, which it never makes (tiny: tied head; membound, nanbeige: untied)."""
    import speedec.bench.setup as setup
    from speedec.quant import quantize_model

    expected = quantize_model(setup.build_model(preset_name, seed=2))
    real_random_model = setup.random_model

    def no_float_model(*args, **kwargs):
        raise AssertionError("the int8 build made the float model")

    monkeypatch.setattr(setup, "random_model", no_float_model)
    model = setup.build_model(preset_name, seed=2, dtype=torch.int8)
    monkeypatch.setattr(setup, "random_model", real_random_model)
    assert model.config == expected.config and model.config.quantization == "q8_0"
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert torch.equal(model.rope, expected.rope)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    if preset_name != "membound":  # (membound's 100M parameters: the weights' equality says it)
        prompt = [5, 9, 2, 7]
        assert (generate(model, prompt, 8, engine="autoregressive").tokens
                == generate(expected, prompt, 8, engine="autoregressive").tokens)


def _q8_0_float64_rounding(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q8_0 with C's roundf written out in float64 (where |x| + 0.5 is exact)."""
    blocks = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = blocks.abs().amax(-1)
    d = amax / torch.full_like(amax, 127.0)
    inv = torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))
    scaled = (blocks * inv[..., None]).double()
    qs = (scaled.sign() * (scaled.abs() + 0.5).floor()).clamp(-127, 127)
    return qs.to(torch.int8).reshape(w.shape), d.half()


def test_fast_q8_0_quantization_is_the_reference_bit_for_bit():
    """quantize_q8_0 (float32 alone, as the build uses it) against roundf in float64: random
    blocks at several magnitudes, exact ties (x.5 rounds away from zero), zero blocks and
    values a float32 step below a tie."""
    from speedec.q8_kernels import quantize_q8_0

    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(64, 96, generator=g) * 10.0 ** e for e in range(-4, 3)])
    ties = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 126.5, -126.5, 1.4999999, 0.49999997, -0.49999997] * 3
                        + [0.0, 64.5])
    w = torch.cat([w, torch.stack([ties, torch.zeros(32), -ties])[:, :32].repeat(1, 3)])
    qs, d = _q8_0_float64_rounding(w)
    fast_qs, fast_d = quantize_q8_0(w)
    assert torch.equal(fast_qs, qs) and torch.equal(fast_d, d)
    assert qs[-3, 1:4].tolist() == [3, -4, 1]  # d = 1: the ties themselves


def test_nanbeige_shape_preset_defaults_to_autoregressive_and_speed():
    from speedec.cli.bench import bench_rows, default_engines

    assert default_engines(NANBEIGE_SHAPE, None) == "autoregressive,speed"
    specs, _ = bench_rows(default_engines(NANBEIGE_SHAPE, None), "1")
    assert [s.label for s in specs] == ["autoregressive", "speed"]
    assert NANBEIGE_SHAPE in CliRunner().invoke(cli, ["bench", "--help"]).output


def test_peer_rows_by_architecture():
    """transformers' peers only for llama models; llama.cpp's for what GGUF holds (llama,
    nanbeige in llama.cpp's nanbeige architecture), not ouro."""
    from speedec.cli.bench import peer_rows

    specs = [EngineSpec("autoregressive", "ours", "autoregressive"), EngineSpec("hf-generate", "hf", "generate"),
             EngineSpec("llamacpp-f16", "llamacpp", "f16")]
    llama = LoopedLM.random(PRESETS["tiny"])
    assert peer_rows(llama, specs) == (specs, [])
    kept, notes = peer_rows(LoopedLM.random(_nanbeige_small()), specs)
    assert [s.label for s in kept] == ["autoregressive", "llamacpp-f16"]
    assert notes == ["the Hugging Face peers are transformers Llama exports: skipped for a nanbeige model"]
    kept, notes = peer_rows(LoopedLM.random(_ouro_small()), specs)
    assert [s.label for s in kept] == ["autoregressive"]
    assert len(notes) == 2 and "ouro model" in notes[1]


def test_rows_report_their_model_bytes_and_peak_rss(tiny):
    from speedec.bench.memory import model_bytes, reset_peak_rss

    report = run_benchmark(tiny, [EngineSpec("speed", "ours", "speed")], [[1, 2, 3]], max_new_tokens=6,
                           repeats=2, warmup=0)
    for row in report.engines:
        assert row.model_bytes == model_bytes(tiny)
        if reset_peak_rss():
            assert row.peak_rss_bytes >= report.memory.model_bytes
            assert row.peak_rss_bytes <= report.memory.decode_peak_rss_bytes
    table = format_table(report)
    assert "peak RSS" in table.splitlines()[4] and "note: model: the weights a row decodes with" in table


def test_llamacpp_peers_check_the_disk_first(monkeypatch, tmp_path):
    import shutil

    import speedec.bench.llamacpp as peer
    from speedec.errors import SpeedecError

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(peer.shutil, "disk_usage", lambda path: usage._replace(free=10**9))
    peer.check_disk(tmp_path, 10**8)  # 0.1 GB of files, 1 GB free: enough
    with pytest.raises(SpeedecError, match=r"need 2.0 GB of GGUF files but .* has 1.0 GB free; point TMPDIR"):
        peer.check_disk(tmp_path, 2 * 10**9)


def test_bench_runs_llamacpp_on_a_nanbeige_model(tmp_path, monkeypatch, small_nanbeige_preset):
    """Where llama.cpp is installed: a nanbeige model's llama.cpp rows run its nanbeige-arch
    GGUF in a worker process; the transformers rows are dropped with a note; every row has
    its model bytes and peak RSS; the GGUF files are deleted. (That llama.cpp's tokens on
    the f32 export are ours is test_gguf's, with the decisions' margins asserted: this
    preset's std-0.02 random weights make near-ties, so it is not asserted here.)"""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "b.json"
    result = CliRunner().invoke(cli, ["bench", "--preset", small_nanbeige_preset, "--engines",
                                      "autoregressive,speed,hf-generate,llamacpp-f32,llamacpp-q8_0",
                                      "--repeats", "1", "--warmup", "0", "--prompts", "2", "--prompt-len", "4",
                                      "--max-new-tokens", "6", "--threads", "1", "--bandwidth-mb", "8",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = {e["engine"]: e for e in data["engines"]}
    assert list(rows) == ["autoregressive", "speed", "llamacpp-f32", "llamacpp-q8_0"]
    assert rows["llamacpp-f32"]["matches_autoregressive"] is not None
    for row in rows.values():
        assert row["model_bytes"] > 0 and row["peak_rss_bytes"] > 0
    assert rows["llamacpp-q8_0"]["model_bytes"] < rows["llamacpp-f32"]["model_bytes"]
    assert data["residual_scale"] == 0.5
    assert "Hugging Face peers are transformers Llama exports: skipped for a nanbeige model" in result.stdout
    assert "model-f32.gguf" in result.stdout
    assert list(scratch.iterdir()) == []  # the GGUF files are gone


def test_llamacpp_worker_death_is_an_error(tmp_path):
    """Where llama.cpp is installed: a worker that ended is reported, not waited on."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from speedec.bench.llamacpp import load_llamacpp_peers
    from speedec.errors import SpeedecError

    model = LoopedLM.random(_nanbeige_small(), seed=1)
    with load_llamacpp_peers(model, ["f32"], threads=1) as peers:
        peer = peers["f32"]
        tokens, seconds, _ = peer.run([1, 2, 3], 4)
        assert len(tokens) == 4 and seconds > 0 and peer.peak_rss_bytes > peer.file_bytes
        directory = peer.path.parent
        peer._process.kill()
        peer._process.wait()
        with pytest.raises(SpeedecError, match="llama.cpp worker for model-f32.gguf ended"):
            peer.run([1, 2, 3], 4)
    assert not directory.exists()
