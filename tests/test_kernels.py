"""The few-row matrix products (speedec.kernels): correctness, batch invariance, choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speedec import kernels
from speedec.errors import ConfigError

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# speedec's own few-row products, by kernel name: overloads of one op (csrc/few_rows.cpp).
OWN_OPS = {"avx2": "default", "avx512": "avx512"}


def own_op(name: str):
    """The op of speedec's kernel ``name``; skips the test (saying why) where it cannot run."""
    if not HAS_AVX2:
        pytest.skip("the CPU has no AVX2")
    assert kernels.avx2_kernel_available(), kernels._AVX2_ERROR
    if name == "avx512" and not kernels.avx512_kernel_available():
        pytest.skip(f"the AVX-512 path cannot run here: {kernels._AVX512_ERROR}")
    return getattr(torch.ops.speedec_kernels.few_rows_linear, OWN_OPS[name])


def auto_kernel() -> str:
    """What ``SPEEDEC_KERNEL=auto`` should pick on this machine."""
    if HAS_AVX2 and kernels.avx512_kernel_available():
        return "avx512"
    return "avx2" if HAS_AVX2 else "onednn" if kernels._ONEDNN else "matmul"


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


@pytest.mark.parametrize("name", ["avx2", "avx512"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 13])
@pytest.mark.parametrize("k_dim,n_out", [(64, 96), (1003, 77), (16, 1)])
def test_own_kernel_matches_float64_and_is_batch_invariant(name, rows, k_dim, n_out):
    op = own_op(name)
    gen = torch.Generator().manual_seed(rows * 1000 + k_dim)
    x = torch.randn(rows, k_dim, generator=gen)
    w = torch.randn(n_out, k_dim, generator=gen)
    out = op(x, w)
    exact = x.double() @ w.double().T
    assert out.shape == (rows, n_out) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4 * k_dim ** 0.5)
    # Each row alone gives the same bits as in the batch: several tokens per step
    # cannot change what one token would have produced.
    alone = torch.cat([op(x[i:i + 1], w) for i in range(rows)])
    assert torch.equal(out, alone)


def _error_bound(x: torch.Tensor, w: torch.Tensor, lanes: int) -> torch.Tensor:
    """A bound on a float32 few-row product's error against float64: each output is
    ``lanes`` float32 chains of ceil(K / lanes) roundings plus a log2(lanes)-step
    sum, so at most (ceil(K / lanes) + log2(lanes) + 1) units of 2^-24 of
    sum |x_k w_k| (and half a bf16 unit of the result for bf16 rows)."""
    k_dim = x.shape[-1]
    steps = -(-k_dim // lanes) + lanes.bit_length()
    bound = steps * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)
    if x.dtype == torch.bfloat16:
        bound += 2.0 ** -8 * (x.double() @ w.double().T).abs()
    return bound


