"""``speedec serve`` driven by the official OpenAI Python client (``openai``).

One real server (uvicorn in a thread, the real scheduler) on a loopback port
serves the Ouro fixture in float64, so that every request's tokens must equal
``speedec.generate(..., engine="autoregressive")`` on it alone, at any load.
What is checked is what an OpenAI client sees: the answer objects it parses,
streaming, chat through the fixture's ChatML template, and the error classes it
raises for our 400, 404 and 429 answers.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import serve_on_loopback, wait_until

openai = pytest.importorskip("openai")

OURO = Path(__file__).parent / "data" / "ouro-tiny"
MODEL_NAME = "ouro-tiny"
EOS = 2  # <|im_end|>: where this fixture's completions and chat turns stop
PROMPTS = ["Hello there", "2+2 is", "The cat sat on", "abc 123", "Once upon", "Why?"]


@contextlib.contextmanager
def running_server(scheduler, tokenizer):
    """``scheduler`` (started here) behind the real app, on a free loopback port, in a
    uvicorn thread; yields the base URL and stops both on exit."""
    from speedec.serve.app import chat_renderer, create_app

    scheduler.start()
    app = create_app(scheduler, tokenizer, model_name=MODEL_NAME, chat_template=chat_renderer(OURO),
                     vocab_size=scheduler.model.config.vocab_size,
                     context_length=scheduler.model.config.max_seq_len)
    with serve_on_loopback(app, scheduler) as url:
        yield url


@pytest.fixture(scope="module")
def model():
    from speedec.model import LoopedLM

    # float64: batched steps give exactly the tokens of the request alone.
    return LoopedLM.from_pretrained(OURO, dtype=torch.float64)


@pytest.fixture(scope="module")
def tokenizer(model):
    from speedec.tokenizer import load_tokenizer

    return load_tokenizer(OURO, model.config.vocab_size)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    from speedec.serve.scheduler import Scheduler

    scheduler = Scheduler(model, engine="speed", max_rows=8, max_queue=16, model_name=MODEL_NAME,
                          step_costs=[1.0] * 8)
    with running_server(scheduler, tokenizer) as url:
        yield url


def client_for(url: str):
    # No retries: a 429 must reach the test, not be retried away.
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30.0)


@pytest.fixture(scope="module")
def client(server):
    with client_for(server) as client:
        yield client


def expected(model, prompt_ids, n):
    from speedec import generate

    return generate(model, prompt_ids, n, engine="autoregressive", eos_token_id=EOS)


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_completion_whole(client, model, tokenizer):
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12,
                                           extra_body={"return_token_ids": True})
    assert completion.object == "text_completion" and completion.model == MODEL_NAME
    [choice] = completion.choices
    prompt_ids = tokenizer.encode(PROMPTS[0])
    reference = expected(model, prompt_ids, 12)
    assert choice.token_ids == reference.tokens and completion.prompt_token_ids == prompt_ids
    assert choice.text == tokenizer.decode([t for t in reference.tokens if t != EOS])
    assert choice.finish_reason == ("stop" if reference.stop_reason == "eos" else "length")
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == len(reference.tokens)


def test_completion_stream_equals_whole(client):
    body = {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 16}
    whole = client.completions.create(**body, extra_body={"return_token_ids": True}).choices[0]
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.text
    last = next(c for c in reversed(chunks) if c.choices)
    assert last.choices[0].finish_reason == whole.finish_reason
    assert last.choices[0].token_ids == whole.token_ids
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(whole.token_ids)


def test_chat_whole_and_stream(client, model, tokenizer):
    from speedec.tokenizer import chat_prompt

    messages = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "2+2?"}]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                           extra_body={"return_token_ids": True})
    assert reply.object == "chat.completion"
    [choice] = reply.choices
    reference = expected(model, chat_prompt(OURO, messages), 10)
    assert choice.token_ids == reference.tokens
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode([t for t in reference.tokens if t != EOS])
    assert choice.finish_reason == ("stop" if reference.stop_reason == "eos" else "length")
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, stream=True)
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_concurrent_requests_are_exact(client, model, tokenizer):
    """Six clients at once (threads; some streamed): every request's tokens are those
    of the request decoded alone."""
    def one(i: int):
        body = {"model": MODEL_NAME, "prompt": PROMPTS[i], "max_tokens": 10 + 3 * i,
                "extra_body": {"return_token_ids": True}}
        if i % 2:
            chunks = list(client.completions.create(**body, stream=True))
            return next(c for c in reversed(chunks) if c.choices).choices[0].token_ids
        return client.completions.create(**body).choices[0].token_ids

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(one, range(len(PROMPTS))))
    for i, tokens in enumerate(results):
        assert tokens == expected(model, tokenizer.encode(PROMPTS[i]), 10 + 3 * i).tokens, PROMPTS[i]


@pytest.mark.parametrize("kwargs,param", [
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": [5, 300], "max_tokens": 4}, "prompt"),
    ({"prompt": "Hi", "temperature": -1.0}, "temperature"),
    ({"prompt": "Hi", "n": 17}, "n"),  # n > 1 is supported since issue 29; 16 is the most
])
def test_bad_requests_raise_bad_request_error(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_NAME, **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.param == param and caught.value.type == "invalid_request_error"


def test_unknown_model_raises_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])


def test_full_queue_raises_rate_limit_error(model, tokenizer):
    """max_rows=1, max_queue=0: while one request holds the only row, the next gets 429.
    The scheduler's steps wait on a gate so that the first request stays active for
    as long as the test needs (not for as long as a race allows)."""
    from speedec.serve.scheduler import Scheduler

    class GatedScheduler(Scheduler):
        gate = threading.Event()

        def _step(self) -> None:
            self.gate.wait(20)
            super()._step()

    scheduler = GatedScheduler(model, engine="autoregressive", max_rows=1, max_queue=0, model_name=MODEL_NAME,
                               step_costs=[1.0])
    with running_server(scheduler, tokenizer) as url, client_for(url) as client:
        try:
            with ThreadPoolExecutor(1) as pool:
                busy = pool.submit(client.completions.create, model=MODEL_NAME, prompt="Hello", max_tokens=8,
                                   extra_body={"return_token_ids": True})
                wait_until(lambda: scheduler.metrics()["requests_active"] >= 1, "the request to be admitted")
                assert scheduler.metrics()["requests_active"] == 1
                with pytest.raises(openai.RateLimitError) as caught:
                    client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
                assert caught.value.status_code == 429 and caught.value.code == "queue_full"
                assert caught.value.response.headers["retry-after"] == "1"
                scheduler.gate.set()
                tokens = busy.result(20).choices[0].token_ids
            assert tokens == expected(model, tokenizer.encode("Hello"), 8).tokens
            # the row is free again: the next request is served
            assert client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).choices
        finally:
            scheduler.gate.set()


def test_likelihood_request_as_lm_evaluation_harness_sends_it(client, model, tokenizer):
    """echo + logprobs + max_tokens 0 over a list of prompts (issue 29): the OpenAI
    client parses the legacy logprobs; each prompt's first token has none, the
    others are the float32 log-softmax of the prefill path's logits."""
    from speedec.cache import KVCache
    from speedec.engines.base import prefill_hidden

    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    completion = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=0, echo=True, logprobs=1,
                                           temperature=0)
    assert [c.index for c in completion.choices] == [0, 1]
    for ids, choice in zip(prompts, completion.choices):
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids)
        with torch.inference_mode():
            cache = KVCache(model.config, len(ids), dtype=model.dtype, device=model.device)
            hidden = prefill_hidden(model, cache, ids)[0]
            rows = [torch.log_softmax(model.head(hidden[t - 1]).float(), -1) for t in range(1, len(ids))]
        for t, row in enumerate(rows, start=1):
            assert lp.token_logprobs[t] == row[ids[t]].item()
            assert max(lp.top_logprobs[t].values()) == row.max().item()
    assert completion.usage.completion_tokens == 0


def test_n_choices_through_the_client(client, model, tokenizer):
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=6, n=3, logprobs=2)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert len({c.text for c in completion.choices}) == 1  # greedy
    reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert content and all(len(item.top_logprobs) == 2 for item in content)
