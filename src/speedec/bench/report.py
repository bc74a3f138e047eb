"""Benchmark output: a terminal table, a JSON file, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from ..storage import atomic_write, atomic_write_text
from .runner import BenchReport


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _size(n: int | None) -> str:
    """Bytes as ``12.3M`` / ``4.56G`` (decimal units); ``-`` when unknown."""
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_table(report: BenchReport) -> str:
    c = report.config
    bw = report.bandwidth
    head = [
        f"preset {report.preset}: d_model {c['d_model']}, K={c['n_unique_layers']} L={c['n_loops']} "
        f"exit={c['exit_loop']}, vocab {c['vocab_size']}, {report.dtype}, {report.threads} threads"
        + (f", kernel {report.machine['kernel']}" if report.machine.get("kernel") else "")
        + (f" (q8_0: {report.machine['q8_kernel']})" if report.dtype == "q8_0" and report.machine.get("q8_kernel")
           else ""),
        f"cpu {report.machine.get('cpu', '?')}" + (f"; flags {' '.join(report.machine['cpu_flags'])}"
                                                   if report.machine.get("cpu_flags") else ""),
        f"{report.prompts} prompts x {report.max_new_tokens} new tokens, {report.repeats} interleaved repeats"
        + (f"; memory: copy {bw.copy_gbps:.1f} GB/s (r+w), sum {bw.sum_gbps:.1f} GB/s, "
           f"stream {bw.stream_gbps:.1f} GB/s; floor uses {bw.read_gbps:.1f} GB/s" if bw else ""),
    ]
    cols = ["engine", "tok/s (median)", "min-max", "ms/tok", "speedup", "vs speed", "accept", "steps/tok",
            "in flight", "MB/tok", "floor ms", "x floor", "exact", "model", "peak RSS"]
    rows = []
    for s in report.engines:
        rows.append([
            s.engine, _fmt(s.tokens_per_s, ".1f"),
            f"{s.tokens_per_s_min:.1f}-{s.tokens_per_s_max:.1f}", _fmt(s.ms_per_token, ".2f"),
            _fmt(s.speedup_vs_autoregressive, ".2f") + ("x" if s.speedup_vs_autoregressive else ""),
            _fmt(s.speedup_vs_speed, ".2f") + ("x" if s.speedup_vs_speed else ""),
            _fmt(s.acceptance, ".3f"), _fmt(s.steps_per_token, ".2f"), _fmt(s.mean_in_flight, ".2f"),
            _fmt(s.bytes_per_token / 1e6 if s.bytes_per_token else None, ".0f"),
            _fmt(s.floor_ms_per_token, ".2f"), _fmt(s.ratio_to_floor, ".2f"),
            _fmt(s.matches_autoregressive, ".0%"), _size(s.model_bytes), _size(s.peak_rss_bytes),
        ])
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                               for i, (v, w) in enumerate(zip(r, widths)))
    out = head + ["", line(cols), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    out += [f"note: {n}" for n in report.notes]
    if any(s.peak_rss_bytes is not None for s in report.engines):
        out.append("note: model: the weights a row decodes with (llama.cpp: its GGUF file, memory-mapped); "
                   "peak RSS: the peak resident memory of the process that decoded the row, while it did "
                   "(llama.cpp runs in a process of its own)")
    return "\n".join(out)


def write_json(report: BenchReport, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")


def cost_model_speedup(acceptance: float, exit_loop: int, n_loops: int) -> float:
    """docs/design.md §3: L / (a * e + (1 - a) * L) steps, before LM-head and batch costs."""
    return n_loops / (acceptance * exit_loop + (1 - acceptance) * n_loops)


def write_plots(report: BenchReport, directory: str | Path) -> list[Path]:
    """speedup by engine (bars) and speedup against acceptance with the cost model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    rows = [s for s in report.engines if s.speedup_vs_autoregressive is not None]

    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar([s.engine for s in rows], [s.speedup_vs_autoregressive for s in rows], color="#4472c4")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("tokens/s relative to autoregressive")
    ax.set_title(f"{report.preset}: speedup by engine (median of paired runs)")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    written.append(_save(fig, directory / f"{report.preset}-speedup.png"))
    plt.close(fig)

    c = report.config
    if c["exit_loop"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        grid = [i / 100 for i in range(101)]
        ax.plot(grid, [cost_model_speedup(a, c["exit_loop"], c["n_loops"]) for a in grid], color="grey",
                label=f"cost model L/(a e + (1-a) L), L={c['n_loops']}, e={c['exit_loop']}")
        for s in rows:
            if s.acceptance is not None:
                ax.scatter([s.acceptance], [s.speedup_vs_autoregressive], label=s.engine, zorder=3)
        ax.set_xlabel("measured draft acceptance")
        ax.set_ylabel("measured speedup vs autoregressive")
        ax.set_title(f"{report.preset}: speedup against acceptance")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, directory / f"{report.preset}-acceptance.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path
