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
    # The choice's index (prompt_index * n + choice) and its prompt's index.
    index: int = 0
    prompt_index: int = 0
    # Alternatives per token when logprobs are asked for (completions: logprobs;
    # chat: top_logprobs, 0 with logprobs: true); None: no logprobs.
    logprobs: int | None = None
    # Completions: the prompt's text (and, with logprobs, its logprobs) before the completion.
    echo: bool = False
    prompt_text: str = ""
    # The model id the request named (the answer's "model"; "": the served name) and
    # the depth it asks for (``NAME@loops=d``; None: all loops).
    model: str = ""
    loops: int | None = None


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
        # Streaming logprobs: completion tokens sent so far, and the next one's text offset.
        self._streamed = 0
        self._offset = len(parsed.prompt_text) if parsed.echo else 0
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

    # -- logprobs

    def _token_text(self, token: int) -> str:
        try:
            return self.state.tokenizer.decode([token])
        except SpeedecError:
            return ""

    def _entries(self, start: int, stop: int | None = None) -> list:
        """The TokenLogprobs of completion tokens ``start:stop`` (those the text covers)."""
        covered = len(self.text.ids)
        stop = covered if stop is None else min(stop, covered)
        return list(getattr(self.handle, "logprobs", [])[start:stop])

    def _legacy(self, entries: Sequence, offset: int, *, prompt: bool = False) -> dict:
        """OpenAI's completions shape of ``entries`` (TokenLogprobs), text offsets from
        ``offset``; ``prompt``: the echoed prompt, whose first token has no logprob."""
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        rows: list = list(entries)
        if prompt:
            first = self.parsed.prompt_ids[0]
            out["tokens"].append(self._token_text(first))
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(offset)
            offset += len(out["tokens"][-1])
        for entry in rows:
            text = self._token_text(entry.token)
            top: dict[str, float] = {}
            for t, lp in entry.top:  # best first: tokens that read alike keep the best one's logprob
                top.setdefault(self._token_text(t), lp)
            top.setdefault(text, entry.logprob)  # OpenAI: up to logprobs + 1 entries, the token's own among them
            out["tokens"].append(text)
            out["token_logprobs"].append(entry.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def _chat_logprobs(self, entries: Sequence) -> dict:
        def item(token: int, logprob: float) -> dict:
            text = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def _prefix(self) -> str:
        return self.parsed.prompt_text if self.parsed.echo else ""

    def _logprobs(self) -> dict | None:
        """The choice's logprobs (None when not asked for)."""
        if self.parsed.logprobs is None:
            return None
        if self.chat:
            return self._chat_logprobs(self._entries(0))
        body = self._legacy(self._entries(0), len(self._prefix()))
        if self.parsed.echo:
            prompt = self._legacy(getattr(self.handle, "prompt_logprobs", None) or [], 0, prompt=True)
            body = {key: prompt[key] + body[key] for key in body}
        return body

    # -- whole answers

    async def choice(self) -> dict:
        """Read the request to its end; its choice (raises ApiError when it failed)."""
        try:
            async for _ in self._chunks():
                pass
        finally:
            self.cancel()
        finish = self._finish_reason()
        index = self.parsed.index
        if self.chat:
            choice = {"index": index, "message": {"role": "assistant", "content": self.text.text},
                      "logprobs": self._logprobs(), "finish_reason": finish}
        else:
            choice = {"index": index, "text": self._prefix() + self.text.text, "logprobs": self._logprobs(),
                      "finish_reason": finish}
        if self.parsed.return_token_ids:
            choice["token_ids"] = list(self.tokens)
        return choice

    async def whole(self, request: Request) -> Response:
        return await whole([self], request)

    # -- Server-Sent Events

    def _new_logprobs(self) -> dict | None:
        """The logprobs of the tokens the text covers that no chunk has carried yet
        (None when not asked for); their concatenation is the whole answer's."""
        if self.parsed.logprobs is None:
            return None
        entries = self._entries(self._streamed)
        self._streamed += len(entries)
        if self.chat:
            return self._chat_logprobs(entries)
        body = self._legacy(entries, self._offset)
        self._offset += sum(len(t) for t in body["tokens"])
        return body

    def _echo_chunk(self) -> dict:
        """The echoed prompt as a completion chunk (with its logprobs when asked for)."""
        logprobs = None
        if self.parsed.logprobs is not None:
            logprobs = self._legacy(getattr(self.handle, "prompt_logprobs", None) or [], 0, prompt=True)
        return self._chunk(self.parsed.prompt_text, None, logprobs=logprobs)

    def _chunk(self, delta: str | None, finish: str | None, *, role: bool = False,
               logprobs: dict | None = None) -> dict:
        if self.chat:
            content: dict = {"role": "assistant", "content": ""} if role else (
                {} if delta is None else {"content": delta})
            choice = {"index": self.parsed.index, "delta": content, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": self.parsed.index, "text": delta or "", "logprobs": logprobs,
                      "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.parsed.model or self.state.model_name, "choices": [choice]}

    async def events(self) -> AsyncIterator[str]:
        """``data: {chunk}`` events, then ``data: [DONE]`` (see :func:`events`)."""
        async for event in events([self]):
            yield event

    async def choice_events(self) -> AsyncIterator[dict]:
        """This choice's chunks: (chat: the role,) (echo: the prompt,) the text deltas, the
        last chunk with its finish_reason, or an error body when the request failed."""
        if self.chat:
            yield self._chunk(None, None, role=True)
        echoed = not self.parsed.echo
        async for delta in self._chunks():
            if not echoed:  # the prompt is known processed once a token arrived
                echoed = True
                yield self._echo_chunk()
            yield self._chunk(delta, None, logprobs=self._new_logprobs())
        if not echoed:
            yield self._echo_chunk()
        try:
            finish = self._finish_reason()
        except ApiError as exc:
            yield exc.body()
            return
        final = self._chunk(None, finish, logprobs=self._new_logprobs())
        if self.parsed.return_token_ids:
            final["choices"][0]["token_ids"] = list(self.tokens)
        yield final


async def events(runs: Sequence[Answer]) -> AsyncIterator[str]:
    """The Server-Sent Events of a request's choices (``runs``, in index order): each
    chunk as ``data: {json}`` as it comes (choices interleave, each chunk names its
    ``index``), then the usage chunk when asked for and no choice failed, then
    ``data: [DONE]``. A client that goes away cancels this generator (Starlette),
    and every choice's request with it."""
    first = runs[0]
    failed = False
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(run: Answer) -> None:
        try:
            async for chunk in run.choice_events():
                await queue.put(chunk)
        except Exception as exc:  # noqa: BLE001 - reported as an error event below
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(run)) for run in runs]
    try:
        left = len(runs)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
                continue
            if isinstance(item, Exception):
                raise item
            failed = failed or "error" in item
            yield _sse(item)
        if first.parsed.include_usage and not failed:
            prompts = {run.parsed.prompt_index: len(run.parsed.prompt_ids) for run in runs}
            prompt, completion = sum(prompts.values()), sum(len(run.tokens) for run in runs)
            yield _sse({"id": first.id, "object": "chat.completion.chunk" if first.chat else "text_completion",
                        "created": first.created, "model": first.parsed.model or first.state.model_name, "choices": [],
                        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                  "total_tokens": prompt + completion}})
        yield "data: [DONE]\n\n"
    except Exception as exc:  # noqa: BLE001 - after the headers, an error can only be an event
        logger.exception("stream failed")
        yield _sse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body())
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for run in runs:
            run.cancel()


