"""The server's scheduler: continuous depth-wise batching across requests, exact under load."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
import torch

from helpers import random_model, serve_requests, small_config
from speedec import generate, kernels
from speedec.engines import get_engine
from speedec.engines.base import GenerationStats, Output, prefill
from speedec.engines.step import run_steps
from speedec.errors import ConfigError, GenerationError
from speedec.sampling import Sampler, SamplingParams
from speedec.serve.keyed import KeyedSampling, position_seed
from speedec.serve.requests import QueueFull, ServeRequest, ShuttingDown
from speedec.serve.scheduler import Scheduler, best_rows

FLAT = [1.0] * 16  # step costs: every row count costs the same (guesses always pay)


def _model(dtype=torch.float64, **overrides):
    fields = dict(n_loops=4, exit_loop=1, vocab_size=64, max_seq_len=160)
    fields.update(overrides)
    return random_model(small_config(**fields), seed=3, std=0.7, residual_scale=4.0, dtype=dtype)


def _prompts(n, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def _start(model, prompt, n):
    from speedec.cache import KVCache

    cache = KVCache(model.config, len(prompt) + n, dtype=model.dtype, device="cpu")
    out = Output(n, None, None)
    out.emit(int(prefill(model, cache, prompt).argmax()))
    return cache, out


def test_run_steps_equals_each_plan_run_alone():
    """One batched step over several requests' plans (spares, exit readout and loop
    embedding included) gives each plan bit for bit what run_step gives it alone."""
    from speedec.engines.step import run_step

    model = _model(torch.float32, exit_readout_rank=4, loop_embedding=True)
    # At most 7 + 4 + 4 rows: within the batch-invariant kernel's 16.
    options = [{"guesses": 2}, {}, {"early_correction": True}]
    prompts = _prompts(3, 64, seed=1)
    twins = []
    for prompt, opts in zip(prompts, options):
        pair = []
        for _ in range(2):
            cache, out = _start(model, prompt, 20)
            pipeline = get_engine("speed", model, **opts).pipeline(
                cache, len(prompt), out, GenerationStats(), Sampler(SamplingParams()))
            pair.append(pipeline)
        twins.append(pair)
    with torch.inference_mode():
        for _ in range(80):
            live = [pair for pair in twins if not pair[0].done]
            if not live:
                break
            batched = run_steps(model, [a.plan() for a, _ in live])
            for (a, b), (hidden, logits) in zip(live, batched):
                alone_hidden, alone_logits = run_step(model, b.plan())
                assert torch.equal(hidden, alone_hidden)
                assert (logits is None) == (alone_logits is None)
                if logits is not None:
                    assert torch.equal(logits, alone_logits)
                assert a.advance(hidden, logits) == b.advance(alone_hidden, alone_logits)
    assert all(a.done and a.out.tokens == b.out.tokens for a, b in twins)


@pytest.mark.parametrize("engine", ["speed", "autoregressive"])
@pytest.mark.parametrize("concurrency,max_rows", [(1, 16), (4, 16), (8, 3), (12, 6)])
def test_greedy_output_is_independent_of_load_float64(engine, concurrency, max_rows):
    """Every request's tokens equal the autoregressive engine's on it alone, at any
    concurrency, arrival order and row budget (queueing and denied guesses included)."""
    model = _model()
    prompts = _prompts(12, 64)
    lengths = [random.Random(i).randint(1, 40) for i in range(12)]
    requests = [ServeRequest(p, n) for p, n in zip(prompts, lengths)]
    results, metrics = serve_requests(model, requests, concurrency=concurrency, jitter=0.01, engine=engine,
                              max_rows=max_rows, step_costs=FLAT)
    for p, n, got in zip(prompts, lengths, results):
        assert got == generate(model, p, n, engine="autoregressive").tokens
    assert metrics["requests_finished"] == 12 and metrics["requests_failed"] == 0
    assert metrics["rows_total"] <= metrics["steps_total"] * max_rows
    if engine == "speed" and concurrency == 1:
        assert metrics["drafts_launched"] > 0
    if engine == "autoregressive":
        assert metrics["drafts_launched"] == 0


def test_greedy_float32_equals_speed_alone_at_low_load_and_batches_rows():
    """float32 with the batch-invariant kernel: at low load every request pipelines as
    the speed engine does alone and gets its tokens bit for bit; several requests
    share steps (more than one row per step)."""
    model = _model(torch.float32)
    prompts = _prompts(6, 64, seed=2)
    requests = [ServeRequest(p, 30) for p in prompts]
    results, metrics = serve_requests(model, requests, concurrency=3, step_costs=FLAT)
    for p, got in zip(prompts, results):
        assert got == generate(model, p, 30, engine="speed").tokens
    assert metrics["rows_total"] / metrics["steps_total"] > 1.5


@pytest.mark.skipif(not kernels.fused_ops_available(), reason="speedec's AVX2 kernels are not built here")
def test_greedy_float32_is_exact_under_load_with_the_fused_kernels():
    """float32 with the batch-invariant products and the per-row fused attention: under
    load (queueing, guesses denied by a 4-row budget) every request still gets the
    speed engine's tokens alone, and those are the autoregressive engine's, bit for bit."""
    model = _model(torch.float32)
    prompts = _prompts(10, 64, seed=4)
    results, metrics = serve_requests(model, [ServeRequest(p, 30) for p in prompts], concurrency=8, jitter=0.005,
                              max_rows=4, step_costs=FLAT)
    for p, got in zip(prompts, results):
        assert got == generate(model, p, 30, engine="speed").tokens == generate(
            model, p, 30, engine="autoregressive").tokens
    assert metrics["rows_total"] / metrics["steps_total"] > 2


def test_seeded_sampling_is_independent_of_load():
    """A seeded sampled request gives the same tokens alone and among others."""
    model = _model()
    prompt = [3, 1, 4, 1, 5]
    sampling = SamplingParams(temperature=1.0, top_k=20, seed=123)
    alone, _ = serve_requests(model, [ServeRequest(prompt, 40, sampling)], concurrency=1, step_costs=FLAT)
    others = [ServeRequest(p, 30, SamplingParams(temperature=0.7, seed=i)) for i, p in enumerate(_prompts(7, 64))]
    loaded, _ = serve_requests(model, [*others[:3], ServeRequest(prompt, 40, sampling), *others[3:]], concurrency=8,
                       max_rows=5, step_costs=FLAT)
    assert loaded[3] == alone[0]
    greedy = generate(model, prompt, 40, engine="autoregressive").tokens
    assert alone[0] != greedy  # it did sample


def test_keyed_sampling_draws_from_the_distribution():
    """The Gumbel-max draw keyed by position is distributed as the processed p."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]], dtype=torch.float64)
    params = SamplingParams(temperature=1.0, top_k=4, seed=9)
    keyed = KeyedSampling(params, seed=9)
    p = Sampler(params).probs(logits)[0]
    n = 6000
    counts = Counter(keyed.pick(logits[0], t) for t in range(n))
    assert counts[3] == 0  # cut by top_k
    for v in range(5):
        assert abs(counts[v] / n - float(p[v])) < 4 * (float(p[v]) * (1 - float(p[v])) / n) ** 0.5 + 1e-9
    assert position_seed(1, 2) != position_seed(2, 1)


