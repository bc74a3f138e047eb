"""The HTTP side of ``speedec serve``: an OpenAI-compatible API over the scheduler.

FastAPI/Starlette speak HTTP; this module turns JSON bodies into
:class:`~speedec.serve.scheduler.ServeRequest` objects, the handle's token
chunks into text (whole responses or Server-Sent Events) and every failure
into an OpenAI-style error body::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Bodies are validated by hand rather than by pydantic models so that every
message names its field in the CLI's wording and every bad input is a 400
(pydantic's default is a 422 that clients do not expect). Fields this server
does not know are ignored: OpenAI clients send many.

Text is produced incrementally: the completion so far is decoded as a whole
and only the new suffix is sent, so tokens that are parts of one character
(byte-level BPE) print correctly; text that could be the start of a ``stop``
string is held back until it is known not to be one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GenerationError, SpeedecError, TokenizerError
from ..sampling import SamplingParams
from .scheduler import QueueFull, ServeRequest, ShuttingDown

logger = logging.getLogger("speedec.serve")

DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 4
# Seeds torch.Generator.manual_seed accepts.
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)
# Fields of a request that an error message of the scheduler may name (first one named wins).
_FIELDS = ("max_tokens", "prompt", "messages", "temperature", "top_p", "top_k", "seed", "stop", "n")
_FIELD_PATTERN = re.compile(r"\b(" + "|".join(_FIELDS) + r"|max_new_tokens|prompt_ids)\b")
# How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_S = 0.5
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ChatRenderer = Callable[[list[dict]], str]


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON body with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class ServerState:
    """What the endpoints share; ``app.state.speedec``."""

    scheduler: Any
    tokenizer: Any
    model_name: str
    chat: ChatRenderer | None
    # Where a completion stops (the tokenizer's end of text), and a chat turn.
    stop_token_ids: frozenset[int]
    chat_stop_token_ids: frozenset[int]
    vocab_size: int | None
    context_length: int | None
    retry_after_s: int
    created: int = field(default_factory=lambda: int(time.time()))
    # True once the server is stopping: /health and new requests answer 503.
    draining: bool = False


def chat_renderer(model_dir: str | Path) -> ChatRenderer | None:
    """``messages -> prompt text`` through the checkpoint's chat template (the function
    ``speedec generate --chat`` uses), or None when the model directory has none."""
    from ..tokenizer import TOKENIZER_FILE, chat_template, render_chat

    try:
        chat_template(model_dir)
    except TokenizerError:
        return None
    if not (Path(model_dir) / TOKENIZER_FILE).is_file():
        return None  # a template's special tokens need the model's own tokenizer

    def render(messages: list[dict]) -> str:
        return render_chat(model_dir, messages)
    return render


def _token_id(tokenizer: Any, token: str) -> int | None:
    lookup = getattr(tokenizer, "token_to_id", None)
    return lookup(token) if lookup is not None else None


def create_app(scheduler: Any, tokenizer: Any, *, model_name: str, chat_template: ChatRenderer | None = None,
               stop_token_ids: Sequence[int] | None = None, chat_stop_token_ids: Sequence[int] | None = None,
               vocab_size: int | None = None, context_length: int | None = None,
               retry_after_s: int = 1) -> FastAPI:
    """The FastAPI application serving ``scheduler`` under ``model_name``.

    ``tokenizer``: speedec's tokenizer of the model (``encode``/``decode``/``eos_token_id``).
    ``chat_template``: ``messages -> prompt text`` (see :func:`chat_renderer`); without
    one ``/v1/chat/completions`` answers 400. ``stop_token_ids``: where completions stop
    (default: the tokenizer's end of text); ``chat_stop_token_ids``: where a chat turn
    stops (default: those plus ``<|im_end|>`` and ``<|endoftext|>`` when the tokenizer
    has them). ``vocab_size``: prompt token ids are checked against it (the scheduler
    checks them too). ``context_length``: the model's ``max_seq_len``; a chat request
    without ``max_tokens`` may then use the rest of the context (else
    ``DEFAULT_MAX_TOKENS``). ``retry_after_s``: the ``Retry-After`` of a 429.
    """
    from ..tokenizer import CHAT_END_TOKEN, EOS_TOKEN

    if stop_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        stop_token_ids = [] if eos is None else [eos]
    if chat_stop_token_ids is None:
        extra = [_token_id(tokenizer, CHAT_END_TOKEN), _token_id(tokenizer, EOS_TOKEN)]
        chat_stop_token_ids = [*stop_token_ids, *(i for i in extra if i is not None)]
    state = ServerState(scheduler=scheduler, tokenizer=tokenizer, model_name=model_name, chat=chat_template,
                        stop_token_ids=frozenset(stop_token_ids),
                        chat_stop_token_ids=frozenset(chat_stop_token_ids), vocab_size=vocab_size,
                        context_length=context_length, retry_after_s=retry_after_s)

    app = FastAPI(title="speedec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.speedec = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown paths and wrong methods, in the same JSON shape as every other error.
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message, code=None).response()

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "speedec"}
        if state.context_length is not None:
            card["max_model_len"] = state.context_length
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            values = state.scheduler.metrics()
        except Exception as exc:  # noqa: BLE001 - a scrape must not take the server down
            logger.exception("metrics failed")
            return ApiError(500, f"metrics are unavailable: {exc}", type="server_error").response()
        return PlainTextResponse(prometheus_text(values), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _endpoint(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _endpoint(state, request, chat=True)

    return app


def mark_draining(app: FastAPI) -> None:
    """From now on ``/health`` and new requests answer 503 (the server is stopping)."""
    app.state.speedec.draining = True


# ----------------------------------------------------------------------------- requests

@dataclass
class _Parsed:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool


async def _endpoint(state: ServerState, request: Request, *, chat: bool) -> Response:
    """Parse, submit, answer; every failure becomes an OpenAI-style error."""
    try:
        body = await _json_body(request)
        parsed = _parse(state, body, chat=chat)
        if state.draining:
            raise ShuttingDown("the server is shutting down")
        stop_ids = state.chat_stop_token_ids if chat else state.stop_token_ids
        try:
            handle = state.scheduler.submit(
                ServeRequest(prompt_ids=parsed.prompt_ids, max_tokens=parsed.max_tokens, sampling=parsed.sampling,
                             stop_token_ids=stop_ids), asyncio.get_running_loop())
        except (GenerationError, TokenizerError) as exc:
            raise ApiError(400, str(exc), param=_param_of(str(exc))) from None
        except QueueFull as exc:
            raise ApiError(429, str(exc) or "the server's queue is full; try again later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(state.retry_after_s)}) from None
        except ShuttingDown as exc:
            raise ApiError(503, str(exc) or "the server is shutting down", type="service_unavailable") from None
        run = _Run(state, handle, parsed, stop_ids, chat=chat)
        if parsed.stream:
            # The background task cancels a request whose stream never started (client gone at once).
            return StreamingResponse(run.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(run.cancel))
        return await run.whole(request)
    except ApiError as exc:
        return exc.response()
    except ShuttingDown as exc:
        return ApiError(503, str(exc), type="service_unavailable").response()
    except SpeedecError as exc:
        return ApiError(400, str(exc), param=_param_of(str(exc))).response()
    except Exception as exc:  # noqa: BLE001 - nothing a client sends may take the server down
        logger.exception("request failed")
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()


def _param_of(message: str) -> str | None:
    """The request field an error message names (the scheduler's messages name them)."""
    found = _FIELD_PATTERN.search(message)
    if found is None:
        return None
    return {"max_new_tokens": "max_tokens", "prompt_ids": "prompt"}.get(found.group(1), found.group(1))


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and not (
        isinstance(value, float) and not math.isfinite(value))


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", param=name)
    return value


def _parse(state: ServerState, body: dict, *, chat: bool) -> _Parsed:
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {model!r}", param="model")
        if model != state.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")
    prompt_ids = _chat_prompt(state, body.get("messages")) if chat else _completion_prompt(state, body)
    # Chat clients may send OpenAI's newer name for the same limit.
    name = ("max_completion_tokens" if chat and body.get("max_tokens") is None
            and body.get("max_completion_tokens") is not None else "max_tokens")
    max_tokens = body.get(name)
    if max_tokens is None:
        # OpenAI's chat default is "until the turn ends": the rest of the context, when known.
        rest = None if state.context_length is None else state.context_length - len(prompt_ids)
        max_tokens = rest if chat and rest is not None else DEFAULT_MAX_TOKENS
        if max_tokens < 1:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) fills the model's context of "
                                f"{state.context_length} tokens", param="messages" if chat else "prompt")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ApiError(400, f"{name} must be an integer >= 1, got {max_tokens!r}", param=name)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, f"n must be 1 (one choice per request), got {n!r}", param="n")
    best_of = body.get("best_of")
    if best_of is not None and (not _is_int(best_of) or best_of != 1):
        raise ApiError(400, f"best_of must be 1, got {best_of!r}", param="best_of")
    if body.get("echo") not in (None, False):
        raise ApiError(400, "echo is not supported", param="echo")
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    sampling = _sampling(body)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise ApiError(400, f"stream_options must be an object, got {options!r}", param="stream_options")
        include_usage = _bool(options, "include_usage")
    return _Parsed(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling, stop=_stop(body),
                   stream=stream, include_usage=include_usage,
                   return_token_ids=_bool(body, "return_token_ids"))


