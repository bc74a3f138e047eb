"""``speedec serve``: an OpenAI-compatible HTTP server over a batching scheduler.

:mod:`.scheduler` owns the model and steps every active request; :mod:`.app`
is the HTTP side (FastAPI); :mod:`.loadtest` measures a running server.
Importing this package imports FastAPI; the rest of speedec does not.
"""

from __future__ import annotations

from .app import ApiError, TextStream, chat_renderer, create_app, mark_draining, prometheus_text
from .scheduler import QueueFull, RequestHandle, RequestStats, Scheduler, ServeRequest, ShuttingDown

__all__ = ["ApiError", "QueueFull", "RequestHandle", "RequestStats", "Scheduler", "ServeRequest", "ShuttingDown",
           "TextStream", "chat_renderer", "create_app", "mark_draining", "prometheus_text"]
