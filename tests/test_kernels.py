"""The few-row matrix products (speedec.kernels): correctness, batch invariance, choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speedec import kernels
from speedec.errors import ConfigError

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def assert_linear_matches_f_linear(x: torch.Tensor, w: torch.Tensor) -> None:
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.fixture
def kernel(monkeypatch):
    """Select a kernel through SPEEDEC_KERNEL for one test."""

    def select(name: str) -> str:
        monkeypatch.setenv("SPEEDEC_KERNEL", name)
        kernels.reset_kernel_choice()
        return kernels.active_kernel()

    yield select
    monkeypatch.delenv("SPEEDEC_KERNEL", raising=False)
    kernels.reset_kernel_choice()


@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2")
def test_avx2_kernel_builds_on_an_avx2_machine():
    assert kernels.avx2_kernel_available(), kernels._AVX2_ERROR


@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2")
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 13])
@pytest.mark.parametrize("k_dim,n_out", [(64, 96), (1003, 77), (16, 1)])
def test_avx2_kernel_matches_float64_and_is_batch_invariant(rows, k_dim, n_out):
    assert kernels.avx2_kernel_available(), kernels._AVX2_ERROR
    gen = torch.Generator().manual_seed(rows * 1000 + k_dim)
    x = torch.randn(rows, k_dim, generator=gen)
    w = torch.randn(n_out, k_dim, generator=gen)
    out = torch.ops.speedec_kernels.few_rows_linear(x, w)
    exact = x.double() @ w.double().T
    assert out.shape == (rows, n_out) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4 * k_dim ** 0.5)
    # Each row alone gives the same bits as in the batch: several tokens per step
    # cannot change what one token would have produced.
    alone = torch.cat([torch.ops.speedec_kernels.few_rows_linear(x[i:i + 1], w) for i in range(rows)])
    assert torch.equal(out, alone)


@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2")
def test_avx2_kernel_rejects_bad_operands():
    assert kernels.avx2_kernel_available(), kernels._AVX2_ERROR
    op = torch.ops.speedec_kernels.few_rows_linear
    with pytest.raises(RuntimeError, match="columns"):
        op(torch.ones(2, 8), torch.ones(4, 9))
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.ones(2, 8, dtype=torch.float64), torch.ones(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="float32 weights take float32 rows"):
        op(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(4, 8))
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(torch.ones(2, 8, dtype=torch.float16), torch.ones(4, 8, dtype=torch.float16))


@pytest.mark.parametrize("name", ["avx2", "onednn", "torch", "auto"])
def test_linear_agrees_with_f_linear_under_every_kernel(kernel, name):
    if name == "avx2" and not HAS_AVX2:
        pytest.skip("the CPU has no AVX2")
    if name == "onednn" and not kernels._ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN linear")
    expected = name if name != "auto" else ("avx2" if HAS_AVX2 else "onednn" if kernels._ONEDNN else "matmul")
    assert kernel(name) == expected
    x = torch.randn(2, 3, 40)
    w = torch.randn(24, 40)
    with torch.inference_mode():
        out = kernels.linear(x, w)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 3, 24)


def test_without_onednn_and_avx2_the_fallback_is_w_at_x(kernel, monkeypatch):
    monkeypatch.setattr(kernels, "_ONEDNN", False)
    monkeypatch.setattr(kernels, "_AVX2", False)
    assert kernel("auto") == "matmul"
    with pytest.raises(ConfigError, match="no oneDNN"):
        kernel("onednn")
    kernel("auto")
    assert_linear_matches_f_linear(torch.randn(3, 16), torch.randn(8, 16))


def test_unknown_kernel_is_a_config_error(kernel):
    with pytest.raises(ConfigError, match="SPEEDEC_KERNEL must be one of"):
        kernel("fastest")


def test_gradients_and_float64_use_f_linear(kernel):
    kernel("auto")
    x = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(kernels.linear(x, w), (w @ x.T).T)
    wg = torch.randn(5, 8, requires_grad=True)
    kernels.linear(torch.randn(3, 8), wg).sum().backward()
    assert wg.grad is not None


def test_use_kernel_switches_and_restores(kernel):
    kernel("auto")
    before = kernels.active_kernel()
    x = torch.randn(3, 32)
    w = torch.randn(16, 32)
    for name in kernels.available_kernels():
        with kernels.use_kernel(name):
            assert_linear_matches_f_linear(x, w)
    assert kernels.active_kernel() == before
    with pytest.raises(ConfigError, match="kernel must be one of"):
        with kernels.use_kernel("auto"):
            pass


def test_without_avx2_the_kernel_falls_back_with_a_reason(kernel, monkeypatch):
    monkeypatch.setattr(kernels, "_AVX2", None)
    monkeypatch.setattr(kernels, "_AVX2_ERROR", "")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not kernels.avx2_kernel_available()
    assert "not AVX2" in kernels._AVX2_ERROR
    assert kernel("auto") in ("onednn", "matmul")
    assert "avx2" not in kernels.available_kernels()
    with pytest.raises(ConfigError, match="SPEEDEC_KERNEL=avx2 but the kernel is unavailable"):
        kernel("avx2")
    kernel("auto")
    assert_linear_matches_f_linear(torch.randn(2, 16), torch.randn(8, 16))


def test_a_failed_build_warns_once_and_falls_back(kernel, monkeypatch, tmp_path):
    if not HAS_AVX2:
        pytest.skip("the CPU has no AVX2")
    monkeypatch.setattr(kernels, "_AVX2", None)
    monkeypatch.setattr(kernels, "_AVX2_ERROR", "")
    broken = tmp_path / "few_rows.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "_SOURCE", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="few-row kernel is unavailable"):
        assert not kernels.avx2_kernel_available()
    assert kernels._AVX2_ERROR
    assert kernel("auto") in ("onednn", "matmul")
    # A bf16 model falls back too (W @ x.T: oneDNN's path is float32's) and decodes.
    from helpers import random_model, small_config
    from speedec.engines import generate

    model = random_model(small_config(), dtype=torch.bfloat16)
    kernels.prepare_kernel(model)
    monkeypatch.setattr(torch.ops.speedec_kernels, "few_rows_linear", None, raising=False)  # never called
    assert generate(model, [1, 2, 3], 8, engine="speed").tokens == \
        generate(model, [1, 2, 3], 8, engine="autoregressive").tokens


def test_a_build_lock_is_waited_for_then_cleared_when_stale(tmp_path, monkeypatch):
    import os
    import threading
    import time

    lock = tmp_path / "lock"
    kernels._clear_stale_lock(tmp_path)  # no lock: returns at once
    # A fresh lock belongs to a build in progress: wait until it is released.
    lock.write_text("")
    threading.Timer(0.3, lock.unlink).start()
    begin = time.monotonic()
    kernels._clear_stale_lock(tmp_path, poll_s=0.05)
    assert 0.2 < time.monotonic() - begin < 10 and not lock.exists()
    # A lock left by a dead build is removed once it is older than the limit.
    lock.write_text("")
    old = time.time() - kernels._STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    kernels._clear_stale_lock(tmp_path)
    assert not lock.exists()
    monkeypatch.setattr(kernels, "_STALE_LOCK_S", 0.3)
    lock.write_text("")  # fresh, never released: waited for, then removed as stale
    kernels._clear_stale_lock(tmp_path, poll_s=0.05)
    assert not lock.exists()


def test_the_kernel_is_the_models_choice(kernel, monkeypatch):
    """prepare_kernel stores the choice on the model; use_kernel overrides it in
    its own thread only, so threads (a server's requests) never swap kernels."""
    import threading
    import types

    from helpers import random_model, small_config

    kernel("auto")
    model = random_model(small_config(exit_readout_rank=4), dtype=torch.float32)
    kernels.prepare_kernel(model)
    modules = [m for m in model.modules() if hasattr(m, "kernel")]
    assert len(modules) > 3 and {m.kernel for m in modules} == {kernels.active_kernel()}
    wide = random_model(small_config())  # float64: no few-row kernel, nothing stored
    kernels.prepare_kernel(wide)
    assert {m.kernel for m in wide.modules() if hasattr(m, "kernel")} == {None}

    callers = []

    def f_linear(x, w):
        callers.append(threading.get_ident())
        return F.linear(x, w)

    monkeypatch.setattr(kernels, "F", types.SimpleNamespace(linear=f_linear))
    x = torch.randn(2, 32)
    model.set_kernel("matmul")
    with torch.inference_mode():
        model.head(x)
        assert callers == []  # the model's W @ x.T, not the process default
        model.set_kernel("torch")
        model.head(x)
        assert callers == [threading.get_ident()]
        model.set_kernel("matmul")
        entered, release = threading.Event(), threading.Event()

        def other_thread():
            with kernels.use_kernel("torch"):
                entered.set()
                release.wait(10)
                model.head(x)

        worker = threading.Thread(target=other_thread)
        worker.start()
        entered.wait(10)
        model.head(x)  # meanwhile, in this thread: still the model's kernel
        release.set()
        worker.join()
        assert len(callers) == 2 and callers[1] == worker.ident
        with kernels.use_kernel("torch"):
            model.head(x)
        assert len(callers) == 3 and callers[2] == threading.get_ident()


# ------------------------------------------------------------ fused attention

def _reference_attention(q, keys, values, layer, loops, positions):
    """float64 attention of each row over its loop's keys 0..position (GQA)."""
    N, H, hd = q.shape
    Hkv = keys.shape[2]
    out = torch.empty(N, H * hd, dtype=torch.float64)
    for n in range(N):
        for h in range(H):
            k = keys[layer, loops[n], h // (H // Hkv), : positions[n] + 1].double()
            v = values[layer, loops[n], h // (H // Hkv), : positions[n] + 1].double()
            w = torch.softmax(k @ q[n, h].double() * hd ** -0.5, dim=0)
            out[n, h * hd:(h + 1) * hd] = w @ v
    return out


@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2")
@pytest.mark.parametrize("hd", [8, 13, 64])
def test_fused_attention_matches_float64_and_is_batch_invariant(hd):
    """slot_attention writes every row's key/value at (layer, loop, position) and
    attends like the float64 reference; a row's output is bit-identical alone, among
    other rows in any order, and with one thread or two."""
    assert kernels.avx2_kernel_available(), kernels._AVX2_ERROR
    gen = torch.Generator().manual_seed(hd)
    K, L, Hkv, H, S = 2, 4, 2, 6, 40
    keys = torch.randn(K, L, Hkv, S, hd, generator=gen)
    values = torch.randn(K, L, Hkv, S, hd, generator=gen)
    loops, positions = [0, 1, 3, 2, 1], [7, 6, 39, 0, 21]
    N = len(loops)
    qkv = torch.randn(N, H + 2 * Hkv, hd, generator=gen)  # views with a row stride, as the layers pass
    q, k, v = qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]
    op = torch.ops.speedec_kernels.slot_attention
    kc, vc = keys.clone(), values.clone()
    out = op(q, k, v, kc, vc, 1, loops, positions, hd ** -0.5)
    for n in range(N):
        assert torch.equal(kc[1, loops[n], :, positions[n]], k[n]) and torch.equal(vc[1, loops[n], :, positions[n]], v[n])
    torch.testing.assert_close(out.double(), _reference_attention(q, kc, vc, 1, loops, positions),
                               rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for n in range(N):
                kc1, vc1 = kc.clone(), vc.clone()  # the cache as the batched call left it
                alone = op(q[n:n + 1], k[n:n + 1], v[n:n + 1], kc1, vc1, 1, loops[n:n + 1], positions[n:n + 1],
                           hd ** -0.5)
                assert torch.equal(alone[0], out[n])
            order = [3, 0, 4, 2, 1]
            shuffled = op(q[order], k[order], v[order], kc.clone(), vc.clone(), 1,
                          [loops[i] for i in order], [positions[i] for i in order], hd ** -0.5)
            assert torch.equal(shuffled, out[order])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2")
def test_fused_attention_rejects_bad_operands():
    assert kernels.avx2_kernel_available(), kernels._AVX2_ERROR
    op = torch.ops.speedec_kernels.slot_attention
    cache = torch.zeros(1, 2, 1, 8, 4)
    q, kv = torch.zeros(1, 2, 4), torch.zeros(1, 1, 4)
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(q, kv, kv, cache, cache.clone(), 0, [0], [8], 0.5)
    with pytest.raises(RuntimeError, match="one loop and one position per row"):
        op(q, kv, kv, cache, cache.clone(), 0, [0, 1], [1], 0.5)
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), kv, kv, cache, cache.clone(), 0, [0], [1], 0.5)


@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2")
def test_decoding_steps_use_the_fused_attention_and_the_switch_turns_it_off(monkeypatch):
    """float32 decoding steps go through slot_attention (one call per layer, no
    softmax op); SPEEDEC_FUSED=0 gives the PyTorch path, same tokens."""
    from helpers import CountWeightReads, random_model, small_config
    from speedec import generate

    model = random_model(small_config(n_loops=4, exit_loop=1), dtype=torch.float32)
    calls = {}

    class Ops(CountWeightReads):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            calls[name] = calls.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    kernels.reset_kernel_choice()
    with Ops({}):
        fused = generate(model, [1, 2, 3], 12, engine="speed").tokens
    assert calls.get("slot_attention_rope", 0) > 0  # (prefill, many rows per group, takes the PyTorch path)
    monkeypatch.setenv("SPEEDEC_FUSED", "0")
    kernels.reset_kernel_choice()
    calls.clear()
    try:
        with Ops({}):
            plain = generate(model, [1, 2, 3], 12, engine="speed").tokens
        assert "slot_attention" not in calls and "slot_attention_rope" not in calls
        assert calls.get("_softmax", calls.get("softmax", 0)) > 0
    finally:
        monkeypatch.delenv("SPEEDEC_FUSED")
        kernels.reset_kernel_choice()
    assert fused == plain


@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2")
@pytest.mark.parametrize("hd", [8, 64])
def test_fused_attention_with_rotary_equals_apply_rope_then_attention(hd):
    """slot_attention_rope on the unrotated projection rotates q and k exactly as
    apply_rope does (bit for bit: same roundings, no FMA) and then attends as
    slot_attention: outputs and cache writes identical."""
    from speedec.model import apply_rope, rope_table

    assert kernels.avx2_kernel_available(), kernels._AVX2_ERROR
    gen = torch.Generator().manual_seed(hd + 1)
    K, L, Hkv, H, S = 2, 4, 2, 4, 48
    rope = rope_table(64, hd, 10000.0)
    keys, values = torch.randn(K, L, Hkv, S, hd, generator=gen), torch.randn(K, L, Hkv, S, hd, generator=gen)
    loops, positions = [3, 2, 1, 0], [40, 9, 17, 2]
    N = len(loops)
    qkv = torch.randn(N, (H + 2 * Hkv) * hd, generator=gen)
    angles = rope[torch.tensor(positions)].float()  # [N, 2, hd]
    qk = apply_rope(qkv[:, : (H + Hkv) * hd].reshape(N, H + Hkv, hd), angles[:, None, 0], angles[:, None, 1])
    v = qkv[:, (H + Hkv) * hd:].reshape(N, Hkv, hd)
    k1, v1 = keys.clone(), values.clone()
    plain = torch.ops.speedec_kernels.slot_attention(qk[:, :H], qk[:, H:], v, k1, v1, 1, loops, positions,
                                                     hd ** -0.5)
    k2, v2 = keys.clone(), values.clone()
    fused = torch.ops.speedec_kernels.slot_attention_rope(qkv, rope, k2, v2, 1, loops, positions, H, hd ** -0.5)
    assert torch.equal(fused, plain) and torch.equal(k1, k2) and torch.equal(v1, v2)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.speedec_kernels.slot_attention_rope(qkv[:, :-1], rope, k2, v2, 1, loops, positions, H, 0.5)
