"""`BodyLimit`: request bodies larger than `max_body_bytes` get 413 in OpenAI's error shape, before parsing.

A declared Content-Length over the limit is refused at once; a chunked (undeclared) body is counted as it
arrives and refused the moment it passes the limit, so neither can make the server buffer it. (FastAPI's own
`max_body_size` answers a declared length with a plain-text 413, which clients parsing the error shape choke
on, hence this small ASGI middleware.)
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.limit = app, max_body_bytes

    def _too_large(self, size: str) -> str:
        return f"request body of {size} bytes exceeds this server's limit of {self.limit} bytes (max_body_bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await APIError(413, self._too_large(declared.decode()), code="body_too_large").response()(
                scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # an HTTPException passes FastAPI's body parsing unchanged
                    raise HTTPException(413, self._too_large(f"more than {self.limit}"))
            return message

        await self.app(scope, counted, send)
