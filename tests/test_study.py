"""The depth study: paired latency ratios, and the CLI on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import random_model, small_config
from speedec.bench.study import StudyEntry, format_study, run_study
from speedec.cli import cli

SAMPLE = Path(__file__).parent / "data" / "english_sample.txt"


def _entry(label, loops, engines, times, counts=None):
    """An entry whose runs take the given seconds, in call order (warm-up included)."""
    calls = iter(times)

    def run(engine):
        return next(calls), 10, counts or {"steps": 0, "after_first": 0, "accepted": 0, "verified": 0}
    return StudyEntry(label, loops, engines, run, {"ppl": 10.0 * loops})


def test_latency_is_paired_against_the_first_autoregressive_run():
    # one engine per entry; rotation alternates who runs first but each entry sees its own sequence
    base = _entry("L=1", 1, ("autoregressive",), [9.0, 1.0, 2.0, 1.0])  # warm-up, then 3 repeats
    deep = _entry("L=4", 4, ("speed",), [9.0, 1.5, 2.0, 1.6],
                  {"steps": 30, "after_first": 20, "accepted": 9, "verified": 10})
    report = run_study([base, deep], kind="depth", unit="token", repeats=3)
    rows = {r.model: r for r in report.rows}
    assert rows["L=1"].latency_vs_base == pytest.approx(1.0)
    assert rows["L=4"].latency_vs_base == pytest.approx(1.5)  # median of 1.5, 1.0, 1.6
    assert rows["L=4"].ms == pytest.approx(160.0)  # median of 150, 200, 160 ms per 10 units
    assert rows["L=4"].acceptance == pytest.approx(0.9) and rows["L=4"].steps_per_token == pytest.approx(1.5)
    assert "L=4" in format_study(report) and rows["L=4"].quality == {"ppl": 40.0}


def test_translation_rows_report_tokens_per_sentence():
    counts_a = {"steps": 40, "after_first": 36, "accepted": 0, "verified": 0, "tokens": 40}
    counts_b = {"steps": 20, "after_first": 16, "accepted": 8, "verified": 9, "tokens": 20}
    base = _entry("L=1", 1, ("autoregressive",), [9.0, 1.0, 1.0], counts_a)
    deep = _entry("L=4", 4, ("speed",), [9.0, 1.0, 1.0], counts_b)
    report = run_study([base, deep], kind="translation", unit="sentence", repeats=2)
    rows = {r.model: r for r in report.rows}
    assert rows["L=1"].tokens_per_unit == pytest.approx(4.0)  # 40 tokens per run of 10 sentences
    assert rows["L=4"].tokens_per_unit == pytest.approx(2.0)
    table = format_study(report)
    assert "tok/sentence" in table and "ms/tok" in table
    # 100 ms per sentence at 2 tokens per sentence: 50 ms per token
    assert table.splitlines()[-1].split()[-2:] == ["2.0", "50.00"]
    depth = run_study([_entry("L=1", 1, ("autoregressive",), [1.0, 1.0])], kind="depth", unit="token", repeats=1)
    assert depth.rows[0].tokens_per_unit is None and "ms/tok" not in format_study(depth).split()


def test_first_model_must_run_autoregressive():
    with pytest.raises(ValueError, match="autoregressive"):
        run_study([_entry("L=2", 2, ("speed",), [1.0] * 4)], kind="depth", unit="token", repeats=1)


def test_depth_study_cli(tmp_path):
    dirs = []
    for loops, exit_loop in ((1, None), (3, 1)):
        config = small_config(vocab_size=256, n_loops=loops, exit_loop=exit_loop)
        directory = tmp_path / f"L{loops}"
        random_model(config, seed=1).float().save_pretrained(directory)
        dirs.append(str(directory))
    out, plot = tmp_path / "study.json", tmp_path / "study.png"
    result = CliRunner().invoke(cli, ["study", "depth", "--models", ",".join(dirs), "--data", str(SAMPLE),
                                      "--prompts", "1", "--max-new-tokens", "6", "--repeats", "1",
                                      "--threads", "1", "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [(r["model"], r["engine"]) for r in data["rows"]] == [
        ("L=1", "autoregressive"), ("L=3", "autoregressive"), ("L=3", "speed")]
    assert all(r["quality"]["ppl"] > 1 for r in data["rows"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(cli, ["study", "depth", "--models", dirs[0], "--data", str(SAMPLE)])
    assert bad.exit_code == 2 and "at least two" in bad.stderr
    # speed variants as extra rows, only for the model with an early exit
    result = CliRunner().invoke(cli, ["study", "depth", "--models", ",".join(dirs), "--data", str(SAMPLE),
                                      "--prompts", "1", "--max-new-tokens", "6", "--repeats", "1",
                                      "--threads", "1", "--engines", "autoregressive,speed+correction",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["engine"]) for r in rows] == [
        ("L=1", "autoregressive"), ("L=3", "autoregressive"), ("L=3", "speed+correction")]
    assert rows[2]["steps_per_token"] is not None
    for engines, message in (("speed", "must include autoregressive"), ("autoregressive,beam", "unknown engine"),
                             ("autoregressive,speed+beam", "unknown speed option")):
        bad = CliRunner().invoke(cli, ["study", "depth", "--models", ",".join(dirs), "--data", str(SAMPLE),
                                       "--engines", engines])
        assert bad.exit_code == 2 and message in bad.stderr, bad.output


def test_pareto_front_keeps_what_nothing_beats():
    from speedec.bench.study import pareto_front

    points = [(1.0, 60.0), (1.4, 55.0), (1.5, 58.0), (2.0, 50.0), (0.9, 70.0), (2.5, 50.0)]
    assert pareto_front(points) == [4, 0, 1, 3]
    # Higher is better on the second coordinate (BLEU): negate it.
    assert pareto_front([(x, -y) for x, y in points]) == [4]
    bleu = [(1.0, 20.0), (1.4, 25.0), (1.2, 22.0), (2.0, 24.0)]
    assert pareto_front([(x, -y) for x, y in bleu]) == [0, 2, 1]


def test_depth_study_reports_test_perplexity_loops_and_labels(tmp_path):
    dirs = []
    for loops, exit_loop, rank in ((1, None, None), (3, 1, 4)):
        config = small_config(vocab_size=256, n_loops=loops, exit_loop=exit_loop, exit_readout_rank=rank)
        directory = tmp_path / f"L{loops}"
        random_model(config, seed=1).float().save_pretrained(directory)
        dirs.append(str(directory))
    out = tmp_path / "study.json"
    args = ["study", "depth", "--models", ",".join(dirs), "--data", str(SAMPLE), "--test", str(SAMPLE),
            "--labels", "one,three", "--prompts", "1", "--max-new-tokens", "6", "--repeats", "1",
            "--threads", "1", "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["one", "three", "three"]
    deep = rows[2]
    assert deep["quality"]["test_ppl"] == pytest.approx(deep["quality"]["ppl"])  # same file twice
    assert len(deep["details"]["ppl_per_loop"]) == 3 and deep["details"]["ppl_per_loop"][-1] == pytest.approx(
        deep["quality"]["ppl"])
    assert 0 <= deep["quality"]["exit_agree"] <= 1
    assert "after loops 1..3" in result.output
    bad = CliRunner().invoke(cli, args[:8] + ["--labels", "only-one"])
    assert bad.exit_code == 2 and "2 models" in bad.stderr
