"""Soak test of ``speedec serve``: minutes of mixed traffic, exactness and memory.

Starts ``speedec serve`` on a preset's random-weight model (a subprocess on a
free loopback port) and, for ``--duration`` seconds, keeps ``--concurrency``
clients busy with a mix of

* well-formed greedy completions (a prompt from a fixed list, ``max_tokens``
  8-64, about half of them streamed) whose token ids (``return_token_ids``)
  are compared with the offline engine's (``speedec.generate(..., engine="speed")``
  on the same weights in this process);
* streamed requests whose client goes away at a random point (about 10% of
  the streamed ones): the server must cancel them and free their rows;
* malformed requests (about 10%: bad JSON, wrong types, ids outside the
  vocabulary, ``max_tokens`` beyond the context, an unknown model...), each of
  which must get its own 4xx in OpenAI's error shape.

In float32 a served request equals the offline run bit for bit only while it is
granted the guesses it would launch alone; under load a token may differ where
the top two logits are within rounding of each other (docs/serving.md,
"Scheduling and exactness"). So mismatches are reported, not fatal: for each,
the top-2 logit gap of the offline model at the first differing position.

The server's resident memory is sampled every few seconds; the report gives its
growth from the first minute's level to the end (target: under 5%). At the end
the server must be idle (no active request, nothing queued).

    python benchmarks/soak.py                       # membound, 300 s, 16 clients
    python benchmarks/soak.py --quick               # tiny preset, 20 s: tries the plumbing

Writes a JSON summary (atomically; ``--out``) and prints a table. The server is
always stopped at the end (SIGTERM, then SIGKILL), also on errors and Ctrl-C.
The helpers :class:`ServerProcess` and :func:`prepare_model` are shared with
``benchmarks/serving.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from speedec.serve.loadtest import DEFAULT_PROMPTS, sse_events

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "speedec-soak/1"
# The load generator's default prompts and a few more (more distinct requests).
PROMPTS = (
    *DEFAULT_PROMPTS,
    "My grandmother used to say that",
    "The first rule of the club is",
    "When the music stopped, everyone",
    "A small boat drifted toward the",
)


class BenchError(Exception):
    """The benchmark cannot run as asked (a server that does not start, bad options)."""


# ----------------------------------------------------------------------------- shared helpers

def free_port() -> int:
    """A loopback port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_model(preset: str, directory: Path, *, seed: int = 0) -> Path:
    """``directory`` holding ``preset``'s random-weight model as the benchmarks build it
    (:func:`speedec.bench.setup.build_model`: float32, the preset's residual scale).

    A model whose vocabulary is the bundled model's (8,192 tokens, e.g. membound)
    gets the bundled tokenizer, so that every generated id is text (the load
    test's inter-token latency counts text chunks) and ``<|endoftext|>`` ends a
    completion as it would for a trained model; smaller vocabularies are bytes.
    Reused when ``directory`` already holds the same preset and seed."""
    from speedec.bench.setup import build_model
    from speedec.bundled import bundled_model_dir
    from speedec.storage import atomic_write_text
    from speedec.tokenizer import TOKENIZER_FILE

    marker = directory / "speedec-bench.json"
    wanted = {"preset": preset, "seed": seed}
    if marker.is_file() and (directory / "config.json").is_file():
        try:
            if json.loads(marker.read_text()) == wanted:
                return directory
        except ValueError:
            pass
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(preset, seed=seed)
    model.save_pretrained(directory)
    bundled = bundled_model_dir()
    source = bundled / TOKENIZER_FILE if bundled is not None else None
    target = directory / TOKENIZER_FILE
    if source is not None and source.is_file() and _vocab_size(source) == model.config.vocab_size:
        shutil.copyfile(source, target)
    elif target.exists():
        target.unlink()
    atomic_write_text(marker, json.dumps(wanted) + "\n")
    return directory


