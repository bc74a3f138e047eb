"""The served model's tokenizer over HTTP, as vLLM exposes it: ``GET /tokenizer_info``,
``POST /tokenize`` and ``POST /detokenize``.

lm-evaluation-harness (``--model local-completions``) needs the model's tokenizer
to split a multiple-choice request into context and continuation; when a
server answers these endpoints it uses them (its ``remote`` tokenizer backend,
chosen by default), so a harness run needs no tokenizer files on its side and
counts tokens exactly as the server does (docs/serving.md).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from ..errors import SpeedecError
from .errors import ApiError
from .routes import JsonBodyRoute
from .state import ServerState


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: the ids of ``prompt``."""

    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr
    # True: as a completion's text prompt is encoded (after the tokenizer's start
    # token, when the model has one); False: the text's own tokens only.
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: the text of ``tokens``."""

    model_config = ConfigDict(extra="ignore")

    tokens: list[StrictInt]


def tokenizer_routes(state: ServerState) -> APIRouter:
    """The three endpoints over ``state.tokenizer``; errors are OpenAI-shaped (400 naming the field)."""
    from ..tokenizer import prompt_ids

    router = APIRouter(route_class=JsonBodyRoute)
    tokenizer = state.tokenizer

    def text_of(ids: list[int]) -> str | None:
        return None if ids is None else tokenizer.decode(ids)

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        eos = getattr(tokenizer, "eos_token_id", None)
        bos = getattr(tokenizer, "bos_token_id", None)
        return JSONResponse({"tokenizer_class": type(tokenizer).__name__,
                             "eos_token": text_of(None if eos is None else [eos]),
                             "bos_token": text_of(None if bos is None else [bos]),
                             "pad_token": None, "model_max_length": state.context_length,
                             "vocab_size": getattr(tokenizer, "vocab_size", None)})

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        try:
            ids = prompt_ids(tokenizer, body.prompt) if body.add_special_tokens else list(
                tokenizer.encode(body.prompt))
        except (SpeedecError, UnicodeError) as exc:
            raise ApiError(400, f"prompt cannot be tokenized: {exc}", param="prompt") from None
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.context_length})

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        try:
            text = tokenizer.decode(body.tokens)
        except SpeedecError as exc:
            raise ApiError(400, str(exc), param="tokens") from None
        return JSONResponse({"prompt": text})

    return router
