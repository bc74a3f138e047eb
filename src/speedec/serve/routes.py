"""The completion endpoints: a validated body (:mod:`.schemas`) checked against the
served model, submitted to the scheduler and answered (:mod:`.streaming`).

What pydantic cannot know is checked here: the model's name and depth (404), prompt token
ids within the vocabulary, the chat template (and its options), the default
``max_tokens`` against the context. The scheduler checks prompt + ``max_tokens``
against the context itself; its refusals name the field they are about.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask

from ..errors import GenerationError, SpeedecError
from ..sampling import SamplingParams
from .depths import UnknownModel, requested_depth
from .errors import ApiError
from .requests import QueueFull, ServeRequest, ShuttingDown
from .schemas import SEED_RANGE, ChatCompletionRequest, CompletionRequest
from .state import ServerState
from .streaming import Answer, Prepared, events, whole

logger = logging.getLogger("speedec.serve")

DEFAULT_MAX_TOKENS = 16
# Fields of a request that an error message of the scheduler may name (first one named wins).
_FIELDS = ("max_tokens", "prompt", "messages", "temperature", "top_p", "top_k", "seed", "stop", "n")
_FIELD_PATTERN = re.compile(r"\b(" + "|".join(_FIELDS) + r"|max_new_tokens|prompt_ids)\b")


class JsonBodyRoute(APIRoute):
    """A route whose body is JSON whatever content type the client names: ``curl -d``
    sends ``application/x-www-form-urlencoded`` and some clients send none, where
    FastAPI would hand pydantic the raw bytes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def json_handler(request: Request) -> Response:
            headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
            request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
            request.__dict__.pop("_headers", None)  # Starlette caches the headers it has read
            return await handler(request)
        return json_handler


async def answer(state: ServerState, request: Request, body: CompletionRequest | ChatCompletionRequest, *,
                 chat: bool) -> Response:
    """Check, submit, answer; every failure raises an :class:`ApiError`."""
    try:
        choices = prepare_all(state, body, chat=chat)
        if state.draining:
            raise ShuttingDown("the server is shutting down")
        stop_ids = state.chat_stop_token_ids if chat else state.stop_token_ids
        handles: list = []
        try:
            for parsed in choices:
                handles.append(_submit(state, parsed, stop_ids))
        except BaseException:
            for handle in handles:  # all choices or none
                handle.cancel()
            raise
        runs = [Answer(state, handle, parsed, stop_ids, chat=chat) for handle, parsed in zip(handles, choices)]
        if choices[0].stream:
            def cancel_all() -> None:
                for run in runs:
                    run.cancel()
            # The background task cancels requests whose stream never started (client gone at once).
            return StreamingResponse(events(runs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(cancel_all))
        return await whole(runs, request)
    except ApiError:
        raise
    except ShuttingDown as exc:
        raise ApiError(503, str(exc) or "the server is shutting down", type="service_unavailable") from None
    except SpeedecError as exc:  # the scheduler's refusals (GenerationError, TokenizerError)
        raise ApiError(400, str(exc), param=_param_of(str(exc))) from None
    except Exception as exc:  # noqa: BLE001 - nothing a client sends may take the server down
        logger.exception("request failed")
        raise ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error") from None


def _submit(state: ServerState, parsed: Prepared, stop_ids: frozenset[int]) -> Any:
    """One choice as a scheduler request; its handle."""
    if parsed.max_tokens == 0 and parsed.logprobs is None:
        return _Echoed()  # echo alone: the answer is the prompt, nothing to run
    prompt_logprobs = parsed.logprobs if parsed.echo else None
    try:
        return state.scheduler.submit(
            ServeRequest(prompt_ids=parsed.prompt_ids, max_tokens=parsed.max_tokens, sampling=parsed.sampling,
                         stop_token_ids=stop_ids, logprobs=parsed.logprobs, prompt_logprobs=prompt_logprobs,
                         loops=parsed.loops),
            asyncio.get_running_loop())
    except QueueFull as exc:
        raise ApiError(429, str(exc) or "the server's queue is full; try again later", type="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(state.retry_after_s)}) from None


class _Echoed:
    """The handle of a choice that generates nothing and needs no logprobs (echo, max_tokens 0)."""

    id = "echo"
    tokens: list[int] = []
    logprobs: list = []
    prompt_logprobs = None
    error = None
    finish_reason = "length"
    done = True

    async def stream(self):
        return
        yield

    def cancel(self) -> None:
        pass


def prepare_all(state: ServerState, body: CompletionRequest | ChatCompletionRequest, *,
                chat: bool) -> list[Prepared]:
    """``body``'s choices checked against the served model, in index order
    (``prompt_index * n + choice``); a seeded choice samples with ``seed + choice``."""
    if isinstance(body, ChatCompletionRequest):
        prompts: list = [None]
    else:
        prompts = body.prompt
    n = body.n or 1
    out = []
    for p, prompt in enumerate(prompts):
        base = prepare(state, body, chat=chat, prompt=prompt)
        if not chat:
            base.prompt_index = p
            base.echo = bool(body.echo)
            if base.echo:
                base.prompt_text = prompt if isinstance(prompt, str) else _decode(state, base.prompt_ids)
        for j in range(n):
            seed = body.seed
            if seed is not None and j:
                seed += j
                if seed > SEED_RANGE[1]:
                    seed -= 2 ** 64
            sampling = base.sampling if seed == body.seed else replace(base.sampling, seed=seed)
            out.append(replace(base, index=p * n + j, sampling=sampling))
    return out


def _decode(state: ServerState, ids: list[int]) -> str:
    try:
        return state.tokenizer.decode(ids)
    except SpeedecError:
        return ""


def prepare(state: ServerState, body: CompletionRequest | ChatCompletionRequest, *, chat: bool,
            prompt: str | list[int] | None = None) -> Prepared:
    """``body`` checked against the served model: prompt ids, the limit, sampling
    (``prompt``: the completion's prompt, default the first of ``body.prompt``)."""
    try:  # NAME, or NAME@loops=d: the model at depth d (docs/serving.md)
        loops = requested_depth(body.model, state.model_name, state.n_loops, any_depth=state.any_depth)
    except UnknownModel as exc:
        raise ApiError(404, str(exc), param="model", code="model_not_found") from None
    if isinstance(body, ChatCompletionRequest):
        prompt_ids, max_tokens = _chat_prompt(state, body), body.limit
    else:
        prompt = body.prompt[0] if prompt is None else prompt
        prompt_ids, max_tokens = _completion_prompt(state, prompt), body.max_tokens
    if max_tokens is None:
        # OpenAI's chat default is "until the turn ends": the rest of the context, when known.
        rest = None if state.context_length is None else state.context_length - len(prompt_ids)
        max_tokens = rest if chat and rest is not None else DEFAULT_MAX_TOKENS
        if max_tokens < 1:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) fills the model's context of "
                                f"{state.context_length} tokens", param="messages" if chat else "prompt")
    try:
        sampling = SamplingParams(temperature=body.temperature or 0.0, top_k=body.top_k, top_p=body.top_p,
                                  seed=body.seed)
    except GenerationError as exc:
        raise ApiError(400, str(exc), param=_param_of(str(exc))) from None
    options = body.stream_options
    return Prepared(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling, stop=body.stop or [],
                    stream=bool(body.stream), include_usage=bool(options and options.include_usage),
                    return_token_ids=bool(body.return_token_ids), logprobs=_logprobs_of(body),
                    model=body.model or state.model_name, loops=loops)


