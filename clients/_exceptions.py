"""The SDK's exception tree, by HTTP status (the shape of openai-python's `_exceptions.py`).

    APIError
    ├── APIConnectionError
    │   └── APITimeoutError
    ├── APIResponseValidationError
    └── APIStatusError (has .status_code, .response, .body)
        ├── BadRequestError           400
        ├── AuthenticationError       401
        ├── PermissionDeniedError     403
        ├── NotFoundError             404
        ├── UnprocessableEntityError  422
        ├── RateLimitError            429
        └── InternalServerError       >= 500
"""

from __future__ import annotations

from typing import Any

import httpx


class APIError(Exception):
    """Base of every SDK error. `body` is the server's `error` object when it sent one."""

    def __init__(self, message: str, *, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.body = body or {}
        self.type: str | None = self.body.get("type")
        self.param: str | None = self.body.get("param")
        self.code: str | None = self.body.get("code")


class APIConnectionError(APIError):
    """The server could not be reached (refused, reset, DNS...)."""

    def __init__(self, message: str = "connection error") -> None:
        super().__init__(message)


class APITimeoutError(APIConnectionError):
    def __init__(self, message: str = "request timed out") -> None:
        super().__init__(message)


class APIResponseValidationError(APIError):
    """The server answered 2xx with a body that does not match the expected model."""


class APIStatusError(APIError):
    """The server answered with a 4xx/5xx status."""

    status_code: int = 0

    def __init__(self, message: str, *, response: httpx.Response, body: dict[str, Any] | None = None) -> None:
        super().__init__(message, body=body)
        self.response = response
        self.status_code = response.status_code


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError):
    status_code = 404


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    pass


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    422: UnprocessableEntityError, 429: RateLimitError,
}


def error_body(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {"message": response.text or response.reason_phrase}
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data["error"]
    return {"message": str(data)}


def status_error(response: httpx.Response) -> APIStatusError:
    """The exception for a non-2xx response (the body must already be read)."""
    body = error_body(response)
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    message = f"Error code: {response.status_code} - {body.get('message', '')}"
    return cls(message, response=response, body=body)
