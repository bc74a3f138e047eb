"""Matrix products for decoding: a few rows against large weight matrices.

At batch size 1 decoding is memory-bound, and SPEED's gain rests on a product
of 2-8 rows costing about what one row costs (one read of the weights). Which
formulation achieves that depends on the machine; measured on the 2-core
development machine (AMD EPYC, AVX2, PyTorch 2.13 CPU with MKL + oneDNN, the
101 MB of float32 layer weights of the ``membound`` preset, see BENCHMARKS.md):

* ``F.linear`` with 2-8 rows: 2-4x slower than one row (no amortisation);
* oneDNN with the weights reordered once into its blocked layout
  (``mkldnn._linear_pointwise``): better, still 2.4x slower at 8 rows than at
  one on the membound step (7.7 -> 18.5 ms, ``speedec kernels``);
* speedec's own AVX2 kernel (``csrc/few_rows.cpp``): streams each weight row
  once per step for up to six rows; the membound step costs 6.0 ms at one row
  and 6.3 ms at four (1.3x and 1.5x faster than oneDNN), 8.2 ms at five. It is
  also batch-invariant: a row's product does not depend on which other rows
  share it.
* speedec's AVX-512 kernel (same file, op ``few_rows_linear.avx512``): the
  same streaming with 16-lane float32 accumulators, up to eight rows per pass
  over a pair of weight rows, K % 16 as one masked step; bf16 rows with bf16
  weights use AVX512_BF16's ``vdpbf16ps`` (pairs of products into float32
  lanes) where it runs. Batch-invariant the same way; it rounds differently
  from the AVX2 kernel (each kernel is fixed per model and machine).

Measured on an Intel Xeon host (KVM guest, 2 cores, AVX-512
F/BW/VL/VNNI/BF16/FP16, AMX advertised but faulting; PyTorch 2.13 CPU, 2
threads; the library built with ``-O3 -mavx2 -mfma -fopenmp
-ffp-contract=off``, the AVX-512 functions with ``target("avx512f,avx512bw,
avx512vl[,avx512bf16]")``), the minimum of 6 runs (another job shared the
machine at times: runs varied by 5-30%). One 8192 x 4096 product, ms for
1 / 2 / 4 / 8 / 16 rows:

=====================  ================================  ================================
weights, rows          ``avx2``                          ``avx512``
=====================  ================================  ================================
float32, float32       2.81 / 2.68 / 3.20 / 5.38 / 9.95  2.64 / 2.85 / 3.12 / 3.92 / 7.07
bf16, float32          1.41 / 1.55 / 2.42 / 4.86 / 8.76  1.17 / 1.24 / 1.70 / 2.64 / 5.41
bf16, bf16             1.38 / 1.59 / 2.39 / 4.68 / 8.52  1.16 / 1.16 / 1.38 / 2.58 / 5.17
=====================  ================================  ================================

(one row reads 51 GB/s float32 and 58 GB/s bf16 with ``avx512``, so bf16
costs 0.44x float32; ``vdpbf16ps`` (the bf16, bf16 row) measured faster than
widening the weights (the bf16, float32 row), 1.38 against 1.70 ms at four
rows, though it issues only one per two cycles here and so is compute-bound
from about five rows). The whole ``membound`` step (``speedec kernels
--max-rows 8``, minimum of 5 runs for float32 and 3 for bf16), ms at
1 / 2 / 4 / 6 / 8 rows:

=========  ================================  ================================
weights    ``avx2``                          ``avx512``
=========  ================================  ================================
float32    2.27 / 2.39 / 2.63 / 3.18 / 4.48  2.29 / 2.39 / 2.61 / 2.84 / 3.09
bf16       2.06 / 2.27 / 2.88 / 3.99 / 5.50  1.89 / 2.03 / 2.35 / 3.20 / 4.05
=========  ================================  ================================

The two are even up to five float32 rows and ``avx512`` is 1.1-1.45x faster
from six; with bf16 weights ``avx512`` is 1.1-1.5x faster throughout. A bf16
step costs 1.24x its one-row cost at four rows, and its one row 0.83x a float32
one, not half: its products take about 1.1 of the 1.9 ms (profiled), the rest
being the bf16 attention and norms (the fused ops are float32's).

The library is compiled on first use (about 15 s, cached under
``$XDG_CACHE_HOME/speedec/kernels``); where it cannot be built or the CPU
lacks AVX2/FMA, oneDNN is used. The AVX-512 kernel is used only where the
library's probe (``speedec_kernels::probe_avx512``, once per process) saw it
run: CPUID reports AVX-512 F/BW/VL (AVX512_BF16 for ``vdpbf16ps``), XCR0 says
the OS saves the ZMM state, and a few of its instructions ran under a SIGILL
handler (a CPU flag is not proof). ``SPEEDEC_KERNEL`` picks explicitly:
``auto`` (default: ``avx512`` where it runs, else ``avx2``, else oneDNN, else
``W @ x.T``), ``avx512``, ``avx2``, ``onednn`` or ``torch`` (plain ``F.linear``).
bfloat16 weights (a bf16 checkpoint loaded in its own dtype) take the same
kernels: each weight is widened to float32 as it is loaded, products and
sums are float32 (in the float32 path's order, so it is batch-invariant the
same way) and the output has the rows' dtype; it reads half the bytes of
float32 (bf16 rows on the AVX-512 kernel with AVX512_BF16: ``vdpbf16ps``
instead, as above). Without these kernels, bf16 products use ``W @ x.T``
(oneDNN's float32 path does not apply). Training (gradients on), other
dtypes/devices and many rows always use ``F.linear``.

Which kernel a product uses is decided per model, not by a setting shared
by the process: :func:`prepare_kernel` stores the choice on the model
(``kernel`` on every module that issues products, see
``LoopedModelBase.set_kernel``) and the layers pass it to :func:`linear`.
A product with no model's choice uses the process default, resolved once
from ``SPEEDEC_KERNEL`` (every thread resolves the same value, so a race
is harmless), and :func:`use_kernel` overrides both for the block it
encloses, in its own thread (or task) only. Threads serving different
models, or the same model, never change each other's kernel.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError

# Above this many rows a plain GEMM is efficient and F.linear is used.
FEW_ROWS = 16

_ONEDNN = (torch.backends.mkldnn.is_available()
           and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


KERNELS = ("auto", "avx512", "avx2", "onednn", "torch")
_SOURCE = Path(__file__).with_name("csrc") / "few_rows.cpp"
# -fopenmp: at::parallel_for is inlined and uses OpenMP; the library then binds
# to the libgomp that PyTorch has already loaded (same soname), one thread pool.
# -ffp-contract=off: the scalar tail must not be fused into FMAs differently in
# different template instances (batch invariance is bit for bit).
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off"]
# None: not tried yet; False: unavailable (reason in _AVX2_ERROR); True: loaded.
_AVX2: bool | None = None
_AVX2_ERROR = ""
# The AVX-512 probe of the loaded library (csrc/few_rows.cpp probe_avx512): None until
# asked, then "" where the AVX-512 path runs, else why not. Once per process.
_AVX512_PROBE: str | None = None
_AVX512_ERROR = ""


def kernel_choice() -> str:
    """The few-row kernel requested by ``SPEEDEC_KERNEL`` (default ``auto``)."""
    choice = os.environ.get("SPEEDEC_KERNEL", "auto").strip().lower() or "auto"
    if choice not in KERNELS:
        raise ConfigError(f"SPEEDEC_KERNEL must be one of {', '.join(KERNELS)}, got {choice!r}")
    return choice


def _kernel_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = _SOURCE.read_bytes() + " ".join([torch.__version__, *_CFLAGS]).encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    return base / "speedec" / "kernels" / digest


def avx2_kernel_available() -> bool:
    """Whether speedec's AVX2 few-row kernel is loaded (building it on the first call)."""
    global _AVX2, _AVX2_ERROR
    if _AVX2 is not None:
        return _AVX2
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        _AVX2, _AVX2_ERROR = False, f"the CPU capability is {capability}, not AVX2"
        return False
    directory = _kernel_cache_dir()
    try:
        from torch.utils.cpp_extension import load

        directory.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(directory)
        built = any(directory.glob("*.so"))
        if not built:
            print("speedec: compiling the AVX2 few-row matmul kernel (once, 15-60 s) ...",
                  file=sys.stderr, flush=True)
        load(name=f"speedec_kernels_{directory.name}", sources=[str(_SOURCE)],
             extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], build_directory=str(directory),
             is_python_module=False, verbose=False)
        torch.ops.speedec_kernels.few_rows_linear  # noqa: B018 - raises if registration failed
        _AVX2 = True
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back, say why once
        last_line = (str(exc).strip().splitlines() or [""])[-1][:200]
        _AVX2, _AVX2_ERROR = False, f"{type(exc).__name__}: {last_line}".rstrip(": ")
        fallback = "oneDNN" if _ONEDNN else "F.linear"
        warnings.warn(f"speedec's AVX2 few-row kernel is unavailable ({_AVX2_ERROR}); using {fallback}",
                      RuntimeWarning, stacklevel=2)
    return _AVX2


