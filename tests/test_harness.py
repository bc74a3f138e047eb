"""lm-evaluation-harness end to end: ``speedec serve`` (the real command, the bundled
model, float64) on a loopback port, and ``lm_eval --model local-completions``
against it, offline, on the two task files in ``tests/data/harness/`` (a
``multiple_choice`` task reading a local jsonl, a ``generate_until`` task), at
every depth of the 4-loop bundled model (``speedec-default`` and
``speedec-default@loops=1`` ... ``@loops=3``).

The harness's numbers must be the model's: its multiple-choice accuracy equals
the accuracy computed here in-process from the depth's logits (the sum of the
continuation tokens' log-softmax, argmax over the choices), each choice's
loglikelihood agrees, and its generations are ``speedec.generate``'s on the
depth's view (``LoopedLM.at_depth``). The harness tokenizes through the
server's ``/tokenize`` (its remote tokenizer, chosen by itself), so it needs no
tokenizer files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")  # the eval extra (.ci/run installs it)

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "harness"
NAME = "speedec-default"
MAX_GEN_TOKS, UNTIL = 12, ("\n", ".")  # speedec_gen.yaml's generation_kwargs


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return {**env, "SPEEDEC_KERNEL": "torch", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false",
            "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``speedec serve`` on a free loopback port (the bundled model in float64, so that a
    request's tokens do not depend on the others'); yields its URL."""
    env = _env(tmp_path_factory.mktemp("serve"))
    command = [sys.executable, "-m", "speedec.cli", "serve", "--port", "0", "--dtype", "float64",
               "--threads", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        assert lines and lines[0].startswith(f"speedec: serving {NAME} on http://127.0.0.1:"), (
            lines, proc.poll(), proc.poll() is not None and proc.stderr.read())
        yield lines[0].split(" on ")[1].split(" ")[0]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference():
    """The bundled model in float64 and its tokenizer, in this process."""
    from speedec.bundled import resolve_model_dir
    from speedec.model import LoopedLM
    from speedec.tokenizer import load_tokenizer

    directory = resolve_model_dir(None)
    model = LoopedLM.from_pretrained(directory, dtype=torch.float64)
    return model, load_tokenizer(directory, model.config.vocab_size)


def run_harness(url: str, model_id: str, out: Path, env: dict) -> tuple[dict, dict[str, list[dict]], str]:
    """``lm_eval`` (its command line, as README.md gives it) on both tasks against the
    server's ``model_id``: the results, each task's samples, and the printed table."""
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
               "--model_args", f"model={model_id},base_url={url}/v1/completions,num_concurrent=4",
               "--tasks", "speedec_mc,speedec_gen", "--include_path", str(TASKS),
               "--log_samples", "--output_path", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
               for task in ("speedec_mc", "speedec_gen")}
    return results, samples, done.stdout


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """The harness's loglikelihood of ``continuation`` after ``context``, computed here:
    the whole text encoded, the context's tokens split off (as lm_eval splits them),
    the float32 log-softmax of the model's logits summed over the continuation's tokens."""
    whole = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    with torch.inference_mode():
        logits = model(torch.tensor([whole])).logits[0]  # [T, V]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))


def expected_generation(model, tokenizer, prompt: str) -> str:
    """speedec.generate's greedy text for ``prompt``, cut where the server and the
    harness cut it: the end-of-text token, then the first ``until`` string."""
    from speedec import generate

    engine = "speed" if model.config.has_early_exit else "autoregressive"
    tokens = generate(model, tokenizer.encode(prompt), MAX_GEN_TOKS, engine=engine,
                      eos_token_id=tokenizer.eos_token_id).tokens
    if tokens and tokens[-1] == tokenizer.eos_token_id:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens)
    for stop in UNTIL:
        text = text.split(stop)[0]
    return text


@pytest.mark.parametrize("loops", [None, 1, 2, 3])  # every depth of the 4-loop bundled model
def test_harness_accuracy_is_the_models_at_each_depth(server, reference, loops, tmp_path):
    model, tokenizer = reference
    view = model if loops is None else model.at_depth(loops)
    model_id = NAME if loops is None else f"{NAME}@loops={loops}"
    results, samples, table = run_harness(server, model_id, tmp_path / "out", _env(tmp_path))
    print(table)

    docs = [json.loads(line) for line in (TASKS / "speedec_mc.jsonl").read_text().splitlines()]
    by_doc = {s["doc_id"]: s for s in samples["speedec_mc"]}
    assert sorted(by_doc) == list(range(len(docs)))
    correct = 0
    for i, doc in enumerate(docs):
        ours = [continuation_logprob(view, tokenizer, doc["context"], " " + choice) for choice in doc["choices"]]
        theirs = [float(r[0]) for r in by_doc[i]["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3), (model_id, i)
        best = max(range(len(ours)), key=ours.__getitem__)
        assert best == max(range(len(theirs)), key=theirs.__getitem__), (model_id, i)
        correct += best == doc["label"]
    assert results["results"]["speedec_mc"]["acc,none"] == correct / len(docs)

    prompts = [json.loads(line)["prompt"] for line in (TASKS / "speedec_gen.jsonl").read_text().splitlines()]
    generated = {s["doc_id"]: s["filtered_resps"][0] for s in samples["speedec_gen"]}
    assert [generated[i] for i in range(len(prompts))] == [
        expected_generation(view, tokenizer, p) for p in prompts]
    assert all(generated.values())  # the model said something
