"""Model builders and a loopback server shared by the tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from speedec import LoopedLM, ModelConfig


def random_model(config: ModelConfig, *, seed: int = 0, std: float = 0.5, residual_scale: float = 3.0,
                 dtype: torch.dtype = torch.float64) -> LoopedLM:
    """A random model with enough signal that its greedy output varies (not one repeated token).
    An exit readout gets a random adapter too, so that it reads differently from the shared exit."""
    model = LoopedLM.random(config, seed=seed, std=std, residual_scale=residual_scale)
    if model.exit_readout is not None:
        with torch.no_grad():
            model.exit_readout.up.normal_(0.0, std, generator=torch.Generator().manual_seed(seed + 1))
    return model.to(dtype)


def vary_norm_gains(model: LoopedLM, seed: int) -> None:
    """Give every norm of ``model`` a non-trivial gain (1 + 0.3 N(0, 1), seeded)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=p.dtype))


def check_speed_on_random_prompt(model: LoopedLM, seed: int, data) -> list[int]:
    """A seeded random prompt and length drawn with hypothesis ``data``: ``speed`` (plain,
    and with drawn options) gives ``autoregressive``'s tokens; returns them."""
    import random

    from speedec import generate

    vocab = model.config.vocab_size
    rng = random.Random(seed)
    prompt = [rng.randrange(vocab) for _ in range(data.draw(st.integers(1, 12)))]
    n_new = data.draw(st.integers(1, 40))
    ref = generate(model, prompt, n_new, engine="autoregressive")
    options = {"early_correction": data.draw(st.booleans()), "guesses": data.draw(st.integers(1, min(3, vocab)))}
    for opts in ({}, options):
        assert generate(model, prompt, n_new, engine="speed", **opts).tokens == ref.tokens, opts
    return prompt


def small_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=48, n_unique_layers=2,
                  n_loops=3, exit_loop=1, max_seq_len=128)
    fields.update(overrides)
    return ModelConfig(**fields)


def mapping_model(exit_map: list[int], final_map: list[int], *, n_loops: int = 3,
                  exit_loop: int = 1) -> LoopedLM:
    """A hand-built model: after ``exit_loop`` loops token t predicts ``exit_map[t]``,
    after all loops it predicts ``final_map[t]`` (float64, no attention).

    Residual stream: dims A (0..V-1) hold the token one-hot, dims B (V..2V-1)
    a counter that the MLP grows by about 0.5 per loop in the token's own B
    dim. The head reads A through ``exit_map`` and B through ``final_map``, so
    the B logit overtakes the A logit (at 1.0) between the exit and the end.
    """
    V = len(exit_map)
    assert len(final_map) == V
    D = 2 * V
    config = ModelConfig(vocab_size=V, d_model=D, n_heads=2, n_kv_heads=1, ffn_dim=V, n_unique_layers=1,
                         n_loops=n_loops, exit_loop=exit_loop, max_seq_len=256, tie_embeddings=False,
                         norm_eps=1e-12)
    model = LoopedLM(config).to(torch.float64)
    growth = _counter_growth(D, n_loops, exit_loop)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        model.embed.weight.copy_(torch.eye(V, D, dtype=torch.float64))
        layer = model.layers[0]
        layer.attn_norm.weight.fill_(1.0)
        layer.mlp_norm.weight.fill_(1.0)
        # ffn unit i: silu(n_Ai) * n_Ai, non-zero only for the current token i.
        layer.w_gate_up[:V, :V] = torch.eye(V, dtype=torch.float64)
        layer.w_gate_up[V:, :V] = torch.eye(V, dtype=torch.float64)
        layer.w_down[V:, :] = growth * torch.eye(V, dtype=torch.float64)
        for t in range(V):
            model.lm_head[exit_map[t], t] += 1.0
            model.lm_head[final_map[t], V + t] += 1.0
    return model.eval()


def _counter_growth(D: int, n_loops: int, exit_loop: int) -> float:
    """Scale so the counter is < 1 after ``exit_loop`` loops and > 1 after ``n_loops``.

    Aim for the crossing of 1.0 midway between the two loop counts.
    """
    import math

    def counter_after(loops: int, g: float) -> float:
        b = 0.0
        for _ in range(loops):
            n_a = 1.0 / math.sqrt((1.0 + b * b) / D)  # normalised A component
            b += g * n_a * n_a / (1.0 + math.exp(-n_a))
        return b

    target = (exit_loop + n_loops) / 2
    lo, hi = 1e-6, 10.0
    for _ in range(200):  # bisect: counter after `target` loops (interpolated) == 1
        mid = (lo + hi) / 2
        c = counter_after(math.floor(target), mid)
        c2 = counter_after(math.ceil(target), mid)
        if (c + c2) / 2 < 1.0:
            lo = mid
        else:
            hi = mid
    g = (lo + hi) / 2
    assert counter_after(exit_loop, g) < 0.9 and counter_after(n_loops, g) > 1.1, "no margin"
    return g


