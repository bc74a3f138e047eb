"""Depth studies: accuracy against latency for models that share their unique
layers but loop them a different number of times (the SPEED paper's claim:
more loops are more accurate, and with SPEED they cost little extra latency).

Every (model, engine) pair decodes the same fixed workload once per
repetition, in a rotated order, and its latency is reported as a median and
as a ratio to the first model's ``autoregressive`` run of the same repetition
(the machine is noisy; ratios of runs made back to back are what compare).
Accuracy comes from the caller: validation perplexity for decoder-only models,
BLEU and chrF for translators.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..engines.base import GenerationStats

BASELINE_ENGINE = "autoregressive"


@dataclass(frozen=True)
class StudyEntry:
    """One model of the study."""

    # Shown in tables and plots, e.g. "L=4".
    label: str
    n_loops: int
    # Engines to time (those the model supports).
    engines: tuple[str, ...]
    # engine -> (seconds, units decoded, pooled engine counters) for one pass over the workload.
    run: Callable[[str], tuple[float, int, dict]]
    # Accuracy numbers (e.g. {"ppl": 57.5} or {"bleu": 12.3, "chrf": 40.1}).
    quality: dict = field(default_factory=dict)
    # Further measurements reported as they are (e.g. perplexity after every loop).
    details: dict = field(default_factory=dict)


@dataclass
class StudyRow:
    model: str
    n_loops: int
    engine: str
    # Median milliseconds per unit (token or sentence) over the repetitions, and the range.
    ms: float
    ms_min: float
    ms_max: float
    # Median over repetitions of this row's time / the first model's autoregressive time.
    latency_vs_base: float
    acceptance: float | None
    steps_per_token: float | None
    quality: dict
    # Mean tokens generated per unit (per sentence for translators, whose
    # outputs differ in length from model to model); None if not counted.
    tokens_per_unit: float | None = None
    # The entry's further measurements (per-loop perplexity, agreements, ...).
    details: dict = field(default_factory=dict)


@dataclass
class StudyReport:
    kind: str
    unit: str
    repeats: int
    base: str
    rows: list[StudyRow]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def run_study(entries: Sequence[StudyEntry], *, kind: str, unit: str, repeats: int = 3, warmup: int = 1,
              progress: Callable[[str], None] | None = None) -> StudyReport:
    """Time every (entry, engine) ``repeats`` times, interleaved, after ``warmup`` untimed passes."""
    if not entries or BASELINE_ENGINE not in entries[0].engines:
        raise ValueError(f"the first model of a study must run {BASELINE_ENGINE!r}")
    pairs = [(e, engine) for e in entries for engine in e.engines]
    for _ in range(warmup):
        for entry, engine in pairs:
            entry.run(engine)
    times: dict[tuple[str, str], list[float]] = {(e.label, g): [] for e, g in pairs}
    stats: dict[tuple[str, str], list[dict]] = {(e.label, g): [] for e, g in pairs}
    units_done: dict[tuple[str, str], int] = {(e.label, g): 0 for e, g in pairs}
    for rep in range(repeats):
        order = pairs[rep % len(pairs):] + pairs[: rep % len(pairs)]
        for entry, engine in order:
            if progress:
                progress(f"repeat {rep + 1}/{repeats}: {entry.label} {engine}")
            seconds, units, st = entry.run(engine)
            times[entry.label, engine].append(1e3 * seconds / units)
            stats[entry.label, engine].append(st)
            units_done[entry.label, engine] += units
    base = times[entries[0].label, BASELINE_ENGINE]
    rows = []
    for entry, engine in pairs:
        ms = times[entry.label, engine]
        st = stats[entry.label, engine]
        accepted = sum(s["accepted"] for s in st)
        verified = sum(s["verified"] for s in st)
        after_first = sum(s["after_first"] for s in st)
        counted = all("tokens" in s for s in st)
        rows.append(StudyRow(
            model=entry.label, n_loops=entry.n_loops, engine=engine, ms=statistics.median(ms),
            ms_min=min(ms), ms_max=max(ms),
            latency_vs_base=statistics.median(m / b for m, b in zip(ms, base)),
            acceptance=accepted / verified if verified else None,
            steps_per_token=sum(s["steps"] for s in st) / after_first if after_first else None,
            quality=dict(entry.quality),
            tokens_per_unit=(sum(s["tokens"] for s in st) / units_done[entry.label, engine]
                             if counted and units_done[entry.label, engine] else None),
            details=dict(entry.details)))
    return StudyReport(kind=kind, unit=unit, repeats=repeats, base=f"{entries[0].label} {BASELINE_ENGINE}",
                       rows=rows)


def format_study(report: StudyReport) -> str:
    keys = list(dict.fromkeys(k for r in report.rows for k in r.quality))
    lengths = report.unit != "token" and any(r.tokens_per_unit for r in report.rows)
    cols = ["model", "engine", *keys, f"ms/{report.unit}", "min-max", f"x {report.base}", "accept", "steps/tok",
            *([f"tok/{report.unit}", "ms/tok"] if lengths else [])]
    lines = []
    for r in report.rows:
        lines.append([r.model, r.engine, *(_num(r.quality.get(k)) for k in keys), f"{r.ms:.2f}",
                      f"{r.ms_min:.2f}-{r.ms_max:.2f}", f"{r.latency_vs_base:.2f}x",
                      _num(r.acceptance, ".3f"), _num(r.steps_per_token, ".2f"),
                      *([_num(r.tokens_per_unit, ".1f"),
                         _num(r.ms / r.tokens_per_unit if r.tokens_per_unit else None)] if lengths else [])])
    widths = [max(len(str(x[i])) for x in [cols, *lines]) for i in range(len(cols))]
    fmt = lambda row: "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w)  # noqa: E731
                                for i, (v, w) in enumerate(zip(row, widths)))
    out = [f"{report.kind} study: {report.repeats} interleaved repeats; latency relative to {report.base}", "",
           fmt(cols), "  ".join("-" * w for w in widths), *map(fmt, lines)]
    return "\n".join(out + [f"note: {n}" for n in report.notes])


def _num(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better
    on both), ordered by the first coordinate."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(report: StudyReport, path: str | Path, *, quality_key: str, quality_label: str,
                higher_is_better: bool = False) -> Path:
    """Quality against latency relative to the baseline: one point per (model, engine),
    the Pareto frontier drawn through the points nothing beats (lower latency, and lower
    quality value, or higher with ``higher_is_better``: BLEU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import _save

    rows = [r for r in report.rows if quality_key in r.quality]
    points = [(r.latency_vs_base, r.quality[quality_key]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = dict(zip(dict.fromkeys(r.engine for r in rows), "os^Dv<>p"))
    for engine, marker in markers.items():
        mine = [(x, y) for (x, y), r in zip(points, rows) if r.engine == engine]
        ax.scatter([x for x, _ in mine], [y for _, y in mine], marker=marker, s=40, label=engine, zorder=3)
    # One label per model (its engines share its quality), below its fastest point.
    fastest: dict[str, tuple[float, float]] = {}
    for (x, y), r in zip(points, rows):
        if r.model not in fastest or x < fastest[r.model][0]:
            fastest[r.model] = (x, y)
    # Labels of models at nearly the same point (same quality, close latency) stack downwards.
    xs, ys = [x for x, _ in points], [y for _, y in points]
    near_x, near_y = 0.06 * (max(xs) - min(xs) or 1.0), 0.02 * (max(ys) - min(ys) or 1.0)
    placed: list[tuple[float, float]] = []
    for model, (x, y) in fastest.items():
        below = sum(abs(x - px) < near_x and abs(y - py) < near_y for px, py in placed)
        ax.annotate(model, (x, y), textcoords="offset points", xytext=(-4, -13 - 9 * below), fontsize=7)
        placed.append((x, y))
    sign = -1.0 if higher_is_better else 1.0
    front = pareto_front([(x, sign * y) for x, y in points])
    ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="grey",
            linestyle="--", linewidth=1, label="Pareto frontier", zorder=2)
    ax.set_xlabel(f"latency per {report.unit}, x {report.base} (paired medians)")
    ax.set_ylabel(quality_label)
    ax.set_title(f"{report.kind}: {quality_label} against latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_study(report: StudyReport, path: str | Path, *, quality_key: str, quality_label: str) -> Path:
    """Accuracy against latency: one line per engine through the models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import _save

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for engine in dict.fromkeys(r.engine for r in report.rows):
        rows = sorted((r for r in report.rows if r.engine == engine and quality_key in r.quality),
                      key=lambda r: r.n_loops)
        if not rows:
            continue
        xs, ys = [r.ms for r in rows], [r.quality[quality_key] for r in rows]
        ax.plot(xs, ys, marker="o", label=engine)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r.model, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"ms per {report.unit} (median)")
    ax.set_ylabel(quality_label)
    ax.set_title(f"{report.kind}: {quality_label} against latency")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


# Rows a study times by default; others ("speed+correction", ...) come with their options.
DEFAULT_ENGINES: dict[str, tuple[str, dict]] = {"autoregressive": ("autoregressive", {}), "speed": ("speed", {})}


def _supported(model, engines: dict[str, tuple[str, dict]]) -> tuple[str, ...]:
    """The rows of ``engines`` a model can run (speculation needs an early exit)."""
    return tuple(name for name, (engine, _) in engines.items()
                 if engine == "autoregressive" or model.config.has_early_exit)


def decoder_entry(label: str, model, prompts: list[list[int]], new_tokens: int, quality: dict,
                  engines: dict[str, tuple[str, dict]] | None = None, details: dict | None = None) -> StudyEntry:
    """A decoder-only model decoding ``prompts`` for ``new_tokens`` each (no EOS).

    ``engines``: row name -> (engine, engine options); default autoregressive and speed."""
    from ..engines import generate

    engines = dict(DEFAULT_ENGINES if engines is None else engines)

    def run(name: str) -> tuple[float, int, dict]:
        engine, options = engines[name]
        total, units, summed = 0.0, 0, []
        for prompt in prompts:
            begin = time.perf_counter()
            result = generate(model, prompt, new_tokens, engine=engine, **options)
            total += time.perf_counter() - begin
            units += len(result.tokens)
            summed.append(result.stats)
        return total, units, pool_stats(summed)

    return StudyEntry(label, model.config.n_loops, _supported(model, engines), run, quality, details or {})


def translation_entry(label: str, model, tokenizer, sources: list[list[int]], quality: dict,
                      engines: dict[str, tuple[str, dict]] | None = None,
                      details: dict | None = None) -> StudyEntry:
    """A translator translating ``sources`` (encoded) with the default length limit."""
    from ..encdec.translate import translate_source

    engines = dict(DEFAULT_ENGINES if engines is None else engines)

    def run(name: str) -> tuple[float, int, dict]:
        engine, options = engines[name]
        total, summed = 0.0, []
        for ids in sources:
            begin = time.perf_counter()
            result = translate_source(model, tokenizer, ids, engine=engine, **options)
            total += time.perf_counter() - begin
            summed.append(result.stats)
        return total, len(sources), pool_stats(summed)

    return StudyEntry(label, model.config.n_loops, _supported(model, engines), run, quality, details or {})


def pool_stats(items: list[GenerationStats]) -> dict:
    """Counters of several requests: steps per token counts tokens after each request's first."""
    return {"steps": sum(s.steps for s in items), "tokens": sum(s.new_tokens for s in items),
            "after_first": sum(max(0, s.new_tokens - 1) for s in items),
            "accepted": sum(s.drafts_accepted for s in items),
            "verified": sum(s.drafts_accepted + s.drafts_rejected for s in items)}