def avx512_kernel_available() -> bool:
    """Whether the AVX-512 few-row product (op ``few_rows_linear.avx512``, same library)
    runs here: the library is loaded and its probe saw AVX-512 F/BW/VL instructions
    run (CPUID, the OS's XCR0 and a few instructions under a SIGILL handler: a CPU
    flag is not proof). The reason it does not is in ``_AVX512_ERROR``."""
    global _AVX512_PROBE, _AVX512_ERROR
    if not avx2_kernel_available():
        _AVX512_ERROR = f"the kernel library is unavailable ({_AVX2_ERROR})"
        return False
    if _AVX512_PROBE is None:
        _AVX512_PROBE = str(torch.ops.speedec_kernels.probe_avx512_reason("avx512"))
    _AVX512_ERROR = _AVX512_PROBE
    return _AVX512_PROBE == ""


def float_paths_report() -> str:
    """One line: which float32/bf16 few-row paths run here and why (for ``speedec kernels``)."""
    if not avx2_kernel_available():
        return f"few-row kernels unavailable: {_AVX2_ERROR}"
    if not avx512_kernel_available():
        return f"avx2 (probed); avx512 not used: {_AVX512_ERROR}"
    dot = "vdpbf16ps (AVX512_BF16 ran)" if avx512_bf16_dot_available() else "widened to float32"
    return f"avx512 (AVX-512 F/BW/VL ran) and avx2; bf16 rows x bf16 weights: {dot}"


