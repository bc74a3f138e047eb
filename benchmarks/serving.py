"""Serving benchmark (issue 14, item 5): our server against concurrency, and a peer.

On the ``membound`` preset (a random-weight looped model whose decoding is
memory-bound), at each concurrency level it measures

(a) ``speedec serve --engine speed``,
(b) ``speedec serve --engine autoregressive``,
(c) the transformers peer: ``transformers serve --continuous-batching`` (its
    OpenAI-compatible server with continuous batching and paged attention) on
    the same weights exported as a plain Llama (``speedec export-hf``), CPU,
    float32, greedy;

each as a subprocess on a free loopback port, with the same request stream
(``speedec loadtest``'s: ``--requests`` streamed greedy completions of
``--max-tokens`` tokens, the built-in prompts round-robin, ``c`` in flight).
It also times the ``speed`` engine offline (no server, one request at a time)
for the target on the latency at concurrency 1, and measures the step-cost
curve ``t(R)`` (the seconds of one pass over the K unique layers with ``R``
rows; what the server measures at start and ``speedec kernels`` prints) to
derive the throughput cap.

**Inter-token latency.** ``itl`` is the loadtest's: gaps between text chunks
(a chunk carries every token a step verified). ``tpot`` (time per output
token) is per request ``(latency - ttft) / (tokens - 1)``, comparable with the
offline engine's ``decode_s / (tokens - 1)``; the c1 target uses it.

**Cap.** Every token passes its row through the K layers once per loop: ``L``
row-steps, wherever it is scheduled (an accepted guess's rows are its own
loops; a rejected one's are waste). A step of ``R`` rows costs ``t(R)``, so
tokens/s <= ``R / (L t(R))``. At concurrency ``c`` a step holds at most
``min(max_rows, c * ceil(L / e))`` rows (a request pipelines at most
``ceil(L / e)`` tokens; ``max_rows``: the server's row budget, the best
``R / t(R)``), hence ``cap(c) = max over those R of R / (L t(R))`` (LM head
and prefill not counted: an upper bound). The autoregressive server runs
exactly ``min(c, max_rows)`` rows: ``cap_ar(c) = R / (L t(R))`` there.

Targets printed: c1 tpot of the speed server <= 1.15x offline speed's;
c8 tokens/s >= 1.8x c1's; speed >= autoregressive at c8; speed >= 2x the peer
at c8 (and the cap, to judge the 1.8x).

    python benchmarks/serving.py                 # membound, levels 1,2,4,8,16, 16 requests each
    python benchmarks/serving.py --quick         # tiny preset, levels 1,2, 4 requests of 8 tokens

Writes ``OUT_DIR/serving.json`` (atomically) and ``OUT_DIR/serving.png``; the
servers' logs go to the work dir. Every server is stopped after its run
(SIGTERM, then SIGKILL), also on errors and Ctrl-C. Run it on a quiet machine:
it measures time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import (  # noqa: E402 - the shared helpers live next to this script
    ROOT,
    BenchError,
    ServerProcess,
    exit_on_sigterm,
    free_port,
    load_model,
    log,
    server_metrics,
    speedec_serve_command,
    write_json,
)

SCHEMA = "speedec-serving-bench/1"
SPEED, AR, PEER = "speedec speed", "speedec autoregressive", "transformers serve (continuous batching)"
# The peer's paged KV cache: 32 blocks of 256 tokens (16 requests of up to 256
# tokens each, twice over), and at most 256 tokens per forward pass. Without
# them it sizes the cache from the machine's whole RAM.
PEER_CB_OPTIONS = ["--cb-num-blocks", "32", "--cb-max-batch-tokens", "256"]


# ----------------------------------------------------------------------------- models

def byte_tokenizer_json(path: Path) -> None:
    """A Hugging Face ``tokenizer.json`` whose ids are the UTF-8 bytes (id = byte value),
    as speedec's byte tokenizer: byte-level BPE without merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tokenizer = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))


