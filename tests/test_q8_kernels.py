"""8-bit (q8_0) products (speedec.q8_kernels): probes, exactness, batch invariance, errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from speedec import q8_kernels as q8
from speedec.errors import ConfigError

REASONS = ("ran", "not in /proc/cpuinfo", "not enabled (CPUID/XGETBV/OS)", "advertised but raised SIGILL",
           "kernel library unavailable: ")


def skip_unless_runs(path: str) -> None:
    """Skip a kernel path the host cannot run, saying why (from probe_report)."""
    if path != "torch" and (problem := q8._path_problem(path)) is not None:
        pytest.skip(f"{path} cannot run here: {problem}")


def weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return q8.quantize_q8_0(torch.randn(n, k, generator=gen) * 0.05)


def rows(m: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Rows with a few large values (as in transformer activations) and an all-zero block.
    x = torch.randn(m, k, generator=gen)
    x[:, ::97] *= 20
    if k > 32:
        x[:, :32] = 0
    return x


def float64_reference(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The product's terms summed in float64, and the sum of their magnitudes."""
    n, k = qs.shape
    xq, dx = q8.quantize_rows(x.reshape(-1, k))
    isum = torch.einsum("mbk,nbk->mnb", xq.double().reshape(-1, k // 32, 32), qs.double().reshape(n, k // 32, 32))
    terms = dx.double()[:, None, :] * d.double()[None] * isum
    return terms.sum(-1), terms.abs().sum(-1)


PATHS = [*q8.Q8_PATHS, "torch"]
SHAPES = [(32, 1), (32, 5), (96, 7), (544, 16), (800, 33), (4096, 9)]


def test_probe_report_runs_and_every_usable_path_runs():
    report = q8.probe_report()
    assert set(report) == set(q8.ISAS)
    for isa, (usable, why) in report.items():
        assert isinstance(usable, bool) and why.startswith(REASONS), (isa, why)
        assert usable == (why == "ran")
    assert q8.probe_report() == report  # cached: probed once
    usable = q8.usable_paths()
    assert usable == [p for p in q8.Q8_PATHS if p in usable]  # best first
    qs, d = weights(6, 64, 0)
    x = rows(3, 64, 1)
    expected = q8.linear_q8(x, qs, d, "torch")
    for path in usable:
        assert torch.equal(q8.linear_q8(x, qs, d, path), expected), path


def test_cpu_flags_come_from_proc_cpuinfo():
    flags = q8.cpu_flags()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert flags == set()
        return
    if "flags" in text:
        assert flags and all(flag in text for flag in flags)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k,n", SHAPES)
def test_product_matches_float64_and_every_path_agrees_bit_for_bit(path, k, n):
    skip_unless_runs(path)
    qs, d = weights(n, k, k + n)
    x = rows(5, k, k * n)
    out = q8.linear_q8(x, qs, d, path)
    assert out.shape == (5, n) and out.dtype == torch.float32
    exact, magnitude = float64_reference(x, qs, d)
    assert ((out.double() - exact).abs() <= 1e-5 * magnitude + 1e-30).all()
    # The same float32 operations in the same order on every path: the torch path's bits.
    assert torch.equal(out, q8.linear_q8(x, qs, d, "torch"))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k,n", [(32, 1), (4096, 7), (96, 33), (544, 2)])
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(path, k, n):
    skip_unless_runs(path)
    qs, d = weights(n, k, 7 * k + n)
    x = rows(16, k, k - n)
    alone = torch.cat([q8.linear_q8(x[i:i + 1], qs, d, path) for i in range(16)])
    for m in range(2, 17):
        assert torch.equal(q8.linear_q8(x[:m], qs, d, path), alone[:m]), m
    # Any rows, in any order, any leading shape.
    order = torch.randperm(16, generator=torch.Generator().manual_seed(k))[:6]
    assert torch.equal(q8.linear_q8(x[order].reshape(2, 3, k), qs, d, path), alone[order].reshape(2, 3, n))


@pytest.mark.parametrize("path", q8.Q8_PATHS)
def test_kernels_do_not_depend_on_the_thread_count_or_the_row_count_beyond_16(path):
    skip_unless_runs(path)
    qs, d = weights(301, 256, 3)  # big enough to split over threads
    x = rows(35, 256, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = q8.linear_q8(x, qs, d, path)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(q8.linear_q8(x, qs, d, path), single)  # 35 rows: three passes
    assert torch.equal(single[20:21], q8.linear_q8(x[20:21], qs, d, path))
    assert torch.equal(single, q8.linear_q8(x, qs, d, "torch"))


@pytest.mark.parametrize("path", PATHS)
def test_a_nan_row_gives_nan_outputs_and_leaves_the_others_alone(path):
    skip_unless_runs(path)
    qs, d = weights(9, 64, 5)
    x = rows(3, 64, 6)
    x[1, 40] = float("nan")
    out = q8.linear_q8(x, qs, d, path)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
    assert torch.equal(out[[0, 2]], q8.linear_q8(x[[0, 2]], qs, d, path))
    assert q8.linear_q8(torch.empty(0, 64), qs, d, path).shape == (0, 9)


def test_the_kernels_quantize_activations_as_the_torch_reference():
    if not q8.build():
        pytest.skip(f"kernel library unavailable: {q8._ERROR}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8 * 32, generator=gen) * torch.logspace(-6, 6, 8 * 32)
    x[0, 32:64] = 0  # amax 0: all zeros, dx 0
    x[1, 64:96] = torch.arange(-16, 16) + 0.5  # ties once scaled by 127 / 127 ...
    x[1, 64] = 127.0  # ... (amax 127): round half to even
    x[2, 96:128] = 1e-39  # a subnormal amax: 127 / amax overflows
    x[2, 100] = 0.0
    x[3, 0:32] = float("inf")
    xq, dx = torch.ops.speedec_q8.quantize_rows(x)
    ref_q, ref_dx = q8.quantize_rows(x)
    assert xq.dtype == torch.int8 and torch.equal(xq.float(), ref_q)
    assert torch.equal(dx, ref_dx)
    assert xq[0, 32:64].eq(0).all() and dx[0, 1] == 0
    assert xq[1, 64:96].tolist() == [127, *[round(v + 0.5) for v in range(-15, 16)]]  # (Python rounds to even)
    assert xq.abs().max() <= 127
    # dx is amax / 127 in float32 (not rounded to float16).
    amax = x.reshape(4, 8, 32).abs().amax(-1)
    assert torch.equal(dx[:, 1:], (amax / torch.full_like(amax, 127.0))[:, 1:])


def test_weight_quantization_is_llama_cpp_q8_0_and_round_trips_within_half_a_step():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(7, 96, generator=gen) * 0.1
    w[0, :32] = 0
    w[2, :32] = torch.linspace(-127, 127, 32)
    w[2, 0] = 127.0
    w[2, 1:4] = torch.tensor([2.5, -2.5, 0.5])  # d = 1: roundf rounds these half away from zero
    qs, d = q8.quantize_q8_0(w)
    assert qs.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (7, 3)
    assert qs[2, 1:4].tolist() == [3, -3, 1]
    assert qs.abs().max() <= 127 and qs[0, :32].eq(0).all() and d[0, 0] == 0
    d32 = w.reshape(7, 3, 32).abs().amax(-1) / 127
    err = (w - qs.float() * d32.repeat_interleave(32, -1)).abs()
    assert (err <= d32.repeat_interleave(32, -1) * (0.5 + 1e-6)).all()
    w_hat = q8.dequantize_q8_0(qs, d)
    assert w_hat.dtype == torch.float32 and torch.equal(w_hat, qs.float() * d.float().repeat_interleave(32, -1))
    step = d.float().repeat_interleave(32, -1)
    assert ((w - w_hat).abs() <= step * (0.5 + 127 * 2.0 ** -11)).all()  # plus float16's rounding of d
    gguf = pytest.importorskip("gguf")
    import numpy as np

    packed = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(7, 3, 34)
    assert np.array_equal(packed[..., 2:].view(np.int8).reshape(7, 96), qs.numpy())
    assert np.array_equal(packed[..., :2].copy().view(np.float16).reshape(7, 3), d.numpy())


def test_bad_operands_are_rejected_with_one_line_messages():
    qs, d = weights(4, 64, 0)
    x = torch.randn(2, 64)
    for call, pattern in [
        (lambda: q8.quantize_q8_0(torch.randn(3, 40)), "K = 40 is not a multiple of 32"),
        (lambda: q8.quantize_q8_0(torch.ones(3, 64, dtype=torch.int32)), "must be a floating-point tensor"),
        (lambda: q8.dequantize_q8_0(qs.float(), d), "qs must be int8 and d float16"),
        (lambda: q8.linear_q8(x, qs, d[:, :1].contiguous()), r"d must be \(4, 2\)"),
        (lambda: q8.linear_q8(x.double(), qs, d, "torch"), "x must be float32"),
        (lambda: q8.linear_q8(torch.randn(2, 32), qs, d, "torch"), r"float32 \[\.\.\., 64\]"),
        (lambda: q8.linear_q8(x, qs, d, "amx"), "path must be one of"),
        (lambda: q8.linear_q8(x, qs.T.contiguous().T, d, "torch"), "qs and d must be contiguous"),
    ]:
        with pytest.raises(ValueError, match=pattern) as caught:
            call()
        assert "\n" not in str(caught.value)
    if not q8.build():
        return
    op = torch.ops.speedec_q8.linear
    path = (q8.usable_paths() or ["avx2"])[0]
    for args, pattern in [
        ((x, qs, d, "amx"), "unknown path 'amx'"),
        ((x.double(), qs, d, path), "x must be float32"),
        ((x, qs.int(), d, path), "qs must be int8"),
        ((x, qs, d.float(), path), "d must be float16"),
        ((torch.randn(2, 32), qs, d, path), "x has 32 columns, qs has 64"),
        ((torch.randn(2, 40), torch.zeros(4, 40, dtype=torch.int8), d, path), "not a multiple of 32"),
        ((x, qs, d[:, :1].contiguous(), path), r"d must be \[N, K / 32\]"),
        ((torch.randn(64, 2).T, qs, d, path), "x must be contiguous"),
        ((x, qs.T.contiguous().T, d, path), "qs and d must be contiguous"),
    ]:
        with pytest.raises(RuntimeError, match=pattern):
            op(*args)
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        torch.ops.speedec_q8.probe("sse9")


@pytest.fixture
def q8_choice(monkeypatch):
    def choose(value: str) -> str | None:
        monkeypatch.setenv("SPEEDEC_Q8_KERNEL", value)
        return q8.best_path()

    return choose


def test_best_path_honours_speedec_q8_kernel(q8_choice, monkeypatch):
    usable = q8.usable_paths()
    assert q8_choice("auto") == (usable[0] if usable else None)
    assert q8_choice("torch") == "torch"
    for path in usable:
        assert q8_choice(path) == path
    with pytest.raises(ConfigError, match="SPEEDEC_Q8_KERNEL must be one of"):
        q8_choice("fastest")
    # A path whose probe failed cannot be forced, and auto passes over it.
    report = dict(q8.probe_report())
    report["avx512vnni"] = (False, "advertised but raised SIGILL")
    monkeypatch.setattr(q8, "_REPORT", report)
    with pytest.raises(ConfigError, match="SPEEDEC_Q8_KERNEL=avx512vnni cannot run here.*SIGILL"):
        q8_choice("avx512vnni")
    assert q8_choice("auto") == next((p for p in usable if p != "avx512vnni"), None)
    with pytest.raises(ConfigError, match="avx512vnni path cannot run here"):
        q8.linear_q8(torch.randn(1, 32), *weights(2, 32, 0), "avx512vnni")


def test_a_failed_build_warns_once_and_leaves_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setattr(q8, "_LIB", None)
    monkeypatch.setattr(q8, "_ERROR", "")
    monkeypatch.setattr(q8, "_REPORT", None)
    broken = tmp_path / "q8_rows.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(q8, "_SOURCE", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SPEEDEC_Q8_KERNEL", raising=False)
    with pytest.warns(RuntimeWarning, match="q8_0 kernels are unavailable"):
        assert not q8.build()
    assert q8._ERROR and "\n" not in q8._ERROR
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not q8.build()  # the reason is kept, without a second warning
    report = q8.probe_report()
    assert all(not usable and why.startswith("kernel library unavailable: ") for usable, why in report.values())
    assert q8.usable_paths() == [] and q8.best_path() is None
    qs, d = weights(3, 64, 2)
    x = rows(2, 64, 3)
    assert q8.linear_q8(x, qs, d).shape == (2, 3)  # the torch path
