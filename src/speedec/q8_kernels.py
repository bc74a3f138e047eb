"""8-bit weights (llama.cpp's q8_0) times a few float32 rows: a kernel per instruction set.

A weight W [N, K] (nn.Linear layout, K a multiple of 32) is stored as ``qs``
int8 [N, K] in [-127, 127] and ``d`` float16 [N, K // 32], one scale per block
of 32 consecutive weights along K: W ~ qs * d (:func:`quantize_q8_0`). A
product quantizes each row's activations per block of 32 as llama.cpp does
(amax = max |x|, dx = amax / 127 in float32, xq = round_half_even(x * 127 /
amax)) and computes

    out[m, j] = sum_b (dx[m, b] * d[j, b]) * isum(m, j, b),  isum = xq . qs (exact int32)

in float32, in one fixed order (block b into lane b % 16, then the 16 lanes
pairwise, halves first). Every path performs exactly these float32 operations,
so all of them agree bit for bit, and a row's output does not depend on the
other rows multiplied with it (batch invariance: csrc/q8_rows.cpp says how).

Paths, best first (:data:`Q8_PATHS`): ``avx512vnni`` (vpdpbusd on 512 bits),
``avxvnni`` (vpdpbusd on 256 bits), ``avx2`` (vpmaddubsw + vpmaddwd), all in
csrc/q8_rows.cpp, built on first use like speedec.kernels' AVX2 kernel; and
``torch``, the same arithmetic in PyTorch (slow: a reference and a fallback).
A path is used only where its instructions were seen to run: :func:`probe_report`
checks CPUID/XGETBV, then runs a few instructions of each set under a SIGILL
handler (a /proc/cpuinfo flag is not proof: a hypervisor can advertise what it
does not enable, and Linux raises SIGILL at a process's first AMX tile
instruction unless the process has requested the tile state, which the probe
does). ``SPEEDEC_Q8_KERNEL`` picks: ``auto`` (default: the best usable path),
``avx512vnni``, ``avxvnni``, ``avx2`` or ``torch``.

Measured on the development Xeon (2 threads, an 8192 x 4096 weight, 34 MB):
``avx512vnni`` costs 0.65 ms at one row and about 1.15x that at four with the
weight in the (480 MB) L3, 1.35 ms and 1.05x from DRAM; the float32 AVX2
kernel reads 4x the bytes (speedec.kernels).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from . import kernels
from .errors import ConfigError

BLOCK = 32
# Kernel paths, best first; "torch" is the PyTorch formulation of the same arithmetic.
Q8_PATHS = ("avx512vnni", "avxvnni", "avx2")
PATHS = (*Q8_PATHS, "torch")
CHOICES = ("auto", *PATHS)
# The instruction sets probe_report covers, and the /proc/cpuinfo flags that advertise each.
ISAS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni", "avx512bf16", "amx_int8")
_FLAGS = {"avx512vnni": ("avx512_vnni",), "avxvnni": ("avx_vnni",), "avx512bf16": ("avx512_bf16",),
          "amx_int8": ("amx_tile", "amx_int8")}
# What each kernel path executes (the whole library is built for AVX2 + FMA + F16C).
_BASE = ("avx2", "fma", "f16c")
_PATH_ISAS = {"avx512vnni": (*_BASE, "avx512f", "avx512bw", "avx512vl", "avx512vnni"),
              "avxvnni": (*_BASE, "avxvnni"), "avx2": _BASE}

_SOURCE = Path(__file__).with_name("csrc") / "q8_rows.cpp"
# As kernels._CFLAGS, with F16C for the scales; -ffp-contract=off keeps the float32
# order the same in every instance (the paths agree bit for bit).
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]
# None: not tried yet; False: unavailable (reason in _ERROR); True: loaded.
_LIB: bool | None = None
_ERROR = ""
_BUILD_LOCK = threading.Lock()
_REPORT: dict[str, tuple[bool, str]] | None = None


def cpu_flags() -> set[str]:
    """The CPU flags of /proc/cpuinfo (Linux); empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = _SOURCE.read_bytes() + " ".join([torch.__version__, *_CFLAGS]).encode()
    return base / "speedec" / "kernels" / f"q8-{hashlib.sha256(key).hexdigest()[:12]}"


