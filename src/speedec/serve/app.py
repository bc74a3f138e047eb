"""The HTTP side of ``speedec serve``: an OpenAI-compatible API over the scheduler.

:func:`create_app` builds the FastAPI application. Its parts:

* :mod:`.schemas`: the request bodies as pydantic models (FastAPI validates them;
  ``/docs`` and ``/openapi.json`` show them);
* :mod:`.errors`: :class:`ApiError` and the one exception handler, which answers every
  failure as an OpenAI-style body (a refused field is a 400 naming it);
* :mod:`.routes`: the completion endpoints (checks against the served model, submission);
* :mod:`.streaming`: token chunks into text, whole or as Server-Sent Events (:class:`TextStream`),
  with their logprobs (:mod:`.logprobs` computes them in the scheduler);
* :mod:`.metrics`: ``/metrics`` in Prometheus text format (:func:`prometheus_text`);
* :mod:`.depths`: the model's ids, one per depth (``NAME@loops=d``);
* :mod:`.tokenize`: the tokenizer's endpoints (``/tokenize``, ``/detokenize``, ``/tokenizer_info``);
* :mod:`.state`: what the endpoints share, and :func:`chat_renderer`.

The names other code imports from here (``create_app``, ``chat_renderer``,
``mark_draining``, ``TextStream``, ``prometheus_text``, ``ApiError``) stay here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .depths import model_ids
from .errors import ApiError, error_response
from .metrics import PROMETHEUS_CONTENT_TYPE, prometheus_text
from .routes import DEFAULT_MAX_TOKENS, JsonBodyRoute, answer
from .schemas import MAX_STOP_STRINGS, SEED_RANGE, ChatCompletionRequest, CompletionRequest
from .state import ChatRenderer, ServerState, chat_renderer
from .streaming import DISCONNECT_POLL_S, TextStream
from .tokenize import tokenizer_routes

__all__ = ["DEFAULT_MAX_TOKENS", "DISCONNECT_POLL_S", "MAX_STOP_STRINGS", "PROMETHEUS_CONTENT_TYPE", "SEED_RANGE",
           "ApiError", "ChatRenderer", "ServerState", "TextStream", "chat_renderer", "create_app", "mark_draining",
           "prometheus_text"]

logger = logging.getLogger("speedec.serve")

# How an error looks, for /docs (every error of the completion endpoints has this shape).
_ERRORS = {"4XX": {"description": 'An OpenAI-style error: {"error": {"message", "type", "param", "code"}}; '
                                  "400 for a field of the wrong type or out of range (param names it), "
                                  "404 for an unknown model, 429 when the queue is full, 503 while stopping."}}


def _token_id(tokenizer: Any, token: str) -> int | None:
    lookup = getattr(tokenizer, "token_to_id", None)
    return lookup(token) if lookup is not None else None


def create_app(scheduler: Any, tokenizer: Any, *, model_name: str, chat_template: ChatRenderer | None = None,
               stop_token_ids: Sequence[int] | None = None, chat_stop_token_ids: Sequence[int] | None = None,
               vocab_size: int | None = None, context_length: int | None = None,
               retry_after_s: int = 1, n_loops: int | None = None, any_depth: bool = False) -> FastAPI:
    """The FastAPI application serving ``scheduler`` under ``model_name``.

    ``tokenizer``: speedec's tokenizer of the model (``encode``/``decode``/``eos_token_id``).
    ``chat_template``: ``messages -> prompt text`` (see :func:`chat_renderer`); without
    one ``/v1/chat/completions`` answers 400. ``stop_token_ids``: where completions stop
    (default: the tokenizer's end of text); ``chat_stop_token_ids``: where a chat turn
    stops (default: those plus ``<|im_end|>`` and ``<|endoftext|>`` when the tokenizer
    has them). ``vocab_size``: prompt token ids are checked against it (the scheduler
    checks them too). ``context_length``: the model's ``max_seq_len``; a chat request
    without ``max_tokens`` may then use the rest of the context (else
    ``DEFAULT_MAX_TOKENS``). ``retry_after_s``: the ``Retry-After`` of a 429. ``n_loops``:
    the model's loops; the app then also serves it at each smaller depth ``d`` as
    ``NAME@loops=d`` (:mod:`.depths`; None: ``NAME`` alone).
    """
    from .. import __version__
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
                        context_length=context_length, retry_after_s=retry_after_s, n_loops=n_loops,
                        any_depth=any_depth)

    app = FastAPI(title="speedec", version=__version__, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json",
                  description=f"An OpenAI-compatible API serving {model_name} (docs/serving.md).")
    app.state.speedec = state
    for kind in (ApiError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(kind, error_response)

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        cards = []
        for model_id, loops in model_ids(state.model_name, state.n_loops):
            card = {"id": model_id, "object": "model", "created": state.created, "owned_by": "speedec",
                    "root": state.model_name}
            if loops:
                card["loops"] = loops
            if state.context_length is not None:
                card["max_model_len"] = state.context_length
            cards.append(card)
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            values = state.scheduler.metrics()
        except Exception as exc:  # noqa: BLE001 - a scrape must not take the server down
            logger.exception("metrics failed")
            return ApiError(500, f"metrics are unavailable: {exc}", type="server_error").response()
        return PlainTextResponse(prometheus_text(values), media_type=PROMETHEUS_CONTENT_TYPE)

    completion_routes = APIRouter(route_class=JsonBodyRoute, responses=_ERRORS)

    @completion_routes.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """A text completion of `prompt` (docs/serving.md)."""
        return await answer(state, request, body, chat=False)

    @completion_routes.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """The assistant's turn after `messages`, through the model's chat template (docs/serving.md)."""
        return await answer(state, request, body, chat=True)

    app.include_router(completion_routes)
    app.include_router(tokenizer_routes(state))  # /tokenize, /detokenize, /tokenizer_info
    return app


def mark_draining(app: FastAPI) -> None:
    """From now on ``/health`` and new requests answer 503 (the server is stopping)."""
    app.state.speedec.draining = True
