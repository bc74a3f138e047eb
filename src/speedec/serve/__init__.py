"""``speedec serve``: an OpenAI-compatible HTTP server over a batching scheduler.

:mod:`.scheduler` owns the model and steps every active request (:mod:`.requests`:
what a request is and the handle its tokens arrive through); :mod:`.app`
is the HTTP side (FastAPI); :mod:`.loadtest` measures a running server.
Importing this package imports FastAPI; the rest of speedec does not.
"""

from __future__ import annotations

from .app import ApiError, TextStream, chat_renderer, create_app, mark_draining, prometheus_text
from .requests import QueueFull, RequestHandle, RequestStats, ServeRequest, ShuttingDown
from .scheduler import Scheduler

__all__ = ["ApiError", "QueueFull", "RequestHandle", "RequestStats", "Scheduler", "ServeRequest", "ShuttingDown",
           "TextStream", "chat_renderer", "create_app", "mark_draining", "prometheus_text"]
