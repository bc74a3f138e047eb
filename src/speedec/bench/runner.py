"""Run engines on the same prompts, interleaved, and summarise them side by side.

The machine is noisy, so every number that compares engines is a ratio of
runs made back to back: in each repetition every engine decodes the same
prompts (in a rotated order), and speedups are computed repetition by
repetition before taking the median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..engines import generate
from ..engines.base import GenerationStats
from ..model import LoopedLM
from .memory import Bandwidth, MemoryUse, model_bytes, peak_rss_bytes, reset_peak_rss

REFERENCE = "autoregressive"
# Plain SPEED: the row the speculation options (early correction, adaptive) are compared with.
SPEED = "speed"


@dataclass(frozen=True)
class EngineSpec:
    """One row of the benchmark."""

    # Name shown in tables and JSON, e.g. "self-speculative k=2".
    label: str
    # "ours" (a speedec engine), "hf" (transformers' generate on the exported Llama) or
    # "llamacpp" (llama.cpp on the exported GGUF).
    kind: str
    # speedec engine name, "generate" / "early-exit" for kind "hf", the GGUF weight type
    # (f32, f16, q8_0) for kind "llamacpp".
    engine: str
    # Engine options (e.g. draft_tokens).
    options: dict = field(default_factory=dict)


@dataclass
class RunRecord:
    """One engine decoding all prompts once."""

    label: str
    repeat: int
    new_tokens: int
    seconds: float
    # Sums of the per-prompt GenerationStats (speedec engines only).
    stats: GenerationStats | None
    # Token lists, to check engines agree.
    tokens: list[list[int]]


@dataclass
class EngineSummary:
    engine: str
    kind: str
    tokens_per_s: float
    tokens_per_s_min: float
    tokens_per_s_max: float
    ms_per_token: float
    # Median over repetitions of (this engine's tokens/s) / (autoregressive tokens/s) in the same repetition.
    speedup_vs_autoregressive: float | None
    # The same paired median against plain ``speed`` (None when that row is absent).
    speedup_vs_speed: float | None
    acceptance: float | None
    steps_per_token: float | None
    mean_in_flight: float | None
    # Bytes of weights that must be read per generated token (prefill included).
    bytes_per_token: float | None
    # bytes_per_token / read bandwidth, in ms; and measured ms_per_token / floor.
    floor_ms_per_token: float | None
    ratio_to_floor: float | None
    # Fraction of prompts whose tokens equal the autoregressive engine's.
    matches_autoregressive: float | None
    # Bytes of the weights this row decodes with: speedec's model (parameters and buffers),
    # the transformers peer's, or llama.cpp's GGUF file (memory-mapped).
    model_bytes: int | None = None
    # Peak resident memory of the process that decoded this row, while it did: this
    # process for speedec and transformers rows (restarted before each of the row's
    # passes on Linux; it holds every in-process model), llama.cpp's own worker
    # process for llama.cpp rows (its whole life: loading and decoding). None where
    # the peak cannot be restarted (then only the report's process-wide peak is known).
    peak_rss_bytes: int | None = None


@dataclass
class BenchReport:
    preset: str
    config: dict
    dtype: str
    threads: int
    max_new_tokens: int
    prompts: int
    prompt_len: int
    repeats: int
    bandwidth: Bandwidth | None
    machine: dict
    engines: list[EngineSummary]
    notes: list[str]
    # The model's bytes and the process's peak resident memory (build, decoding).
    memory: MemoryUse | None = None
    # A random preset's residual scale (its acceptance knob; None for a saved model).
    residual_scale: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self, label: str) -> EngineSummary | None:
        return next((s for s in self.engines if s.engine == label), None)


def weight_bytes(model: LoopedLM) -> tuple[int, int]:
    """Bytes of the K unique layers, and of the LM head (final norm included); 8-bit
    weights count their values and scales."""
    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    layers = size([*model.layers.parameters(), *model.layers.buffers()])
    head_weight = model.head_weight
    head = head_weight.nbytes if not isinstance(head_weight, torch.Tensor) else size([head_weight])
    head += size(model.norm.parameters())
    return layers, head


def weights_name(model: LoopedLM) -> str:
    """The weights' format: the dtype (``float32``, ``bfloat16``) or the quantization (``q8_0``)."""
    return getattr(model.config, "quantization", None) or str(model.dtype).replace("torch.", "")


