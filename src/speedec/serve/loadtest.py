"""``speedec loadtest``: throughput and latency of a running server against concurrency.

For each concurrency level ``c`` it sends ``requests`` completions with ``c`` of
them in flight at any time (asyncio + httpx), streamed so that the time to the
first token (TTFT) and the gaps between text chunks (inter-token latency, ITL)
are seen as a client sees them. A level ends when all its requests are done
or its time limit passes (requests still running are then abandoned and
counted as ``timed_out``), so a run always stops by itself.

Only servers on this machine are measured (127.0.0.0/8, ::1, localhost): a
load test is not to be aimed at someone else's server.

Results: one JSON document (``write_json``, atomic) holding one *run* per
server URL (with its ``label``), each a list of *levels*; :func:`merge_results`
joins documents and :func:`plot_results` draws tokens/s and p50 latencies
against concurrency, one line per run.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import SpeedecError

DEFAULT_PROMPTS = (
    "Once upon a time",
    "The weather today is",
    "In the middle of the night, the old house",
    "She opened the letter and read",
    "The best way to learn a new language is",
    "At the edge of the forest there was",
    "He looked at the map and said",
    "The train was late again, so",
)
SCHEMA = "speedec-loadtest/1"


class LoadtestError(SpeedecError, ValueError):
    """A load test cannot run as asked (a non-loopback URL, bad prompts file...)."""


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) URL of this machine;
    LoadtestError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadtestError(f"--url must be an http:// URL such as http://127.0.0.1:8000, got {url!r}")
    host = parts.hostname
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise LoadtestError(f"--url has a bad port: {url!r}") from None
    if host.lower() != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise LoadtestError(f"--url must point at this machine (127.0.0.0/8, ::1 or localhost), got {host!r}")
    return url.rstrip("/")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between order
    statistics (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts: one per non-empty line of ``path``, or the built-in ones."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadtestError(f"cannot read prompts file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LoadtestError(f"prompts file {path} has no non-empty line")
    return prompts


@dataclass
class RequestRecord:
    """What one request measured (seconds from its own start)."""

    ok: bool = False
    timed_out: bool = False
    error: str | None = None
    completion_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    chunk_gaps_s: list[float] = field(default_factory=list)


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    completed: int
    errors: int
    timed_out: int
    duration_s: float
    completion_tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p95_s: float | None
    itl_p99_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    first_error: str | None = None


def summarize(concurrency: int, records: Sequence[RequestRecord], duration_s: float) -> LevelResult:
    """One level's numbers from its requests' records. Throughput counts the
    tokens of completed requests over the level's wall time."""
    done = [r for r in records if r.ok]
    tokens = sum(r.completion_tokens for r in done)
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    gaps = [g for r in done for g in r.chunk_gaps_s]
    latency = [r.latency_s for r in done if r.latency_s is not None]
    errors = [r for r in records if not r.ok and not r.timed_out]
    rate = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return LevelResult(
        concurrency=concurrency, requests=len(records), completed=len(done), errors=len(errors),
        timed_out=sum(r.timed_out for r in records), duration_s=duration_s, completion_tokens=tokens,
        tokens_per_s=rate(tokens), requests_per_s=rate(len(done)),
        ttft_p50_s=percentile(ttft, 50), ttft_p95_s=percentile(ttft, 95), ttft_p99_s=percentile(ttft, 99),
        itl_p50_s=percentile(gaps, 50), itl_p95_s=percentile(gaps, 95), itl_p99_s=percentile(gaps, 99),
        latency_p50_s=percentile(latency, 50), latency_p95_s=percentile(latency, 95),
        latency_p99_s=percentile(latency, 99), first_error=errors[0].error if errors else None)


# ----------------------------------------------------------------------------- running