def test_stop_tokens_and_metrics():
    model = _model()
    prompt = [1, 2, 3]
    ref = generate(model, prompt, 30, engine="autoregressive").tokens
    stop = ref[5]
    first = ref.index(stop)
    scheduler = Scheduler(model, step_costs=FLAT)
    scheduler.start()
    handle = scheduler.submit(ServeRequest(prompt, 30, stop_token_ids=frozenset({stop})))
    assert handle.result(30) == ref[: first + 1] and handle.finish_reason == "stop"
    handle = scheduler.submit(ServeRequest(prompt, 4))
    assert handle.result(30) == ref[:4] and handle.finish_reason == "length"
    assert handle.stats.completion_tokens == 4 and handle.stats.time_to_first_token_s > 0
    m = scheduler.metrics()
    assert m["requests_total"] == 2 and m["tokens_total"] == first + 1 + 4 and m["steps_total"] > 0
    assert scheduler.shutdown(5)


class GatedScheduler(Scheduler):
    """A scheduler whose steps can be held: while ``hold(handles)`` is true for the
    active requests' handles, the scheduler thread waits before running a step (it
    is woken by a cancellation or a shutdown, which notify the scheduler's lock).
    Tests use it to keep a request in flight for as long as they need, not as long
    as a race between threads happens to allow."""

    def __init__(self, model, hold, **options):
        super().__init__(model, **options)
        self.hold = hold
        self.held = threading.Event()  # set once a step has been held

    def _step(self) -> None:
        with self._lock:
            handles = [a.handle for a in self._active]
            if self.hold(handles):
                self.held.set()
                assert self._lock.wait_for(lambda: not self.hold(handles), 60), "the step was never released"
        super()._step()