def export_peer_model(model, model_dir: Path, out: Path, *, eos: int | None) -> Path:
    """``model`` as a Hugging Face Llama in ``out`` (``speedec.hf.export_hf``), with a
    tokenizer transformers can load that encodes as speedec's does (the model's own
    ``tokenizer.json``, else bytes) and a generation config that stops where speedec
    stops (``eos``)."""
    from speedec.hf import export_hf
    from speedec.storage import atomic_write_text
    from speedec.tokenizer import EOS_TOKEN, TOKENIZER_FILE

    export_hf(model, out)
    own = model_dir / TOKENIZER_FILE
    if own.is_file():
        shutil.copyfile(own, out / TOKENIZER_FILE)
    else:
        byte_tokenizer_json(out / TOKENIZER_FILE)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.max_seq_len}
    generation = {"do_sample": False}
    if eos is not None:
        tokenizer_config["eos_token"] = EOS_TOKEN
        generation.update(eos_token_id=eos, pad_token_id=eos)
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- the curve and the cap

def step_curve(model, rows: int, repeats: int) -> list[float]:
    """Seconds of one step with 1..rows rows (the function the server measures with)."""
    from speedec.engines.speed import measure_step_costs

    return measure_step_costs(model, rows, repeats=repeats)


def caps(costs: list[float], levels: list[int], *, n_loops: int, exit_loop: int | None) -> dict:
    """Throughput caps from the step-cost curve (see the module's doc)."""
    from speedec.serve.scheduler import best_rows

    max_rows = best_rows(costs)
    depth = math.ceil(n_loops / exit_loop) if exit_loop else 1

    def t(r: int) -> float:
        return costs[r - 1]

    def speed_cap(c: int) -> tuple[float, int]:
        top = min(max_rows, c * depth)
        return max((r / (n_loops * t(r)), r) for r in range(1, top + 1))

    per_level = {}
    for c in levels:
        cap, rows = speed_cap(c)
        r_ar = min(c, max_rows)
        per_level[str(c)] = {"speed_tokens_per_s": cap, "speed_rows": rows,
                             "ar_tokens_per_s": r_ar / (n_loops * t(r_ar)), "ar_rows": r_ar}
    up_to_8 = min(8, len(costs))
    return {"max_rows": max_rows, "pipeline_depth": depth, "n_loops": n_loops, "exit_loop": exit_loop,
            "levels": per_level,
            # the brief's rule of thumb: c8 against one autoregressive row, max_{R<=8} R t(1) / t(R)
            "c8_over_ar_c1": max(r * t(1) / t(r) for r in range(1, up_to_8 + 1)),
            "c8_over_ideal_c1": speed_cap(8)[0] / speed_cap(1)[0]}


# ----------------------------------------------------------------------------- offline

def offline_speed(model, prompts: list[list[int]], n_requests: int, max_tokens: int, eos: int | None) -> dict:
    """The speed engine alone, one request after another (the same prompts round-robin)."""
    from speedec import generate

    generate(model, prompts[0], max_tokens, engine="speed", eos_token_id=eos)  # warm-up
    tpot, ttft, tokens, wall, acceptance = [], [], 0, 0.0, []
    for i in range(n_requests):
        result = generate(model, prompts[i % len(prompts)], max_tokens, engine="speed", eos_token_id=eos)
        s = result.stats
        tokens += s.new_tokens
        wall += s.wall_s
        ttft.append(s.prefill_s)
        if s.new_tokens > 1:
            tpot.append(s.decode_s / (s.new_tokens - 1))
        if s.acceptance is not None:
            acceptance.append(s.acceptance)
    return {"requests": n_requests, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttft), "tpot_p50_s": statistics.median(tpot) if tpot else None,
            "tpot_mean_s": statistics.fmean(tpot) if tpot else None,
            "acceptance_mean": statistics.fmean(acceptance) if acceptance else None}


# ----------------------------------------------------------------------------- servers

