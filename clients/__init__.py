"""sparsedial's Python SDK: `SparseDial` / `AsyncSparseDial` over httpx, typed with pydantic.

It needs only httpx and pydantic (no torch, transformers or fastapi), so it installs anywhere.
"""

from ._base import AsyncStream, Stream
from ._client import AsyncSparseDial, SparseDial
from ._exceptions import (
                          APIConnectionError,
                          APIError,
                          APIResponseValidationError,
                          APIStatusError,
                          APITimeoutError,
                          AuthenticationError,
                          BadRequestError,
                          InternalServerError,
                          NotFoundError,
                          PermissionDeniedError,
                          RateLimitError,
                          UnprocessableEntityError,
)

__all__ = [
                          "APIConnectionError",
                          "APIError",
                          "APIResponseValidationError",
                          "APIStatusError",
                          "APITimeoutError",
                          "AsyncSparseDial",
                          "AsyncStream",
                          "AuthenticationError",
                          "BadRequestError",
                          "InternalServerError",
                          "NotFoundError",
                          "PermissionDeniedError",
                          "RateLimitError",
                          "SparseDial",
                          "Stream",
                          "UnprocessableEntityError",
]
