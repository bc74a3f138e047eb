"""Accuracy and speed of the bundled model at every depth, through lm-evaluation-harness.

1. Builds (once; ``--rebuild`` to redo it) a small multiple-choice set from the
   bundled model's held-out text, the test split of ``speedec data prepare --out
   data/english`` (never trained on): each item is a sentence of a paragraph,
   and the choices are the sentence that follows it and three sentences of
   similar length from elsewhere in the split; the task is to pick the right
   next sentence. Written to ``benchmarks/tasks/next_sentence.jsonl`` (committed).
2. Starts ``speedec serve`` (the bundled model, float32, the ``speed`` engine) on a
   loopback port and runs ``lm_eval --model local-completions`` on that task
   (``benchmarks/tasks/next_sentence.yaml``) against every depth's model id,
   ``speedec-default@loops=1`` ... ``speedec-default``.
3. Measures each depth's decoding speed on the same server: greedy completions of
   64 tokens, one request at a time (``speedec.serve.loadtest``, built-in prompts),
   in rounds that interleave the depths; the median round is reported.

Prints a markdown table and writes the numbers, the host's CPU, the date and the
commit to ``--out`` (JSON). A few minutes on two cores::

    python benchmarks/depth_table.py --out benchmarks/results/depth-table.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "benchmarks" / "tasks"
ITEMS = TASKS / "next_sentence.jsonl"
TASK = "speedec_next_sentence"
NAME = "speedec-default"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences_by_paragraph(text: str) -> list[list[str]]:
    """The split's paragraphs (blank-line separated), each as its sentences."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        if flat:
            out.append([s for s in _SENTENCE_END.split(flat) if s])
    return out


def build_items(text: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` items: a sentence (40 to 200 characters) as the context; as choices, the
    sentence after it (same bounds) and three sentences of other paragraphs whose
    lengths are within 25% of it, in a seeded random order."""
    rng = random.Random(seed)
    paragraphs = sentences_by_paragraph(text)

    def fits(s: str) -> bool:
        return 40 <= len(s) <= 200

    pool = [(p, s) for p, sents in enumerate(paragraphs) for s in sents if fits(s)]
    pairs = [(p, a, b) for p, sents in enumerate(paragraphs) for a, b in zip(sents, sents[1:])
             if fits(a) and fits(b)]
    rng.shuffle(pairs)
    items, used = [], set()
    for p, context, right in pairs:
        if len(items) == n:
            break
        if right in used or context in used:
            continue
        near = [s for q, s in pool if q != p and s not in used and s != right
                and abs(len(s) - len(right)) <= 0.25 * len(right)]
        if len(near) < 3:
            continue
        wrong = rng.sample(near, 3)
        choices = [right, *wrong]
        rng.shuffle(choices)
        used.update((context, right, *wrong))
        items.append({"context": context, "choices": choices, "label": choices.index(right)})
    if len(items) < n:
        raise SystemExit(f"error: the text gives only {len(items)} items, {n} asked for")
    return items


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "speedec.cli", "serve", "--port", "0", "--threads", str(threads)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(300)
    if not lines or " on http://" not in lines[0]:
        proc.kill()
        raise SystemExit(f"error: speedec serve did not start ({lines})")
    return proc, lines[0].split(" on ")[1].split(" ")[0]


def harness(url: str, model_id: str, out: Path) -> tuple[dict, float]:
    """lm_eval on the task against ``model_id``: its metrics and the seconds it took."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
               "--model_args", f"model={model_id},base_url={url}/v1/completions,num_concurrent=4",
               "--tasks", TASK, "--include_path", str(TASKS), "--output_path", str(out / "results")]
    begin = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - begin
    if done.returncode:
        raise SystemExit(f"error: lm_eval failed on {model_id}: {done.stderr[-2000:]}")
    results = json.loads(next((out / "results").rglob("results_*.json")).read_text())
    return results["results"][TASK], seconds


def host_cpu() -> str:
    try:
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in listing.splitlines()
                 if line.startswith("Model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "english" / "test.txt"),
                        help="The held-out text (speedec data prepare's test split).")
    parser.add_argument("--items", type=int, default=240, help="Items to build (the test split gives about 240).")
    parser.add_argument("--rebuild", action="store_true", help="Build the item file again.")
    parser.add_argument("--threads", type=int, default=1, help="The server's CPU threads.")
    parser.add_argument("--requests", type=int, default=8, help="Completions per depth and round for tokens/s.")
    parser.add_argument("--rounds", type=int, default=5, help="Rounds of tokens/s (the median is reported).")
    parser.add_argument("--out", default=None, help="Write the table as JSON.")
    args = parser.parse_args()

    if args.rebuild or not ITEMS.is_file():
        data = Path(args.data)
        if not data.is_file():
            raise SystemExit(f"error: {data} does not exist; run `speedec data prepare --out data/english`")
        items = build_items(data.read_text(encoding="utf-8"), args.items)
        ITEMS.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    n_items = len(ITEMS.read_text(encoding="utf-8").splitlines())

    from speedec.bundled import bundled_model_dir
    from speedec.serve.loadtest import run_loadtest

    loops = json.loads((bundled_model_dir() / "config.json").read_text())["n_loops"]
    proc, url = start_server(args.threads)
    rows = []
    load = os.getloadavg()[0]
    try:
        for depth in range(1, loops + 1):
            model_id = NAME if depth == loops else f"{NAME}@loops={depth}"
            with tempfile.TemporaryDirectory() as tmp:
                metrics, seconds = harness(url, model_id, Path(tmp))
            rows.append({"model": model_id, "loops": depth, "acc": metrics["acc,none"],
                         "acc_stderr": metrics["acc_stderr,none"], "acc_norm": metrics["acc_norm,none"],
                         "harness_seconds": round(seconds, 1), "tokens_per_s_rounds": []})
            print(f"{model_id}: acc {rows[-1]['acc']:.3f}", file=sys.stderr)
        for _ in range(args.rounds):  # depths interleaved, so that a busy moment hits them all alike
            for row in rows:
                level = run_loadtest(url, [1], args.requests, max_tokens=64, time_limit_s=300, stream=False,
                                     model=row["model"], progress=False)["levels"][0]
                if level["completed"] != args.requests:
                    raise SystemExit(f"error: {row['model']}: {level['completed']} of {args.requests} completed")
                row["tokens_per_s_rounds"].append(level["tokens_per_s"])
        for row in rows:
            row["tokens_per_s"] = statistics.median(row["tokens_per_s_rounds"])
    finally:
        proc.terminate()
        proc.wait(60)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    document = {"schema": "speedec-depth-table/1", "task": TASK, "items": n_items, "cpu": host_cpu(),
                "date": time.strftime("%Y-%m-%d"), "commit": commit, "server_threads": args.threads,
                "engine": "speed", "load_average_1min_at_start": load,
                "tokens_per_s": f"median of {args.rounds} rounds of {args.requests} greedy completions of 64 tokens, "
                                "one at a time, depths interleaved",
                "rows": rows}
    print("| loops | model id | accuracy (± stderr) | acc_norm | tokens/s |\n|---:|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['loops']} | `{row['model']}` | {row['acc']:.3f} ± {row['acc_stderr']:.3f} | "
              f"{row['acc_norm']:.3f} | {row['tokens_per_s']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
