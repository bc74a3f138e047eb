"""A served request as the scheduler and its clients share it: what is asked
(:class:`ServeRequest`), the handle its tokens arrive through
(:class:`RequestHandle`, with its :class:`RequestStats`), where its verified
tokens stop (:class:`StopOutput`), and the errors a submission can meet
(:class:`QueueFull`, :class:`ShuttingDown`)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..engines.base import Output
from ..errors import SpeedecError
from ..sampling import SamplingParams
from .logprobs import TokenLogprob


class QueueFull(SpeedecError, RuntimeError):
    """The server's queue is full: try again later (HTTP 429)."""


class ShuttingDown(SpeedecError, RuntimeError):
    """The server is stopping and accepts no new request (HTTP 503)."""


@dataclass(frozen=True)
class ServeRequest:
    """One completion request as the scheduler sees it: token ids in, token ids out."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Token ids that end the request (emitted, then finish_reason "stop").
    stop_token_ids: frozenset[int] = frozenset()
    # Each generated token's logprob and its top ``logprobs`` alternatives (None: none).
    logprobs: int | None = None
    # The prompt's logprobs (echo), each position with its top ``prompt_logprobs``
    # alternatives (None: none). ``max_tokens`` may be 0 then (the prompt alone).
    prompt_logprobs: int | None = None
    # Loops to decode with (the model's view at that depth, ``LoopedLM.at_depth``);
    # None: all of them.
    loops: int | None = None


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    drafts_launched: int = 0
    drafts_accepted: int = 0
    # Seconds from submit to the first token; None until it exists.
    time_to_first_token_s: float | None = None
    # Steps the request took part in.
    steps: int = 0


class RequestHandle:
    """A submitted request. Its tokens arrive as the scheduler verifies them.

    * ``async for chunk in handle.stream()``: lists of new token ids, in order,
      until the request finishes (from the event loop that submitted it);
    * ``handle.result(timeout)``: blocking, the whole list (any thread);
    * ``handle.cancel()``: any thread; the scheduler frees the request's rows
      and cache at its next step (finish_reason ``"cancelled"``).

    When finished: ``finish_reason`` is ``"stop"`` (a stop token), ``"length"``
    (max_tokens), ``"cancelled"`` or ``"error"`` (``error`` holds the exception;
    the request failed alone).
    """

    def __init__(self, request: ServeRequest, loop: asyncio.AbstractEventLoop | None,
                 wake: Callable[[], None]) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.request = request
        self.tokens: list[int] = []
        # request.logprobs set: each token's TokenLogprob, filled before the token is pushed.
        self.logprobs: list[TokenLogprob] = []
        # request.prompt_logprobs set: positions 1.. of the prompt (position 0 has none).
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.stats = RequestStats(prompt_tokens=len(request.prompt_ids))
        self.submitted = time.perf_counter()
        self._loop = loop
        self._queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._cond = threading.Condition()
        self._cancel = threading.Event()
        self._wake = wake

    # ------------------------------------------------------------ the client's side
    async def stream(self) -> AsyncIterator[list[int]]:
        if self._queue is None:
            raise RuntimeError("stream() needs a request submitted with an event loop")
        while True:
            chunk = await self._queue.get()
            if chunk is None:
                return
            yield chunk

    def result(self, timeout: float | None = None) -> list[int]:
        """Wait until the request finishes; its tokens (raises its error, if it failed)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finish_reason is not None, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.tokens)

    def cancel(self) -> None:
        if self.finish_reason is None:
            self._cancel.set()
            self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # --------------------------------------------------------- the scheduler's side
    def _push(self, item: list[int] | None) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the client's event loop is closed: nobody listens
                pass

    def _deliver(self, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        if not tokens:
            return
        with self._cond:
            if logprobs is not None:
                self.logprobs.extend(logprobs)
            if self.stats.time_to_first_token_s is None:
                self.stats.time_to_first_token_s = time.perf_counter() - self.submitted
            self.tokens.extend(tokens)
            self.stats.completion_tokens = len(self.tokens)
        self._push(list(tokens))

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._cond:
            if self.finish_reason is not None:
                return
            self.error = error
            self.finish_reason = reason
            self._cond.notify_all()
        self._push(None)


class StopOutput(Output):
    """Verified tokens of a served request: stops at any of its stop tokens."""

    def __init__(self, max_new_tokens: int, stop_ids: frozenset[int]) -> None:
        super().__init__(max_new_tokens, None, None)
        self.stop_ids = stop_ids

    def emit(self, token: int) -> None:
        self.tokens.append(token)
        if token in self.stop_ids:
            self.stop_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.stop_reason = "length"