def _sampling(body: dict) -> SamplingParams:
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 0.0
    if not _is_number(temperature) or temperature < 0:
        raise ApiError(400, f"temperature must be a finite number >= 0, got {temperature!r}", param="temperature")
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ApiError(400, f"top_p must be a number in (0, 1], got {top_p!r}", param="top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ApiError(400, f"top_k must be an integer >= 1, got {top_k!r}", param="top_k")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ApiError(400, f"seed must be an integer in [-2**63, 2**64), got {seed!r}", param="seed")
    try:
        return SamplingParams(temperature=float(temperature), top_k=top_k,
                              top_p=None if top_p is None else float(top_p), seed=seed)
    except GenerationError as exc:
        raise ApiError(400, str(exc), param=_param_of(str(exc))) from None


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, f"stop must be a string or a list of strings, got {stop!r}", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    if any(not s for s in stop):
        raise ApiError(400, "stop strings must not be empty", param="stop")
    return stop


def _encode(state: ServerState, text: str, param: str) -> list[int]:
    try:
        return list(state.tokenizer.encode(text))
    except SpeedecError as exc:
        raise ApiError(400, str(exc), param=param) from None
    except UnicodeError:  # JSON may carry lone surrogates, which no encoder takes
        raise ApiError(400, f"{param} is not valid Unicode text (a lone surrogate?)", param=param) from None


def _completion_prompt(state: ServerState, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one: ["text"] or [[1, 2, 3]]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        ids = _encode(state, prompt, "prompt")
    elif isinstance(prompt, list) and all(_is_int(i) for i in prompt):
        ids = list(prompt)
    elif prompt is None:
        raise ApiError(400, "prompt is required", param="prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, f"prompt holds {len(prompt)} prompts; this server takes one per request",
                       param="prompt")
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")
    if not ids:
        raise ApiError(400, "prompt is empty", param="prompt")
    _check_ids(state, ids)
    return ids


def _check_ids(state: ServerState, ids: list[int]) -> None:
    limit = state.vocab_size
    bad = next((i for i in ids if i < 0 or (limit is not None and i >= limit)), None)
    if bad is not None:
        bound = f"0..{limit - 1}" if limit is not None else "ids >= 0"
        raise ApiError(400, f"prompt token id {bad} is outside the vocabulary ({bound})", param="prompt")


def _message_text(content: Any, index: int) -> str:
    """A message's content: a string, null, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{index}].content must be a string, got {content!r}", param="messages")


def _chat_prompt(state: ServerState, messages: Any) -> list[int]:
    if state.chat is None:
        raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{index}] must be an object with a string role", param="messages")
        turns.append({"role": message["role"], "content": _message_text(message.get("content"), index)})
    try:
        text = state.chat(turns)
    except SpeedecError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    ids = _encode(state, text, "messages")
    if not ids:
        raise ApiError(400, "messages render to an empty prompt", param="messages")
    return ids


# ----------------------------------------------------------------------------- answers

class TextStream:
    """Token ids in, text deltas out: decodes the completion so far as a whole and
    hands out only the new, settled suffix.

    Settled means: no trailing U+FFFD (an incomplete UTF-8 sequence whose last bytes
    are still to come) and no trailing text that could be the start of a ``stop``
    string. When a stop string appears, the text is cut before it and ``stopped``
    turns true. Stop tokens (``stop_ids``) end the text and are not printed.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), stop_ids: frozenset[int] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.received = 0
        self.sent = ""
        self.stopped = False
        self.ended = False  # a stop token arrived

    def _decode(self) -> str:
        vocab = getattr(self.tokenizer, "vocab_size", None)
        ids = self.ids if vocab is None else [i for i in self.ids if 0 <= i < vocab]
        try:
            return self.tokenizer.decode(ids)
        except SpeedecError:
            return ""

    def add(self, tokens: Sequence[int]) -> str:
        """The new text after ``tokens`` (empty while it is unsettled)."""
        if self.stopped or self.ended:
            return ""
        self.received += len(tokens)
        for token in tokens:
            if token in self.stop_ids:
                self.ended = True
                break
            self.ids.append(token)
        text = self._decode()
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        settled = text.rstrip("\ufffd")
        return self._emit(settled[:len(settled) - self._partial_stop(settled)])

    def finish(self) -> str:
        """The rest of the text once the request has ended."""
        if self.stopped:
            return ""
        return self._emit(self._decode())

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta

    def _first_stop(self, text: str) -> int | None:
        # Only text not yet sent can hold a new stop string (sent text held none).
        start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that starts a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    @property
    def text(self) -> str:
        return self.sent


class _Run:
    """One submitted request: its handle, read into a whole answer or into SSE chunks."""

    def __init__(self, state: ServerState, handle: Any, parsed: _Parsed, stop_ids: frozenset[int], *,
                 chat: bool) -> None:
        self.state = state
        self.handle = handle
        self.parsed = parsed
        self.chat = chat
        self.text = TextStream(state.tokenizer, parsed.stop, stop_ids)
        self.tokens: list[int] = []
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    # -- shared

    async def _chunks(self) -> AsyncIterator[str]:
        """Text deltas until the request ends or a stop string appears (then the handle is cancelled)."""
        async for chunk in self.handle.stream():
            self.tokens.extend(chunk)
            delta = self.text.add(chunk)
            if delta:
                yield delta
            if self.text.stopped:
                self.cancel()
                return
        delta = self.text.finish()
        if delta:
            yield delta

    def cancel(self) -> None:
        if not self.handle.done:
            self.handle.cancel()

    def _finish_reason(self) -> str:
        """"stop" or "length"; raises ApiError when the request failed or was cut short."""
        if self.text.stopped:
            return "stop"
        reason = self.handle.finish_reason
        if reason in ("stop", "length"):
            return reason
        if reason == "error":
            error = self.handle.error
            message = str(error) if error is not None else "unknown error"
            raise ApiError(500, f"the request failed: {message}", type="server_error")
        raise ApiError(503, "the request was cancelled before it finished (the server is shutting down)",
                       type="service_unavailable")

    def _usage(self) -> dict:
        prompt = len(self.parsed.prompt_ids)
        completion = len(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -- whole answers

    async def whole(self, request: Request) -> Response:
        watcher = asyncio.create_task(self._watch_disconnect(request))
        try:
            async for _ in self._chunks():
                pass
        finally:
            watcher.cancel()
            self.cancel()
        finish = self._finish_reason()
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text.text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": self.text.text, "logprobs": None, "finish_reason": finish}
        body = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_name, "choices": [choice],
                "usage": self._usage()}
        if self.parsed.return_token_ids:
            choice["token_ids"] = list(self.tokens)
            body["prompt_token_ids"] = list(self.parsed.prompt_ids)
        return JSONResponse(body)

    async def _watch_disconnect(self, request: Request) -> None:
        """Cancel the request when its client goes away (frees its rows at the next step)."""
        while not self.handle.done:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                self.cancel()
                return

    # -- Server-Sent Events

    def _chunk(self, delta: str | None, finish: str | None, *, role: bool = False) -> dict:
        if self.chat:
            content: dict = {"role": "assistant", "content": ""} if role else (
                {} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_name, "choices": [choice]}

    async def events(self) -> AsyncIterator[str]:
        """``data: {chunk}`` events, then ``data: [DONE]``. A client that goes away
        cancels this generator (Starlette), and the handle with it."""
        try:
            if self.chat:
                yield _sse(self._chunk(None, None, role=True))
            async for delta in self._chunks():
                yield _sse(self._chunk(delta, None))
            try:
                finish = self._finish_reason()
            except ApiError as exc:
                yield _sse(exc.body())
            else:
                final = self._chunk(None, finish)
                if self.parsed.return_token_ids:
                    final["choices"][0]["token_ids"] = list(self.tokens)
                yield _sse(final)
                if self.parsed.include_usage:
                    usage = {"id": self.id, "object": final["object"], "created": self.created,
                             "model": self.state.model_name, "choices": [], "usage": self._usage()}
                    yield _sse(usage)
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - after the headers, an error can only be an event
            logger.exception("stream failed")
            yield _sse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body())
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- metrics