def avx512_bf16_dot_available() -> bool:
    """Whether the AVX-512 kernel multiplies bf16 rows by bf16 weights with
    vdpbf16ps (AVX512_BF16 probed as :func:`avx512_kernel_available` probes
    AVX-512); elsewhere it widens them to float32."""
    return avx512_kernel_available() and bool(torch.ops.speedec_kernels.probe_avx512("avx512bf16"))


# A build killed hard (SIGKILL, out of memory) leaves PyTorch's lock file
# behind, and PyTorch would wait on it forever; a real build takes well under this.
_STALE_LOCK_S = 300.0


def _clear_stale_lock(directory: Path, *, poll_s: float = 0.5) -> None:
    """Wait while another process builds (its lock is fresh); remove a lock older
    than ``_STALE_LOCK_S`` so that a dead build cannot block this one forever."""
    lock = directory / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > _STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll_s)


def fused_ops_available() -> bool:
    """Whether decoding may use speedec's fused float32 ops (the one-row attention
    ``speedec_kernels::slot_attention`` and ``rms_norm``, csrc/few_rows.cpp): the
    kernels are built and ``SPEEDEC_FUSED`` is not ``0`` (default on; ``0``
    gives the PyTorch formulations, for comparisons). Resolved once per process
    (:func:`reset_kernel_choice` forgets it)."""
    global _FUSED
    if _FUSED is None:
        enabled = os.environ.get("SPEEDEC_FUSED", "1").strip() != "0"
        _FUSED = enabled and kernel_choice() in ("auto", "avx512", "avx2") and avx2_kernel_available()
    return _FUSED


_FUSED: bool | None = None


def active_kernel() -> str:
    """The kernel :func:`linear` uses for a few float32 (or bf16) CPU rows: ``avx512``,
    ``avx2``, ``onednn``, ``torch`` (``F.linear``, only when chosen) or ``matmul``
    (``W @ x.T``, the fallback when none of the first three is available)."""
    choice = kernel_choice()
    if choice in ("auto", "avx512") and avx512_kernel_available():
        return "avx512"
    if choice == "avx512":
        raise ConfigError(f"SPEEDEC_KERNEL=avx512 but the kernel is unavailable: {_AVX512_ERROR}")
    if choice in ("auto", "avx2") and avx2_kernel_available():
        return "avx2"
    if choice == "avx2":
        raise ConfigError(f"SPEEDEC_KERNEL=avx2 but the kernel is unavailable: {_AVX2_ERROR}")
    if choice == "onednn" and not _ONEDNN:
        raise ConfigError("SPEEDEC_KERNEL=onednn but this PyTorch build has no oneDNN linear")
    if choice == "torch":
        return "torch"
    return "onednn" if _ONEDNN else "matmul"