@pytest.mark.parametrize("name", ["avx2", "avx512"])
@pytest.mark.parametrize("w_dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])  # (float32 weights take float32 rows)
@pytest.mark.parametrize("k_dim,n_out", [(1003, 37), (4096, 1), (17, 131), (40, 5)])  # (131: two threads' share)
def test_own_kernel_is_batch_invariant_for_up_to_16_rows(name, w_dtype, x_dtype, k_dim, n_out):
    """Every row's output is the same bits alone as among 2..16 rows, wherever it sits in
    the batch (any chunking of the rows) and with one thread or two (any split of N);
    each is within the float32 error bound of the float64 product. Odd N, N = 1 and K
    not a multiple of 8, 16 or 32 exercise the paired rows, the single rows and the tails."""
    op = own_op(name)
    gen = torch.Generator().manual_seed(k_dim + n_out)
    x = torch.randn(16, k_dim, generator=gen).to(x_dtype)
    w = torch.randn(n_out, k_dim, generator=gen).to(w_dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([op(x[i:i + 1], w) for i in range(16)])
        assert alone.dtype == x_dtype and alone.shape == (16, n_out)
        exact = x.double() @ w.double().T
        lanes = 16 if name == "avx512" else 8
        assert ((alone.double() - exact).abs() <= _error_bound(x, w, lanes)).all()
        if x_dtype == torch.bfloat16 and not (name == "avx512" and kernels.avx512_bf16_dot_available()):
            # Without vdpbf16ps, bf16 rows are widened: the float32 rows' product, rounded once.
            assert torch.equal(alone, op(x.float(), w).bfloat16())
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for rows in range(2, 17):
                for start in sorted({0, 16 - rows, (16 - rows) // 2}):
                    assert torch.equal(op(x[start:start + rows], w), alone[start:start + rows]), (rows, start)
            # Leading dimensions are rows too.
            assert torch.equal(op(x.reshape(2, 8, k_dim), w), alone.reshape(2, 8, n_out))
    finally:
        torch.set_num_threads(threads)


def test_the_op_without_an_overload_name_is_the_avx2_path():
    """few_rows_linear(x, w) is the AVX2 product (the default overload, as before the
    AVX-512 overload was added); the two paths round differently."""
    op = own_op("avx2")
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(16, 1003, generator=gen), torch.randn(64, 1003, generator=gen)
    assert torch.equal(torch.ops.speedec_kernels.few_rows_linear(x, w), op(x, w))
    assert not torch.equal(own_op("avx512")(x, w), op(x, w))


def test_avx512_probe_is_consistent_and_cached():
    """probe_avx512 says whether AVX-512 F/BW/VL (and AVX512_BF16) ran here, once per
    process; where it did, the CPU advertises them; where not, the op refuses to run."""
    if not HAS_AVX2:
        pytest.skip("the CPU has no AVX2")
    assert kernels.avx2_kernel_available(), kernels._AVX2_ERROR
    ops = torch.ops.speedec_kernels
    runs, reason = ops.probe_avx512("avx512"), ops.probe_avx512_reason("avx512")
    assert runs == (reason == "") and ops.probe_avx512("avx512") == runs
    assert runs == kernels.avx512_kernel_available()
    if ops.probe_avx512("avx512bf16"):
        assert runs  # the bf16 path needs the rest of AVX-512 too
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    flags = next((line.split(":")[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), None) if cpuinfo.exists() else None
    if runs and flags is not None:
        assert {"avx512f", "avx512bw", "avx512vl"} <= set(flags)
    with pytest.raises(RuntimeError, match="isa must be"):
        ops.probe_avx512("amx")
    if not runs:
        assert "avx512" not in kernels.available_kernels()
        with pytest.raises(RuntimeError, match="cannot run here"):
            ops.few_rows_linear.avx512(torch.ones(1, 8), torch.ones(2, 8))


@pytest.mark.parametrize("name", ["avx2", "avx512"])
def test_engines_give_identical_tokens_under_each_own_kernel(name):
    """speed's batched steps and autoregressive decoding agree token for token under the
    kernel (float32, batch-invariant products and the fused attention)."""
    from helpers import random_model, small_config
    from speedec.engines import generate

    own_op(name)
    model = random_model(small_config(vocab_size=64, n_loops=4, exit_loop=1), seed=3, std=0.7,
                         residual_scale=4.0, dtype=torch.float32)
    prompt = list(range(1, 9))
    op = getattr(torch.ops.speedec_kernels.few_rows_linear, OWN_OPS[name])
    with kernels.use_kernel(name):
        ref = generate(model, prompt, 40, engine="autoregressive").tokens
        assert generate(model, prompt, 40, engine="speed").tokens == ref
        assert generate(model, prompt, 40, engine="speed", guesses=2).tokens == ref
        with torch.inference_mode():  # (the products do go through this kernel)
            x = torch.randn(3, model.config.d_model)
            assert torch.equal(kernels.linear(x, model.head_weight), op(x, model.head_weight))


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


@pytest.mark.parametrize("name", ["avx512", "avx2", "onednn", "torch", "auto"])
def test_linear_agrees_with_f_linear_under_every_kernel(kernel, name):
    if name in OWN_OPS:
        own_op(name)
    if name == "onednn" and not kernels._ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN linear")
    expected = name if name != "auto" else auto_kernel()
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
    with pytest.raises(ConfigError, match="SPEEDEC_KERNEL=avx512 but the kernel is unavailable: the kernel library"):
        kernel("avx512")
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
    assert "avx2" not in kernels.available_kernels() and "avx512" not in kernels.available_kernels()
    with pytest.raises(ConfigError, match="SPEEDEC_KERNEL=avx2 but the kernel is unavailable"):
        kernel("avx2")
    with pytest.raises(ConfigError, match="SPEEDEC_KERNEL=avx512 but the kernel is unavailable"):
        kernel("avx512")
    kernel("auto")
    assert_linear_matches_f_linear(torch.randn(2, 16), torch.randn(8, 16))


def test_where_the_avx512_probe_fails_auto_picks_avx2_and_avx512_says_why(kernel, monkeypatch):
    """A host whose CPU lacks AVX-512 (or advertises it and faults): ``auto`` is the AVX2
    kernel, ``avx512`` is not listed, and asking for it is a ConfigError naming the probe's reason."""
    if not HAS_AVX2:
        pytest.skip("the CPU has no AVX2")
    assert kernels.avx2_kernel_available(), kernels._AVX2_ERROR
    monkeypatch.setattr(kernels, "_AVX512_PROBE", "AVX-512 F/BW/VL is advertised but raised SIGILL")
    assert kernel("auto") == "avx2"
    assert kernels.available_kernels()[0] == "avx2" and "avx512" not in kernels.available_kernels()
    with pytest.raises(ConfigError, match="SPEEDEC_KERNEL=avx512 but the kernel is unavailable: .*SIGILL"):
        kernel("avx512")
    kernel("auto")
    with pytest.raises(ConfigError, match="the avx512 kernel is unavailable here: .*SIGILL"):
        with kernels.use_kernel("avx512"):
            pass
    assert kernels.fused_ops_available()  # the fused ops are the AVX2 library's


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