def build() -> bool:
    """Build (first use, cached on disk) and load the kernel library once per
    process; False, with the reason kept and a warning once, where it cannot be."""
    global _LIB, _ERROR
    with _BUILD_LOCK:
        if _LIB is not None:
            return _LIB
        flags = cpu_flags()
        missing = [isa for isa in _BASE if flags and isa not in flags]
        capability = torch.backends.cpu.get_cpu_capability()
        try:
            if missing or capability not in ("AVX2", "AVX512"):
                raise RuntimeError(f"the CPU lacks {', '.join(missing) or 'AVX2'} (capability {capability})")
            from torch.utils.cpp_extension import load

            directory = _cache_dir()
            directory.mkdir(parents=True, exist_ok=True)
            kernels._clear_stale_lock(directory)
            if not any(directory.glob("*.so")):
                print("speedec: compiling the q8_0 few-row kernels (once, 15-60 s) ...", file=sys.stderr, flush=True)
            load(name=f"speedec_q8_{directory.name[3:]}", sources=[str(_SOURCE)],
                 extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], build_directory=str(directory),
                 is_python_module=False, verbose=False)
            torch.ops.speedec_q8.linear  # noqa: B018 - raises if registration failed
            _LIB = True
        except Exception as exc:  # no compiler, no ninja, a failed build: say why once
            lines = str(exc).strip().splitlines() or [""]
            # A compiler's first error says more than ninja's closing line.
            line = next((ln for ln in lines if "error:" in ln), lines[-1]).strip()[:200]
            _LIB, _ERROR = False, f"{type(exc).__name__}: {line}".rstrip(": ")
            warnings.warn(f"speedec's q8_0 kernels are unavailable ({_ERROR}); using PyTorch",
                          RuntimeWarning, stacklevel=2)
        return _LIB


def probe_report() -> dict[str, tuple[bool, str]]:
    """For each instruction set of :data:`ISAS`: whether it is usable, and why
    (``ran``, ``not in /proc/cpuinfo``, ``not enabled (CPUID/XGETBV/OS)``,
    ``advertised but raised SIGILL``, ``kernel library unavailable: ...``).
    Probed once per process."""
    return dict(_report())


def _report() -> dict[str, tuple[bool, str]]:
    global _REPORT
    if _REPORT is None:
        report = {}
        flags = cpu_flags()
        built = build()
        for isa in ISAS:
            if not built:
                report[isa] = (False, f"kernel library unavailable: {_ERROR}")
            elif flags and not all(flag in flags for flag in _FLAGS.get(isa, (isa,))):
                report[isa] = (False, "not in /proc/cpuinfo")
            elif not torch.ops.speedec_q8.cpu_supports(isa):
                report[isa] = (False, "not enabled (CPUID/XGETBV/OS)")
            elif torch.ops.speedec_q8.probe(isa):
                report[isa] = (True, "ran")
            else:
                report[isa] = (False, "advertised but raised SIGILL")
        _REPORT = report
    return _REPORT


def _path_problem(path: str) -> str | None:
    """Why a kernel path cannot run here (None if it can)."""
    report = _report()
    for isa in _PATH_ISAS[path]:
        usable, why = report[isa]
        if not usable:
            return f"{isa}: {why}"
    return None


def usable_paths() -> list[str]:
    """The kernel paths that run here, best first (``torch`` always does and is not listed)."""
    return [path for path in Q8_PATHS if _path_problem(path) is None]