async def whole(runs: Sequence[Answer], request: Request) -> Response:
    """The one JSON answer of ``runs`` (a request's choices, in index order), read
    concurrently; a client that goes away cancels them all."""
    watcher = asyncio.create_task(_watch_disconnect(runs, request))
    try:
        choices = await asyncio.gather(*(run.choice() for run in runs))
    finally:
        watcher.cancel()
        for run in runs:
            run.cancel()
    first = runs[0]
    prompts = {run.parsed.prompt_index: len(run.parsed.prompt_ids) for run in runs}
    prompt = sum(prompts.values())
    completion = sum(len(run.tokens) for run in runs)
    body = {"id": first.id, "object": "chat.completion" if first.chat else "text_completion",
            "created": first.created, "model": first.parsed.model or first.state.model_name, "choices": list(choices),
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}
    if first.parsed.return_token_ids:
        ids: dict[int, list[int]] = {}
        for run in runs:
            ids.setdefault(run.parsed.prompt_index, list(run.parsed.prompt_ids))
        body["prompt_token_ids"] = ids[0] if len(ids) == 1 else [ids[i] for i in sorted(ids)]
    return JSONResponse(body)


async def _watch_disconnect(runs: Sequence[Answer], request: Request) -> None:
    """Cancel the requests when their client goes away (frees their rows at the next step)."""
    while not all(run.handle.done for run in runs):
        await asyncio.sleep(DISCONNECT_POLL_S)
        if await request.is_disconnected():
            for run in runs:
                run.cancel()
            return


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
