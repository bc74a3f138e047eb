"""The HTTP side of ``speedec serve``: request validation and errors against a fake
scheduler; end-to-end answers against the real scheduler on tiny random models."""

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from helpers import wait_until
from speedec.errors import GenerationError
from speedec.serve.app import TextStream, chat_renderer, create_app, prometheus_text
from speedec.serve.requests import QueueFull, ShuttingDown
from speedec.tokenizer import ByteTokenizer, load_tokenizer

OURO = Path(__file__).parent / "data" / "ouro-tiny"


# ----------------------------------------------------------------------------- a fake scheduler

class FakeHandle:
    """Hands out ``chunks`` one per event-loop turn, then ends with ``final``."""

    def __init__(self, chunks, final="length", error=None, pause=0.0):
        self.id = "fake"
        self.chunks = [list(c) for c in chunks]
        self.final = final
        self.error = None
        self._error = error
        self.pause = pause
        self.tokens = []
        self.finish_reason = None
        self.cancelled = False

    async def stream(self):
        for chunk in self.chunks:
            await asyncio.sleep(self.pause)
            if self.cancelled:
                break
            self.tokens.extend(chunk)
            yield chunk
        if self.cancelled:
            self.finish_reason = "cancelled"
        else:
            self.finish_reason = self.final
            self.error = self._error

    def cancel(self):
        self.cancelled = True
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    @property
    def done(self):
        return self.finish_reason is not None


class FakeScheduler:
    def __init__(self, reply=None, raises=None):
        self.reply = reply or (lambda request: FakeHandle([[104, 105], [33]]))  # "hi!"
        self.raises = raises
        self.requests = []
        self.handles = []

    def submit(self, request, loop=None):
        if self.raises is not None:
            raise self.raises
        self.requests.append(request)
        handle = self.reply(request)
        self.handles.append(handle)
        return handle

    def metrics(self):
        return {"requests_total": 3, "requests_active": 1, "queue_depth": 0, "tokens_total": 40,
                "steps_total": 20, "rows_total": 50, "step_seconds_total": 0.125, "drafts_launched": 30,
                "drafts_accepted": 24, "drafts_rejected": 6, "requests_failed": 0, "requests_cancelled": 1,
                "rows_limit": 8}

    def shutdown(self, deadline_s=30.0):
        return True


def client_for(scheduler, tokenizer=None, **kwargs):
    kwargs.setdefault("model_name", "tiny")
    return TestClient(create_app(scheduler, tokenizer or ByteTokenizer(), **kwargs))


