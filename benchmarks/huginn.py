"""Recurrent-depth decoding (issue 23): autoregressive, speed at several exit recurrences e and
self-speculative on a huginn preset at r = 8, 16, 32 recurrences, measured side by side.

    python benchmarks/huginn.py --preset membound-recurrent --loops 8,16,32 --out benchmarks/results/huginn-membound
    python benchmarks/huginn.py --preset huginn-3.5b-shape --dtype bfloat16 --loops 32 --exits 4,8 \\
        --prompts 1 --new-tokens 8 --rounds 1 --out benchmarks/results/huginn-3.5b

Every round runs every row once on the same prompts (greedy, so every row emits the same
tokens, which is checked); a row's ratio is its tokens/s over autoregressive's in the same
round, and the table gives the median over rounds. Also: acceptance by e, the cost of one
step (one recurrence) by rows in flight, weights and KV cache bytes at 1k tokens, the cost
model r / (a e + (1 - a) r), and a plot of tokens/s against e. Writes OUT.json, OUT.md and
OUT.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch

from speedec import generate
from speedec.bench.runner import machine_info
from speedec.bench.setup import build_model
from speedec.cache import KVCache
from speedec.engines.speed import measure_step_costs
from speedec.kernels import prepare_kernel


def run_row(model, prompts, new_tokens, engine, options):
    tokens, elapsed, accepted, verified = [], 0.0, 0, 0
    for prompt in prompts:
        begin = time.perf_counter()
        out = generate(model, prompt, new_tokens, engine=engine, **options)
        elapsed += time.perf_counter() - begin
        tokens.append(out.tokens)
        accepted += out.stats.drafts_accepted
        verified += out.stats.drafts_accepted + out.stats.drafts_rejected
    return tokens, sum(map(len, tokens)) / elapsed, (accepted / verified if verified else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="membound-recurrent")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--residual-scale", type=float, default=None,
                        help="the random model's convergence knob (default: the preset's; smaller converges faster)")
    parser.add_argument("--loops", default="8,16,32")
    parser.add_argument("--exits", default="1,2,4,8,16", help="exit recurrences (those below r run)")
    parser.add_argument("--self-spec-exit", type=int, default=None, help="default: r / 4")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reference", default=None,
                        help="a directory whose recpre/ holds the reference modeling code: adds its generate row")
    parser.add_argument("--reference-python", default=None,
                        help="the python of a virtualenv with transformers < 5 (benchmarks/huginn_reference.py)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}[args.dtype]
    begin = time.perf_counter()
    base = build_model(args.preset, dtype=dtype, residual_scale=args.residual_scale)
    prepare_kernel(base)
    build_s = time.perf_counter() - begin
    rng = random.Random(0)
    prompts = [[rng.randrange(base.config.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    weights = sum(t.nbytes for t in base.state_dict().values())
    machine = machine_info()
    result = {"preset": args.preset, "dtype": args.dtype, "cpu": machine["cpu"], "cpu_flags": machine["cpu_flags"],
              "kernel": machine["kernel"], "q8_kernel": machine["q8_kernel"], "threads": torch.get_num_threads(),
              "date": datetime.date.today().isoformat(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "residual_scale": args.residual_scale, "weights_bytes": weights, "build_s": build_s, "depths": []}
    reference_dir = None
    if args.reference:
        import tempfile

        from speedec import export_hf

        reference_dir = Path(tempfile.mkdtemp(prefix="huginn-ref-"))
        export_hf(base, reference_dir / "model")  # the same weights, as a RavenForCausalLM checkpoint
        (reference_dir / "prompts.json").write_text(json.dumps(prompts))
    for r in [int(x) for x in args.loops.split(",")]:
        model = base.at_depth(r)
        exits = [e for e in (int(x) for x in args.exits.split(",")) if e < r]
        spec_exit = args.self_spec_exit or max(1, r // 4)
        rows = [("autoregressive", "autoregressive", {}, None)]
        rows += [(f"speed e={e}", "speed", {}, e) for e in exits]
        rows += [(f"self-speculative e={spec_exit} k=3", "self-speculative", {"draft_tokens": 3}, spec_exit)]
        ratios = {name: [] for name, *_ in rows}
        speeds = {name: [] for name, *_ in rows}
        acceptance = {}
        if reference_dir is not None:
            ratios["reference generate"], speeds["reference generate"] = [], []
            result.setdefault("reference_tokens_equal", {})
        for _ in range(args.rounds):
            ar_speed = None
            reference = None
            for name, engine, options, e in rows:
                view = model.at_depth(r)
                if e is not None:
                    view.config = view.config.replace(exit_loop=e)
                tokens, speed, acc = run_row(view, prompts, args.new_tokens, engine, options)
                if reference is None:
                    reference, ar_speed = tokens, speed
                if tokens != reference:  # an exactness failure: recorded, and shown in the table
                    result.setdefault("mismatches", []).append(f"{name} at r={r}")
                    print(f"MISMATCH: {name} at r={r} emitted other tokens than autoregressive", flush=True)
                speeds[name].append(speed)
                ratios[name].append(speed / ar_speed)
                acceptance[name] = acc
                print(f"r={r} {name}: {speed:.2f} tok/s ({speed / ar_speed:.2f}x), acceptance {acc}", flush=True)
            if reference_dir is not None:  # in the same round, on the same prompts
                command = [args.reference_python, str(Path(__file__).with_name("huginn_reference.py")),
                           "--reference", args.reference, "--model", str(reference_dir / "model"),
                           "--prompts", str(reference_dir / "prompts.json"), "--loops", str(r),
                           "--new-tokens", str(args.new_tokens), "--dtype",
                           "bfloat16" if dtype == torch.bfloat16 else "float32",
                           "--threads", str(torch.get_num_threads())]
                ref = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
                speed = ref["tokens_per_s"][0]
                speeds["reference generate"].append(speed)
                ratios["reference generate"].append(speed / ar_speed)
                same = sum(a == b for a, b in zip(ref["tokens"], reference))
                result["reference_tokens_equal"][str(r)] = f"{same}/{len(reference)} prompts"
                print(f"r={r} reference generate: {speed:.2f} tok/s ({speed / ar_speed:.2f}x), "
                      f"{same}/{len(reference)} prompts give autoregressive's tokens", flush=True)
        costs = measure_step_costs(model, max(1, -(-r // min(exits))) if exits else 1)
        kv = KVCache(model.config, 1024, dtype=model.dtype if dtype != torch.int8 else torch.float32).nbytes
        depth = {"loops": r, "kv_cache_bytes_1k": kv, "step_costs_s": costs, "rows": []}
        if reference_dir is not None:
            rows.append(("reference generate", "reference", {}, None))
            acceptance["reference generate"] = None
        for name, engine, _options, e in rows:
            a = acceptance[name]
            model_ratio = r / (a * e + (1 - a) * r) if engine == "speed" and a is not None else None
            depth["rows"].append({"row": name, "exit": e, "tokens_per_s": statistics.median(speeds[name]),
                                  "ratio": statistics.median(ratios[name]), "acceptance": a,
                                  "cost_model_ratio": model_ratio})
        result["depths"].append(depth)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def path(suffix: str) -> Path:  # (OUT may hold dots: "huginn-3.5b-shape")
        return out.parent / (out.name + suffix)

    path(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# {args.preset} ({args.dtype}): recurrent-depth decoding", "",
             f"{result['cpu']} ({', '.join(result['cpu_flags'])}; kernel {result['kernel']}, q8_0 "
             f"{result['q8_kernel']}), {result['threads']} threads, {result['date']}, commit {result['commit']}; "
             f"{args.prompts} random prompts of {args.prompt_len} ids x {args.new_tokens} greedy tokens, "
             f"{args.rounds} round(s), ratios paired per round (median). Weights {weights / 1e9:.2f} GB. "
             f"Residual scale: {args.residual_scale or 'the preset default'}.", ""]
    for depth in result["depths"]:
        lines += [f"## r = {depth['loops']} (KV cache at 1k tokens: {depth['kv_cache_bytes_1k'] / 1e9:.2f} GB)", "",
                  "| row | tok/s | vs autoregressive | acceptance | cost model r/(ae+(1-a)r) |", "|---|---|---|---|---|"]
        for row in depth["rows"]:
            acc = "" if row["acceptance"] is None else f"{row['acceptance']:.3f}"
            model_ratio = "" if row["cost_model_ratio"] is None else f"{row['cost_model_ratio']:.2f}x"
            lines.append(f"| {row['row']} | {row['tokens_per_s']:.2f} | {row['ratio']:.2f}x | {acc} | {model_ratio} |")
        costs = ", ".join(f"{c * 1e3:.1f}" for c in depth["step_costs_s"])
        lines += ["", f"Step cost (ms) by rows in flight 1..{len(depth['step_costs_s'])}: {costs}", ""]
        same = result.get("reference_tokens_equal", {}).get(str(depth["loops"]))
        if same:
            lines += [f"The reference's greedy tokens equal autoregressive's on {same}.", ""]
    if result.get("mismatches"):
        lines += ["**Rows whose tokens differed from autoregressive's:** " + ", ".join(result["mismatches"]), ""]
    path(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for depth in result["depths"]:
        pts = [(row["exit"], row["tokens_per_s"]) for row in depth["rows"] if row["row"].startswith("speed")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"speed, r={depth['loops']}")
        ax.axhline(depth["rows"][0]["tokens_per_s"], linestyle=":", color=ax.lines[-1].get_color() if pts else None,
                   label=f"autoregressive, r={depth['loops']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("exit recurrence e")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{args.preset} {args.dtype}: speed by exit recurrence")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path(".png"), dpi=120)
    print(path(".md").read_text())


if __name__ == "__main__":
    main()
