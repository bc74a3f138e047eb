"""``speedec serve`` (an OpenAI-compatible HTTP server) and ``speedec loadtest``.

Imported only when one of the two commands runs (``LAZY_COMMANDS``), so that
the other commands never import FastAPI or uvicorn.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import click

from .common import split_list
from .options import (
    AT_LEAST_ONE,
    POSITIVE,
    FloatRange,
    IntRange,
    Placement,
    model_dtype_option,
    placement_options,
    threads_option,
)

SERVE_ENGINES = ("speed", "autoregressive")
BUNDLED_MODEL_NAME = "speedec-default"


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it): a port in use or a
    bad host is a one-line error before the model is loaded, and ``--port 0``
    picks a free port that the ready line then names."""
    if not host:
        raise click.UsageError("--host must not be empty")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.UsageError(f"--host {host!r} cannot be resolved: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "the address is already in use" if exc.errno == 98 else (exc.strerror or str(exc))
        raise click.ClickException(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def _display_url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@click.command("serve")
@click.option("--model", "model_dir", help="Model directory (default: the bundled model).")
@click.option("--model-name", default=None,
              help="The model's name in the API (default: the model directory's name; "
                   f"{BUNDLED_MODEL_NAME} for the bundled model).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=IntRange(min=0, max=65535),
              help="Port to listen on (0: any free port, named in the ready line).")
@click.option("--engine", default="speed", show_default=True, type=click.Choice(SERVE_ENGINES),
              help="speed: requests pipeline their tokens through the loops; autoregressive: one row "
                   "per request per step.")
@click.option("--max-rows", type=AT_LEAST_ONE, default=None,
              help="Rows per step across all requests, at most 16 (the batch-invariant kernel's limit; "
                   "default: where the step cost per row, measured at start, is lowest).")
@click.option("--max-queue", type=IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for rows beyond which new ones get HTTP 429.")
@placement_options(model_dtype_option, threads_option())
@click.option("--shutdown-deadline", type=FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds in-flight requests get to finish after SIGTERM/SIGINT.")
def serve_command(model_dir, model_name, host, port, engine, max_rows, max_queue, placement: Placement,
                  shutdown_deadline) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions,
    /v1/chat/completions, /v1/models, /health, /metrics). See docs/serving.md."""
    import uvicorn

    from ..bundled import hub_reference, resolve_model_dir
    from ..serve.app import chat_renderer, create_app, mark_draining
    from ..serve.scheduler import Scheduler
    from ..tokenizer import load_tokenizer
    from .common import load_model

    placement.set_threads()
    sock = _bind(host, port)
    try:
        directory, model = load_model(model_dir, placement)
        tokenizer = load_tokenizer(directory, model.config.vocab_size)
        if model_name is None:
            model_name = (BUNDLED_MODEL_NAME if model_dir is None  # a hub id names itself, not its snapshot
                          else model_dir if hub_reference(model_dir) and not Path(model_dir).exists()
                          else resolve_model_dir(model_dir).resolve().name)
        scheduler = Scheduler(model, engine=engine, max_rows=max_rows, max_queue=max_queue, model_name=model_name)
        app = create_app(scheduler, tokenizer, model_name=model_name, chat_template=chat_renderer(directory),
                         vocab_size=model.config.vocab_size, context_length=model.config.max_seq_len,
                         n_loops=model.config.n_loops, any_depth=getattr(model, "any_depth", False))
        scheduler.start()
    except BaseException:
        sock.close()
        raise
    ready = (f"speedec: serving {model_name} on {_display_url(host, sock)} "
             f"(engine {engine}, max rows {scheduler.max_rows})")
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5,
                            access_log=False)

    def drain() -> None:
        mark_draining(app)
        scheduler.shutdown(shutdown_deadline)

    server = _graceful_server(config, ready=ready, drain=drain, deadline_s=shutdown_deadline)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if server.draining is None or server.draining.is_alive():  # not drained (or a second signal)
            scheduler.shutdown(0.0)
    click.echo("speedec: stopped", err=True)


def _graceful_server(config, *, ready: str, drain, deadline_s: float):
    """uvicorn's server, stopped gracefully: the first SIGTERM/SIGINT runs ``drain``
    (the app answers 503 to health checks and new requests; the scheduler lets
    in-flight requests finish within the deadline), then uvicorn closes; a second
    one stops at once. Exits normally rather than re-raising the signal as uvicorn
    does, so the command exits 0. Prints ``ready`` once it listens."""
    import uvicorn

    class Server(uvicorn.Server):
        draining: threading.Thread | None = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                click.echo(ready)
                sys.stdout.flush()

        def handle_exit(self, sig, frame) -> None:
            if self.draining is not None:  # a second signal: stop now
                self.force_exit = True
                self.should_exit = True
                return
            click.echo(f"speedec: shutting down (in-flight requests get {deadline_s:g} s)", err=True)

            def run() -> None:
                try:
                    drain()
                finally:
                    self.should_exit = True

            self.draining = threading.Thread(target=run, name="speedec-drain", daemon=True)
            self.draining.start()

    return Server(config)


# ----------------------------------------------------------------------------- loadtest

def _concurrency(text: str) -> list[int]:
    items = split_list(text)
    try:
        levels = [int(item) for item in items]
    except ValueError:
        levels = []
    if not levels or any(level < 1 for level in levels):
        raise click.UsageError(f"--concurrency must be comma-separated integers >= 1, got {text!r}")
    return levels


@click.command("loadtest")
@click.option("--url", "urls", multiple=True, default=("http://127.0.0.1:8000",), show_default=True,
              help="Server to measure (this machine only); repeat to compare servers in one run.")
@click.option("--label", "labels", multiple=True,
              help="Name of each --url's run in the results (default: the URL); one per --url.")
@click.option("--concurrency", default="1,2,4,8,16", show_default=True,
              help="Requests in flight, one level per value.")
@click.option("--requests", "n_requests", type=AT_LEAST_ONE, default=32, show_default=True,
              help="Requests per concurrency level.")
@click.option("--max-tokens", type=AT_LEAST_ONE, default=64, show_default=True)
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="Prompts, one per line (default: a few built-in English prompts).")
@click.option("--time-limit", type=POSITIVE, default=120.0, show_default=True,
              help="Seconds per level; requests still running then are abandoned (counted as timed out).")
@click.option("--model", "model_name", default=None, help="Model name to send (default: the server's first).")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Stream answers (TTFT and inter-token latency need it).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON (atomically).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write tokens/s and p50 latency charts (PNG).")
@click.option("--merge", "merge_files", multiple=True, type=click.Path(dir_okay=False),
              help="Also put the runs of an earlier --out file in the JSON and plot (repeatable).")
def loadtest_command(urls, labels, concurrency, n_requests, max_tokens, prompts_file, time_limit, model_name,
                     stream, out, plot, merge_files) -> None:
    """Measure a running server: tokens/s, requests/s, time to first token and
    inter-token latency (p50/p95/p99) at each concurrency level."""
    from ..serve.loadtest import (
        check_loopback,
        format_table,
        merge_results,
        plot_results,
        read_prompts,
        results_document,
        run_loadtest,
        write_json,
    )

    levels = _concurrency(concurrency)
    urls = [check_loopback(url) for url in urls]
    if labels and len(labels) != len(urls):
        raise click.UsageError(f"give one --label per --url ({len(urls)}), got {len(labels)}")
    prompts = read_prompts(prompts_file)
    earlier = merge_results(merge_files)["runs"] if merge_files else []
    runs = [run_loadtest(url, levels, n_requests, max_tokens=max_tokens, prompts=prompts, time_limit_s=time_limit,
                         stream=stream, label=labels[i] if labels else None, model=model_name)
            for i, url in enumerate(urls)]
    document = results_document([*earlier, *runs], {
        "concurrency": levels, "requests": n_requests, "max_tokens": max_tokens, "stream": stream,
        "time_limit_s": time_limit, "prompts": prompts_file or "built-in"})
    click.echo(format_table(document))
    if out:
        write_json(out, document)
    if plot and not plot_results(document, plot):
        click.echo("note: matplotlib is not installed; no plot written", err=True)