def error_of(response, status, param="unset"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "\n" not in error["message"]
    if param != "unset":
        assert error["param"] == param, error
    return error


def sse(response):
    """The JSON events of a streamed answer; checks it ends with [DONE]."""
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


# ----------------------------------------------------------------------------- fake: answers

def test_completion_format_and_usage():
    scheduler = FakeScheduler()
    response = client_for(scheduler).post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3,
                                                                    "model": "tiny", "user": "x"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "hi!", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    request = scheduler.requests[0]
    assert request.prompt_ids == list(b"Hello") and request.max_tokens == 3
    assert request.sampling.greedy  # temperature defaults to 0


def test_prompt_forms_and_sampling_fields():
    scheduler = FakeScheduler()
    client = client_for(scheduler)
    for prompt in ([1, 2, 3], [[1, 2, 3]], ["\x01\x02\x03"]):
        assert client.post("/v1/completions", json={"prompt": prompt}).status_code == 200
        assert scheduler.requests[-1].prompt_ids == [1, 2, 3]
    assert scheduler.requests[-1].max_tokens == 16
    client.post("/v1/completions", json={"prompt": "a", "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 7})
    sampling = scheduler.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.5, 0.9, 5, 7)


def test_stop_string_cuts_text_and_cancels():
    scheduler = FakeScheduler(lambda r: FakeHandle([list(b"ab"), list(b"c\nd"), list(b"ef")]))
    client = client_for(scheduler)
    body = client.post("/v1/completions", json={"prompt": "x", "stop": ["\nd", "zz"]}).json()
    assert body["choices"][0]["text"] == "abc" and body["choices"][0]["finish_reason"] == "stop"
    assert scheduler.handles[-1].cancelled
    # streamed: the held-back "c" never leaks the stop string
    events = sse(client.post("/v1/completions", json={"prompt": "x", "stop": "\nd", "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == "abc"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_token_is_not_text():
    tokenizer = load_tokenizer(OURO, 300)
    assert tokenizer.eos_token_id == 2  # <|im_end|>
    ids = tokenizer.encode("Hi there")
    scheduler = FakeScheduler(lambda r: FakeHandle([ids[:2], ids[2:] + [2]], final="stop"))
    body = client_for(scheduler, tokenizer).post("/v1/completions", json={"prompt": "a"}).json()
    assert body["choices"][0] == {"index": 0, "text": "Hi there", "logprobs": None, "finish_reason": "stop"}
    assert body["usage"]["completion_tokens"] == len(ids) + 1
    assert scheduler.requests[-1].stop_token_ids == frozenset({2})


def test_streaming_multibyte_text_and_usage():
    text = "né€😀!"
    data = list(text.encode())
    scheduler = FakeScheduler(lambda r: FakeHandle([[b] for b in data]))
    response = client_for(scheduler).post("/v1/completions", json={
        "prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse(response)
    pieces = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(data)


def test_text_stream_holds_back_stop_prefixes():
    stream = TextStream(ByteTokenizer(), stop=["END"])
    assert stream.add(list(b"abE")) == "ab"
    assert stream.add(list(b"N")) == ""
    assert stream.add(list(b"x")) == "ENx"
    assert stream.add(list(b"yEND more")) == "y" and stream.stopped
    assert stream.finish() == "" and stream.text == "abENxy"


def test_return_token_ids():
    scheduler = FakeScheduler()
    body = client_for(scheduler).post("/v1/completions", json={"prompt": [5, 6], "return_token_ids": True}).json()
    assert body["choices"][0]["token_ids"] == [104, 105, 33] and body["prompt_token_ids"] == [5, 6]


def test_chat_with_template_fake():
    tokenizer = load_tokenizer(OURO, 300)
    scheduler = FakeScheduler(lambda r: FakeHandle([tokenizer.encode("4"), [2]], final="stop"))
    client = client_for(scheduler, tokenizer, chat_template=chat_renderer(OURO))
    messages = [{"role": "system", "content": "Hi"}, {"role": "user", "content": [{"type": "text", "text": "2+2?"}]}]
    body = client.post("/v1/chat/completions", json={"messages": messages}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "4"}
    assert body["choices"][0]["finish_reason"] == "stop"
    # the reference ids of this chat (tests/data/ouro-tiny/README.md)
    assert scheduler.requests[0].prompt_ids == [1, 295, 215, 282, 2, 215, 1, 291, 215, 34, 27, 34, 47, 2, 215, 1,
                                                289, 215]
    assert {2, 0} <= scheduler.requests[0].stop_token_ids
    assert scheduler.requests[0].max_tokens == 16  # no context length given
    events = sse(client.post("/v1/chat/completions", json={"messages": messages, "stream": True}))
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "4"
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_models_health_metrics():
    client = client_for(FakeScheduler())
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert client.get("/health").json() == {"status": "ok"}
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = parse_metrics(response.text)
    assert values["speedec_requests_total"] == 3 and values["speedec_drafts_accepted_total"] == 24
    assert values["speedec_draft_acceptance"] == pytest.approx(0.8)
    assert values["speedec_rows_per_step"] == pytest.approx(2.5)
    assert values["speedec_step_seconds_total"] == pytest.approx(0.125)
    assert values["speedec_rows_limit"] == 8  # keys added later are exported as gauges
    assert "# TYPE speedec_queue_depth gauge" in response.text
    assert "# TYPE speedec_tokens_total counter" in response.text


def parse_metrics(text):
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) speedec_\w+ .+", line), line
            continue
        name, value = line.split(" ")
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name)
        values[name] = float(value)
    return values


def test_metrics_before_any_step():
    values = parse_metrics(prometheus_text({}))
    assert values["speedec_draft_acceptance"] == 0 and values["speedec_rows_per_step"] == 0


def test_health_503_while_draining():
    app = create_app(FakeScheduler(), ByteTokenizer(), model_name="tiny")
    client = TestClient(app)
    app.state.speedec.draining = True
    assert client.get("/health").status_code == 503
    error_of(client.post("/v1/completions", json={"prompt": "a"}), 503)


# ----------------------------------------------------------------------------- fake: errors

@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": ["a", []]}, "prompt"),  # a list of prompts is supported since issue 29; an empty one is not
    ({"prompt": [1, 300]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": 0}, "top_k"),
    ({"prompt": "a", "top_k": 1.5}, "top_k"),
    ({"prompt": "a", "seed": "s"}, "seed"),
    ({"prompt": "a", "seed": 2 ** 70}, "seed"),
    ({"prompt": "a", "stop": 3}, "stop"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "stream_options": []}, "stream_options"),
    # n, logprobs and echo are supported since issue 29: their out-of-range values are refused.
    ({"prompt": "a", "n": 17}, "n"),
    ({"prompt": "a", "model": 3}, "model"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "echo": "yes"}, "echo"),
])
def test_bad_fields_are_400_naming_the_field(body, param):
    scheduler = FakeScheduler()
    error = error_of(client_for(scheduler, vocab_size=256).post("/v1/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert not scheduler.requests


def test_malformed_bodies_are_400():
    client = client_for(FakeScheduler())
    for raw in (b"{not json", b"", b"[1, 2]", b'"text"', b"[" * 100000):
        error_of(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)
    error_of(client.post("/v1/chat/completions", content=b"nope"), 400)
    error_of(client.post("/v1/completions", content=b'{"prompt": "a\\ud800b"}'), 400, "prompt")
    error_of(client.post("/v1/completions", content=b'{"prompt": "a", "temperature": NaN}'), 400, "temperature")
    error_of(client.post("/v1/completions", content=b'{"prompt": "a", "model": "\\ud800"}'), 404, "model")


def test_unknown_model_404_unknown_route_404():
    client = client_for(FakeScheduler())
    error = error_of(client.post("/v1/completions", json={"prompt": "a", "model": "gpt-4"}), 404, "model")
    assert error["code"] == "model_not_found"
    error_of(client.get("/v1/nothing"), 404)
    error_of(client.get("/v1/completions"), 405)


@pytest.mark.parametrize("raises,status", [
    (GenerationError("max_tokens 100000 goes beyond the model's context (max_seq_len 512)"), 400),
    (GenerationError("prompt token id 999 is outside the vocabulary"), 400),
    (QueueFull("the queue is full (64 requests waiting)"), 429),
    (ShuttingDown("the server is shutting down"), 503),
])
def test_scheduler_refusals(raises, status):
    response = client_for(FakeScheduler(raises=raises)).post("/v1/completions", json={"prompt": "a"})
    error = error_of(response, status)
    if status == 400:
        assert error["param"] == str(raises).split()[0]
    if status == 429:
        assert response.headers["retry-after"] == "1"


def test_failed_request_is_500_and_server_lives_on():
    scheduler = FakeScheduler(lambda r: FakeHandle([[104]], final="error", error=RuntimeError("boom")))
    client = client_for(scheduler)
    error = error_of(client.post("/v1/completions", json={"prompt": "a"}), 500)
    assert "boom" in error["message"] and error["type"] == "server_error"
    events = sse(client.post("/v1/completions", json={"prompt": "a", "stream": True}))
    assert "boom" in events[-1]["error"]["message"]
    scheduler.reply = lambda r: FakeHandle([[104]])
    assert client.post("/v1/completions", json={"prompt": "a"}).status_code == 200


def test_chat_errors():
    client = client_for(FakeScheduler())
    error = error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
                     400, "messages")
    assert "no chat template" in error["message"]
    tokenizer = load_tokenizer(OURO, 300)
    client = client_for(FakeScheduler(), tokenizer, chat_template=chat_renderer(OURO))
    for messages in (None, [], "hi", [{"content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "image_url"}]}]):
        error_of(client.post("/v1/chat/completions", json={"messages": messages}), 400, "messages")
    error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                       "max_completion_tokens": 0}), 400, "max_completion_tokens")


def test_chat_default_max_tokens_is_the_rest_of_the_context():
    tokenizer = load_tokenizer(OURO, 300)
    scheduler = FakeScheduler()
    client = client_for(scheduler, tokenizer, chat_template=chat_renderer(OURO), context_length=128)
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 128
    messages = [{"role": "user", "content": "2+2?"}]
    assert client.post("/v1/chat/completions", json={"messages": messages}).status_code == 200
    prompt = scheduler.requests[-1].prompt_ids
    assert scheduler.requests[-1].max_tokens == 128 - len(prompt)
    error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 200}]}),
             400, "messages")
    client.post("/v1/completions", json={"prompt": "a"})
    assert scheduler.requests[-1].max_tokens == 16


