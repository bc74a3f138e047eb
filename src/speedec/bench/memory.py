"""The machine's memory bandwidth, the floor every memory-bound decoder hits.

Three measurements over buffers far larger than any CPU cache, best of
several rounds each:

* copy — ``dst.copy_(src)``, bytes read + bytes written;
* sum — a reduction, bytes read;
* stream — a one-row product against a large matrix with the same kernel the
  engines use (``speedec.kernels.linear``), bytes read.

The floor uses the highest *read* rate measured, so no engine can look closer
to the floor than it is.

Also the process's resident memory: its peak (``VmHWM``), which Linux lets a
process reset (``/proc/self/clear_refs``), so that the peak while decoding can
be told apart from the peak while the model was built.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

from ..kernels import linear


@dataclass(frozen=True)
class Bandwidth:
    # GB/s of a large copy, bytes read + bytes written.
    copy_gbps: float
    # GB/s of a reduction over a large buffer (bytes read).
    sum_gbps: float
    # GB/s of a one-row product against a large weight matrix (bytes read).
    stream_gbps: float
    # Size of each buffer, MB.
    buffer_mb: float

    @property
    def read_gbps(self) -> float:
        """The best read rate: what the floor is computed from."""
        return max(self.sum_gbps, self.stream_gbps)


def _best(fn, repeats: int) -> float:
    fn()  # warm the pages
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(buffer_mb: float = 400.0, repeats: int = 5) -> Bandwidth:
    n = int(buffer_mb * 1e6 / 4) // 1024 * 1024  # whole rows of 1024 for the stream matrix
    nbytes = n * 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = _best(lambda: dst.copy_(src), repeats)
    sum_s = _best(lambda: src.sum(), repeats)
    matrix = src.view(-1, 1024)  # [n / 1024, 1024]
    row = torch.ones(1, 1024)
    with torch.inference_mode():
        stream_s = _best(lambda: linear(row, matrix), repeats)
    return Bandwidth(copy_gbps=2 * nbytes / copy_s / 1e9, sum_gbps=nbytes / sum_s / 1e9,
                     stream_gbps=nbytes / stream_s / 1e9, buffer_mb=buffer_mb)


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """The process's resident memory now (None where /proc is not available)."""
    return _status_kb("VmRSS")


def peak_rss_bytes() -> int:
    """The process's peak resident memory since it started or since the last
    :func:`reset_peak_rss` that worked."""
    peak = _status_kb("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kB elsewhere


def reset_peak_rss() -> bool:
    """Restart the peak at the current resident memory (Linux); False where not possible
    (the peak then stays the whole process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


@dataclass(frozen=True)
class MemoryUse:
    """What a benchmark held in memory."""

    # Bytes of the model's parameters and buffers.
    model_bytes: int
    # Peak resident memory of the process while the model was built (and before).
    build_peak_rss_bytes: int | None
    # Peak resident memory while the engines decoded (warm-up included); the
    # whole process's peak when it could not be reset.
    decode_peak_rss_bytes: int
    # Whether decode_peak_rss_bytes covers decoding alone.
    decode_peak_is_reset: bool


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def format_memory(memory: MemoryUse, dtype: str) -> str:
    """One line for the benchmark's output."""
    gb = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"  # noqa: E731
    build = (f"{gb(memory.build_peak_rss_bytes)} while building" if memory.build_peak_rss_bytes is not None
             else None)
    decode = f"{gb(memory.decode_peak_rss_bytes)} while decoding" + (
        "" if memory.decode_peak_is_reset else " (the process's peak: it could not be reset)")
    return f"memory: model {gb(memory.model_bytes)} ({dtype}); peak RSS " + ", ".join(
        p for p in (build, decode) if p)
