"""``speedec loadtest``: the loopback rule, the statistics, and a tiny real run
against a uvicorn server (in a thread) over the real scheduler."""

import asyncio
import json
import socket

import pytest
from click.testing import CliRunner

from helpers import serve_on_loopback, wait_until
from speedec.serve.loadtest import (
    LoadtestError,
    RequestRecord,
    check_loopback,
    merge_results,
    percentile,
    plot_results,
    read_prompts,
    run_level,
    summarize,
)


def run_cli(*args):
    from speedec.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.9.8.7:1/", "http://localhost:8000",
                                 "http://LOCALHOST", "http://[::1]:8000", "https://127.0.0.1"])
def test_loopback_urls_accepted(url):
    assert check_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.1:8000", "http://0.0.0.0:8000",
                                 "http://[2001:db8::1]:80", "ftp://127.0.0.1", "127.0.0.1:8000", "",
                                 "http://127.0.0.1:99999", "http://localhost.example.com"])
def test_other_urls_refused(url):
    with pytest.raises(LoadtestError):
        check_loopback(url)


def test_percentile_matches_linear_interpolation():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 95) == pytest.approx(4.8)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


def test_summarize_synthetic_records():
    records = [RequestRecord(ok=True, completion_tokens=10, ttft_s=0.1 * (i + 1), latency_s=1.0 + i,
                             chunk_gaps_s=[0.01 * (i + 1)] * 3) for i in range(4)]
    records += [RequestRecord(error="HTTP 429: queue full"), RequestRecord(timed_out=True)]
    level = summarize(2, records, duration_s=4.0)
    assert (level.requests, level.completed, level.errors, level.timed_out) == (6, 4, 1, 1)
    assert level.completion_tokens == 40 and level.tokens_per_s == 10.0 and level.requests_per_s == 1.0
    assert level.ttft_p50_s == pytest.approx(0.25) and level.ttft_p99_s == pytest.approx(0.397)
    assert level.itl_p50_s == pytest.approx(0.025) and level.latency_p95_s == pytest.approx(3.85)
    assert level.first_error == "HTTP 429: queue full"
    empty = summarize(1, [RequestRecord(error="x")], duration_s=0.0)
    assert empty.tokens_per_s == 0 and empty.ttft_p50_s is None


def test_read_prompts(tmp_path):
    assert read_prompts(None)
    path = tmp_path / "p.txt"
    path.write_text("one\n\n  two  \n")
    assert read_prompts(path) == ["one", "two"]
    path.write_text("\n \n")
    with pytest.raises(LoadtestError, match="no non-empty line"):
        read_prompts(path)
    with pytest.raises(LoadtestError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("args,message", [
    (["--url", "http://example.com:8000"], "must point at this machine"),
    (["--url", "http://192.168.1.5:8000"], "must point at this machine"),
    (["--concurrency", "1,x"], "--concurrency must be comma-separated integers >= 1"),
    (["--concurrency", "0"], "--concurrency must be comma-separated integers >= 1"),
    (["--requests", "0"], "--requests must be >= 1, got 0"),
    (["--time-limit", "0"], "--time-limit must be > 0"),
    (["--label", "a", "--label", "b"], "one --label per --url"),
])
def test_loadtest_bad_options_exit_2(args, message):
    code, _, err = run_cli("loadtest", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_loadtest_unreachable_server_is_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = run_cli("loadtest", "--url", f"http://127.0.0.1:{port}", "--requests", 1, "--concurrency", 1)
    assert code == 2 and "cannot reach" in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def server_url():
    from speedec.config import preset
    from speedec.model import LoopedLM
    from speedec.serve.app import create_app
    from speedec.serve.scheduler import Scheduler
    from speedec.tokenizer import ByteTokenizer

    model = LoopedLM.random(preset("tiny"), seed=1, residual_scale=20)
    scheduler = Scheduler(model, engine="speed", max_rows=8, model_name="tiny", step_costs=[1.0] * 8)
    scheduler.start()
    app = create_app(scheduler, ByteTokenizer(), model_name="tiny", vocab_size=model.config.vocab_size)
    with serve_on_loopback(app, scheduler) as url:
        yield url


def test_loadtest_real_run_writes_json_and_png(server_url, tmp_path):
    out, plot = tmp_path / "res" / "results.json", tmp_path / "res" / "results.png"
    code, stdout, err = run_cli("loadtest", "--url", server_url, "--concurrency", "1,2", "--requests", 4,
                                "--max-tokens", 8, "--label", "speed", "--out", out, "--plot", plot,
                                "--time-limit", 60)
    assert code == 0, err
    assert "tok/s" in stdout and "speed" in stdout
    document = json.loads(out.read_text())
    assert document["schema"] == "speedec-loadtest/1" and document["settings"]["requests"] == 4
    [run] = document["runs"]
    assert run["label"] == "speed" and run["url"] == server_url and run["model"] == "tiny"
    assert [level["concurrency"] for level in run["levels"]] == [1, 2]
    for level in run["levels"]:
        assert (level["completed"], level["errors"], level["timed_out"]) == (4, 0, 0), level
        assert level["completion_tokens"] == 32 and level["tokens_per_s"] > 0
        assert 0 < level["ttft_p50_s"] <= level["ttft_p99_s"] and level["itl_p50_s"] is not None
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    # two result files (e.g. speed and autoregressive servers) in one chart
    second = tmp_path / "again.json"
    code, _, err = run_cli("loadtest", "--url", server_url, "--concurrency", "2", "--requests", 2,
                           "--max-tokens", 4, "--no-stream", "--label", "plain", "--merge", out, "--out", second)
    assert code == 0, err
    merged = json.loads(second.read_text())
    assert [r["label"] for r in merged["runs"]] == ["speed", "plain"]
    assert merged["runs"][1]["levels"][0]["completed"] == 2
    assert [r["label"] for r in merge_results([out, second])["runs"]] == ["speed", "speed", "plain"]
    assert plot_results(merged, tmp_path / "merged.png")


def test_level_stops_at_its_time_limit(server_url):
    result = asyncio.run(run_level(server_url, 2, 50, prompts=["Hi"], max_tokens=400, model=None,
                                   time_limit_s=0.3))
    assert result.duration_s < 20  # the 0.3 s limit, plus cancelling on a loaded machine
    assert result.completed + result.timed_out + result.errors == result.requests <= 50
    assert result.timed_out >= 1 and result.errors == 0
    # the abandoned requests' connections closed: the server cancelled them and freed their rows
    import httpx

    def metrics_text():
        return httpx.get(server_url + "/metrics", trust_env=False).text

    def idle():
        text = metrics_text()
        return "\nspeedec_requests_active 0\n" in text and "\nspeedec_queue_depth 0\n" in text

    wait_until(idle, "the server to cancel the abandoned requests", poll_s=0.02)
    metrics = metrics_text()
    assert "\nspeedec_requests_active 0\n" in metrics
    cancelled = float(metrics.split("\nspeedec_requests_cancelled_total ")[1].split()[0])
    assert cancelled >= result.timed_out


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    document = {"runs": [{"label": "a", "levels": []}]}
    assert plot_results(document, tmp_path / "p.png") is False and not (tmp_path / "p.png").exists()