def linear(x: torch.Tensor, weight: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """``x [..., in] @ weight[out, in].T``, with the fastest kernel for the row count.

    ``kernel``: the model's choice (``avx512``, ``avx2``, ``onednn``, ``torch``
    or ``matmul``, see :func:`prepare_kernel`); None uses the process default.
    A :func:`use_kernel` block overrides either.
    """
    if not isinstance(weight, torch.Tensor):  # 8-bit weights (speedec.quant.Q8Weight) multiply themselves
        return weight.forward(x)  # (no module hooks on the decoding path)
    rows = x.numel() // x.shape[-1]
    if rows > FEW_ROWS or torch.is_grad_enabled():
        return F.linear(x, weight)
    kernel_operands = weight.device.type == "cpu" and _kernel_operands(x.dtype, weight.dtype)
    if kernel_operands:
        kernel = _OVERRIDE.get() or kernel or _DEFAULT or _resolve()
        if kernel == "avx2":  # takes x [..., in] as it is: no reshapes on this path
            return torch.ops.speedec_kernels.few_rows_linear(x, weight)
        if kernel == "avx512":  # (the same, 16 lanes wide)
            return torch.ops.speedec_kernels.few_rows_linear.avx512(x, weight)
    # Row-major rows in, row-major rows out: a column-major output pushes the
    # attention that follows off its fast kernel.
    x2 = x.reshape(rows, x.shape[-1]).contiguous()
    if kernel_operands:
        if x2.dtype != weight.dtype:  # float32 rows, bf16 weights: the fallbacks compute in bf16
            return linear(x.to(weight.dtype), weight, "matmul" if kernel == "onednn" else kernel).to(x.dtype)
        if kernel == "torch":
            return F.linear(x, weight)
        if kernel == "onednn" and weight.dtype == torch.float32:  # (oneDNN's path here is float32's)
            out = torch.ops.mkldnn._linear_pointwise(x2, _onednn_weight(weight), None, "none", [], "")
            return out.reshape(*x.shape[:-1], weight.shape[0])
    if rows == 1:  # MKL's GEMV is slow on one thread: pad to two rows
        out = (weight @ torch.cat((x2, x2)).T)[:, :1]  # [out, 1]
    else:
        out = weight @ x2.T  # [out, rows]
    return out.T.contiguous().reshape(*x.shape[:-1], weight.shape[0])


# Weight dtypes the few-row kernels take.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _kernel_operands(rows: torch.dtype, weight: torch.dtype) -> bool:
    """float32 rows with float32 weights, or float32 / bf16 rows with bf16 weights."""
    return weight == rows == torch.float32 or (weight == torch.bfloat16 and rows in _KERNEL_DTYPES)

# The process default: resolved on first use (kernel_choice + availability),
# then only read; reset_kernel_choice forgets it (tests change SPEEDEC_KERNEL).
_DEFAULT: str | None = None
# The kernel of a use_kernel block, per thread / task (None: no block).
_OVERRIDE: ContextVar[str | None] = ContextVar("speedec_kernel_override", default=None)


def _resolve() -> str:
    global _DEFAULT
    _DEFAULT = active_kernel()
    return _DEFAULT


@contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Run the few-row products of the block with kernel ``name`` (``avx512``,
    ``avx2``, ``onednn`` or ``torch``), whatever kernel their model chose; only
    in the calling thread. Raises :class:`ConfigError` if it is unavailable."""
    if name not in KERNELS[1:]:
        raise ConfigError(f"kernel must be one of {', '.join(KERNELS[1:])}, got {name!r}")
    if name not in available_kernels():
        reason = {"avx512": _AVX512_ERROR, "avx2": _AVX2_ERROR}.get(name, "")
        raise ConfigError(f"the {name} kernel is unavailable here" + (f": {reason}" if reason else ""))
    token = _OVERRIDE.set(name)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def prepare_kernel(model) -> None:
    """Choose (and on first use build) the few-row kernel for ``model`` now and
    store the choice on the model (``model.set_kernel``), so that a first-run
    compile is not counted in the timings of the work that follows and the
    model keeps its kernel whatever else the process runs."""
    if model.device.type == "cpu" and model.dtype in _KERNEL_DTYPES:
        model.set_kernel(active_kernel())
    if getattr(model.config, "quantization", None) is not None:
        from .q8_kernels import best_path
        from .quant import set_q8_path

        set_q8_path(model, (best_path() or "torch") if model.device.type == "cpu" else "torch")


def available_kernels() -> list[str]:
    """The few-row kernels this machine can run, best first (building speedec's own if needed)."""
    return ((["avx512"] if avx512_kernel_available() else []) + (["avx2"] if avx2_kernel_available() else [])
            + (["onednn"] if _ONEDNN else []) + ["torch"])


def reset_kernel_choice() -> None:
    """Forget the process default so that the next product without a model's
    choice reads ``SPEEDEC_KERNEL`` again."""
    global _DEFAULT, _FUSED
    _DEFAULT = _FUSED = None


def _onednn_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout, reordered once and kept on the tensor.

    The copy is tied to the tensor object and to its storage and version, so
    an in-place update (an optimizer step, ``load_state_dict``) or a move to
    another dtype/device makes a fresh one; it dies with the weight.
    """
    try:
        key = (weight.data_ptr(), weight._version)
    except RuntimeError:  # inference tensors have no version counter; they cannot change in place
        key = (weight.data_ptr(), -1)
    cached = getattr(weight, "_speedec_onednn", None)
    if cached is None or cached[0] != key:
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        cached = (key, packed)
        weight._speedec_onednn = cached
    return cached[1]