class CountWeightReads(TorchDispatchMode):
    """Counts matrix products per weight tensor (whatever kernel runs them), and attention calls.

    A product reads a weight when one of its operands shares the weight's
    storage (BLAS path) or is the weight's oneDNN-reordered copy.
    """

    PRODUCTS = ("mm", "addmm", "bmm", "matmul", "linear", "mv", "_linear_pointwise", "few_rows_linear")

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.weights = weights
        self.ptrs = {w.untyped_storage().data_ptr(): name for name, w in weights.items()}
        self.calls = {name: 0 for name in weights}
        self.attention = 0

    def _name(self, tensor: torch.Tensor) -> str | None:
        for name, w in self.weights.items():
            packed = getattr(w, "_speedec_onednn", None)
            if packed is not None and packed[1] is tensor:
                return name
        if tensor.layout != torch.strided:
            return None
        return self.ptrs.get(tensor.untyped_storage().data_ptr())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.PRODUCTS:
            for a in args:
                if isinstance(a, torch.Tensor):
                    name = self._name(a)
                    if name is not None:
                        self.calls[name] += 1
        name = func.__name__.split(".")[0]
        if "scaled_dot_product" in name or name in ("softmax", "_softmax", "slot_attention", "slot_attention_rope"):
            self.attention += 1
        return func(*args, **(kwargs or {}))


def train_killed_after_step_3(monkeypatch, trainer_module, train_fn, config) -> None:
    """Run ``train_fn(config)`` while ``trainer_module.train_step`` dies at step 4
    (the checkpoint is at step 3; step 4 is logged, then the run dies), then
    undo the test's monkeypatches."""
    real_step = trainer_module.train_step

    def killed_after_step_3(run, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(trainer_module, "train_step", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_fn(config, progress=False)
    monkeypatch.undo()


def serve_requests(model, requests, *, concurrency, jitter=0.0, seed=0, **options):
    """Submit ``requests`` (ServeRequest) to a new Scheduler(model, **options) with at most
    ``concurrency`` in flight, each after a random delay of up to ``jitter`` s; return the
    tokens of each and the scheduler's metrics (it is shut down)."""
    import random

    from speedec.serve.scheduler import Scheduler

    scheduler = Scheduler(model, **options)
    scheduler.start()
    rng = random.Random(seed)
    results = [None] * len(requests)
    gate = threading.Semaphore(concurrency)

    def one(i):
        with gate:
            time.sleep(rng.random() * jitter)
            results[i] = scheduler.submit(requests[i]).result(timeout=120)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    metrics = scheduler.metrics()
    assert scheduler.shutdown(5)
    return results, metrics


def wait_until(predicate, what: str, timeout_s: float = 60.0, poll_s: float = 0.01):
    """Wait for ``predicate()`` to hold; fail naming ``what`` after ``timeout_s``.

    For conditions that another thread (a server, a scheduler) makes true *eventually*
    and whose timing the test cannot fix: the limit is a hang detector, not a speed
    check, so it is far beyond what a loaded 2-core machine needs."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


@contextlib.contextmanager
def serve_on_loopback(app, scheduler):
    """The ASGI ``app`` in a uvicorn thread on a free loopback port; yields its base URL,
    then stops the server and ``scheduler.shutdown`` (the scheduler is started by the caller)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
    try:
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        scheduler.shutdown(5.0)
        sock.close()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one thread: a tiny model's products are
    just big enough for PyTorch to split them over threads, which only adds waiting
    (badly so on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args) -> tuple[int, str, str]:
    """``speedec ARGS`` in process: exit code, stdout, stderr."""
    from click.testing import CliRunner

    from speedec.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def edit_config(directory, **changes) -> None:
    """Change fields of ``directory``'s ``config.json``."""
    import json
    from pathlib import Path

    path = Path(directory) / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(directory, edit) -> None:
    """Rewrite ``directory``'s ``model.safetensors`` after ``edit(tensors)``."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = str(Path(directory) / "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)

