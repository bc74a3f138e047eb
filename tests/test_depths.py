"""One model id per depth: ``LoopedLM.at_depth`` (a view sharing the weights), the
scheduler decoding requests at mixed depths in shared steps, and the server's
``NAME@loops=d`` ids (listing, answers, 404s)."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import random_model, serve_requests, small_config
from speedec import generate
from speedec.errors import ConfigError, GenerationError
from speedec.serve.depths import UnknownModel, model_ids, requested_depth
from speedec.serve.requests import ServeRequest

FLAT = [1.0] * 16  # step costs: every row count costs the same (guesses always pay)


def _model(dtype=torch.float32, **overrides):
    fields = dict(n_loops=4, exit_loop=2, vocab_size=64, max_seq_len=160)
    fields.update(overrides)
    return random_model(small_config(**fields), seed=5, std=0.7, residual_scale=4.0, dtype=dtype)


def _prompts(n, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 10))] for _ in range(n)]


# ----------------------------------------------------------------------------- the view

def test_at_depth_shares_the_weights_and_reads_out_the_models_loop():
    model = _model(exit_readout_rank=4, loop_embedding=True)
    tokens = torch.tensor([_prompts(1, 64, seed=1)[0] * 3])
    full = model(tokens, output_loops=(1, 2, 3))
    for d in (1, 2, 3):
        view = model.at_depth(d)
        assert view.config.n_loops == d and model.config.n_loops == 4
        assert view.config.exit_loop == (None if d == 1 else min(2, d - 1))
        assert (view.exit_readout is None) == (d == 1) and model.exit_readout is not None
        own = dict(model.named_parameters())
        for name, p in view.named_parameters():  # no copies: the very tensors
            assert p is own[name]
        assert torch.equal(view(tokens).logits, full.loop_logits[d])
    assert model.at_depth(4) is model


@pytest.mark.parametrize("bad", [0, 5, -1, 1.5, True, "2", None])
def test_at_depth_refuses_a_depth_the_model_lacks(bad):
    with pytest.raises(ConfigError, match=r"loops must be an integer from 1 to 4"):
        _model().at_depth(bad)


def test_a_view_decodes_as_a_model_of_that_many_loops():
    """speed pipelines at every depth with an exit (drafts from min(exit, d - 1)); depth 1
    is autoregressive; both give the view's autoregressive tokens."""
    model = _model(exit_readout_rank=4)
    prompt = _prompts(1, 64, seed=2)[0]
    outputs = set()
    for d in (2, 3):
        view = model.at_depth(d)
        ref = generate(view, prompt, 24, engine="autoregressive")
        fast = generate(view, prompt, 24, engine="speed")
        assert fast.tokens == ref.tokens and fast.stats.drafts_launched > 0
        outputs.add(tuple(ref.tokens))
    outputs.add(tuple(generate(model.at_depth(1), prompt, 24, engine="autoregressive").tokens))
    outputs.add(tuple(generate(model, prompt, 24, engine="autoregressive").tokens))
    assert len(outputs) > 1  # the depths really differ


# ----------------------------------------------------------------------------- the scheduler

@pytest.mark.parametrize("engine", ["speed", "autoregressive"])
def test_mixed_depths_share_steps_and_each_equals_its_view_alone(engine):
    """float32, greedy, 12 concurrent requests at depths 1..4: each gets exactly what
    speedec.generate gives on the depth's view alone, and steps carry rows of
    requests at different depths together."""
    model = _model(exit_readout_rank=4)
    depths = [None, 1, 2, 3] * 3
    prompts = _prompts(12, 64, seed=3)
    requests = [ServeRequest(p, 20, loops=d) for p, d in zip(prompts, depths)]
    mixed_steps = []
    run_segments = model.run_segments

    def spy(x, segments):  # which depths (cache loops) ride in one step
        mixed_steps.append(len({cache.keys.shape[1] for _, cache, _ in segments}))
        return run_segments(x, segments)

    model.run_segments = spy
    results, metrics = serve_requests(model, requests, concurrency=12, engine=engine, max_rows=16,
                                      step_costs=FLAT)
    del model.run_segments
    for p, d, got in zip(prompts, depths, results):
        view = model if d is None else model.at_depth(d)
        alone = generate(view, p, 20, engine=engine if view.config.has_early_exit else "autoregressive")
        assert got == alone.tokens, d
    assert metrics["requests_failed"] == 0
    assert max(mixed_steps) >= 3
    if engine == "speed":
        assert metrics["drafts_launched"] > 0


def test_scheduler_refuses_a_depth_with_a_one_line_error():
    from speedec.serve.scheduler import Scheduler

    scheduler = Scheduler(_model(), engine="autoregressive", max_rows=4, step_costs=FLAT)
    scheduler.start()
    try:
        with pytest.raises(GenerationError, match=r"^loops must be an integer from 1 to 4.*got 7$"):
            scheduler.submit(ServeRequest([1, 2], 3, loops=7))
    finally:
        scheduler.shutdown(5)


# ----------------------------------------------------------------------------- the ids

