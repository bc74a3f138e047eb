"""The server's scheduler: one thread owns the model and steps every active request.

Each request is a :class:`~speedec.engines.pipeline.Pipeline` (its tokens in
flight, each at its own loop and position) with its own KV cache. A step
gathers the rows of every active request's plan and passes them once through
the K unique layers (:meth:`speedec.model.LoopedLM.run_segments`: every weight
matrix applied once to all rows, attention per request against its own
cache), reads all their logits rows in one LM-head matmul, and advances each
request with its share (continuous depth-wise batching). Requests join
(prefill, first token) and leave between steps.

**Rows.** A step carries at most ``max_rows`` rows (at most the few-row
kernel's limit, :data:`speedec.kernels.FEW_ROWS`, within which a row's
products do not depend on the other rows; default: the row count where the
measured step cost per row is lowest, :func:`best_rows`). Every active request owns
one row (its oldest token in flight); a waiting request is admitted when a
row is free. Guesses take the rows left over: a request's pipeline asks, each
time its newest token reaches the early exit, whether it may launch a guess,
and the scheduler grants it when a row is free, no request is waiting, and
the guess pays at the measured step-cost curve ``t(R)`` (``speedec kernels``):
it rides as one more row for the ``L - e`` steps until its parent retires and
then, with probability ``a`` (the request's own running acceptance), saves
its request those steps, so the ``k`` guesses of a step at ``R`` rows pay
when ``k a t(n) > n (t(R) - t(n))`` for ``n`` active requests (see
:meth:`Scheduler._grant`). Requests are advanced best acceptance
first, so grants go where they pay most. At low load every request pipelines
as ``speed`` does alone; as load grows guesses stop, down to one row per
request (autoregressive rows, batched).

**Exactness.** Greedy output does not depend on guesses (they are verified
against the final loop), and a row's products do not depend on the other rows
of the step (batch-invariant kernel), so a request's tokens equal those of
the same request decoded alone (``speedec generate``); sampled requests use
position-keyed sampling (:mod:`speedec.serve.keyed`), whose tokens are fixed
by the seed and the final logits alone. docs/serving.md says where this is
bit for bit and where it is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..engines.base import GenerationStats, check_token_id, token_ids
from ..engines.pipeline import Pipeline
from ..engines.speed import step_costs_for
from ..engines.step import StepPlan, run_step, run_steps
from ..errors import ConfigError, GenerationError
from ..kernels import FEW_ROWS
from ..sampling import Sampler, SamplingParams
from .depths import model_at
from .keyed import KeyedSampling
from .logprobs import check_logprobs, first_logprobs, prefill_request, verified_logprobs
from .requests import QueueFull, RequestHandle, ServeRequest, ShuttingDown, StopOutput

ENGINES = ("speed", "autoregressive")
logger = logging.getLogger(__name__)


class _Grant:
    """The speculation policy the scheduler gives each request's pipeline: a guess
    is launched only when the scheduler grants it a row (see the module's doc).
    It keeps the request's acceptance estimate (moving average over ``window``)."""

    def __init__(self, scheduler: Scheduler, prior: float, window: int = 16, probe_every: int = 8) -> None:
        self.scheduler, self.acceptance, self.window = scheduler, prior, window
        self.probe_every = probe_every
        self._declined = 0
        self.guesses_skipped = 0

    def choose(self, rows: int | None = None) -> int:
        # Declined on price every time, the estimate would never move: every
        # probe_every-th opportunity asks for a row whatever the price.
        probe = self._declined + 1 >= self.probe_every
        if self.scheduler._grant(self.acceptance, probe=probe):
            self._declined = 0
            return 1
        self._declined += 1
        self.guesses_skipped += 1
        return 0

    def record(self, rank: int | None, *, known: int | None = None) -> None:
        self.acceptance += (float(rank == 0) - self.acceptance) / self.window


@dataclass(eq=False)
class _Active:
    handle: RequestHandle
    pipeline: Pipeline
    stats: GenerationStats
    grant: _Grant | None

    @property
    def rows(self) -> int:
        return len(self.pipeline.slots) + sum(len(s.spares) for s in self.pipeline.slots)


class Scheduler:
    """Owns ``model``; a background thread runs its steps.

    ``engine``: ``"speed"`` (each request pipelines, guesses granted within the
    row budget) or ``"autoregressive"`` (one row per request per step, no
    guesses). ``max_rows``: rows per step across all requests (at most the
    batch-invariant kernel's limit, 16; default: where the measured step cost
    per row is lowest, :func:`best_rows`). ``max_queue``: requests
    waiting for rows beyond which :meth:`submit` raises :class:`QueueFull`.
    ``step_costs``: seconds of a step with 1..max_rows rows (default: measured
    when the scheduler starts, as ``speedec kernels`` does).
    """

    def __init__(self, model, *, engine: str = "speed", max_rows: int | None = None,
                 max_queue: int = 64, model_name: str = "speedec",
                 step_costs: Sequence[float] | None = None) -> None:
        c = model.config
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "speed" and not c.has_early_exit:
            raise ConfigError("the speed engine needs a model with an early exit; serve this model "
                              "with engine 'autoregressive'")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)
                                     or not 1 <= max_rows <= FEW_ROWS):
            raise ConfigError(f"max_rows must be an integer from 1 to {FEW_ROWS} (the rows a step's "
                              f"products stay batch-invariant for), got {max_rows!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ConfigError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if step_costs is not None:
            step_costs = [float(t) for t in step_costs]
            needed = FEW_ROWS if max_rows is None else max_rows
            if len(step_costs) < needed or not all(t > 0 for t in step_costs):
                raise ConfigError(f"step_costs must hold {needed} positive seconds, got {step_costs!r}")
        self.model, self.engine, self.model_name = model, engine, model_name
        self.max_rows, self.max_queue = max_rows, max_queue
        self.step_costs: list[float] | None = step_costs
        self._lock = threading.Condition()
        self._queue: deque[RequestHandle] = deque()
        self._active: list[_Active] = []
        self._admitting = 0
        self._accepting = True
        self._running = False
        self._thread: threading.Thread | None = None
        # Grants of the step being advanced: rows still free, rows projected.
        self._free_rows = 0
        self._projected = 0
        self._counters = dict.fromkeys(
            ("requests_total", "requests_finished", "requests_failed", "requests_cancelled",
             "tokens_total", "steps_total", "rows_total", "step_seconds_total", "prefill_seconds_total",
             "drafts_launched", "drafts_accepted", "drafts_rejected"), 0.0)
        self._acceptance = 0.8  # server-wide running estimate: a new request's prior

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Measure the step costs (unless given; what the row budget and the grants
        need) and start the scheduler thread."""
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        if self.step_costs is None and (self.max_rows is None or self.engine == "speed"):
            self.step_costs = step_costs_for(self.model, self.max_rows or FEW_ROWS)
        if self.max_rows is None:
            self.max_rows = best_rows(self.step_costs)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="speedec-scheduler", daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(self, request: ServeRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Validate and enqueue ``request`` (decoded at depth ``request.loops``). Raises GenerationError
        (one line naming the field: ``prompt``, ``max_tokens``, ``loops``...), QueueFull or ShuttingDown.
        ``loop``: the event loop :meth:`RequestHandle.stream` runs in (default: the running one, if any)."""
        c = model_at(self.model, request.loops).config
        prompt = token_ids(request.prompt_ids, c.vocab_size)
        m = request.max_tokens
        check_logprobs(request)
        if len(prompt) + m > c.max_seq_len:
            raise GenerationError(f"max_tokens ({m}) + the prompt ({len(prompt)} tokens) exceeds the "
                                  f"model's context of {c.max_seq_len} tokens")
        if not isinstance(request.sampling, SamplingParams):
            raise GenerationError("sampling must be a SamplingParams")
        for t in request.stop_token_ids:
            check_token_id("stop token id", t, c.vocab_size)
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        with self._lock:
            if not self._accepting or not self._running:
                raise ShuttingDown("the server is shutting down" if self._running or self._thread
                                   else "the scheduler is not started")
            if len(self._queue) >= self.max_queue and len(self._active) + self._admitting >= self.max_rows:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            handle = RequestHandle(request, loop, self._notify)
            self._queue.append(handle)
            self._counters["requests_total"] += 1
            self._lock.notify_all()
        return handle

    def shutdown(self, deadline_s: float = 30.0) -> bool:
        """Stop accepting requests, let in-flight ones finish within ``deadline_s``
        (the rest are cancelled), stop the thread. True when all finished in time."""
        end = time.monotonic() + deadline_s
        with self._lock:
            self._accepting = False
            finished = self._lock.wait_for(lambda: not self._queue and not self._active and not self._admitting,
                                           max(0.0, end - time.monotonic()))
            if not finished:
                for handle in [*self._queue, *(a.handle for a in self._active)]:
                    handle._cancel.set()
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, end - time.monotonic()))
        return finished

    def metrics(self) -> dict[str, float]:
        """Counters and gauges: requests_total, requests_active, queue_depth,
        tokens_total, steps_total, rows_total, step_seconds_total, drafts_launched,
        drafts_accepted, drafts_rejected (acceptance = accepted / (accepted + rejected),
        the engines' definition; launched also counts guesses discarded behind a
        rejected one or at a request's end), requests_failed, requests_cancelled
        (and more)."""
        with self._lock:
            out = dict(self._counters)
            out["requests_active"] = float(len(self._active))
            out["queue_depth"] = float(len(self._queue) + self._admitting)
            out["max_rows"] = float(self.max_rows or 0)
            for a in self._active:  # live requests count too
                out["drafts_launched"] += a.stats.drafts_launched
                out["drafts_accepted"] += a.stats.drafts_accepted
                out["drafts_rejected"] += a.stats.drafts_rejected
        return out

    # ---------------------------------------------------------------- the thread
    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    self._reap()
                    self._lock.wait_for(lambda: self._queue or self._active or not self._running)
                    self._reap()
                    if not self._running and not self._active and not self._queue:
                        self._lock.notify_all()
                        return
                    admit = []
                    rows = sum(a.rows for a in self._active)
                    while self._queue and rows + len(admit) < self.max_rows:
                        admit.append(self._queue.popleft())
                    self._admitting = len(admit)  # neither queued nor active while they prefill
                for handle in admit:
                    self._admit(handle)
                    with self._lock:
                        self._admitting -= 1
                if self._active:
                    try:
                        self._step()
                    except Exception as exc:  # a bug outside any one request: fail those in flight, go on
                        logger.exception("scheduler step failed; failing the requests in flight")
                        with self._lock:
                            for a in list(self._active):
                                self._active.remove(a)
                                self._retire(a, "error", exc)
                with self._lock:
                    self._lock.notify_all()  # shutdown() waits on the active set

    def _reap(self) -> None:
        """Drop cancelled requests (queue and active): their rows and cache go now."""
        for handle in [h for h in self._queue if h.cancelled]:
            self._queue.remove(handle)
            self._close(handle, "cancelled")
        for a in [a for a in self._active if a.handle.cancelled]:
            self._active.remove(a)
            self._retire(a, "cancelled")

    def _admit(self, handle: RequestHandle) -> None:
        """Prefill a request and emit its first token; it joins the active set."""
        try:
            request, model = handle.request, model_at(self.model, handle.request.loops)
            begin = time.perf_counter()
            prompt = list(request.prompt_ids)
            seed = request.sampling.seed
            keyed = KeyedSampling(request.sampling, random.getrandbits(62) if seed is None else seed)
            cache = KVCache(model.config, len(prompt) + request.max_tokens, dtype=model.dtype,
                            device=model.device)
            logits = prefill_request(model, cache, handle)  # None: max_tokens 0 (the prompt's logprobs alone)
            out = StopOutput(request.max_tokens, request.stop_token_ids)
            if logits is not None:
                out.emit(keyed.pick(logits, len(prompt)))
            self._counters["prefill_seconds_total"] += time.perf_counter() - begin
            handle._deliver(out.tokens[:], first_logprobs(logits, out.tokens[:], request.logprobs))
            stats = GenerationStats(prompt_tokens=len(prompt))
            if out.done or logits is None:
                self._close(handle, out.stop_reason or "length")
                return
            grant = _Grant(self, self._acceptance) if self.engine == "speed" else None
            pipeline = Pipeline(model, cache, len(prompt), out, stats, Sampler(SamplingParams()),
                                policy=grant, speculate=self.engine == "speed",
                                transform=None if keyed.greedy else keyed,
                                keep_final=request.logprobs is not None)
        except Exception as exc:  # a failing request fails alone
            self._close(handle, "error", exc)
            return
        with self._lock:
            self._active.append(_Active(handle, pipeline, stats, grant))

    def _grant(self, acceptance: float, *, probe: bool = False) -> bool:
        """May the request being advanced launch a guess (one more row next step)?

        Each of the ``n`` active requests owns one row; the other rows are guesses.
        A guess rides as an extra row for the ``L - e`` steps until its parent
        retires and then, with probability ``a``, saves its request those
        steps, each worth a guess-free step ``t(n)``. With ``k`` guesses in
        flight (this one included) at ``R + 1`` rows, they pay when what they
        save, ``k a t(n)``, exceeds what they cost the ``n`` requests over
        the same steps, ``n (t(R + 1) - t(n))`` (``t``: the measured step-cost
        curve, ``a``: this request's running acceptance). Priced against the
        guess-free step, not against the step just before, so that a cost that
        jumps once is not paid for one guess and then ignored for the next.
        ``probe``: grant whenever a row is free (the request's estimate needs news).
        """
        if self._free_rows <= 0:
            return False
        costs, n = self.step_costs, max(len(self._active), 1)
        rows = self._projected + 1

        def t(r: int) -> float:
            return costs[min(max(r, 1), len(costs)) - 1]

        if not probe and (rows - n) * acceptance * t(n) <= n * max(0.0, t(rows) - t(n)):
            return False
        self._free_rows -= 1
        self._projected += 1
        return True

    def _step(self) -> None:
        active = self._active
        begin = time.perf_counter()
        if self.engine == "speed":
            # No row can be granted next step (every row is a request's own, or a request
            # waits for one): no request reads its exit this step, so a full server does
            # exactly what the autoregressive one does, without the exit rows' head reads.
            with self._lock:
                waiting = bool(self._queue)
            full = waiting or sum(a.rows for a in active) >= self.max_rows
            for a in active:
                a.pipeline.speculate = not full
        plans, failed = [], []
        for a in active:
            try:
                plans.append(a.pipeline.plan())
            except Exception as exc:
                failed.append((a, exc))
        with self._lock:
            for a, exc in failed:
                active.remove(a)
                self._retire(a, "error", exc)
        if not active:
            return
        outputs = self._run_plans(plans)
        rows = sum(p.rows.shape[0] for p in plans)
        # Grants for the next step: rows still free (none while a request waits for one).
        with self._lock:
            waiting = bool(self._queue)
        self._projected = rows
        self._free_rows = 0 if waiting else self.max_rows - rows
        finished = []
        order = sorted(range(len(active)), key=lambda i: -(active[i].grant.acceptance if active[i].grant else 0))
        for i in order:
            a, result = active[i], outputs[i]
            if isinstance(result, Exception):
                finished.append((a, "error", result))
                continue
            try:
                tokens = a.pipeline.advance(*result)
            except Exception as exc:
                finished.append((a, "error", exc))
                continue
            a.handle.stats.steps += 1
            a.handle.stats.drafts_launched = a.stats.drafts_launched
            a.handle.stats.drafts_accepted = a.stats.drafts_accepted
            a.handle._deliver(tokens, verified_logprobs(a.pipeline, tokens, a.handle.request.logprobs))
            if a.pipeline.done:
                finished.append((a, a.pipeline.out.stop_reason, None))
        elapsed = time.perf_counter() - begin
        with self._lock:
            c = self._counters
            c["steps_total"] += 1
            c["rows_total"] += rows
            c["step_seconds_total"] += elapsed
            for a, reason, error in finished:
                active.remove(a)
                self._retire(a, reason, error)

    def _run_plans(self, plans: list[StepPlan]) -> list:
        """Every plan's (hidden, logits): one batched pass; if it fails, each plan alone,
        so that a failing request fails alone (its exception in its place)."""
        try:
            return run_steps(self.model, plans)
        except Exception:
            results = []
            for plan in plans:
                try:
                    results.append(run_step(self.model, plan))
                except Exception as exc:
                    results.append(exc)
            return results

    def _retire(self, a: _Active, reason: str, error: BaseException | None = None) -> None:
        try:
            a.pipeline.finish()
        except Exception:  # a broken pipeline's counters are lost; the request still ends
            logger.exception("closing request %s", a.handle.id)
        c = self._counters
        c["drafts_launched"] += a.stats.drafts_launched
        c["drafts_accepted"] += a.stats.drafts_accepted
        c["drafts_rejected"] += a.stats.drafts_rejected
        if a.stats.drafts_launched:
            rate = a.stats.drafts_accepted / a.stats.drafts_launched
            self._acceptance += (rate - self._acceptance) / 8
        self._close(a.handle, reason, error)

    def _close(self, handle: RequestHandle, reason: str, error: BaseException | None = None) -> None:
        c = self._counters
        c["tokens_total"] += len(handle.tokens)
        c["requests_finished"] += 1
        c["requests_failed"] += reason == "error"
        c["requests_cancelled"] += reason == "cancelled"
        handle._finish(reason, error)


def best_rows(step_costs: Sequence[float]) -> int:
    """The default row budget: the row count at which a step serves rows fastest,
    ``argmax_R R / t(R)`` (the largest on ties): beyond it a row costs more
    than the average row, and serving more rows per step would lower the
    throughput the step-cost curve allows."""
    return max(range(1, len(step_costs) + 1), key=lambda r: (r / step_costs[r - 1], r))
