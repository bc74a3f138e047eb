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
    header = lines[1].split()
    for name in available_kernels():
        assert name in header[1:]
    rows = lines[3:]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    for r in rows:
        assert all(float(v.rstrip("x")) > 0 for v in r.split()[1:])
    bad = CliRunner().invoke(cli, ["kernels", "--preset", "tiny", "--rounds", "0"])
    assert bad.exit_code == 2 and "--rounds must be >= 1" in bad.stderr
    bad = CliRunner().invoke(cli, ["kernels", "--preset", "tiny", "--max-rows", "17"])
    assert bad.exit_code == 2 and "--max-rows must be at most 16" in bad.stderr
