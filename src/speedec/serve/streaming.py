"""A submitted request's answer: text out of the scheduler's token chunks, as a whole
response or as Server-Sent Events.

Text is produced incrementally: the completion so far is decoded as a whole
and only the new suffix is sent, so tokens that are parts of one character
(byte-level BPE) print correctly; text that could be the start of a ``stop``
string is held back until it is known not to be one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..errors import SpeedecError
from ..sampling import SamplingParams
from .errors import ApiError
from .state import ServerState

logger = logging.getLogger("speedec.serve")

# How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_S = 0.5


@dataclass
class Prepared:
    """A request checked against the served model, as the scheduler and the answer need it."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool


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


class Answer:
    """One submitted request: its handle, read into a whole answer or into SSE chunks."""

    def __init__(self, state: ServerState, handle: Any, parsed: Prepared, stop_ids: frozenset[int], *,
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