def test_model_ids_and_requested_depth():
    assert model_ids("m", 3) == [("m", 3), ("m@loops=1", 1), ("m@loops=2", 2)]
    assert model_ids("m", None) == [("m", 0)]
    assert requested_depth(None, "m", 4) is None and requested_depth("m", "m", 4) is None
    assert requested_depth("m@loops=2", "m", 4) == 2
    assert requested_depth("m@loops=4", "m", 4) is None  # the full depth, by another name
    for bad in ("m@loops=0", "m@loops=5", "m@loops=x", "m@loops=1.5", "m@loops=", "m@loops=-1", "m@loops=2 "):
        with pytest.raises(UnknownModel, match=r"^the model .* does not exist: .*\(m has 4 loops\)$"):
            requested_depth(bad, "m", 4)
    with pytest.raises(UnknownModel, match=r"this server serves 'm' and m@loops=d for d = 1..3$"):
        requested_depth("other", "m", 4)


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from speedec.serve.app import create_app
    from speedec.serve.scheduler import Scheduler
    from speedec.tokenizer import ByteTokenizer

    model = _model(vocab_size=256)
    scheduler = Scheduler(model, engine="speed", max_rows=16, step_costs=FLAT)
    scheduler.start()
    app = create_app(scheduler, ByteTokenizer(), model_name="tiny", vocab_size=256, context_length=160,
                     n_loops=4)
    with TestClient(app) as test_client:
        test_client.model = model
        yield test_client
    scheduler.shutdown(5)


def test_models_lists_one_id_per_depth(client):
    cards = client.get("/v1/models").json()["data"]
    assert [(c["id"], c["loops"], c["root"]) for c in cards] == [
        ("tiny", 4, "tiny"), ("tiny@loops=1", 1, "tiny"), ("tiny@loops=2", 2, "tiny"), ("tiny@loops=3", 3, "tiny")]


def test_a_depth_id_is_decoded_by_the_view(client):
    prompt = list(b"Hello")
    for name, view in (("tiny", client.model), ("tiny@loops=1", client.model.at_depth(1)),
                       ("tiny@loops=3", client.model.at_depth(3))):
        body = client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 12,
                                                    "return_token_ids": True, "logprobs": 1}).json()
        assert body["model"] == name
        ref = generate(view, prompt, 12, engine="autoregressive")
        assert body["choices"][0]["token_ids"] == ref.tokens
        with torch.inference_mode():  # the first token's logprob: the view's final loop
            expected = torch.log_softmax(view(torch.tensor([prompt])).logits[0, -1].float(), -1)[ref.tokens[0]]
        assert body["choices"][0]["logprobs"]["token_logprobs"][0] == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("name", ["tiny@loops=0", "tiny@loops=5", "tiny@loops=two", "tiny@loops=1.0", "tiny2"])
def test_an_unknown_depth_is_a_404_naming_the_model(client, name):
    for path, extra in (("/v1/completions", {"prompt": "Hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        response = client.post(path, json={"model": name, "max_tokens": 2, **extra})
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert repr(name) in error["message"] and "\n" not in error["message"]


def test_tokenizer_endpoints(client):
    assert client.post("/tokenize", json={"prompt": "Hi!", "add_special_tokens": False}).json()["tokens"] == [
        72, 105, 33]
    assert client.post("/detokenize", json={"tokens": [72, 105]}).json() == {"prompt": "Hi"}
    info = client.get("/tokenizer_info").json()
    assert "eos_token" in info and info["model_max_length"] == 160
    bad = client.post("/detokenize", json={"tokens": [999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert client.post("/tokenize", json={"prompt": 3}).status_code == 400


# ----------------------------------------------------------------------------- speedec eval --loops

def _run(*args):
    from click.testing import CliRunner

    from speedec.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_eval_at_a_depth(tmp_path):
    """`speedec eval --loops d` scores the first d loops: the same per-loop numbers as
    the full model's first d, the exit moved below d (none at depth 1); a depth the
    model lacks is one line and exit code 2."""
    import json

    model = _model(vocab_size=256, exit_readout_rank=4)
    model.save_pretrained(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat and thought about the answer"] * 40))
    common = ["eval", "--model", tmp_path / "m", "--data", text, "--windows", 2, "--seq-len", 32,
              "--prompts", 2, "--prompt-tokens", 8, "--new-tokens", 8, "--json", "--threads", 1]
    results = {}
    for loops in (None, 1, 3):
        code, stdout, err = _run(*common, *([] if loops is None else ["--loops", loops]))
        assert code == 0, err
        results[loops] = json.loads(stdout)
    assert results[None]["n_loops"] == 4 and results[None]["exit_loop"] == 2
    assert results[3]["n_loops"] == 3 and results[3]["exit_loop"] == 2 and results[3]["acceptance"] is not None
    assert results[1]["n_loops"] == 1 and results[1]["acceptance"] is None
    for loops in (1, 3):
        assert results[loops]["loss_per_loop"] == pytest.approx(results[None]["loss_per_loop"][:loops], rel=1e-6)
    for bad, message in ((9, "--loops: loops must be an integer from 1 to 4 (the model's loops), got 9"),
                         (0, "--loops must be >= 1, got 0")):
        code, _, err = _run(*common, "--loops", bad)
        assert code == 2 and err == f"error: {message}\n", err