# scheduler.metrics() key -> (Prometheus name, type, help)
_METRICS = {
    "requests_total": ("speedec_requests_total", "counter", "Requests accepted by the scheduler."),
    "tokens_total": ("speedec_tokens_total", "counter", "Tokens generated (verified) for all requests."),
    "steps_total": ("speedec_steps_total", "counter", "Scheduler steps (one batched pass over the layers each)."),
    "rows_total": ("speedec_rows_total", "counter", "Rows run, summed over steps."),
    "step_seconds_total": ("speedec_step_seconds_total", "counter", "Seconds spent in scheduler steps."),
    "drafts_launched": ("speedec_drafts_launched_total", "counter", "Guesses launched from the early exit."),
    "drafts_accepted": ("speedec_drafts_accepted_total", "counter", "Guesses that verification kept."),
    "drafts_rejected": ("speedec_drafts_rejected_total", "counter", "Guesses that verification replaced."),
    "requests_failed": ("speedec_requests_failed_total", "counter", "Requests that ended with an error."),
    "requests_cancelled": ("speedec_requests_cancelled_total", "counter",
                           "Requests cancelled (client gone, stop string, shutdown)."),
    "requests_finished": ("speedec_requests_finished_total", "counter", "Requests that ran to their end."),
    "requests_active": ("speedec_requests_active", "gauge", "Requests holding rows now."),
    "queue_depth": ("speedec_queue_depth", "gauge", "Requests waiting for rows."),
}
_NAME = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_text(values: Mapping[str, Any]) -> str:
    """Prometheus text exposition (format 0.0.4) of ``scheduler.metrics()``, with two derived
    gauges: draft acceptance (accepted / verified, the engines' definition) and rows per step; keys this module
    does not know are exported as ``speedec_<key>`` (a counter when the key ends in
    ``_total``, else a gauge)."""
    def number(key: str) -> float:
        value = values.get(key, 0)
        return float(value) if _is_number(value) else 0.0

    lines: list[str] = []

    def emit(name: str, kind: str, help_text: str, value: float) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_format(value)}"])

    for key, (name, kind, help_text) in _METRICS.items():
        emit(name, kind, help_text, number(key))
    verified, steps = number("drafts_accepted") + number("drafts_rejected"), number("steps_total")
    emit("speedec_draft_acceptance", "gauge", "Fraction of verified guesses kept (0 before any).",
         number("drafts_accepted") / verified if verified else 0.0)
    emit("speedec_rows_per_step", "gauge", "Mean rows per scheduler step (0 before any step).",
         number("rows_total") / steps if steps else 0.0)
    for key in sorted(set(values) - set(_METRICS)):
        if _is_number(values[key]) or isinstance(values[key], bool):
            name = "speedec_" + _NAME.sub("_", str(key))
            emit(name, "counter" if name.endswith("_total") else "gauge", f"Scheduler metric {key}.",
                 float(values[key]))
    return "\n".join(lines) + "\n"


def _format(value: float) -> str:
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if value == int(value) and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(float(value))