def test_chat_renderer_none_without_template(tmp_path):
    assert chat_renderer(tmp_path) is None
    assert chat_renderer(OURO) is not None


def test_client_disconnect_cancels_stream():
    """A client that stops reading mid-stream: the handle is cancelled."""
    # 10^5 chunks 10 ms apart: the stream outlasts any wait for the cancellation.
    scheduler = FakeScheduler(lambda r: FakeHandle([[104]] * 100_000, pause=0.01))
    with client_for(scheduler) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "a", "stream": True,
                                                             "max_tokens": 1000}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        wait_until(lambda: scheduler.handles[0].cancelled, "the handle to be cancelled")
    assert scheduler.handles[0].cancelled and len(scheduler.handles[0].tokens) < 100_000


# ----------------------------------------------------------------------------- the real scheduler

@pytest.fixture(scope="module")
def tiny_model():
    from helpers import random_model
    from speedec.config import preset

    return random_model(preset("tiny"), seed=0)  # float64: batched steps give the same tokens


@pytest.fixture(scope="module")
def real_app(tiny_model):
    from speedec.serve.scheduler import Scheduler

    scheduler = Scheduler(tiny_model, engine="speed", max_rows=8, max_queue=16, model_name="tiny",
                          step_costs=[1.0] * 8)
    scheduler.start()
    app = create_app(scheduler, ByteTokenizer(), model_name="tiny", vocab_size=tiny_model.config.vocab_size)
    yield app, scheduler
    scheduler.shutdown(5.0)