def best_path() -> str | None:
    """The path ``SPEEDEC_Q8_KERNEL`` asks for (default ``auto``: the best usable
    kernel path, None if there is none); ConfigError for an unknown or unusable one."""
    choice = os.environ.get("SPEEDEC_Q8_KERNEL", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"SPEEDEC_Q8_KERNEL must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "auto":
        paths = usable_paths()
        return paths[0] if paths else None
    if choice != "torch" and (problem := _path_problem(choice)) is not None:
        raise ConfigError(f"SPEEDEC_Q8_KERNEL={choice} cannot run here ({problem})")
    return choice


# ---------------------------------------------------------------------------
# Weights.

def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's q8_0 quantization of ``w`` [..., K]: per block of 32, d = amax / 127
    (float32), qs = round_half_away(w / d) clamped to [-127, 127] (int8), d stored as
    float16. Returns (qs [..., K], d [..., K // 32]).

    All in float32: ``|x| + 0.5`` (C's ``roundf``) may not be a float32, so the rounding is
    ``floor(|x|) + (frac(|x|) >= 0.5)``, whose fraction float32 holds exactly (``|x| <= 127``
    where it matters): the same integer, half away from zero."""
    if not (w.is_floating_point() and w.dim() >= 1):
        raise ValueError(f"quantize_q8_0: w must be a floating-point tensor [..., K], got {w.dtype} "
                         f"with {w.dim()} dimensions")
    if w.shape[-1] % BLOCK:
        raise ValueError(f"quantize_q8_0: K = {w.shape[-1]} is not a multiple of {BLOCK}")
    blocks = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1)
    d = amax / torch.full_like(amax, 127.0)
    inv = torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))
    x = blocks * inv[..., None]
    magnitude = x.abs()
    q = magnitude.floor()
    q += magnitude.sub_(q).ge_(0.5)
    q.copysign_(x).clamp_(-127, 127)
    return q.to(torch.int8).reshape(w.shape), d.half()


def dequantize_q8_0(qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """qs * d as float32 [..., K] (the weight that q8_0 products use)."""
    _check_weights(qs, d, "dequantize_q8_0")
    blocks = qs.float().reshape(*qs.shape[:-1], qs.shape[-1] // BLOCK, BLOCK)
    return (blocks * d.float()[..., None]).reshape(qs.shape)


def _check_weights(qs: torch.Tensor, d: torch.Tensor, name: str) -> None:
    if qs.dtype != torch.int8 or d.dtype != torch.float16:
        raise ValueError(f"{name}: qs must be int8 and d float16, got {qs.dtype} and {d.dtype}")
    if qs.dim() < 1 or qs.shape[-1] % BLOCK:
        raise ValueError(f"{name}: qs must be [..., K] with K a multiple of {BLOCK}, got {tuple(qs.shape)}")
    expected = (*qs.shape[:-1], qs.shape[-1] // BLOCK)
    if tuple(d.shape) != expected:
        raise ValueError(f"{name}: d must be {expected} for qs {tuple(qs.shape)}, got {tuple(d.shape)}")


# ---------------------------------------------------------------------------
# Products.

def linear_q8(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """``x [..., K]`` (float32) times the q8_0 weight (qs [N, K], d [N, K // 32]):
    float32 [..., N]. ``path``: a kernel path, ``torch``, or None for :func:`best_path`
    (``torch`` where no kernel path runs)."""
    _check_weights(qs, d, "linear_q8")
    if qs.dim() != 2:
        raise ValueError(f"linear_q8: qs must be [N, K], got {tuple(qs.shape)}")
    if x.dtype != torch.float32 or x.dim() < 1 or x.shape[-1] != qs.shape[1]:
        raise ValueError(f"linear_q8: x must be float32 [..., {qs.shape[1]}], got {x.dtype} {tuple(x.shape)}")
    if not (qs.is_contiguous() and d.is_contiguous()):
        raise ValueError("linear_q8: qs and d must be contiguous")
    path = path or best_path() or "torch"
    if path not in PATHS:
        raise ValueError(f"linear_q8: path must be one of {', '.join(PATHS)}, got {path!r}")
    if path == "torch":
        return _torch_linear(x, qs, d)
    if (problem := _path_problem(path)) is not None:
        raise ConfigError(f"linear_q8: the {path} path cannot run here ({problem})")
    return torch.ops.speedec_q8.linear(x.contiguous(), qs, d, path)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations' quantization of a product, in PyTorch: (xq [..., K] as
    float32 integers, dx [..., K // 32]). Row by row, block by block."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1)  # (a NaN propagates, as in the kernels)
    dx = amax / torch.full_like(amax, 127.0)  # tensor / tensor: an IEEE division, not a reciprocal
    inv = torch.where(amax != 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.nan_to_num(torch.round(blocks * inv[..., None]), nan=0.0).clamp(-127, 127)
    return xq.reshape(x.shape), dx


# Weight rows per chunk of the PyTorch path (bounds its float32 temporaries).
_TORCH_ROWS = 1024


def _torch_linear(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The kernels' arithmetic in PyTorch, the same float32 operations in the same
    order: each output uses its own row and weight row only (batch-invariant)."""
    N, K = qs.shape
    nb = K // BLOCK
    M = math.prod(x.shape[:-1])
    x2 = x.detach().reshape(M, K)
    xq, dx = quantize_rows(x2)
    xb = xq.reshape(M, nb, BLOCK).transpose(0, 1)  # [nb, M, 32]
    out = torch.empty(M, N)
    groups = -(-nb // 16)
    for n0 in range(0, N, _TORCH_ROWS):
        w = qs[n0:n0 + _TORCH_ROWS].float()
        n = w.shape[0]
        # Block sums: integers below 2^24 in magnitude with integer products, exact in float32
        # whatever the summation order (and in bf16/tf32 matmul modes: |values| <= 127).
        isum = torch.bmm(xb, w.reshape(n, nb, BLOCK).permute(1, 2, 0)).permute(1, 2, 0)  # [M, n, nb]
        terms = (dx[:, None, :] * d[n0:n0 + n].float()[None]) * isum
        terms = torch.nn.functional.pad(terms, (0, groups * 16 - nb)).reshape(M, n, groups, 16)
        lanes = torch.zeros(M, n, 16)
        for g in range(groups):  # block b into lane b % 16, blocks in order
            lanes = lanes + terms[:, :, g]
        v8 = lanes[..., :8] + lanes[..., 8:]
        v4 = v8[..., :4] + v8[..., 4:]
        v2 = v4[..., :2] + v4[..., 2:]
        out[:, n0:n0 + n] = v2[..., 0] + v2[..., 1]
    return out.reshape(*x.shape[:-1], N)
