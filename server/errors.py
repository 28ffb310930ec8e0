"""Errors in OpenAI's shape, and the mapping from engine exceptions to HTTP statuses.

Every non-2xx response body is `{"error": {"message", "type", "param", "code"}}`, including request
validation errors (400, as OpenAI and vLLM answer them, so `openai.BadRequestError` handlers see them),
Starlette's 404/405/413 and any unexpected exception (500, logged), so one client-side parser handles them all.
"""

from __future__ import annotations

import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sparsedial.engine.api import (
    EngineNotReadyError,
    EngineOverloadedError,
    PromptTooLongError,
    UnknownTierError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ErrorDetail, ErrorResponse, InvalidUnicodeError

log = logging.getLogger("sparsedial.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """Raised by routes; rendered as an OpenAI error body with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=_TYPES.get(self.status, "server_error"),
                             param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_ABS_DIRS = re.compile(r"(?<![\w.~])/(?:[^\s'\"/:,()]+/)+")


def public_reason(exc: BaseException) -> str:
    """An error message fit for an unauthenticated client: absolute directories cut down to the file name
    (the full message goes to the server log)."""
    if isinstance(exc, APIError):  # a setting the model does not accept: name the setting
        head, message = exc.param or "settings", exc.message
    else:
        head, message = type(exc).__name__, str(exc)
    return f"{head}: {_ABS_DIRS.sub('', message)}"


def from_engine_error(exc: Exception) -> APIError | None:
    """The HTTP error for an exception the engine raises at submit time; None for unexpected ones."""
    if isinstance(exc, UnknownTierError):
        return APIError(400, str(exc), param="sparsity", code="unknown_tier")
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, EngineOverloadedError):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": retry})
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, f"engine not ready: {exc}", code="not_ready", headers={"Retry-After": "1"})
    if isinstance(exc, ValueError):  # SamplingParams and other input checks name the bad value
        return APIError(400, str(exc), code="invalid_value")
    return None


def _field_name(loc: tuple) -> str | None:
    """The top-level field an error is about (OpenAI's `param`): `messages`, not `messages.0.content`."""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    return str(parts[0]) if parts and isinstance(parts[0], str) else None


def _field_path(loc: tuple) -> str | None:
    """Where inside the body, for the message: `messages[0].content`; pydantic's union-member tags (`str`,
    `list[int]`, `function-after[...]`) are left out."""
    out = ""
    for p in loc:
        if p in ("body", "query", "path"):
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _UNION_TAG.fullmatch(str(p)):
            out += f".{p}" if out else str(p)
    return out or None


_UNION_TAG = re.compile(r"[a-z_-]+\[.*\]|str|int|float|bool|none|list|dict|lax-or-strict|json-or-python"
                        r"|[A-Z]\w+")


def _report(request: Request, status: int) -> None:
    """Tell the app's `on_error(route, status)` hook (metrics), if it set one."""
    hook = getattr(request.app.state, "on_error", None)
    if hook is not None:
        route = request.scope.get("route")
        hook(getattr(route, "path", "unmatched"), status)


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    msgs = []
    for err in errors[:5]:
        name = _field_path(tuple(err.get("loc", ())))
        if err.get("type") == "json_invalid":
            msgs.append(f"invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
        elif err.get("type") == "extra_forbidden":
            msgs.append(f"{name}: unknown field")
        else:
            msgs.append(f"{name}: {err.get('msg')}" if name else str(err.get("msg")))
    json_error = bool(errors) and errors[0].get("type") == "json_invalid"
    param = None if json_error or not errors else _field_name(tuple(errors[0].get("loc", ())))
    cause = errors[0].get("ctx", {}).get("error") if errors else None
    if isinstance(cause, InvalidUnicodeError):  # found by a whole-body check: it knows its field
        param, msgs = cause.param, [str(cause)]
    _report(request, 400)
    return APIError(400, "; ".join(dict.fromkeys(msgs)) or "invalid request", param=param,
                    code="invalid_request").response()


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: logged with its traceback, answered as a JSON 500 (never plain text)."""
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    _report(request, 500)
    return APIError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                    code="internal_error").response()


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    _report(request, exc.status)
    return exc.response()


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    _report(request, exc.status_code)
    return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
