"""The depth study's training runs: recipes, budgets and depths, run in parallel.

Every run has the bundled default model's shape (d_model 256, K = 2 unique
layers, 8,192-token vocabulary, sequences of 256, batches of 16) and differs
only in its loop count L, its recipe and its token budget. Three groups:

* ``search``: every recipe of :data:`RECIPES` at L = 4 and the L = 1 learning
  rates at 4M tokens (the recipe search, and the 4M point of the budget trend);
* ``trend``: L = 1 and L = 4 at 2M tokens, today's recipe and the best one;
* ``full``: the default model's budget (11.5M tokens): L = 1 (best learning
  rate), and L = 2, 4, 8 with the best L = 4 recipe, and L = 4 with today's
  (the runs of the expected winner, :data:`PRIOR`, start at once).

The best recipe is the one with the lowest final-loop validation loss at the
end of ``search`` (for L = 1 the best learning rate); runs that depend on it
start when ``search`` is done, the others at once.

    python benchmarks/depth_sweep.py --out runs/depth --jobs 12 --device cuda

writes one config per run (``<out>/configs``), trains each with
``python -m speedec.cli train`` and evaluates its final model on the
validation and test splits (``python -m speedec.cli eval``), and writes
``<out>/summary.json``: every run's eval events, final metrics and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "train" / "default.json"
TOKENS_PER_STEP = 16 * 256
BUDGETS = {"2M": 2_000_000, "4M": 4_000_000, "11.5M": 2800 * TOKENS_PER_STEP}


def rising(L: int, top: float = 0.3) -> list[float]:
    """Per-loop supervision weights rising with depth: loop l gets top * l / (L - 1)."""
    return [round(top * loop / (L - 1), 4) for loop in range(1, L)]


# Recipe name -> changes to the default config (a function of L). "today" is the
# recipe of the bundled model before this study.
RECIPES = {
    "today": lambda L: {"exit_weight": 1.0},
    "final-only": lambda L: {"exit_weight": 0.0},
    "drafter": lambda L: {"exit_weight": 0.0, "model": {"exit_readout_rank": 64}},
    "drafter-lr1e-3": lambda L: {"exit_weight": 0.0, "lr": 1e-3, "model": {"exit_readout_rank": 64}},
    "drafter-lr3e-3": lambda L: {"exit_weight": 0.0, "lr": 3e-3, "model": {"exit_readout_rank": 64}},
    "drafter-warmup300": lambda L: {"exit_weight": 0.0, "warmup_steps": 300,
                                    "model": {"exit_readout_rank": 64}},
    "drafter-loopemb": lambda L: {"exit_weight": 0.0,
                                  "model": {"exit_readout_rank": 64, "loop_embedding": True}},
    "drafter-deep": lambda L: {"exit_weight": 0.0, "loop_weights": rising(L),
                               "model": {"exit_readout_rank": 64}},
    "drafter-deep-curriculum": lambda L: {"exit_weight": 0.0, "loop_weights": rising(L),
                                          "exit_schedule": "curriculum",
                                          "model": {"exit_readout_rank": 64}},
    "drafter-loopemb-deep": lambda L: {"exit_weight": 0.0, "loop_weights": rising(L),
                                       "model": {"exit_readout_rank": 64, "loop_embedding": True}},
    "final-only-lr1e-3": lambda L: {"exit_weight": 0.0, "lr": 1e-3},
    "drafter-exit-ramp": lambda L: {"exit_weight": 0.3, "exit_schedule": "ramp",
                                    "exit_schedule_window": [0.5, 1.0],
                                    "model": {"exit_readout_rank": 64}},
}
# The recipe whose full-budget runs start before the search ends.
PRIOR = "drafter"
L1_LRS = {"l1-lr1e-3": 1e-3, "l1-lr2e-3": 2e-3, "l1-lr3e-3": 3e-3}


SMOKE = False  # --smoke: a few steps per run, to check the sweep end to end on a CPU


def make_config(name: str, L: int, budget: str, changes: dict, out: Path) -> Path:
    base = json.loads(BASE_CONFIG.read_text())
    model = dict(base["model"], n_loops=L, exit_loop=1 if L > 1 else None, **changes.pop("model", {}))
    if L == 1:
        model.pop("exit_readout_rank", None)
        model.pop("loop_embedding", None)
        changes = {k: v for k, v in changes.items() if k not in ("loop_weights", "exit_schedule",
                                                                  "exit_schedule_window")}
        changes["exit_weight"] = 0.0
    config = dict(base, **changes, model=model)
    config.pop("max_steps", None)
    config.update(max_tokens=BUDGETS[budget], out_dir=str(out / "runs" / name), eval_every=250,
                  save_every=1000, threads=1, description=f"depth sweep: {name} (L={L}, {budget} tokens)")
    if SMOKE:
        config.update(max_tokens=BUDGETS[budget] // 1000, warmup_steps=2, eval_every=5, eval_batches=1,
                      batch_size=4, seq_len=64)
    path = out / "configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


class Sweep:
    def __init__(self, out: Path, device: str, deadline: float) -> None:
        self.out, self.device, self.deadline = out, device, deadline
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()

    def run(self, name: str, L: int, budget: str, changes: dict, recipe: str) -> dict:
        config = make_config(name, L, budget, dict(changes), self.out)
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        begin = time.time()
        result = {"name": name, "n_loops": L, "budget": budget, "tokens": BUDGETS[budget], "recipe": recipe,
                  "config": json.loads(config.read_text())}
        with open(log, "w") as fh:
            remaining = max(1.0, self.deadline - time.time())
            try:
                proc = subprocess.run([sys.executable, "-m", "speedec.cli", "train", "--config",
                                       str(config), "--no-progress", "--device", self.device],
                                      stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=remaining)
                result["returncode"] = proc.returncode
            except subprocess.TimeoutExpired:
                result["returncode"] = "timeout"
        result["train_wall_s"] = time.time() - begin
        run_dir = self.out / "runs" / name
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            result["evals"] = [e for e in events if e.get("event") == "eval"]
            done = [e for e in events if e.get("event") == "done"]
            result["train_s"] = done[-1]["train_s"] if done else None
        if result["returncode"] == 0:
            for split in ("validation", "test"):
                result[split] = self.evaluate(run_dir / "model", split)
        with self.lock:
            self.results[name] = result
            self.save()
        validation = result.get("validation") or {}
        print(f"[{time.strftime('%H:%M:%S')}] {name}: rc={result['returncode']} "
              f"val={validation.get('ppl')} in {result['train_wall_s']:.0f}s", flush=True)
        return result

    def evaluate(self, model_dir: Path, split: str) -> dict | None:
        remaining = self.deadline - time.time()
        if remaining < 5:
            return None
        try:
            proc = subprocess.run([sys.executable, "-m", "speedec.cli", "eval", "--model", str(model_dir),
                                   "--data", str(ROOT / "data" / "english" / f"{split}.txt"), "--json",
                                   "--prompts", "16" if split == "validation" else "0", "--threads", "1"],
                                  capture_output=True, text=True, timeout=remaining)
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()[-500:]}
        return json.loads(proc.stdout)

    def save(self) -> None:
        path = self.out / "summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        tmp.replace(path)


def final_loss(result: dict | None) -> float:
    if not result or not result.get("evals"):
        return float("inf")
    return result["evals"][-1]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/depth")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=480.0, help="Wall-clock limit of the whole sweep.")
    parser.add_argument("--smoke", action="store_true", help="A few steps per run (checks the sweep itself).")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.smoke
    out = Path(args.out)
    sweep = Sweep(out, args.device, time.time() + args.budget_s)

    # Tokenise the splits once, before the runs start (each would otherwise do it).
    try:
        import speedec  # noqa: F401 (installed, or on PYTHONPATH)
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
    from speedec.tokenizer import BPETokenizer
    from speedec.training.data import load_tokens

    tokenizer = BPETokenizer(ROOT / "data" / "english" / "tokenizer.json")
    for split in ("train", "validation", "test"):
        load_tokens(ROOT / "data" / "english" / f"{split}.txt", tokenizer)

    pool = ThreadPoolExecutor(max_workers=args.jobs)
    full = {}  # (recipe, L) -> future of its run at the full budget

    def submit_full(recipe: str, L: int, changes: dict):
        full[recipe, L] = pool.submit(sweep.run, f"L{L}-{recipe}-11.5M", L, "11.5M", changes, recipe)

    # Longest runs first; the full-budget runs of the expected winner ("drafter") and of
    # today's recipe start at once, so that they finish even if the search is slow.
    for L in (8, 4, 2):
        submit_full(PRIOR, L, RECIPES[PRIOR](L))
    submit_full("today", 4, RECIPES["today"](4))
    submit_full("l1-lr2e-3", 1, {"lr": 2e-3})
    search = {name: pool.submit(sweep.run, f"L4-{name}-4M", 4, "4M", RECIPES[name](4), name) for name in RECIPES}
    lr_search = {name: pool.submit(sweep.run, f"L1-{name}-4M", 1, "4M", {"lr": lr}, name)
                 for name, lr in L1_LRS.items()}
    trend = [pool.submit(sweep.run, "L4-today-2M", 4, "2M", RECIPES["today"](4), "today"),
             pool.submit(sweep.run, "L1-l1-lr2e-3-2M", 1, "2M", {"lr": 2e-3}, "l1-lr2e-3")]

    best = min(search, key=lambda name: final_loss(search[name].result()))
    best_l1 = min(lr_search, key=lambda name: final_loss(lr_search[name].result()))
    print(f"best L4 recipe: {best}; best L1 learning rate: {best_l1}", flush=True)
    with sweep.lock:
        sweep.results["_selection"] = {"best_recipe": best, "best_l1": best_l1, "prior": PRIOR}
    if best != PRIOR:
        for L in (8, 4, 2):
            submit_full(best, L, RECIPES[best](L))
    if best_l1 != "l1-lr2e-3":
        submit_full(best_l1, 1, {"lr": L1_LRS[best_l1]})
        trend.append(pool.submit(sweep.run, f"L1-{best_l1}-2M", 1, "2M", {"lr": L1_LRS[best_l1]}, best_l1))
    trend.append(pool.submit(sweep.run, f"L4-{best}-2M", 4, "2M", RECIPES[best](4), best))
    for future in list(full.values()) + trend:
        future.result()
    pool.shutdown()
    # The models worth copying off the training machine: the study's four depths.
    chosen = [f"L1-{best_l1}-11.5M"] + [f"L{L}-{best}-11.5M" for L in (2, 4, 8)]
    (out / "transfer.txt").write_text("\n".join(chosen) + "\n")
    sweep.save()


def report(summary_file: Path, extra_metrics: list[Path], out_json: Path, out_plot: Path) -> None:
    """The recipe table and the budget trend of a finished sweep (plus runs trained apart from it,
    given by their ``metrics.jsonl``): a compact JSON and the trend plot. Perplexities are the
    trainer's own validation sample at the end of each run, the one number every run has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = json.loads(summary_file.read_text())
    runs = {}
    for name, result in summary.items():
        if name.startswith("_") or not result.get("evals"):
            continue
        last = result["evals"][-1]
        runs[name] = {"n_loops": result["n_loops"], "recipe": result["recipe"], "tokens": last_tokens(result),
                      "finished": result["returncode"] == 0, "val_ppl": last["ppl"],
                      "ppl_per_loop": last["ppl_per_loop"],
                      "agreement": last.get("draft_agreement", last["exit_agreement"]),
                      "eval": {k: (result.get("validation") or {}).get(k) for k in ("ppl", "acceptance")},
                      "test_ppl": (result.get("test") or {}).get("ppl")}
    for path in extra_metrics:
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        evals = [e for e in events if e.get("event") == "eval"]
        done = [e for e in events if e.get("event") == "done"]
        name = path.name.replace("-metrics.jsonl", "")
        L = len(evals[-1]["ppl_per_loop"])
        runs[name] = {"n_loops": L, "recipe": name.split("-", 1)[1].rsplit("-", 1)[0], "tokens": done[-1]["tokens"],
                      "finished": True, "val_ppl": evals[-1]["ppl"], "ppl_per_loop": evals[-1]["ppl_per_loop"],
                      "agreement": evals[-1].get("draft_agreement", evals[-1]["exit_agreement"])}
    out_json.write_text(json.dumps({"selection": summary.get("_selection"), "runs": runs}, indent=1) + "\n")

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series = {"L=1": lambda r: r["n_loops"] == 1 and r["recipe"] == "l1-lr2e-3",
              "L=4, constant exit weight 1.0 (before)": lambda r: r["n_loops"] == 4 and r["recipe"] == "today",
              "L=4, drafter + warmup 300 (new)": lambda r: r["n_loops"] == 4 and r["recipe"] == "drafter-warmup300"}
    for label, keep in series.items():
        points = sorted((r["tokens"], r["val_ppl"]) for r in runs.values() if keep(r) and r["finished"])
        ax.plot([t / 1e6 for t, _ in points], [p for _, p in points], marker="o", label=label)
    # Second seeds of the trend's recipes (recipe "<recipe>-seed<N>"): unconnected, to show the spread.
    for L, recipe, colour in ((1, "l1-lr2e-3", "C0"), (4, "drafter-warmup300", "C2")):
        points = [(r["tokens"], r["val_ppl"]) for r in runs.values()
                  if r["n_loops"] == L and r["recipe"].startswith(recipe + "-seed") and r["finished"]]
        if points:
            ax.plot([t / 1e6 for t, _ in points], [p for _, p in points], linestyle="none", marker="x",
                    color=colour, label=f"L={L}, another seed")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation perplexity (final loop)")
    ax.set_title("depth at equal parameters: the budget trend")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_plot, dpi=120)
    for name, r in sorted(runs.items(), key=lambda kv: (kv[1]["tokens"], kv[1]["n_loops"], kv[0])):
        loops = " / ".join(f"{p:.1f}" for p in r["ppl_per_loop"])
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
        print(f"| {name} | {r['n_loops']} | {r['tokens'] / 1e6:.1f}M | {r['val_ppl']:.2f} | {loops} | {agree} |")


def last_tokens(result: dict) -> int:
    return result["evals"][-1]["step"] * TOKENS_PER_STEP if result.get("evals") else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        # python benchmarks/depth_sweep.py report SUMMARY OUT.json OUT.png [EXTRA-metrics.jsonl ...]
        report(Path(sys.argv[2]), [Path(p) for p in sys.argv[5:]], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