def _vocab_size(tokenizer_file: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()


class ServerProcess:
    """A server subprocess on ``127.0.0.1:port``; its output goes to ``log``.

    ``with ServerProcess(...) as server:`` starts it and waits until ``/health``
    answers 200 (an error naming the log's last lines if it exits or times out
    first); leaving the block always stops it: SIGTERM, then SIGKILL after
    ``grace_s`` seconds."""

    def __init__(self, command: list[str], port: int, log: Path, *, env: dict | None = None,
                 ready_timeout_s: float = 600.0, grace_s: float = 15.0, name: str = "server") -> None:
        self.command, self.port, self.log = [str(c) for c in command], port, Path(log)
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout_s, self.grace_s, self.name = ready_timeout_s, grace_s, name
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.proc.returncode} before it was ready: "
                                 f"{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise BenchError(f"{self.name} was not ready within {self.ready_timeout_s:g} s: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return f"(no log at {self.log})"
        return " | ".join(text[-lines:]) or f"(empty log {self.log})"

    def stop(self) -> int | None:
        """SIGTERM, wait ``grace_s``, then SIGKILL; the exit code (None if it was never started)."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        finally:
            if not self._log_file.closed:
                self._log_file.close()
        return proc.returncode


def speedec_serve_command(model_dir: Path, port: int, *, engine: str, threads: int | None = None,
                          max_rows: int | None = None, max_queue: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "speedec.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--engine", engine, "--shutdown-deadline", "5"]
    if threads is not None:
        command += ["--threads", str(threads)]
    if max_rows is not None:
        command += ["--max-rows", str(max_rows)]
    if max_queue is not None:
        command += ["--max-queue", str(max_queue)]
    return command


_T0 = time.monotonic()


def log(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since the script started."""
    print(f"[{time.monotonic() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, document: dict) -> None:
    """``document`` as indented JSON, atomically (temp file in the same directory, then rename)."""
    from speedec.storage import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit in the main thread, so that ``finally`` blocks (which
    stop the servers) run as they do on Ctrl-C."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


# ----------------------------------------------------------------------------- the soak

@dataclass
class Mismatch:
    prompt: str
    max_tokens: int
    streamed: bool
    position: int  # first differing token (== the shorter length when one is a prefix of the other)
    served: list[int]
    expected: list[int]
    top2_gap: float | None = None
    served_is_runner_up: bool | None = None


@dataclass
class Tally:
    well_formed: int = 0
    ok: int = 0
    exact: int = 0
    streamed_ok: int = 0
    text_mismatches: int = 0
    disconnected: int = 0
    malformed: int = 0
    malformed_correct: int = 0
    malformed_wrong: list[dict] = field(default_factory=list)
    unexpected: Counter = field(default_factory=Counter)
    unexpected_examples: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    completion_tokens: int = 0

    def unexpected_status(self, what: str, detail: str) -> None:
        self.unexpected[what] += 1
        if len(self.unexpected_examples) < 10:
            self.unexpected_examples.append(f"{what}: {detail}"[:300])


def malformed_requests(vocab_size: int, context: int) -> list[tuple[str, str, bytes, int]]:
    """(kind, path, raw body, expected status) of every malformed request the soak sends."""
    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    completions, chat = "/v1/completions", "/v1/chat/completions"
    return [
        ("bad-json", completions, b'{"prompt": "Once upon", "max_tokens": ', 400),
        ("not-an-object", completions, b"[1, 2, 3]", 400),
        ("max-tokens-string", completions, body({"prompt": "Hi", "max_tokens": "ten"}), 400),
        ("prompt-number", completions, body({"prompt": 12, "max_tokens": 4}), 400),
        ("id-outside-vocab", completions, body({"prompt": [1, 2, vocab_size + 7], "max_tokens": 4}), 400),
        ("negative-id", completions, body({"prompt": [5, -3], "max_tokens": 4}), 400),
        ("beyond-context", completions, body({"prompt": "Hi", "max_tokens": context + 1}), 400),
        ("unknown-model", completions, body({"model": "no-such-model", "prompt": "Hi", "max_tokens": 4}), 404),
        ("negative-temperature", completions, body({"prompt": "Hi", "temperature": -1}), 400),
        ("stream-not-bool", completions, body({"prompt": "Hi", "stream": "yes"}), 400),
        ("chat-messages-string", chat, body({"messages": "hello", "max_tokens": 4}), 400),
    ]


class Soak:
    """The client side: ``concurrency`` workers, each sending one request after another
    until the deadline; the tallies in :attr:`tally`."""

    def __init__(self, url: str, *, model_name: str, prompts: dict[str, list[int]], references: dict[str, list[int]],
                 vocab_size: int, context: int, tokenizer, stop_ids: set[int], seed: int,
                 malformed_share: float = 0.10, stream_share: float = 0.5, disconnect_share: float = 0.10) -> None:
        self.url, self.model_name = url, model_name
        self.prompts, self.references = prompts, references
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.malformed = malformed_requests(vocab_size, context)
        self.rng = random.Random(seed)
        self.malformed_share, self.stream_share, self.disconnect_share = (malformed_share, stream_share,
                                                                          disconnect_share)
        self.tally = Tally()

    async def run(self, concurrency: int, duration_s: float) -> None:
        import httpx

        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, trust_env=False,
                                     timeout=httpx.Timeout(120.0, connect=10.0)) as client:
            deadline = time.monotonic() + duration_s
            await asyncio.gather(*(self._worker(client, deadline) for _ in range(concurrency)))

    async def _worker(self, client, deadline: float) -> None:
        while time.monotonic() < deadline:
            r = self.rng.random()
            try:
                if r < self.malformed_share:
                    await self._malformed(client)
                else:
                    prompt = self.rng.choice(list(self.prompts))
                    max_tokens = self.rng.randint(8, 64)
                    if self.rng.random() < self.stream_share:
                        disconnect = self.rng.random() < self.disconnect_share
                        await self._streamed(client, prompt, max_tokens, disconnect)
                    else:
                        await self._whole(client, prompt, max_tokens)
            except Exception as exc:  # noqa: BLE001 - a failed request is a finding, not a crash
                self.tally.unexpected_status(type(exc).__name__, str(exc))

    def _body(self, prompt: str, max_tokens: int, stream: bool) -> dict:
        return {"model": self.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": stream, "return_token_ids": True}

    async def _malformed(self, client) -> None:
        kind, path, raw, status = self.rng.choice(self.malformed)
        self.tally.malformed += 1
        response = await client.post(path, content=raw, headers={"content-type": "application/json"})
        try:
            error = response.json()["error"]
            shaped = isinstance(error.get("message"), str) and "\n" not in error["message"] and "type" in error
        except (ValueError, KeyError, TypeError, AttributeError):
            shaped = False
        if response.status_code == status and shaped:
            self.tally.malformed_correct += 1
        elif len(self.tally.malformed_wrong) < 20:
            self.tally.malformed_wrong.append({"kind": kind, "expected": status, "got": response.status_code,
                                               "body": response.text[:200]})
        else:
            self.tally.malformed_wrong.append({"kind": kind, "expected": status, "got": response.status_code})

    async def _whole(self, client, prompt: str, max_tokens: int) -> None:
        self.tally.well_formed += 1
        response = await client.post("/v1/completions", json=self._body(prompt, max_tokens, False))
        if response.status_code != 200:
            self.tally.unexpected_status(f"HTTP {response.status_code}", response.text)
            return
        data = response.json()
        choice = data["choices"][0]
        if data.get("prompt_token_ids") != self.prompts[prompt]:
            self.tally.unexpected_status("prompt-ids", f"{prompt!r}: the server tokenized it differently")
        self._check(prompt, max_tokens, choice["token_ids"], choice["text"], streamed=False)

    async def _streamed(self, client, prompt: str, max_tokens: int, disconnect: bool) -> None:
        if not disconnect:
            self.tally.well_formed += 1
        leave_after = self.rng.randint(1, max(1, max_tokens // 2)) if disconnect else None
        text, token_ids, events = [], None, 0
        async with client.stream("POST", "/v1/completions", json=self._body(prompt, max_tokens, True)) as response:
            if response.status_code != 200:
                self.tally.unexpected_status(f"HTTP {response.status_code}", (await response.aread()).decode())
                return
            async for event in sse_events(response):
                if "error" in event:
                    self.tally.unexpected_status("stream error event", str(event["error"].get("message")))
                    return
                events += 1
                choice = event["choices"][0]
                text.append(choice.get("text") or "")
                if "token_ids" in choice:
                    token_ids = choice["token_ids"]
                if leave_after is not None and events >= leave_after:
                    # Leaving the block closes the connection mid-stream: the server must cancel.
                    self.tally.disconnected += 1
                    return
        if disconnect:  # the stream ended before the chosen point: it counts as a whole request
            self.tally.well_formed += 1
        if token_ids is None:
            self.tally.unexpected_status("stream without token_ids", prompt)
            return
        self.tally.streamed_ok += 1
        self._check(prompt, max_tokens, token_ids, "".join(text), streamed=True)

    def _check(self, prompt: str, max_tokens: int, served: list[int], text: str, *, streamed: bool) -> None:
        tally = self.tally
        tally.ok += 1
        tally.completion_tokens += len(served)
        expected = self.references[prompt][:max_tokens]
        if served == expected:
            tally.exact += 1
        else:
            position = next((i for i, (a, b) in enumerate(zip(served, expected)) if a != b),
                            min(len(served), len(expected)))
            tally.mismatches.append(Mismatch(prompt, max_tokens, streamed, position, served, expected))
        visible = [t for t in served if t not in self.stop_ids]
        if text != self.tokenizer.decode(visible):
            tally.text_mismatches += 1


def top2(model, ids: list[int]) -> tuple[float, int, int]:
    """(top-1 minus top-2 logit, top-1 id, top-2 id) of the next token after ``ids``."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    values, indices = logits.topk(2)
    return float(values[0] - values[1]), int(indices[0]), int(indices[1])


class RssSampler:
    """Samples a process's resident set size every ``interval_s`` in a thread."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.start_time = 0.0

    def _rss(self) -> int | None:
        try:
            import psutil

            return psutil.Process(self.pid).memory_info().rss
        except ImportError:
            pass
        except Exception:  # noqa: BLE001 - the process is gone
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            if rss is not None:
                self.samples.append((time.monotonic() - self.start_time, rss))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.start_time = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self, duration_s: float) -> dict:
        """Growth from the first minute's level (median of the samples in the first
        ``min(60 s, duration / 4)``) to the end's (median of the last ``min(30 s,
        duration / 10)``, at least the last sample)."""
        if not self.samples:
            return {"samples": 0}
        first_window = min(60.0, duration_s / 4)
        last_window = min(30.0, duration_s / 10)
        end_time = self.samples[-1][0]
        first = [rss for t, rss in self.samples if t <= first_window] or [self.samples[0][1]]
        last = [rss for t, rss in self.samples if t >= end_time - last_window] or [self.samples[-1][1]]
        start_mb, end_mb = statistics.median(first) / 2 ** 20, statistics.median(last) / 2 ** 20
        return {"samples": len(self.samples), "interval_s": self.interval_s,
                "first_window_s": first_window, "last_window_s": last_window,
                "start_mb": round(start_mb, 1), "end_mb": round(end_mb, 1),
                "peak_mb": round(max(rss for _, rss in self.samples) / 2 ** 20, 1),
                "growth": (end_mb - start_mb) / start_mb,
                "series_mb": [[round(t, 1), round(rss / 2 ** 20, 1)] for t, rss in self.samples]}


def server_metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10.0, trust_env=False).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def format_report(report: dict) -> str:
    t = report["requests"]
    rss = report["rss"]
    rows = [
        ("well-formed requests sent", t["well_formed"]),
        ("  completed (200)", t["ok"]),
        ("  exact (= offline speed engine)", f"{t['exact']} ({t['exact_share']:.1%})"),
        ("  mismatched", t["mismatched"]),
        ("  text != decode(token_ids)", t["text_mismatches"]),
        ("streamed, disconnected mid-stream", t["disconnected"]),
        ("malformed sent", t["malformed"]),
        ("  with the right 4xx", t["malformed_correct"]),
        ("unexpected statuses / errors", sum(t["unexpected"].values())),
        ("completion tokens checked", t["completion_tokens"]),
        ("RSS start / end / peak (MB)", f"{rss.get('start_mb', '-')} / {rss.get('end_mb', '-')} / "
                                         f"{rss.get('peak_mb', '-')}"),
        ("RSS growth (target < 5%)", f"{rss['growth']:+.2%}" if "growth" in rss else "-"),
        ("server idle at the end", report["server"]["idle_at_end"]),
        ("server exit code", report["server"]["exit_code"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"soak: {report['settings']['preset']}, {report['settings']['duration_s']:g} s, "
             f"{report['settings']['concurrency']} clients, engine {report['settings']['engine']}",
             "-" * (width + 20)]
    lines += [f"{name.ljust(width)}  {value}" for name, value in rows]
    if t["unexpected"]:
        lines.append("unexpected: " + ", ".join(f"{k} x{v}" for k, v in t["unexpected"].items()))
        lines += [f"  {example}" for example in t["unexpected_examples"][:5]]
    if t["malformed_wrong"]:
        lines.append("malformed with the wrong answer: " + json.dumps(t["malformed_wrong"][:5]))
    if report["mismatches"]:
        lines.append("mismatches (first differing position, offline top-2 logit gap there):")
        for m in report["mismatches"][:20]:
            gap = "-" if m["top2_gap"] is None else f"{m['top2_gap']:.3g}"
            lines.append(f"  {m['prompt'][:28]!r:32} n={m['max_tokens']:<3} at {m['position']:<3} gap {gap:>9}  "
                         f"served is runner-up: {m['served_is_runner_up']}")
        gaps = [m["top2_gap"] for m in report["mismatches"] if m["top2_gap"] is not None]
        if gaps:
            lines.append(f"  largest gap {max(gaps):.3g} (float32 near-ties are gaps of ~1e-5 and below)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="Seconds of load (default 300).")
    parser.add_argument("--concurrency", type=int, default=16, help="Clients kept busy (default 16).")
    parser.add_argument("--preset", default="membound", help="Model preset (default membound).")
    parser.add_argument("--engine", default="speed", choices=("speed", "autoregressive"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the server and the offline "
                                                                  "reference (default: PyTorch's choice).")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "soak",
                        help="Where the model and the server log go (default runs/soak).")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON summary (default benchmarks/results/soak.json; with --quick WORK_DIR/soak-quick.json).")
    parser.add_argument("--rss-interval", type=float, default=None, help="Seconds between RSS samples (default 5).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the traffic mix.")
    parser.add_argument("--quick", action="store_true", help="Tiny preset, 20 s: to try the plumbing.")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.duration = "tiny", min(args.duration, 20.0)
    if args.duration <= 0 or args.concurrency < 1:
        parser.error("--duration must be > 0 and --concurrency >= 1")
    out = args.out or (args.work_dir / "soak-quick.json" if args.quick else ROOT / "benchmarks" / "results" / "soak.json")
    interval = args.rss_interval or (1.0 if args.duration < 120 else 5.0)
    exit_on_sigterm()
    try:
        report = run(args, interval)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(out, report)
    print(format_report(report))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def load_model(args):
    """The preset's model directory (written on first use), the model and its tokenizer,
    with ``args.threads`` PyTorch threads (what both benchmark scripts start from)."""
    import torch

    from speedec.model import LoopedLM
    from speedec.tokenizer import load_tokenizer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log(f"model {args.preset} in {args.work_dir / args.preset}")
    model_dir = prepare_model(args.preset, args.work_dir / args.preset)
    model = LoopedLM.from_pretrained(model_dir)
    return model_dir, model, load_tokenizer(model_dir, model.config.vocab_size)


def run(args, interval: float) -> dict:
    import torch

    from speedec import generate

    model_dir, model, tokenizer = load_model(args)
    config = model.config
    eos = tokenizer.eos_token_id
    stop_ids = set() if eos is None else {eos}
    prompts = {p: tokenizer.encode(p) for p in PROMPTS}
    # Offline references, before the server starts (a quiet machine): n tokens of a
    # greedy run are the first n of a 64-token run.
    log(f"offline references ({len(prompts)} prompts x 64 tokens, engine speed)")
    references = {p: generate(model, ids, 64, engine="speed", eos_token_id=eos).tokens for p, ids in prompts.items()}

    port = free_port()
    command = speedec_serve_command(model_dir, port, engine=args.engine, threads=args.threads)
    model_name = model_dir.resolve().name
    server_log = args.work_dir / "soak-server.log"
    soak = Soak(f"http://127.0.0.1:{port}", model_name=model_name, prompts=prompts, references=references,
                vocab_size=config.vocab_size, context=config.max_seq_len, tokenizer=tokenizer, stop_ids=stop_ids,
                seed=args.seed)
    log(f"starting {' '.join(command[1:])}")
    with ServerProcess(command, port, server_log, name="speedec serve") as server:
        log(f"server {server.url} (pid {server.pid}) ready; {args.duration:g} s of load with "
            f"{args.concurrency} clients")
        with RssSampler(server.pid, interval) as sampler:
            begin = time.monotonic()
            asyncio.run(soak.run(args.concurrency, args.duration))
            wall = time.monotonic() - begin
        # Cancelled requests leave at the scheduler's next step: give it a moment.
        metrics = {}
        for _ in range(50):
            metrics = server_metrics(server.url)
            if metrics.get("speedec_requests_active") == 0 and metrics.get("speedec_queue_depth") == 0:
                break
            time.sleep(0.1)
        exit_code = server.stop()
    log(f"server stopped (exit code {exit_code}); {len(soak.tally.mismatches)} mismatches to look at")

    tally = soak.tally
    gaps: dict[tuple[str, int], tuple[float, int, int]] = {}
    for m in tally.mismatches:
        if m.position < len(m.expected):
            key = (m.prompt, m.position)
            if key not in gaps:
                gaps[key] = top2(model, prompts[m.prompt] + m.expected[:m.position])
            m.top2_gap, _, runner_up = gaps[key]
            m.served_is_runner_up = m.position < len(m.served) and m.served[m.position] == runner_up
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"preset": args.preset, "engine": args.engine, "duration_s": args.duration,
                     "concurrency": args.concurrency, "threads": args.threads, "seed": args.seed,
                     "model_dir": str(model_dir), "command": command, "quick": args.quick,
                     "torch_threads": torch.get_num_threads()},
        "wall_s": wall,
        "requests": {
            "well_formed": tally.well_formed, "ok": tally.ok, "exact": tally.exact,
            "exact_share": tally.exact / tally.ok if tally.ok else 0.0,
            "mismatched": len(tally.mismatches), "streamed_ok": tally.streamed_ok,
            "text_mismatches": tally.text_mismatches, "disconnected": tally.disconnected,
            "malformed": tally.malformed, "malformed_correct": tally.malformed_correct,
            "malformed_wrong": tally.malformed_wrong, "unexpected": dict(tally.unexpected),
            "unexpected_examples": tally.unexpected_examples, "completion_tokens": tally.completion_tokens,
            "tokens_per_s": tally.completion_tokens / wall if wall > 0 else 0.0,
        },
        "mismatches": [asdict(m) for m in tally.mismatches],
        "rss": sampler.summary(args.duration),
        "server": {"exit_code": exit_code, "log": str(server_log),
                   "idle_at_end": metrics.get("speedec_requests_active") == 0
                   and metrics.get("speedec_queue_depth") == 0,
                   "metrics_at_end": metrics},
    }


if __name__ == "__main__":
    sys.exit(main())