def bytes_per_token(spec: EngineSpec, model: LoopedLM, stats: GenerationStats | None, prompts: int,
                    new_tokens: int) -> float | None:
    """Weight bytes an engine must read per generated token.

    Ours: one read of the unique layers per step and of the head per LM-head
    call, plus prefill (the layers L times and the head once per prompt). HF
    generate: the exported model holds K*L separate layers, so every token
    reads L copies of the layers and the head; so does llama.cpp on the GGUF
    of the model's own format (f32 for float32, q8_0 for q8_0; other weight
    types: None).
    """
    layers, head = weight_bytes(model)
    n_loops = model.config.n_loops
    if spec.kind == "hf":
        return float(n_loops * layers + head) if spec.engine == "generate" else None
    if spec.kind == "llamacpp":
        same = {"float32": "f32", "q8_0": "q8_0"}.get(weights_name(model)) == spec.engine.removeprefix("looped-")
        return float(n_loops * layers + head) if same else None
    if stats is None or new_tokens == 0:
        return None
    prefill = prompts * (n_loops * layers + head)
    return (prefill + stats.steps * layers + stats.lm_head_calls * head) / new_tokens


def _sum_stats(items: list[GenerationStats]) -> GenerationStats:
    total = GenerationStats()
    rows = 0.0
    for s in items:
        for name in ("prompt_tokens", "new_tokens", "steps", "drafts_launched", "drafts_accepted",
                     "drafts_rejected", "drafts_discarded", "flushes", "corrections",
                     "guesses_skipped", "spares_launched", "spare_hits", "lm_head_calls"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        for name in ("prefill_s", "decode_s", "wall_s"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        rows += s.mean_in_flight * s.steps
    total.mean_in_flight = rows / total.steps if total.steps else 0.0
    return total


def _runner(spec: EngineSpec, model: LoopedLM, hf_model, llamacpp_peers) -> Callable[[list[int], int], tuple]:
    """A function (prompt, n) -> (tokens, seconds, stats|None)."""
    if spec.kind == "llamacpp":
        return llamacpp_peers[spec.engine].run
    if spec.kind == "ours":
        def run(prompt, n):
            start = time.perf_counter()
            result = generate(model, prompt, n, engine=spec.engine, **spec.options)
            return result.tokens, time.perf_counter() - start, result.stats
        return run

    exit_layers = model.config.exit_loop * model.config.n_unique_layers

    def run_hf(prompt, n):
        ids = torch.tensor([prompt])
        extra = {"assistant_early_exit": exit_layers} if spec.engine == "early-exit" else {}
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, pad_token_id=0,
                                    eos_token_id=None, **extra)
        return out[0, len(prompt):].tolist(), time.perf_counter() - start, None
    return run_hf


def run_benchmark(model: LoopedLM, specs: list[EngineSpec], prompts: list[list[int]], *,
                  max_new_tokens: int, repeats: int = 5, warmup: int = 1, hf_model=None,
                  llamacpp_peers: dict | None = None, bandwidth: Bandwidth | None = None,
                  preset: str = "custom", progress: Callable[[str], None] | None = None,
                  build_peak_rss_bytes: int | None = None) -> BenchReport:
    """``build_peak_rss_bytes``: the process's peak resident memory once the model was
    built (default: the peak when this is called); the peak while decoding is measured
    from a reset of the peak (Linux) at the start."""
    if build_peak_rss_bytes is None:
        build_peak_rss_bytes = peak_rss_bytes()
    peak_reset = reset_peak_rss()
    if not any(s.label == REFERENCE for s in specs):
        specs = [EngineSpec(REFERENCE, "ours", REFERENCE), *specs]
    runners = {s.label: _runner(s, model, hf_model, llamacpp_peers) for s in specs}
    for _ in range(warmup):
        for s in specs:
            runners[s.label](prompts[0], min(8, max_new_tokens))
    # This process's peak while decoding: the warm-up's, then every pass's (each restarts it).
    decode_peak = peak_rss_bytes()
    row_peaks: dict[str, int | None] = {s.label: None for s in specs}
    records: list[RunRecord] = []
    for rep in range(repeats):
        order = specs[rep % len(specs):] + specs[: rep % len(specs)]  # rotate who goes first
        for s in order:
            if progress:
                progress(f"repeat {rep + 1}/{repeats}: {s.label}")
            if peak_reset:
                reset_peak_rss()
            tokens, seconds, stats = [], 0.0, []
            for prompt in prompts:
                toks, secs, st = runners[s.label](prompt, max_new_tokens)
                tokens.append(toks)
                seconds += secs
                if st is not None:
                    stats.append(st)
            records.append(RunRecord(s.label, rep, sum(map(len, tokens)), seconds,
                                     _sum_stats(stats) if stats else None, tokens))
            here = peak_rss_bytes()
            decode_peak = max(decode_peak, here)
            if s.kind == "llamacpp":
                row_peaks[s.label] = llamacpp_peers[s.engine].peak_rss_bytes
            elif peak_reset:
                row_peaks[s.label] = max(row_peaks[s.label] or 0, here)
    memory = MemoryUse(model_bytes=model_bytes(model), build_peak_rss_bytes=build_peak_rss_bytes,
                       decode_peak_rss_bytes=decode_peak, decode_peak_is_reset=peak_reset)
    summaries = [_summarise(s, records, model, len(prompts), bandwidth) for s in specs]
    for summary, s in zip(summaries, specs):
        summary.model_bytes = _row_model_bytes(s, model, hf_model, llamacpp_peers)
        summary.peak_rss_bytes = row_peaks[s.label]
    return BenchReport(
        preset=preset, config=model.config.to_dict(), dtype=weights_name(model),
        threads=torch.get_num_threads(), max_new_tokens=max_new_tokens, prompts=len(prompts),
        prompt_len=len(prompts[0]), repeats=repeats, bandwidth=bandwidth, machine=machine_info(),
        engines=summaries, notes=[], memory=memory)


def _row_model_bytes(spec: EngineSpec, model: LoopedLM, hf_model, llamacpp_peers) -> int | None:
    """Bytes of the weights a row decodes with (see :attr:`EngineSummary.model_bytes`)."""
    if spec.kind == "llamacpp":
        return llamacpp_peers[spec.engine].file_bytes
    if spec.kind == "hf":
        return model_bytes(hf_model) if hf_model is not None else None
    return model_bytes(model)


def paired_ratios(records: list[RunRecord], label: str, baseline: str) -> list[float]:
    """tokens/s of ``label`` over tokens/s of ``baseline``, repetition by repetition."""
    base = {r.repeat: r.new_tokens / r.seconds for r in records if r.label == baseline}
    return [(r.new_tokens / r.seconds) / base[r.repeat] for r in records
            if r.label == label and r.repeat in base]


def _summarise(spec: EngineSpec, records: list[RunRecord], model: LoopedLM, n_prompts: int,
               bandwidth: Bandwidth | None) -> EngineSummary:
    mine = [r for r in records if r.label == spec.label]
    ref = {r.repeat: r for r in records if r.label == REFERENCE}
    tps = [r.new_tokens / r.seconds for r in mine]
    ratios = paired_ratios(records, spec.label, REFERENCE)
    over_speed = paired_ratios(records, spec.label, SPEED)
    median_tps = statistics.median(tps)
    stats = _sum_stats([r.stats for r in mine if r.stats is not None]) if mine[0].stats else None
    new_tokens = sum(r.new_tokens for r in mine)
    bpt = bytes_per_token(spec, model, stats, n_prompts * len(mine), new_tokens)
    floor_ms = bpt / (bandwidth.read_gbps * 1e9) * 1e3 if bpt is not None and bandwidth else None
    ms = 1e3 / median_tps
    ref_tokens = ref[0].tokens if 0 in ref else None
    matches = (sum(a == b for a, b in zip(mine[0].tokens, ref_tokens)) / len(ref_tokens)
               if ref_tokens else None)
    return EngineSummary(
        engine=spec.label, kind=spec.kind, tokens_per_s=median_tps, tokens_per_s_min=min(tps),
        tokens_per_s_max=max(tps), ms_per_token=ms,
        speedup_vs_autoregressive=statistics.median(ratios) if ratios else None,
        speedup_vs_speed=statistics.median(over_speed) if over_speed else None,
        acceptance=stats.acceptance if stats else None,
        steps_per_token=(stats.steps / max(1, stats.new_tokens - n_prompts * len(mine))) if stats else None,
        mean_in_flight=stats.mean_in_flight if stats else None,
        bytes_per_token=bpt, floor_ms_per_token=floor_ms,
        ratio_to_floor=ms / floor_ms if floor_ms else None, matches_autoregressive=matches)


def machine_info() -> dict:
    import os
    import platform

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    from ..kernels import active_kernel
    from ..q8_kernels import best_path, cpu_flags

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "kernel": active_kernel(), "q8_kernel": best_path() or "torch", "cpu_flags": flags}
