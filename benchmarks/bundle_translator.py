"""Bundle a trained translator with the package, and measure what was bundled.

    python benchmarks/bundle_translator.py --model runs/translation/es-en-L4/model \
        --data data/parallel-es-en --json benchmarks/results/translator-bundled.json

Writes the model's weights in bfloat16 (half the bytes of float32; loading
casts them back to float32 exactly) with its config and tokenizer to
``src/speedec/assets/default-translator`` (``speedec translate`` without
``--model``), then loads the bundled copy as a user gets it and measures it:
BLEU and chrF (sacrebleu, greedy, both references) on the verse test split and
the held-out book, and ``speed`` against ``autoregressive`` on the test split
(ms per sentence, acceptance, steps per token), with equality of their outputs
checked sentence by sentence.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from speedec.bench.runner import machine_info  # noqa: E402
from speedec.bench.study import pool_stats  # noqa: E402
from speedec.encdec.data import read_pairs, split_path  # noqa: E402
from speedec.encdec.evaluate import evaluate_translation  # noqa: E402
from speedec.encdec.translate import encode_source, load_translator, translate_source  # noqa: E402
from speedec.storage import atomic_write_text  # noqa: E402
from speedec.tokenizer import TOKENIZER_FILE  # noqa: E402

OUT = REPO / "src" / "speedec" / "assets" / "default-translator"
CARD = "README.md"


def bundle(model_dir: Path, out: Path) -> None:
    model, _ = load_translator(model_dir)
    card = out / CARD
    kept = card.read_text(encoding="utf-8") if card.is_file() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        model.to(torch.bfloat16).save_pretrained(staged)
        shutil.copy(model_dir / TOKENIZER_FILE, staged / TOKENIZER_FILE)
        if kept is not None:
            (staged / CARD).write_text(kept, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)


def timed(model, tokenizer, sources, engine: str, rounds: int) -> tuple[list[float], list, dict]:
    """Milliseconds per sentence of each round, the last round's tokens, and the engine's
    counters pooled over every round (:func:`speedec.bench.study.pool_stats`)."""
    per_round, outputs, stats = [], None, []
    for _ in range(rounds):
        begin = time.perf_counter()
        results = [translate_source(model, tokenizer, ids, engine=engine) for ids in sources]
        per_round.append(1e3 * (time.perf_counter() - begin) / len(sources))
        outputs = [r.tokens for r in results]
        stats += [r.stats for r in results]
    return per_round, outputs, pool_stats(stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Trained translator directory.")
    parser.add_argument("--data", type=Path, required=True, help="Parallel corpus directory.")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--splits", default="test,test-book")
    parser.add_argument("--timed", type=int, default=60, help="Test sentences timed per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle(args.model, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    model, tokenizer = load_translator(args.out)  # what a user gets: bf16 on disk, float32 in memory
    report = {"source": str(args.model), "bundled": str(args.out.resolve().relative_to(REPO) if args.out.resolve().is_relative_to(REPO) else args.out), "bytes": size,
              "params": sum(p.numel() for p in model.parameters()), "config": model.config.to_dict(),
              "machine": machine_info(), "threads": args.threads, "scores": {}}
    for split in args.splits.split(","):
        pairs = read_pairs(split_path(args.data, split))
        r = evaluate_translation(model, tokenizer, pairs, engine="autoregressive", warmup=0, progress=True).report
        report["scores"][split] = {k: r[k] for k in ("sentences", "bleu", "chrf", "references", "bleu_signature")}
        print(f"{split}: {r['sentences']} sentences, BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f} "
              f"({r['references']} reference(s))", flush=True)
    test = read_pairs(split_path(args.data, "test"))[: args.timed]
    sources = [encode_source(tokenizer, p.src)[: model.config.max_source_len] for p in test]
    timed(model, tokenizer, sources[:5], "autoregressive", 1)  # warm-up
    timed(model, tokenizer, sources[:5], "speed", 1)
    ar, ar_out, _ = timed(model, tokenizer, sources, "autoregressive", args.rounds)
    sp, sp_out, pooled = timed(model, tokenizer, sources, "speed", args.rounds)
    report["speed"] = {
        "sentences": len(sources), "rounds": args.rounds,
        "autoregressive_ms_per_sentence": statistics.median(ar), "speed_ms_per_sentence": statistics.median(sp),
        "speedup": statistics.median(a / s for a, s in zip(ar, sp)),
        "acceptance": pooled["accepted"] / pooled["verified"] if pooled["verified"] else None,
        "steps_per_token": pooled["steps"] / pooled["after_first"] if pooled["after_first"] else None,
        "same_tokens": ar_out == sp_out}
    s = report["speed"]
    print(f"speed vs autoregressive on {len(sources)} test sentences: {s['speedup']:.2f}x "
          f"({s['autoregressive_ms_per_sentence']:.1f} -> {s['speed_ms_per_sentence']:.1f} ms/sentence), "
          f"acceptance {s['acceptance']:.3f}, steps/token {s['steps_per_token']:.2f}, "
          f"same tokens: {s['same_tokens']}; bundle {size / 1e6:.1f} MB")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