def _logprobs_of(body: CompletionRequest | ChatCompletionRequest) -> int | None:
    """Alternatives per token (None: no logprobs)."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def _param_of(message: str) -> str | None:
    """The request field an error message names (the scheduler's messages name them)."""
    found = _FIELD_PATTERN.search(message)
    if found is None:
        return None
    return {"max_new_tokens": "max_tokens", "prompt_ids": "prompt"}.get(found.group(1), found.group(1))


def _encode(state: ServerState, text: str, param: str, *, prompt: bool = False) -> list[int]:
    """``text``'s ids; ``prompt``: a completion's prompt, which starts with the tokenizer's
    beginning-of-text token when it has one (speedec.tokenizer.prompt_ids)."""
    from ..tokenizer import prompt_ids

    try:
        return prompt_ids(state.tokenizer, text) if prompt else list(state.tokenizer.encode(text))
    except SpeedecError as exc:
        raise ApiError(400, str(exc), param=param) from None
    except UnicodeError:  # JSON may carry lone surrogates, which no encoder takes
        raise ApiError(400, f"{param} is not valid Unicode text (a lone surrogate?)", param=param) from None


def _completion_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    """A completion's prompt ids (``prompt``: one text or one list of ids, non-empty)."""
    ids = _encode(state, prompt, "prompt", prompt=True) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ApiError(400, "prompt is empty", param="prompt")
    limit = state.vocab_size
    bad = next((i for i in ids if i < 0 or (limit is not None and i >= limit)), None)
    if bad is not None:
        bound = f"0..{limit - 1}" if limit is not None else "ids >= 0"
        raise ApiError(400, f"prompt token id {bad} is outside the vocabulary ({bound})", param="prompt")
    return ids


def _chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    """A chat's prompt ids: the messages through the model's template, with the request's
    ``chat_template_kwargs`` as template variables (such as ``enable_thinking``)."""
    if state.chat is None:
        raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
    turns = [{"role": message.role, "content": message.text} for message in body.messages]
    try:
        # render_chat refuses the variables speedec sets itself (messages, bos_token, ...).
        text = state.chat(turns, dict(body.chat_template_kwargs or {}))
    except SpeedecError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    ids = _encode(state, text, "messages")
    if not ids:
        raise ApiError(400, "messages render to an empty prompt", param="messages")
    return ids
