"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions`` as pydantic models.

FastAPI validates a body against these (and ``/docs`` shows them); fields the
models do not name are ignored, since OpenAI clients send many. Types are
strict: ``"5"`` is not an integer and ``true`` is not a number. What pydantic
refuses becomes a 400 whose message :func:`error_message` words as the CLI
does, naming the field (:mod:`.errors`). Checks that need the served model
(the model name, token ids within the vocabulary, the context, the chat
template) are the route's (:mod:`.routes`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4
# Choices per prompt (n), alternatives per token (logprobs, top_logprobs), choices per request.
MAX_N = 16
MAX_LOGPROBS = 20
MAX_CHOICES = 64
# Seeds torch.Generator.manual_seed accepts.
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)
# The type of the errors validators raise with a message of their own ({"message", "param"} in ctx).
INVALID = "invalid_request"

PositiveInt = Annotated[StrictInt, Field(ge=1)]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
One = Annotated[StrictInt, Field(ge=1, le=1)]
Scalar = StrictStr | StrictBool | StrictInt | StrictFloat | None


def invalid(message: str, param: str | None = None) -> PydanticCustomError:
    """A validation error answered with ``message`` (verbatim) naming ``param``
    (default: the field whose validator raised it)."""
    return PydanticCustomError(INVALID, "{message}", {"message": message, "param": param})


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool | None = Field(None, description="A last chunk with `usage` and no choices.")


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = Field(
        None, description="A string, null, or a list of `{\"type\": \"text\", \"text\": ...}` parts.")

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Request(_Body):
    """The fields both endpoints share."""

    model: StrictStr | None = Field(
        None, description="The served model's name, or NAME@loops=d: the model at depth d (another: 404).")
    max_tokens: PositiveInt | None = Field(
        None, description="Tokens to generate at most (default 16; chat: the rest of the context).")
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = Field(
        None, description=f"Choices per prompt, 1..{MAX_N} (each its own request; seeded: seed + choice).")
    best_of: One | None = Field(None, description="Must be 1.")
    temperature: Annotated[Number, Field(ge=0)] | None = Field(None, description="Default 0: greedy.")
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: PositiveInt | None = Field(None, description="Not in OpenAI's API (vLLM's extension).")
    seed: Annotated[StrictInt, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = Field(
        None, description="Makes sampling reproducible.")
    stream: StrictBool | None = Field(None, description="Server-Sent Events.")
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} non-empty strings; the text is cut before the first.")
    return_token_ids: StrictBool | None = Field(
        None, description="speedec's extension: the completion's (and prompt's) token ids in the answer.")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str] | None:
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and len(stop) > MAX_STOP_STRINGS:
            raise invalid(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        if stop is not None and not all(stop):
            raise invalid("stop strings must not be empty")
        return stop


class CompletionRequest(_Request):
    """The body of ``POST /v1/completions``."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "Once upon a time", "max_tokens": 32}]})

    prompt: StrictStr | list[StrictInt] | list[StrictStr | list[StrictInt]] = Field(
        description="A string, a list of token ids, or a list of these (one request per prompt and choice).")
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="Tokens to generate at most (default 16; 0 only with echo: the prompt's logprobs).")
    echo: StrictBool | None = Field(None, description="The prompt's text (and logprobs) before the completion.")
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(
        None, description=f"Each token's logprob and its top 0..{MAX_LOGPROBS} alternatives.")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: str | list) -> list[str | list[int]]:
        """Always a list of prompts (each a string or a list of token ids)."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and not all(isinstance(p, (str, list)) for p in prompt):
            raise invalid("prompt must be a string or a list of token ids")
        else:
            prompts = list(prompt)
        if not prompts:
            raise invalid("prompt is empty")
        for i, p in enumerate(prompts):
            if not p:
                raise invalid("prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty")
        return prompts

    @model_validator(mode="after")
    def _choices(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise invalid("max_tokens must be an integer >= 1, got 0", "max_tokens")
        choices = len(self.prompt) * (self.n or 1)
        if choices > MAX_CHOICES:
            raise invalid(f"{len(self.prompt)} prompts x n={self.n or 1} make {choices} choices; "
                          f"this server takes at most {MAX_CHOICES} per request", "n")
        return self


class ChatCompletionRequest(_Request):
    """The body of ``POST /v1/chat/completions``."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 32}]})

    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: StrictBool | None = Field(None, description="Each generated token's logprob.")
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(
        None, description=f"0..{MAX_LOGPROBS} alternatives per token (needs logprobs: true).")
    max_completion_tokens: PositiveInt | None = Field(None, description="OpenAI's newer name for max_tokens.")
    chat_template_kwargs: dict[str, Scalar] | None = Field(
        None, description="Variables for the chat template, e.g. {\"enable_thinking\": false}.")

    @model_validator(mode="after")
    def _top_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        return self

    @property
    def limit(self) -> int | None:
        """``max_tokens``, else ``max_completion_tokens`` (None: neither was given)."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


# ----------------------------------------------------------------------------- messages

_MESSAGES = {
    "model": "model must be a string, got {value!r}",
    "max_tokens": "max_tokens must be an integer >= 1, got {value!r}",
    "max_completion_tokens": "max_completion_tokens must be an integer >= 1, got {value!r}",
    "n": f"n must be an integer from 1 to {MAX_N}, got {{value!r}}",
    "best_of": "best_of must be 1, got {value!r}",
    "echo": "echo must be true or false, got {value!r}",
    "logprobs": f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {{value!r}}",
    "top_logprobs": f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {{value!r}}",
    "temperature": "temperature must be a finite number >= 0, got {value!r}",
    "top_p": "top_p must be a number in (0, 1], got {value!r}",
    "top_k": "top_k must be an integer >= 1, got {value!r}",
    "seed": "seed must be an integer in [-2**63, 2**64), got {value!r}",
    "stream": "stream must be true or false, got {value!r}",
    "stream_options": "stream_options must be an object, got {value!r}",
    "stop": "stop must be a string or a list of strings, got {value!r}",
    "return_token_ids": "return_token_ids must be true or false, got {value!r}",
    "prompt": "prompt must be a string or a list of token ids",
    "chat_template_kwargs": "chat_template_kwargs must be an object of strings, numbers, booleans or nulls",
}


def error_message(error: Mapping, body: Any) -> tuple[str, str | None]:
    """One line naming what is wrong, and the field (``param``), for the first error of
    a body these models refused; ``body``: the parsed JSON."""
    loc = tuple(error.get("loc") or ())
    loc = loc[1:] if loc[:1] == ("body",) else loc
    kind = error.get("type")
    ctx = error.get("ctx") or {}
    if kind == INVALID:
        return ctx["message"], ctx.get("param") or (str(loc[0]) if loc else None)
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {_json_error(ctx.get('error'), loc, body)}", None
    if not isinstance(body, dict):
        got = "null (or nothing)" if body is None else type(body).__name__
        return f"the request body must be a JSON object, got {got}", None
    if not loc:
        return f"the request body is not valid: {error.get('msg', '')}", None
    field = str(loc[0])
    if field == "messages":
        return _messages_error(loc, body.get("messages")), field
    if body.get(field) is None:  # missing or null where a value is required
        return f"{field} is required", field
    if field == "stream_options" and loc[1:2] == ("include_usage",):
        value = (body.get("stream_options") or {}).get("include_usage")
        return f"include_usage must be true or false, got {value!r}", "include_usage"
    if field == "logprobs" and "messages" in body:
        return f"logprobs must be true or false, got {body.get(field)!r}", field
    template = _MESSAGES.get(field)
    if template is None:
        where = ".".join(str(part) for part in loc)
        return f"{where}: {error.get('msg', 'is not valid')}", field
    return template.format(value=body.get(field)), field


def _json_error(reason: Any, loc: tuple, doc: Any) -> str:
    """``json``'s own wording: ``Expecting value: line 1 column 1 (char 0)``."""
    position = loc[0] if loc and isinstance(loc[0], int) else None
    if isinstance(doc, str) and position is not None:
        return str(json.JSONDecodeError(str(reason), doc, position))
    return str(reason)


def _messages_error(loc: tuple, messages: Any) -> str:
    """What is wrong with ``messages`` at ``loc`` (``("messages", index, "content", ...)``)."""
    if len(loc) < 2 or not isinstance(loc[1], int) or not isinstance(messages, list):
        return "messages must be a non-empty list of {role, content} objects"
    index = loc[1]
    if loc[2:3] == ("content",):
        content = messages[index].get("content")
        if isinstance(content, list):
            return f"messages[{index}].content: only text parts are supported"
        return f"messages[{index}].content must be a string, got {content!r}"
    return f"messages[{index}] must be an object with a string role"