def _doom(scheduler, request, on_advance):
    """Make ``request``'s pipeline raise RuntimeError("boom") on its ``on_advance``-th
    advance (1 = its first step). Chosen before the request is submitted, so the
    failure fires at that step whatever the threads' timing."""
    from speedec.engines import pipeline as pipeline_module

    doomed: dict[int, int] = {}  # id(pipeline) -> advances so far
    real_admit, real_advance = scheduler._admit, pipeline_module.Pipeline.advance

    def admit(handle):
        real_admit(handle)
        if handle.request is request:  # in the scheduler thread: _active is its own
            doomed.update({id(a.pipeline): 0 for a in scheduler._active if a.handle is handle})

    def advance(self, hidden, logits):
        if id(self) in doomed:
            doomed[id(self)] += 1
            if doomed[id(self)] == on_advance:
                raise RuntimeError("boom")
        return real_advance(self, hidden, logits)

    scheduler._admit = admit
    return advance


def test_cancel_frees_the_request_and_others_are_unaffected():
    model = _model()
    long_request = ServeRequest([1, 2], 150)
    # Steps are held while the long request is in flight and not cancelled: it
    # cannot finish before the cancellation arrives.
    scheduler = GatedScheduler(model, lambda handles: any(
        h.request is long_request and not h.cancelled for h in handles), step_costs=FLAT)
    scheduler.start()
    long = scheduler.submit(long_request)
    other = scheduler.submit(ServeRequest([4, 5, 6], 40))
    assert scheduler.held.wait(60)
    assert not long.done
    long.cancel()
    assert other.result(30) == generate(model, [4, 5, 6], 40, engine="autoregressive").tokens
    assert long.result(30) == long.tokens
    assert long.finish_reason == "cancelled" and 1 <= len(long.tokens) < 150
    assert scheduler.metrics()["requests_cancelled"] == 1 and scheduler.metrics()["requests_active"] == 0
    assert scheduler.shutdown(5)


@pytest.mark.parametrize("engine", ["speed", "autoregressive"])
def test_a_failing_request_fails_alone(monkeypatch, engine):
    """An exception inside one request's pipeline (here: on its second step) ends that
    request with "error" and its exception; the others finish with their exact tokens,
    and the scheduler keeps serving."""
    from speedec.engines import pipeline as pipeline_module

    model = _model()
    scheduler = Scheduler(model, engine=engine, step_costs=FLAT)
    bad_request = ServeRequest([7, 7], 20)  # 20 tokens: far more than two steps make
    monkeypatch.setattr(pipeline_module.Pipeline, "advance", _doom(scheduler, bad_request, on_advance=2))
    scheduler.start()
    prompts = _prompts(3, 64)
    handles = [scheduler.submit(ServeRequest(p, 20)) for p in prompts]
    bad = scheduler.submit(bad_request)
    for h, p in zip(handles, prompts):
        assert h.result(30) == generate(model, p, 20, engine="autoregressive").tokens
        assert h.finish_reason == "length"
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(30)
    assert bad.finish_reason == "error" and isinstance(bad.error, RuntimeError)
    assert 1 <= len(bad.tokens) < 20
    assert bad.tokens == generate(model, [7, 7], 20, engine="autoregressive").tokens[:len(bad.tokens)]
    assert scheduler.metrics()["requests_failed"] == 1
    after = scheduler.submit(ServeRequest([1], 5))
    assert after.result(30) == generate(model, [1], 5, engine="autoregressive").tokens
    assert scheduler.shutdown(5)


@pytest.mark.parametrize("request_,match", [
    (ServeRequest([], 5), "empty"),
    (ServeRequest([1, 99], 5), "outside the vocabulary"),
    (ServeRequest([1], 0), "max_tokens"),
    (ServeRequest([1], 200), "max_tokens .* context"),
    (ServeRequest([1], 5, stop_token_ids=frozenset({64})), "stop token id"),
])
def test_bad_requests_are_generation_errors(request_, match):
    scheduler = Scheduler(_model(), step_costs=FLAT)
    scheduler.start()
    with pytest.raises(GenerationError, match=match):
        scheduler.submit(request_)
    assert scheduler.shutdown(5)


def test_queue_full_and_shutdown():
    model = _model()
    # Steps are held until shutdown cancels the running request: the first request can
    # neither finish nor free its row for the waiting one while the test checks.
    scheduler = GatedScheduler(model, lambda handles: not all(h.cancelled for h in handles),
                               max_rows=1, max_queue=1, step_costs=FLAT)
    with pytest.raises(ShuttingDown, match="not started"):
        scheduler.submit(ServeRequest([1], 5))
    scheduler.start()
    first = scheduler.submit(ServeRequest([1], 150))
    assert scheduler.held.wait(60)  # first is active (prefilled), its first step held
    waiting = scheduler.submit(ServeRequest([2], 5))
    with pytest.raises(QueueFull, match="queue is full"):
        scheduler.submit(ServeRequest([3], 5))
    assert scheduler.metrics()["queue_depth"] == 1 and scheduler.metrics()["requests_active"] == 1
    assert not scheduler.shutdown(0.0)  # deadline passed: the rest is cancelled
    assert first.finish_reason == "cancelled" and waiting.finish_reason == "cancelled"
    assert waiting.tokens == [] and 1 <= len(first.tokens) < 150
    with pytest.raises(ShuttingDown):
        scheduler.submit(ServeRequest([1], 5))


