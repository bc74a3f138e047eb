"""Logprobs, echo, n and lists of prompts in the OpenAI API (issue 29, item 1).

A token's logprob is the float32 log-softmax of the final loop's logits, before
temperature, top-k or top-p. The reference for a generated token is what the
in-process ``autoregressive`` engine computes for its position (the logits its
sampler is handed, ``model.head`` of the final loop's state); for an echoed
prompt token it is the prefill path: the final loop's states of the whole prompt
in one pass (:func:`speedec.engines.base.prefill_hidden`), each position through
``model.head`` alone. Both must match bit for bit, alone or among 8 requests, under
the ``speed`` and ``autoregressive`` schedulers.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from helpers import random_model, small_config
from speedec import generate
from speedec.cache import KVCache
from speedec.engines import base as engine_base
from speedec.engines.base import prefill, prefill_hidden
from speedec.sampling import Sampler
from speedec.serve.app import create_app
from speedec.serve.requests import ServeRequest
from speedec.serve.scheduler import Scheduler
from speedec.tokenizer import ByteTokenizer

FLAT = [1.0] * 16  # every row count costs the same: guesses always pay
VOCAB = 256  # the byte tokenizer's


@pytest.fixture(scope="module")
def model():
    config = small_config(n_loops=4, exit_loop=1, vocab_size=VOCAB, max_seq_len=160)
    return random_model(config, seed=3, std=0.7, residual_scale=4.0, dtype=torch.float32)


def reference(model, prompt, n, **sampling):
    """The autoregressive engine's tokens and, per token, the float32 log-softmax of the
    logits its sampler was handed."""
    seen = []

    class Recording(Sampler):
        def pick(self, logits):
            seen.append(torch.log_softmax(logits.float(), -1))
            return super().pick(logits)

    real = engine_base.Sampler
    engine_base.Sampler = Recording
    try:
        result = generate(model, prompt, n, engine="autoregressive", **sampling)
    finally:
        engine_base.Sampler = real
    return result.tokens, seen


def prompt_reference(model, prompt):
    """The prefill path's log-softmax ``[T - 1, V]`` of the prompt's positions 0..T-2."""
    with torch.inference_mode():
        cache = KVCache(model.config, len(prompt), dtype=model.dtype, device=model.device)
        hidden = prefill_hidden(model, cache, prompt)[0]
        return [torch.log_softmax(model.head(hidden[t]).float(), -1) for t in range(len(prompt) - 1)]


@pytest.fixture(params=["speed", "autoregressive"])
def client(request, model):
    scheduler = Scheduler(model, engine=request.param, step_costs=FLAT, max_rows=16)
    scheduler.start()
    app = create_app(scheduler, ByteTokenizer(), model_name="tiny", vocab_size=VOCAB, context_length=160)
    with TestClient(app) as c:
        yield c
    scheduler.shutdown(5)


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def _check_generated(model, prompt, max_tokens, logprobs, k, **sampling):
    tokens, seen = reference(model, prompt, max_tokens, **sampling)
    assert [bytes([t]).decode("utf-8", "replace") for t in tokens] == logprobs["tokens"]
    for t, (token, lp, got, top) in enumerate(zip(tokens, seen, logprobs["token_logprobs"],
                                                  logprobs["top_logprobs"])):
        assert got == lp[token].item(), t  # bit for bit: float32 -> Python float is exact
        values, ids = lp.topk(k)
        expected = {bytes([i]).decode("utf-8", "replace"): v for i, v in zip(ids.tolist(), values.tolist())}
        expected.setdefault(logprobs["tokens"][t], lp[token].item())
        # Bytes >= 128 decode alike (U+FFFD): compare where the strings are distinct.
        if len(expected) == len(set(expected)) and all(ord(s) < 128 for s in expected):
            assert top == expected, t
    return tokens


def test_logprobs_equal_the_autoregressive_engine_alone(client, model):
    prompt = [5, 17, 33, 2, 9]
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "logprobs": 5}).json()
    choice = body["choices"][0]
    tokens = _check_generated(model, prompt, 12, choice["logprobs"], 5)
    assert len(choice["logprobs"]["token_logprobs"]) == len(tokens) == 12
    assert choice["logprobs"]["text_offset"] == list(range(12))


def forced(model, prompt, tokens):
    """The autoregressive engine's decode loop (prefill, then one position at a time
    through all L loops and ``model.head``) forced along ``tokens``: the float32
    log-softmax it computes for each of their positions."""
    with torch.inference_mode():
        cache = KVCache(model.config, len(prompt) + len(tokens), dtype=model.dtype, device=model.device)
        logits = [prefill(model, cache, prompt)]
        for pos, token in enumerate(tokens[:-1], start=len(prompt)):
            x = model.embed(torch.tensor([[token]], device=model.device))
            x = model.run_loops(x, model.layout([[pos]], [0]), cache, model.config.n_loops)
            logits.append(model.head(x[0, 0]))
    return [torch.log_softmax(row.float(), -1) for row in logits]


def test_forced_reference_is_the_engine(model):
    tokens, seen = reference(model, [9, 8, 7], 10)
    assert all(torch.equal(a, b) for a, b in zip(forced(model, [9, 8, 7], tokens), seen))


def test_logprobs_equal_the_autoregressive_engine_among_8_concurrent(client, model):
    prompts = _prompts(8, seed=5)

    def one(i):
        body = {"prompt": prompts[i], "max_tokens": 10 + i, "logprobs": 3, "return_token_ids": True}
        if i % 2:
            body.update(temperature=0.9, seed=40 + i)  # logprobs come before the sampling transform
        return client.post("/v1/completions", json=body).json()["choices"][0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for i, choice in enumerate(results):
        tokens, logprobs = choice["token_ids"], choice["logprobs"]
        assert len(tokens) == 10 + i
        if not i % 2:
            assert tokens == _check_generated(model, prompts[i], 10 + i, logprobs, 3)
        for t, (token, lp) in enumerate(zip(tokens, forced(model, prompts[i], tokens))):
            assert logprobs["token_logprobs"][t] == lp[token].item(), (i, t)
            assert sorted(logprobs["top_logprobs"][t].values(), reverse=True)[:1] == [lp.max().item()]


def test_scheduler_logprobs_are_bit_exact_for_sampled_requests_too(model):
    """Sampling changes the tokens, never their logprobs: each equals the log-softmax
    of the autoregressive engine's logits when it is forced along the same tokens,
    alone and among 8 concurrent requests."""
    from speedec.sampling import SamplingParams

    prompt = [3, 1, 4, 1, 5]
    scheduler = Scheduler(model, engine="speed", step_costs=FLAT, max_rows=16)
    scheduler.start()
    try:
        handles = [scheduler.submit(ServeRequest(prompt, 15, SamplingParams(temperature=1.0, seed=7), logprobs=2))]
        handles[0].result(30)
        handles += [scheduler.submit(ServeRequest(p, 15, SamplingParams(temperature=1.0, seed=7 + i), logprobs=2))
                    for i, p in enumerate([prompt] + _prompts(7, seed=9))]
        for h in handles:
            h.result(60)
        metrics = scheduler.metrics()
    finally:
        scheduler.shutdown(5)
    assert metrics["rows_total"] / metrics["steps_total"] > 1.5  # the 8 shared steps
    assert handles[1].tokens == handles[0].tokens
    for handle in handles:
        tokens = handle.tokens
        assert [e.token for e in handle.logprobs] == tokens
        for entry, lp in zip(handle.logprobs, forced(model, handle.request.prompt_ids, tokens)):
            assert entry.logprob == lp[entry.token].item()
            assert [i for i, _ in entry.top] == lp.topk(2).indices.tolist()
            assert [v for _, v in entry.top] == lp.topk(2).values.tolist()


def test_echo_with_max_tokens_0_gives_the_prompt_logprobs(client, model):
    prompt = [72, 101, 108, 108, 111, 33]  # "Hello!"
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True,
                                                 "logprobs": 1}).json()
    choice = body["choices"][0]
    assert choice["text"] == "Hello!" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == list("Hello!")
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == list(range(6))
    for t, row in enumerate(prompt_reference(model, prompt)):
        assert lp["token_logprobs"][t + 1] == row[prompt[t + 1]].item()
        best = int(row.argmax())
        assert lp["top_logprobs"][t + 1][bytes([best]).decode("utf-8", "replace")] == row[best].item()
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 0, "total_tokens": 6}


def test_echo_of_a_one_token_prompt(client, model):
    body = client.post("/v1/completions", json={"prompt": [65], "max_tokens": 0, "echo": True,
                                                 "logprobs": 3}).json()
    lp = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] == "A"
    assert lp == {"tokens": ["A"], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}


def test_echo_with_generated_tokens_and_a_text_prompt(client, model):
    body = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4, "echo": True,
                                                 "logprobs": 0}).json()
    choice = body["choices"][0]
    tokens, seen = reference(model, [97, 98, 99], 4)
    completion = bytes(tokens).decode("utf-8", "replace")
    assert choice["text"] == "abc" + completion
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 3 + 4 and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][3:] == [row[t].item() for t, row in zip(tokens, seen)]
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])  # logprobs 0: the token's own
    # Echo without logprobs: the prompt's text, no logprobs, nothing run for max_tokens 0.
    plain = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 0, "echo": True}).json()
    assert plain["choices"][0]["text"] == "abc" and plain["choices"][0]["logprobs"] is None


def test_n_choices_each_indexed(client, model):
    prompt = [10, 20, 30]
    greedy = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "n": 3}).json()
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in greedy["choices"]}) == 1  # greedy choices are identical
    assert greedy["usage"]["prompt_tokens"] == 3 and greedy["usage"]["completion_tokens"] == 18
    sampled = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20, "n": 3, "temperature": 1.0,
                                                   "seed": 11}).json()
    texts = [c["text"] for c in sampled["choices"]]
    assert len(set(texts)) > 1  # each choice its own stream
    # Choice j samples with seed + j: choice 1 is what seed 12 gives alone.
    alone = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20, "temperature": 1.0,
                                                 "seed": 12}).json()
    assert alone["choices"][0]["text"] == texts[1]


def test_a_list_of_prompts_gives_2n_choices_in_order(client, model):
    prompts = [[1, 2, 3], "hi"]
    body = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 5, "n": 2, "logprobs": 1,
                                                 "return_token_ids": True}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for p, ids in enumerate([[1, 2, 3], [104, 105]]):
        expected, _ = reference(model, ids, 5)
        for j in range(2):
            choice = body["choices"][p * 2 + j]
            assert choice["token_ids"] == expected
            assert len(choice["logprobs"]["tokens"]) == 5
    assert body["prompt_token_ids"] == [[1, 2, 3], [104, 105]]
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 20


def test_chat_logprobs_shape(model):
    scheduler = Scheduler(model, engine="speed", step_costs=FLAT, max_rows=16)
    scheduler.start()
    app = create_app(scheduler, ByteTokenizer(), model_name="tiny", vocab_size=VOCAB, context_length=160,
                     chat_template=lambda messages, options: "".join(m["content"] for m in messages))
    try:
        with TestClient(app) as c:
            body = c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "logprobs": True,
                "top_logprobs": 2}).json()
            plain = c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}).json()
    finally:
        scheduler.shutdown(5)
    assert plain["choices"][0]["logprobs"] is None
    content = body["choices"][0]["logprobs"]["content"]
    tokens, seen = reference(model, [72, 105], 5)
    assert len(content) == 5
    for item, token, lp in zip(content, tokens, seen):
        text = bytes([token]).decode("utf-8", "replace")
        assert item["token"] == text and item["bytes"] == list(text.encode("utf-8"))
        assert item["logprob"] == lp[token].item()
        assert [t["logprob"] for t in item["top_logprobs"]] == lp.topk(2).values.tolist()
        assert set(item["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def _events(response):
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_concatenate_to_the_whole_answer(client, echo):
    body = {"prompt": "Hello", "max_tokens": 9, "logprobs": 2, "echo": echo}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    merged = {key: [] for key in whole["logprobs"]}
    for event in events:
        part = event["choices"][0]["logprobs"]
        for key in merged:
            merged[key] += part[key]
    assert merged == whole["logprobs"]
    if echo:
        assert events[0]["choices"][0]["text"] == "Hello" and events[0]["choices"][0]["logprobs"]["tokens"] == list(
            "Hello")


def test_streamed_choices_interleave_each_with_its_index(client):
    body = {"prompt": [[1, 2, 3], "hi"], "max_tokens": 5, "n": 2, "logprobs": 1, "temperature": 1.0, "seed": 3}
    whole = client.post("/v1/completions", json=body).json()
    response = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    events = _events(response)
    texts, finals, tokens = {}, {}, {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        tokens[choice["index"]] = tokens.get(choice["index"], []) + choice["logprobs"]["tokens"]
        if choice["finish_reason"]:
            finals[choice["index"]] = choice["finish_reason"]
    assert sorted(texts) == [0, 1, 2, 3] and sorted(finals) == [0, 1, 2, 3]
    for c in whole["choices"]:
        assert texts[c["index"]] == c["text"] and tokens[c["index"]] == c["logprobs"]["tokens"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_streamed_chat_logprobs(model):
    scheduler = Scheduler(model, engine="speed", step_costs=FLAT, max_rows=16)
    scheduler.start()
    app = create_app(scheduler, ByteTokenizer(), model_name="tiny", vocab_size=VOCAB, context_length=160,
                     chat_template=lambda messages, options: "".join(m["content"] for m in messages))
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "logprobs": True, "top_logprobs": 1}
    try:
        with TestClient(app) as c:
            whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
            events = _events(c.post("/v1/chat/completions", json={**body, "stream": True}))
    finally:
        scheduler.shutdown(5)
    streamed = [item for e in events if e["choices"] and e["choices"][0]["logprobs"]
                for item in e["choices"][0]["logprobs"]["content"]]
    assert streamed == whole and len(whole) == 6


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "a", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1, "echo": True}, "max_tokens"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 5, "n": 16}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
     "top_logprobs"),
])
def test_out_of_range_values_are_400_naming_the_field(path, body, param):
    class Refuse:
        def submit(self, request, loop=None):
            raise AssertionError("nothing may be submitted")

    app = create_app(Refuse(), ByteTokenizer(), model_name="tiny", vocab_size=VOCAB,
                     chat_template=lambda messages, options: "x")
    response = TestClient(app).post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
