"""The machine's memory bandwidth, the floor every memory-bound decoder hits."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Bandwidth:
    # GB/s streaming a large buffer once (a reduction): what reading weights costs.
    read_gbps: float
    # GB/s of a large copy, bytes read + bytes written.
    copy_gbps: float
    # Size of the buffer used, in MB.
    buffer_mb: float


def measure_bandwidth(buffer_mb: float = 400.0, repeats: int = 5) -> Bandwidth:
    """Best-of-``repeats`` timings over a buffer far larger than any CPU cache."""
    n = int(buffer_mb * 1e6 / 4)
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    read_s, copy_s = float("inf"), float("inf")
    for _ in range(repeats + 1):  # the first round warms the pages
        t0 = time.perf_counter()
        src.sum()
        t1 = time.perf_counter()
        dst.copy_(src)
        t2 = time.perf_counter()
        read_s, copy_s = min(read_s, t1 - t0), min(copy_s, t2 - t1)
    nbytes = n * 4
    return Bandwidth(read_gbps=nbytes / read_s / 1e9, copy_gbps=2 * nbytes / copy_s / 1e9,
                     buffer_mb=buffer_mb)
