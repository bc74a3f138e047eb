"""Where a ``speed`` step's time goes: the weight products against everything else.

    python benchmarks/profile_step.py --preset default [--tokens 64] [--engine speed]

Decodes a few prompts with the engine under ``torch.profiler`` and prints,
per step: wall time, the number of PyTorch operator calls, and the share of
self CPU time of the few-row products (the weight reads), attention, and the
rest (norms, rotary, cache writes, concatenations, argmax, bookkeeping).
Profiler overhead inflates every operator call alike, so the operator count
and the shares are what compare between versions; the wall time per step
without the profiler is printed too.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from speedec.bench.setup import build_model, make_prompts
from speedec.bundled import resolve_model_dir
from speedec.engines import get_engine
from speedec.kernels import prepare_kernel

PRODUCTS = ("speedec_kernels::few_rows_linear", "aten::linear", "aten::mm", "aten::addmm",
            "mkldnn::_linear_pointwise")
ATTENTION = ("aten::bmm", "aten::_softmax", "aten::masked_fill", "aten::masked_fill_", "speedec_kernels::slot_attention", "speedec_kernels::slot_attention_rope")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--engine", default="speed")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.preset, model_dir=resolve_model_dir(None) if args.preset == "default" else None)
    prepare_kernel(model)
    engine = get_engine(args.engine, model)
    prompts = make_prompts(model, None, count=args.prompts, length=16)
    with torch.inference_mode():
        engine.generate(prompts[0], 8)  # warm-up
        begin, steps = time.perf_counter(), 0
        for p in prompts:
            steps += engine.generate(p, args.tokens).stats.steps
        plain = (time.perf_counter() - begin) / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            psteps = sum(engine.generate(p, args.tokens).stats.steps for p in prompts)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    calls = Counter({e.key: e.count for e in events})

    def share(names):
        return sum(e.self_cpu_time_total for e in events if e.key in names) / total

    print(f"preset {args.preset}, engine {args.engine}: {plain * 1e3:.3f} ms/step without the profiler, "
          f"{sum(calls.values()) / psteps:.1f} operator calls/step")
    print(f"self CPU time: products {share(PRODUCTS):.1%}, attention {share(ATTENTION):.1%}, "
          f"rest {1 - share(PRODUCTS) - share(ATTENTION):.1%}")
    print(f"{'operator':44s} {'calls/step':>10s} {'self %':>7s}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"{e.key:44s} {e.count / psteps:10.1f} {e.self_cpu_time_total / total:7.1%}")


if __name__ == "__main__":
    main()
