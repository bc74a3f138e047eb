"""``speedec kernels``: the cost of one SPEED step against the rows in flight,
for each few-row matrix-product kernel, measured interleaved on one model."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from ..engines.speed import measure_step_costs
from ..kernels import available_kernels, use_kernel
from ..model import LoopedLM


def compare_kernels(model: LoopedLM, max_rows: int, *, rounds: int = 3, repeats: int = 5,
                    progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Median seconds per step with 1..max_rows rows, per available kernel.

    Kernels take turns round by round (this machine is noisy), and each round
    takes the median of ``repeats`` steps per row count."""
    kernels = available_kernels()
    samples: dict[str, list[list[float]]] = {k: [] for k in kernels}
    for r in range(rounds):
        for name in kernels:
            if progress:
                progress(f"round {r + 1}/{rounds}: {name}")
            with use_kernel(name):
                samples[name].append(measure_step_costs(model, max_rows, repeats=repeats))
    return {name: [statistics.median(col) for col in zip(*runs)] for name, runs in samples.items()}


def format_kernel_table(costs: dict[str, list[float]]) -> str:
    """Milliseconds per step per kernel, and each kernel's time over the first's."""
    names = list(costs)
    base = names[0]
    cols = ["rows", *[f"{n} ms" for n in names], *[f"{n} / {base}" for n in names[1:]]]
    rows = []
    for i in range(len(costs[base])):
        rows.append([str(i + 1), *[f"{costs[n][i] * 1e3:.2f}" for n in names],
                     *[f"{costs[n][i] / costs[base][i]:.2f}x" for n in names[1:]]])
    widths = [max(len(r[j]) for r in [cols, *rows]) for j in range(len(cols))]
    line = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cols), "  ".join("-" * w for w in widths), *[line(r) for r in rows]])


def compare_q8_paths(model: LoopedLM, max_rows: int, *, rounds: int = 3, repeats: int = 5,
                     progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """:func:`compare_kernels` for a q8_0 model: median seconds per step with 1..max_rows
    rows for every 8-bit kernel path this CPU runs (best first), interleaved round by round."""
    from ..q8_kernels import usable_paths
    from ..quant import q8_path, set_q8_path

    chosen = q8_path(model)
    paths = usable_paths() or ["torch"]
    samples: dict[str, list[list[float]]] = {p: [] for p in paths}
    try:
        for r in range(rounds):
            for path in paths:
                if progress:
                    progress(f"round {r + 1}/{rounds}: {path}")
                set_q8_path(model, path)
                samples[path].append(measure_step_costs(model, max_rows, repeats=repeats))
    finally:
        set_q8_path(model, None if chosen == "auto" else chosen)
    return {path: [statistics.median(col) for col in zip(*runs)] for path, runs in samples.items()}
