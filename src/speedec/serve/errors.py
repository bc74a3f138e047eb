"""Every failure of the server as an OpenAI-style error body::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

:class:`ApiError` is the app's own error; :func:`error_response` is the one
exception handler, which also answers a body pydantic refused (a 400 naming the
field, where FastAPI's default is a 422 that clients do not expect) and
unknown paths or methods in the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import error_message

# What error_response answers (FastAPI's exception_handlers).
HANDLED = (StarletteHTTPException, RequestValidationError)


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


def as_api_error(request: Request, exc: Exception) -> ApiError:
    """``exc`` (an ApiError, a refused body, an HTTP error of the router) as an ApiError."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        message, param = error_message(errors[0], exc.body) if errors else ("the request is not valid", None)
        return ApiError(400, message.replace("\n", " "), param=param)
    if isinstance(exc, StarletteHTTPException):
        # Unknown paths, wrong methods, a body json could not read (not UTF-8, nested too deeply, ...).
        message = {400: "the request body could not be read as JSON (not UTF-8 text, or nested too deeply?)",
                   404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message, headers=exc.headers)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


async def error_response(request: Request, exc: Exception) -> Response:
    """The one exception handler: ``exc`` as an OpenAI-style error body."""
    return as_api_error(request, exc).response()