PROMPTS = [[72, 101, 108, 108, 111], [84, 104, 101], [1, 2, 3, 4, 5, 6, 7], [200, 17]]


def test_real_concurrent_greedy_equals_generate_alone(real_app, tiny_model):
    import httpx

    from speedec import generate

    app, _ = real_app

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(*(
                client.post("/v1/completions", json={"prompt": p, "max_tokens": 12 + i, "return_token_ids": True})
                for i, p in enumerate(PROMPTS)))

    responses = asyncio.run(run())
    for i, (prompt, response) in enumerate(zip(PROMPTS, responses)):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        expected = generate(tiny_model, prompt, 12 + i, engine="autoregressive").tokens
        assert choice["token_ids"] == expected and choice["finish_reason"] == "length"
        assert choice["text"] == ByteTokenizer().decode(expected)
        assert response.json()["usage"]["completion_tokens"] == len(expected)


def test_real_stream_equals_whole(real_app):
    client = TestClient(real_app[0])
    body = {"prompt": "Hello", "max_tokens": 20, "return_token_ids": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    events = sse(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    assert events[-1]["choices"][0]["token_ids"] == whole["token_ids"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    # a stop string taken from the same text cuts it there, streamed or not
    text = whole["text"]
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    cut = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    events = sse(client.post("/v1/completions", json={**body, "stop": [stop], "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == cut["text"]


def test_real_refusals_and_metrics(real_app):
    client = TestClient(real_app[0])
    error = error_of(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 100000}), 400, "max_tokens")
    assert "context" in error["message"]
    error_of(client.post("/v1/completions", json={"prompt": [256]}), 400, "prompt")
    error_of(client.post("/v1/completions", json={"prompt": "Hi", "temperature": -0.5}), 400, "temperature")
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0.8,
                                                "top_p": 0.9, "seed": 3}).status_code == 200
    text = client.get("/metrics").text
    values = parse_metrics(text)
    assert values["speedec_requests_total"] >= 1 and values["speedec_tokens_total"] >= 4
    assert values["speedec_steps_total"] >= 1 and values["speedec_rows_per_step"] >= 1
    assert 0 <= values["speedec_draft_acceptance"] <= 1


def test_real_client_disconnect_frees_the_request(real_app):
    app, scheduler = real_app
    cancelled = scheduler.metrics()["requests_cancelled"]
    with TestClient(app) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "Hi", "stream": True,
                                                             "max_tokens": 400}) as response:
            assert next(response.iter_lines()).startswith("data: ")
    wait_until(lambda: scheduler.metrics()["requests_cancelled"] > cancelled
               and scheduler.metrics()["requests_active"] == 0, "the request to be cancelled")
    metrics = scheduler.metrics()
    assert metrics["requests_cancelled"] == cancelled + 1 and metrics["requests_active"] == 0


