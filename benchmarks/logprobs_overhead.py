"""What logprobs cost the server (issue 29's target: ``logprobs: 5`` at most 10% fewer
tokens/s than no logprobs, on the bundled model).

The bundled model served in-process (speedec's FastAPI app and scheduler, no HTTP
socket), one request at a time: each repeat sends the same prompts with and without
``logprobs`` (the order alternating from repeat to repeat), and the ratio of tokens/s
is taken repeat by repeat, so slow minutes hit both sides. Run it alone on the machine:

    python benchmarks/logprobs_overhead.py [--repeats 5] [--max-tokens 64] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fastapi.testclient import TestClient

from speedec.bundled import resolve_model_dir
from speedec.model import LoopedLM
from speedec.serve.app import create_app
from speedec.serve.scheduler import Scheduler
from speedec.tokenizer import load_tokenizer

PROMPTS = ["Once upon a time", "The committee met on Tuesday", "She walked down to the harbour",
           "It is a truth universally acknowledged"]


def tokens_per_s(client: TestClient, max_tokens: int, logprobs: int | None) -> float:
    tokens, begin = 0, time.perf_counter()
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": max_tokens}
        if logprobs is not None:
            body["logprobs"] = logprobs
        answer = client.post("/v1/completions", json=body)
        answer.raise_for_status()
        tokens += answer.json()["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--logprobs", type=int, default=5)
    parser.add_argument("--engine", default="speed")
    parser.add_argument("--out")
    args = parser.parse_args()
    directory = resolve_model_dir(None)
    model = LoopedLM.from_pretrained(directory)
    scheduler = Scheduler(model, engine=args.engine)
    scheduler.start()
    client = TestClient(create_app(scheduler, load_tokenizer(directory, model.config.vocab_size),
                                   model_name="default", vocab_size=model.config.vocab_size,
                                   context_length=model.config.max_seq_len))
    tokens_per_s(client, 8, None)  # warm up both paths
    tokens_per_s(client, 8, args.logprobs)
    rows = []
    for repeat in range(args.repeats):
        order = (None, args.logprobs) if repeat % 2 == 0 else (args.logprobs, None)
        measured = {k: tokens_per_s(client, args.max_tokens, k) for k in order}
        rows.append({"plain": measured[None], "logprobs": measured[args.logprobs],
                     "ratio": measured[args.logprobs] / measured[None]})
        print(f"repeat {repeat + 1}: plain {measured[None]:.1f} tok/s, logprobs={args.logprobs} "
              f"{measured[args.logprobs]:.1f} tok/s, ratio {rows[-1]['ratio']:.3f}")
    assert scheduler.shutdown(10)
    median = statistics.median(r["ratio"] for r in rows)
    print(f"median ratio (logprobs / plain): {median:.3f} over {args.repeats} repeats, engine {args.engine}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"engine": args.engine, "logprobs": args.logprobs, "max_tokens": args.max_tokens,
                       "prompts": PROMPTS, "repeats": rows, "median_ratio": median}, fh, indent=2)


if __name__ == "__main__":
    main()