def test_shutdown_lets_in_flight_requests_finish():
    model = _model()
    scheduler = Scheduler(model, step_costs=FLAT)
    scheduler.start()
    handles = [scheduler.submit(ServeRequest(p, 25)) for p in _prompts(4, 64)]
    assert scheduler.shutdown(60)
    assert all(h.finish_reason == "length" and len(h.tokens) == 25 for h in handles)


def test_options_are_checked():
    model = _model()
    with pytest.raises(ConfigError, match="engine"):
        Scheduler(model, engine="fast")
    with pytest.raises(ConfigError, match="max_rows"):
        Scheduler(model, max_rows=17)
    with pytest.raises(ConfigError, match="step_costs"):
        Scheduler(model, max_rows=4, step_costs=[1.0, 1.0])
    no_exit = random_model(small_config(n_loops=1, exit_loop=None), seed=0)
    with pytest.raises(ConfigError, match="autoregressive"):
        Scheduler(no_exit)
    Scheduler(no_exit, engine="autoregressive")


def test_default_row_budget_follows_the_step_cost_curve():
    assert best_rows([1.0, 1.0, 1.0, 1.2, 3.0, 3.0]) == 4
    assert best_rows([1.0] * 16) == 16
    assert best_rows([1.0, 5.0, 9.0]) == 1
    scheduler = Scheduler(_model(), step_costs=[1.0] * 5 + [9.0] * 11)
    scheduler.start()
    assert scheduler.max_rows == 5
    assert scheduler.shutdown(5)


def test_guesses_stop_where_rows_are_dear():
    """A second row priced above any saving: no guess is granted beyond the probes
    (one in 8 opportunities); with flat costs nearly every opportunity guesses."""
    model = _model()
    dear = [1.0] + [100.0] * 15
    requests = [ServeRequest([5, 6, 7], 60)]
    results, metrics = serve_requests(model, requests, concurrency=1, max_rows=16, step_costs=dear)
    assert 0 < metrics["drafts_launched"] <= 60 / 8 + 1
    cheap_results, cheap = serve_requests(model, requests, concurrency=1, step_costs=FLAT)
    assert cheap["drafts_launched"] > 3 * metrics["drafts_launched"]
    assert results == cheap_results


def test_a_step_that_fails_outside_any_request_fails_those_in_flight_and_the_scheduler_goes_on(monkeypatch):
    model = _model()
    scheduler = Scheduler(model, step_costs=FLAT)
    calls = {"n": 0}
    real = scheduler._run_plans

    def broken_once(plans):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("bug in the step")
        return real(plans)

    monkeypatch.setattr(scheduler, "_run_plans", broken_once)
    scheduler.start()
    victims = [scheduler.submit(ServeRequest(p, 30)) for p in _prompts(2, 64)]
    for handle in victims:
        with pytest.raises(RuntimeError, match="bug in the step"):
            handle.result(30)
        assert handle.finish_reason == "error"
    after = scheduler.submit(ServeRequest([1, 2], 10))
    assert after.result(30) == generate(model, [1, 2], 10, engine="autoregressive").tokens
    assert scheduler.metrics()["requests_failed"] == 2
    assert scheduler.shutdown(5)


def test_a_full_server_reads_no_exit_and_launches_no_guess(monkeypatch):
    """When every row of a step is a request's own (here: a 1-row budget), the speed
    server plans no exit read at all: it runs what the autoregressive server runs."""
    from speedec.engines import pipeline as pipeline_module

    model = _model()
    exits = []
    real_plan = pipeline_module.Pipeline.plan

    def plan(self):
        step = real_plan(self)
        exits.append(len(step.exit_rows))
        return step

    monkeypatch.setattr(pipeline_module.Pipeline, "plan", plan)
    results, metrics = serve_requests(model, [ServeRequest(p, 20) for p in _prompts(3, 64)], concurrency=3,
                              max_rows=1, step_costs=FLAT)
    assert sum(exits) == 0 and metrics["drafts_launched"] == 0 and len(exits) > 0
    assert results == [generate(model, p, 20, engine="autoregressive").tokens for p in _prompts(3, 64)]