def test_real_chat_on_ouro_fixture():
    from speedec import generate
    from speedec.model import LoopedLM
    from speedec.serve.scheduler import Scheduler
    from speedec.tokenizer import chat_prompt

    model = LoopedLM.from_pretrained(OURO)
    tokenizer = load_tokenizer(OURO, model.config.vocab_size)
    scheduler = Scheduler(model, engine="speed", max_rows=4, model_name="ouro-tiny", step_costs=[1.0] * 4)
    scheduler.start()
    try:
        client = TestClient(create_app(scheduler, tokenizer, model_name="ouro-tiny",
                                       chat_template=chat_renderer(OURO)))
        messages = [{"role": "user", "content": "2+2?"}]
        body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 10,
                                                         "return_token_ids": True}).json()
        expected = generate(model, chat_prompt(OURO, messages), 10, engine="autoregressive", eos_token_id=2)
        choice = body["choices"][0]
        assert choice["token_ids"] == expected.tokens
        visible = [t for t in expected.tokens if t != 2]
        assert choice["message"]["content"] == tokenizer.decode(visible)
        assert choice["finish_reason"] == ("stop" if expected.stop_reason == "eos" else "length")
        assert body["usage"]["prompt_tokens"] == len(chat_prompt(OURO, messages))
        events = sse(client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 10,
                                                               "stream": True}))
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == choice["message"]["content"]
    finally:
        scheduler.shutdown(5.0)


# ----------------------------------------------------------------------------- speedec serve

def run_cli(*args):
    from speedec.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "--port must be at most 65535, got 70000"),
    (["--port", "x"], "'x' is not a valid integer"),
    (["--engine", "beam"], "'beam' is not one of"),
    (["--max-rows", "0"], "--max-rows must be >= 1, got 0"),
    (["--max-queue", "-1"], "--max-queue must be >= 0, got -1"),
    (["--shutdown-deadline", "-2"], "--shutdown-deadline must be >= 0"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--host", "no such host!"], "--host"),
])
def test_serve_bad_options_exit_2(args, message):
    code, _, err = run_cli("serve", "--port", "0", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")


def test_serve_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_cli("serve", "--model", tmp_path, "--port", taken.getsockname()[1])
    assert code == 2 and "already in use" in err and len(err.strip().splitlines()) == 1, err


def test_serve_commands_are_lazy():
    """Other commands never import FastAPI."""
    code = ("import sys; from speedec.cli import cli; cli.get_command(None, 'generate'); "
            "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules; "
            "cli.get_command(None, 'serve'); assert 'uvicorn' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_process_answers_then_drains_on_sigterm(tmp_path):
    """The real command: ready line, answers, SIGTERM lets the in-flight stream finish, exit 0."""
    import os
    import signal

    import httpx

    from speedec.config import preset
    from speedec.model import LoopedLM

    LoopedLM.random(preset("tiny"), seed=1, residual_scale=20).save_pretrained(tmp_path / "tiny")
    env = {**os.environ, "SPEEDEC_KERNEL": "torch"}  # no kernel compile in a test
    command = [sys.executable, "-m", "speedec.cli", "serve", "--model", tmp_path / "tiny", "--port", "0",
               "--engine", "autoregressive", "--threads", "1", "--shutdown-deadline", "120"]
    proc = subprocess.Popen(command,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert lines and lines[0].startswith("speedec: serving tiny on http://127.0.0.1:"), (lines, proc.poll())
        assert "(engine autoregressive, max rows" in lines[0]
        url = lines[0].split(" on ")[1].split(" ")[0]
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
            assert client.get("/health").json() == {"status": "ok"}
            assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4}).status_code == 200
            with client.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 500,
                                                                 "stream": True}) as response:
                events = response.iter_lines()
                assert next(events).startswith("data: ")
                proc.send_signal(signal.SIGTERM)
                rest = [line for line in events if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(150) == 0
        assert "shutting down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


WEIRD = [None, True, False, 0, -1, 1.5, 2 ** 80, -(2 ** 80), float("inf"), "", "x", "\u0000", [], [None], [[]],
         [1, 2], ["a", 1], {}, {"a": 1}, [{"role": "user"}], [{"role": "user", "content": None}]]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stream", "stream_options", "n", "best_of", "echo", "logprobs", "return_token_ids"]


def test_no_field_value_crashes_the_server():
    """Every field set to every odd JSON value: an answer, never a 500."""
    tokenizer = load_tokenizer(OURO, 300)
    client = client_for(FakeScheduler(lambda r: FakeHandle([[104]])), tokenizer,
                        chat_template=chat_renderer(OURO), vocab_size=300, context_length=128)
    base = {"/v1/completions": {"prompt": "Hi"}, "/v1/chat/completions": {"messages": [{"role": "user",
                                                                                         "content": "Hi"}]}}
    for path, body in base.items():
        for name in FIELDS:
            for value in WEIRD:
                payload = json.dumps({**body, name: value}, allow_nan=True)
                response = client.post(path, content=payload)
                assert response.status_code in (200, 400, 404), (path, name, value, response.text)
                if response.status_code != 200:
                    error_of(response, response.status_code)


# ----------------------------------------------------------------------------- validation by pydantic

@pytest.mark.parametrize("path,body,param,message", [
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens must be an integer >= 1, got 0"),
    ("/v1/completions", {"prompt": "a", "max_tokens": True}, "max_tokens",
     "max_tokens must be an integer >= 1, got True"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, "temperature",
     "temperature must be a finite number >= 0, got 'hot'"),
    ("/v1/completions", {"prompt": "a", "seed": 2 ** 64}, "seed",
     f"seed must be an integer in [-2**63, 2**64), got {2 ** 64}"),
    ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop",
     "stop may hold at most 4 strings, got 5"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": 1}}, "include_usage",
     "include_usage must be true or false, got 1"),
    # n > 1 and lists of prompts are supported since issue 29: the refusals name the limits instead.
    ("/v1/completions", {"prompt": "a", "n": 17}, "n", "n must be an integer from 1 to 16, got 17"),
    ("/v1/completions", {"prompt": None}, "prompt", "prompt is required"),
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt", "prompt 1 is empty"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "prompt must be a string or a list of token ids"),
    ("/v1/chat/completions", {"messages": []}, "messages",
     "messages must be a non-empty list of {role, content} objects"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages",
     "messages[0].content must be a string, got 5"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}, "messages",
     "messages[1] must be an object with a string role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"enable_thinking": [1]}}, "chat_template_kwargs",
     "chat_template_kwargs must be an object of strings, numbers, booleans or nulls"),
])
def test_refused_fields_keep_their_messages(path, body, param, message):
    """pydantic validates; the answer is a 400 (never FastAPI's 422) worded as before."""
    scheduler = FakeScheduler()
    client = client_for(scheduler, load_tokenizer(OURO, 300), chat_template=chat_renderer(OURO))
    error = error_of(client.post(path, json=body), 400, param)
    assert error["message"] == message and error["type"] == "invalid_request_error"
    assert not scheduler.requests