def served_model(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", timeout=10.0, trust_env=False).json()["data"][0]["id"]


def warm_up(url: str, model: str, prompt: str, max_tokens: int) -> str:
    """One whole and one streamed greedy request (the peer's continuous batching takes
    its sampling settings from its first request); the whole one's text."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    with httpx.Client(base_url=url, timeout=600.0, trust_env=False) as client:
        response = client.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise BenchError(f"{url}: warm-up request answered {response.status_code}: {response.text[:200]}")
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            for _ in streamed.iter_lines():
                pass
        return response.json()["choices"][0]["text"]


def speedec_counters(url: str) -> dict[str, float] | None:
    try:
        values = server_metrics(url)
    except Exception:  # noqa: BLE001 - a peer has no /metrics
        return None
    return values if "speedec_steps_total" in values else None


def measure_server(label: str, server: ServerProcess, levels: list[int], args, prompts: list[str]) -> dict:
    """The load test's levels against one running server, with per-request tpot and,
    for speedec servers, rows per step and draft acceptance per level."""
    from speedec.serve.loadtest import run_level

    model = served_model(server.url)
    text = warm_up(server.url, model, prompts[0], args.max_tokens)
    out_levels = []
    for c in levels:
        before = speedec_counters(server.url)
        records = []
        log(f"{label}: concurrency {c}, {args.requests} requests")
        result = asyncio.run(run_level(server.url, c, args.requests, prompts=prompts, max_tokens=args.max_tokens,
                                       model=model, stream=True, time_limit_s=args.time_limit,
                                       on_done=records.append))
        after = speedec_counters(server.url)
        level = asdict(result)
        tpot = [(r.latency_s - r.ttft_s) / (r.completion_tokens - 1) for r in records
                if r.ok and r.ttft_s is not None and r.latency_s is not None and r.completion_tokens > 1]
        level["tpot_p50_s"] = statistics.median(tpot) if tpot else None
        level["tpot_mean_s"] = statistics.fmean(tpot) if tpot else None
        if before is not None and after is not None:
            steps = after["speedec_steps_total"] - before["speedec_steps_total"]
            rows = after["speedec_rows_total"] - before["speedec_rows_total"]
            launched = after["speedec_drafts_launched_total"] - before["speedec_drafts_launched_total"]
            accepted = after["speedec_drafts_accepted_total"] - before["speedec_drafts_accepted_total"]
            level["rows_per_step"] = rows / steps if steps else None
            rejected = (after.get("speedec_drafts_rejected_total", 0.0)
                        - before.get("speedec_drafts_rejected_total", 0.0))
            # The engines' acceptance: accepted / verified (launched also counts discarded guesses).
            level["draft_acceptance"] = (accepted / (accepted + rejected) if accepted + rejected
                                         else accepted / launched if launched else None)
            level["step_ms"] = 1000 * (after["speedec_step_seconds_total"]
                                       - before["speedec_step_seconds_total"]) / steps if steps else None
        out_levels.append(level)
    run = {"label": label, "url": server.url, "model": model, "warm_up_text": text, "levels": out_levels}
    counters = speedec_counters(server.url)
    if counters is not None:
        run["max_rows"] = counters.get("speedec_max_rows")
    return run


def peer_command(hf_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(hf_dir), "--continuous-batching",
            "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", *PEER_CB_OPTIONS]


def peer_available() -> str | None:
    """None when ``transformers serve`` can run here, else why not."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:
        return "transformers is not installed (pip install -e '.[hf]')"
    if not is_serve_available():
        return "transformers serve needs fastapi, uvicorn, pydantic and openai (pip install openai)"
    return None


# ----------------------------------------------------------------------------- report

def level_of(run: dict, c: int) -> dict | None:
    return next((level for level in run["levels"] if level["concurrency"] == c), None)


def targets(document: dict) -> list[dict]:
    runs = {run["label"]: run for run in document["runs"]}
    levels = document["settings"]["levels"]
    big = 8 if 8 in levels else max(levels)
    out = []

    def add(name: str, value: float | None, goal: str, ok: bool | None) -> None:
        out.append({"target": name, "value": value, "goal": goal, "met": ok})

    speed = runs.get(SPEED)
    offline = document["offline_speed"]
    s1 = level_of(speed, 1) if speed and 1 in levels else None
    sb = level_of(speed, big) if speed else None
    if s1 and s1["tpot_p50_s"] and offline.get("tpot_p50_s"):
        ratio = s1["tpot_p50_s"] / offline["tpot_p50_s"]
        add("c1 inter-token latency (tpot p50), speed server / offline speed", ratio, "<= 1.15", ratio <= 1.15)
    if s1 and sb and s1["tokens_per_s"]:
        ratio = sb["tokens_per_s"] / s1["tokens_per_s"]
        add(f"c{big} tokens/s / c1 tokens/s (speed server)", ratio, ">= 1.8", ratio >= 1.8)
        cap = document["cap"]["levels"].get(str(big))
        if cap:
            add(f"  cap from the step-cost curve: c{big} cap / measured c1", cap["speed_tokens_per_s"]
                / s1["tokens_per_s"], "(the most the curve allows)", None)
    ar = runs.get(AR)
    ab = level_of(ar, big) if ar else None
    if sb and ab and ab["tokens_per_s"]:
        ratio = sb["tokens_per_s"] / ab["tokens_per_s"]
        add(f"c{big} tokens/s, speed server / autoregressive server", ratio, ">= 1.0", ratio >= 1.0)
    peer = runs.get(PEER)
    pb = level_of(peer, big) if peer else None
    if sb and pb and pb["tokens_per_s"]:
        ratio = sb["tokens_per_s"] / pb["tokens_per_s"]
        add(f"c{big} tokens/s, speed server / transformers peer", ratio, ">= 2.0", ratio >= 2.0)
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


def format_report(document: dict) -> str:
    s = document["settings"]
    lines = [f"serving benchmark: preset {s['preset']}, {s['requests']} requests x {s['max_tokens']} tokens per "
             f"level, streamed, greedy; torch threads {s['torch_threads']}; {s['machine']}"]
    costs = document["step_costs_s"]
    lines.append("step cost t(R), ms: " + "  ".join(f"{r}:{1000 * t:.2f}" for r, t in enumerate(costs, 1)))
    cap = document["cap"]
    lines.append(f"row budget (best R/t(R)): {cap['max_rows']}; a request pipelines <= {cap['pipeline_depth']} "
                 f"rows; L = {cap['n_loops']}")
    lines.append("cap tokens/s (<= R / (L t(R))): " + "  ".join(
        f"c{c}: speed {v['speed_tokens_per_s']:.0f} (R={v['speed_rows']}), ar {v['ar_tokens_per_s']:.0f}"
        for c, v in cap["levels"].items()))
    lines.append(f"cap c8 / ideal c1 (speed) = {cap['c8_over_ideal_c1']:.2f}x;  max_(R<=8) R t(1)/t(R) "
                 f"(c8 against one AR row) = {cap['c8_over_ar_c1']:.2f}x")
    budgets = [f"{run['label']} {run['max_rows']:g}" for run in document["runs"] if run.get("max_rows")]
    if budgets:
        lines.append("servers' row budgets (from their own curve at start): " + ", ".join(budgets))
    off = document["offline_speed"]
    lines.append(f"offline speed engine (no server, c1): {off['tokens_per_s']:.1f} tok/s, ttft p50 "
                 f"{_ms(off['ttft_p50_s'])} ms, tpot p50 {_ms(off['tpot_p50_s'])} ms, acceptance "
                 f"{off['acceptance_mean'] if off['acceptance_mean'] is None else round(off['acceptance_mean'], 3)}")
    header = ("server", "conc", "done", "err", "tok/s", "ttft p50", "itl p50", "itl p95", "tpot p50", "rows/step",
              "accept")
    rows = [header]
    for run in document["runs"]:
        for level in run["levels"]:
            rows.append((run["label"], str(level["concurrency"]), f"{level['completed']}/{level['requests']}",
                         str(level["errors"] + level["timed_out"]), f"{level['tokens_per_s']:.1f}",
                         _ms(level["ttft_p50_s"]), _ms(level["itl_p50_s"]), _ms(level["itl_p95_s"]),
                         _ms(level["tpot_p50_s"]),
                         "-" if level.get("rows_per_step") is None else f"{level['rows_per_step']:.2f}",
                         "-" if level.get("draft_acceptance") is None else f"{level['draft_acceptance']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines += [table[0], "-" * len(table[0]), *table[1:], "(latencies in ms; itl: gaps between text chunks; tpot: "
              "(latency - ttft) / (tokens - 1) per request)"]
    if document.get("peer_note"):
        lines.append(f"peer: {document['peer_note']}")
    lines.append("targets:")
    for t in document["targets"]:
        verdict = "" if t["met"] is None else ("  met" if t["met"] else "  NOT met")
        lines.append(f"  {t['target']}: {t['value']:.2f}x (goal {t['goal']}){verdict}")
    return "\n".join(lines)


def plot(document: dict, path: Path) -> bool:
    """Tokens/s and latency (itl p50, tpot p50) against concurrency, one line per server."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from speedec.storage import atomic_write

    fig, (ax_tps, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in document["runs"]:
        conc = [level["concurrency"] for level in run["levels"]]
        line, = ax_tps.plot(conc, [level["tokens_per_s"] for level in run["levels"]], marker="o", label=run["label"])
        for key, style, name in (("itl_p50_s", "-", "itl p50"), ("tpot_p50_s", ":", "tpot p50")):
            points = [(c, level[key] * 1000) for c, level in zip(conc, run["levels"]) if level.get(key)]
            if points:
                ax_lat.plot(*zip(*points), style, marker="o", color=line.get_color(), label=f"{run['label']}: {name}")
    levels = document["settings"]["levels"]
    cap = document["cap"]["levels"]
    ax_tps.plot(levels, [cap[str(c)]["speed_tokens_per_s"] for c in levels], "k--", alpha=0.5,
                label="cap R/(L t(R)) (speed)")
    off = document["offline_speed"]
    ax_tps.plot([1], [off["tokens_per_s"]], "k*", markersize=10, label="offline speed engine (c1)")
    if off.get("tpot_p50_s"):
        ax_lat.plot([1], [off["tpot_p50_s"] * 1000], "k*", markersize=10, label="offline speed: tpot p50")
    for ax, title, ylabel in ((ax_tps, "Throughput", "tokens / s"), (ax_lat, "Inter-token latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({document['settings']['preset']})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main

def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        levels = []
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"--levels must be comma-separated integers >= 1, got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=parse_levels, default=[1, 2, 4, 8, 16], help="Concurrency levels.")
    parser.add_argument("--requests", type=int, default=16, help="Requests per level (default 16).")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens per request (default 64).")
    parser.add_argument("--preset", default="membound", help="Model preset (default membound).")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="Where serving.json and serving.png go (default benchmarks/results/; with --quick "
                             "WORK_DIR/quick).")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "serving",
                        help="Models and server logs (default runs/serving).")
    parser.add_argument("--skip-peer", action="store_true", help="Do not measure the transformers peer.")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every server and of the offline runs (default: PyTorch's choice).")
    parser.add_argument("--time-limit", type=float, default=900.0, help="Seconds per level at most (default 900).")
    parser.add_argument("--step-repeats", type=int, default=21, help="Timings per row count of the curve.")
    parser.add_argument("--quick", action="store_true",
                        help="Tiny preset, levels 1,2, 4 requests of 8 tokens: tries the plumbing.")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.levels, args.requests, args.max_tokens = "tiny", [1, 2], 4, 8
    if args.requests < 1 or args.max_tokens < 2:
        parser.error("--requests must be >= 1 and --max-tokens >= 2")
    out_dir = args.out_dir or (args.work_dir / "quick" if args.quick else ROOT / "benchmarks" / "results")
    exit_on_sigterm()
    try:
        document = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(out_dir / "serving.json", document)
    wrote_plot = plot(document, out_dir / "serving.png")
    print(format_report(document))
    print(f"wrote {out_dir / 'serving.json'}" + (f" and {out_dir / 'serving.png'}" if wrote_plot else
                                                  " (no plot: matplotlib is missing)"), file=sys.stderr)
    return 0


def run(args) -> dict:
    import torch

    from speedec.kernels import FEW_ROWS, active_kernel
    from speedec.serve.loadtest import DEFAULT_PROMPTS

    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads is not None else {}
    model_dir, model, tokenizer = load_model(args)
    config = model.config
    eos = tokenizer.eos_token_id
    prompts = list(DEFAULT_PROMPTS)
    prompt_ids = [tokenizer.encode(p) for p in prompts]

    log(f"step-cost curve, 1..{FEW_ROWS} rows")
    costs = step_curve(model, FEW_ROWS, args.step_repeats)
    cap = caps(costs, args.levels, n_loops=config.n_loops, exit_loop=config.exit_loop)
    log(f"offline speed engine, {args.requests} requests")
    offline = offline_speed(model, prompt_ids, args.requests, args.max_tokens, eos)
    offline_text = tokenizer.decode([t for t in _greedy(model, prompt_ids[0], args.max_tokens, eos) if t != eos])

    runs, peer_note = [], None
    variants = [(SPEED, "speed"), (AR, "autoregressive")]
    for label, engine in variants:
        port = free_port()
        command = speedec_serve_command(model_dir, port, engine=engine, threads=args.threads)
        log(f"starting {label}")
        with ServerProcess(command, port, args.work_dir / f"server-{engine}.log", env=env, name=label) as server:
            runs.append(measure_server(label, server, args.levels, args, prompts))
    if args.skip_peer:
        peer_note = "skipped (--skip-peer)"
    elif (why := peer_available()) is not None:
        peer_note = f"not measured: {why}"
        log(peer_note)
    else:
        hf_dir = export_peer_model(model, model_dir, args.work_dir / f"{args.preset}-hf", eos=eos)
        _check_peer_tokenizer(hf_dir, prompts, prompt_ids)
        port = free_port()
        command = peer_command(hf_dir, port)
        peer_env = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1"}
        log(f"starting {PEER}")
        with ServerProcess(command, port, args.work_dir / "server-transformers.log", env=peer_env,
                           name="transformers serve") as server:
            runs.append(measure_server(PEER, server, args.levels, args, prompts))
        import transformers

        peer_note = (f"transformers {transformers.__version__} `transformers serve {hf_dir.name} "
                     f"--continuous-batching --device cpu --dtype float32 {' '.join(PEER_CB_OPTIONS)}` "
                     "(OpenAI-compatible server, continuous batching with paged attention, greedy via "
                     "temperature 0)")
    for run_ in runs:
        run_["warm_up_text_equals_offline"] = run_.pop("warm_up_text") == offline_text

    document = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"preset": args.preset, "levels": args.levels, "requests": args.requests,
                     "max_tokens": args.max_tokens, "stream": True, "prompts": "speedec loadtest's built-in",
                     "threads": args.threads, "torch_threads": torch.get_num_threads(), "kernel": active_kernel(),
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
                     + f", {_cpu_count()} CPUs", "quick": args.quick, "model_dir": str(model_dir)},
        "step_costs_s": costs,
        "cap": cap,
        "offline_speed": offline,
        "runs": runs,
        "peer_note": peer_note,
    }
    document["targets"] = targets(document)
    return document


def _greedy(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    from speedec import generate

    return generate(model, ids, n, engine="autoregressive", eos_token_id=eos).tokens


def _check_peer_tokenizer(hf_dir: Path, prompts: list[str], prompt_ids: list[list[int]]) -> None:
    """The peer must see the same prompt ids as speedec's servers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    for text, ids in zip(prompts, prompt_ids):
        theirs = tokenizer(text)["input_ids"]
        if theirs != ids:
            raise BenchError(f"the exported tokenizer encodes {text!r} as {theirs[:8]}..., speedec as {ids[:8]}...")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    sys.exit(main())
