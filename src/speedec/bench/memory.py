"""The machine's memory bandwidth, the floor every memory-bound decoder hits.

Three measurements over buffers far larger than any CPU cache, best of
several rounds each:

* copy — ``dst.copy_(src)``, bytes read + bytes written;
* sum — a reduction, bytes read;
* stream — a one-row product against a large matrix with the same kernel the
  engines use (``speedec.kernels.linear``), bytes read.

The floor uses the highest *read* rate measured, so no engine can look closer
to the floor than it is.
"""

from __future__ import annotations

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