def test_body_is_json_whatever_its_content_type():
    """curl -d sends application/x-www-form-urlencoded; the body is read as JSON all the same."""
    scheduler = FakeScheduler()
    client = client_for(scheduler)
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {} if content_type is None else {"content-type": content_type}
        response = client.post("/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 2}', headers=headers)
        assert response.status_code == 200, (content_type, response.text)
        assert scheduler.requests[-1].prompt_ids == list(b"Hi") and scheduler.requests[-1].max_tokens == 2
    error = error_of(client.post("/v1/completions", content=b"{not json"), 400, None)
    assert error["message"] == ("the request body is not valid JSON: Expecting property name enclosed in "
                                "double quotes: line 1 column 2 (char 1)")
    error = error_of(client.post("/v1/completions", content=b"[1]"), 400, None)
    assert error["message"] == "the request body must be a JSON object, got list"


def test_openapi_shows_the_request_schemas():
    client = client_for(FakeScheduler())
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    completion, chat = schemas["CompletionRequest"], schemas["ChatCompletionRequest"]
    assert {"prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
            "return_token_ids"} <= set(completion["properties"])
    assert completion["required"] == ["prompt"]
    assert {"messages", "max_tokens", "max_completion_tokens", "temperature",
            "chat_template_kwargs"} <= set(chat["properties"])
    assert chat["required"] == ["messages"]
    assert {"role", "content"} <= set(schemas["Message"]["properties"])
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        operation = spec["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + name)
        assert "422" not in operation["responses"]  # refused bodies are 400s
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def test_serve_modules_have_no_import_cycles():
    import ast

    import speedec.serve

    package = Path(speedec.serve.__file__).parent
    imports = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        imports[path.stem] = {node.module.split(".")[0] for node in ast.walk(tree)
                              if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    imports.pop("__init__")

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n)))
                   for n in imports.get(start, ()))
    assert not [m for m in imports if reaches(m, m)], imports