async def _one_request(client, url: str, body: dict, stream: bool) -> RequestRecord:
    """Send one completion; measure TTFT (first chunk with text), chunk gaps, latency."""
    record = RequestRecord()
    start = time.perf_counter()
    try:
        if not stream:
            response = await client.post(url + "/v1/completions", json=body)
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {_error_message(response.text)}"
                return record
            data = response.json()
            record.latency_s = time.perf_counter() - start
            record.ttft_s = record.latency_s
            record.completion_tokens = int(data.get("usage", {}).get("completion_tokens", 0))
            record.ok = True
            return record
        last = None
        chunks = 0
        usage = None
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {_error_message((await response.aread()).decode())}"
                return record
            async for event in sse_events(response):
                if "error" in event:
                    record.error = f"stream error: {event['error'].get('message')}"
                    return record
                if event.get("usage"):
                    usage = int(event["usage"].get("completion_tokens", 0))
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    chunks += 1
                    now = time.perf_counter()
                    if last is None:
                        record.ttft_s = now - start
                    else:
                        record.chunk_gaps_s.append(now - last)
                    last = now
        record.latency_s = time.perf_counter() - start
        # A server that sends no usage chunk: count text chunks (a lower bound).
        record.completion_tokens = usage if usage is not None else chunks
        record.ok = True
    except asyncio.CancelledError:
        record.timed_out = True
        raise
    except Exception as exc:  # noqa: BLE001 - a failed request is a data point, not a crash
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def sse_events(response):
    """The JSON events of an OpenAI-style server-sent-event stream, up to ``data: [DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text.strip()[:200]


async def run_level(url: str, concurrency: int, n_requests: int, *, prompts: Sequence[str], max_tokens: int,
                    model: str | None, stream: bool = True, time_limit_s: float | None = None,
                    on_done: Callable[[RequestRecord], None] | None = None) -> LevelResult:
    """``n_requests`` completions with ``concurrency`` in flight; stops at ``time_limit_s``."""
    import httpx

    records: list[RequestRecord] = []
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    timeout = httpx.Timeout(time_limit_s + 10 if time_limit_s else 600.0, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        async def worker() -> None:
            nonlocal next_index
            while next_index < n_requests:
                index = next_index
                next_index += 1
                body: dict[str, Any] = {"prompt": prompts[index % len(prompts)], "max_tokens": max_tokens,
                                        "temperature": 0, "stream": stream}
                if stream:
                    body["stream_options"] = {"include_usage": True}
                if model is not None:
                    body["model"] = model
                # Until it finishes the request counts as timed out (the level may end first).
                records.append(RequestRecord(timed_out=True))
                slot = len(records) - 1
                done = await _one_request(client, url, body, stream)
                records[slot] = done
                if on_done is not None:
                    on_done(done)

        start = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, n_requests))]
        _, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    return summarize(concurrency, records, duration)


async def _served_model(url: str) -> str | None:
    """The first model ``/v1/models`` lists (None if the server does not say)."""
    import httpx

    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        try:
            response = await client.get(url + "/v1/models")
            return response.json()["data"][0]["id"] if response.status_code == 200 else None
        except httpx.HTTPError as exc:
            raise LoadtestError(f"cannot reach {url}: {exc}") from None
        except (ValueError, KeyError, IndexError, TypeError):
            return None


def run_loadtest(url: str, concurrency: Sequence[int], requests: int, *, max_tokens: int = 64,
                 prompts: Sequence[str] | None = None, time_limit_s: float | None = 120.0, stream: bool = True,
                 label: str | None = None, model: str | None = None, progress: bool = True) -> dict:
    """One run against one server: a dict with ``label``, ``url``, ``model`` and
    ``levels`` (one :class:`LevelResult` dict per concurrency, in order)."""
    url = check_loopback(url)
    if not concurrency or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in concurrency):
        raise LoadtestError(f"--concurrency must be integers >= 1, got {list(concurrency)!r}")
    if requests < 1:
        raise LoadtestError(f"--requests must be >= 1, got {requests}")
    prompts = list(prompts or DEFAULT_PROMPTS)
    if model is None:
        model = asyncio.run(_served_model(url))
    levels = []
    for c in concurrency:
        if progress:
            from tqdm import tqdm

            with tqdm(total=requests, desc=f"{label or url} c={c}", unit="req", file=sys.stderr,
                      leave=False) as bar:
                result = asyncio.run(run_level(url, c, requests, prompts=prompts, max_tokens=max_tokens,
                                               model=model, stream=stream, time_limit_s=time_limit_s,
                                               on_done=lambda _r: bar.update(1)))
        else:
            result = asyncio.run(run_level(url, c, requests, prompts=prompts, max_tokens=max_tokens, model=model,
                                           stream=stream, time_limit_s=time_limit_s))
        levels.append(asdict(result))
    return {"label": label or url, "url": url, "model": model, "levels": levels}


def results_document(runs: Sequence[dict], settings: dict) -> dict:
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": dict(settings), "runs": list(runs)}


# ----------------------------------------------------------------------------- output

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def format_table(document: dict) -> str:
    """One row per (run, concurrency): throughput, latency percentiles (ms), errors."""
    header = ("label", "conc", "done", "err", "tok/s", "req/s", "ttft p50", "p95", "p99", "itl p50", "p95", "p99")
    rows = [header]
    for run in document["runs"]:
        for level in run["levels"]:
            rows.append((str(run["label"]), str(level["concurrency"]), f"{level['completed']}/{level['requests']}",
                         str(level["errors"] + level["timed_out"]), f"{level['tokens_per_s']:.1f}",
                         f"{level['requests_per_s']:.2f}", _ms(level["ttft_p50_s"]), _ms(level["ttft_p95_s"]),
                         _ms(level["ttft_p99_s"]), _ms(level["itl_p50_s"]), _ms(level["itl_p95_s"]),
                         _ms(level["itl_p99_s"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:]) + "\n(latencies in ms)"


def write_json(path: str | Path, document: dict) -> None:
    """Write ``document`` atomically (a temp file in the same directory, then a rename)."""
    from ..storage import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def merge_results(paths: Sequence[str | Path]) -> dict:
    """The runs of several result files in one document (settings of the first)."""
    runs, settings = [], {}
    for path in paths:
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LoadtestError(f"cannot read results file {path}: {exc}") from None
        if not isinstance(document, dict) or document.get("schema") != SCHEMA:
            raise LoadtestError(f"{path} is not a speedec loadtest results file")
        settings = settings or document.get("settings", {})
        runs.extend(document["runs"])
    return results_document(runs, settings)


def plot_results(document: dict, path: str | Path) -> bool:
    """Tokens/s and p50 latencies against concurrency, one line per run, as a PNG
    written atomically. False (nothing written) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from ..storage import atomic_write

    fig, (ax_tps, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in document["runs"]:
        levels = run["levels"]
        conc = [level["concurrency"] for level in levels]
        ax_tps.plot(conc, [level["tokens_per_s"] for level in levels], marker="o", label=run["label"])
        for key, style, name in (("ttft_p50_s", "-", "TTFT p50"), ("itl_p50_s", "--", "ITL p50")):
            points = [(c, level[key] * 1000) for c, level in zip(conc, levels) if level[key] is not None]
            if points:
                ax_lat.plot(*zip(*points), style, marker="o", label=f"{run['label']}: {name}")
    ticks = sorted({level["concurrency"] for run in document["runs"] for level in run["levels"]})
    for ax, title, ylabel in ((ax_tps, "Throughput", "tokens / s"), (ax_lat, "Latency (p50)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return True
