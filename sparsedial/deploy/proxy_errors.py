"""sparsedial's JSON errors from Ray Serve's HTTP proxy, where the replica cannot answer (docs/deploy.md,
"Failures").

When the engine replica serving a request dies (SIGKILL, OOM kill, a lost node), Serve's proxy gets a
`RayActorError` and ends the request without a response of its own: uvicorn then answers a plain-text
`500 Internal Server Error` (or, mid-stream, just closes the connection); Serve's other errors (timeouts,
backpressure, an unavailable deployment, an exception outside the replica's app) are plain-text bodies too.
The replicas' app answers every error in the OpenAI shape (server/errors.py); this ASGI middleware, which Serve
applies around its proxy app (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, read when a proxy starts, names
`middlewares` below), makes these proxy-side failures answer in the same shape:

- no response started when the proxy's app returns: `503 {"error": {..., "code": "replica_unavailable"}}`,
  `Retry-After: 1` (the replica died with the request in flight; Serve replaces it, new requests go to the
  live replicas);
- a `text/event-stream` response cut off mid-stream: a last `data: {"error": ...}` event and `data: [DONE]`,
  as the single-process server ends a stream that failed (server/routes_generate.py);
- a plain-text error response of Serve's own (status >= 400): the same status and headers, the text as the
  `message` of a JSON error body.

Responses of the replicas' app go through untouched (no buffering, one wrapper call per ASGI message). Imports
neither ray nor torch: it runs in Serve's proxy actors.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sparsedial.server.errors import APIError

log = logging.getLogger("ray.serve")

ENV_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "sparsedial.deploy.proxy_errors:middlewares"
REPLICA_GONE = ("the engine replica serving this request stopped before it answered (it died or was restarted; "
                "Ray Serve replaces it and sends new requests to the live replicas): retry the request")
_SERVE_CODES = {408: "timeout", 429: "queue_full", 500: "internal_error", 503: "not_ready"}


def replica_gone_error() -> APIError:
    return APIError(503, REPLICA_GONE, code="replica_unavailable", headers={"Retry-After": "1"})


def _header(message: dict[str, Any], name: bytes) -> bytes:
    for k, v in message.get("headers") or ():
        if bytes(k).lower() == name:
            return bytes(v)
    return b""


def _json_start(status: int, body: bytes, extra: list[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {"type": "http.response.start", "status": status, "headers": headers + list(extra)}


class ReplicaErrorMiddleware:
    """Pure ASGI middleware around Serve's proxy app (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith("/-/"):  # Serve's own health routes
            await self.app(scope, receive, send)
            return
        started = completed = sse = False
        held: dict[str, Any] | None = None  # a plain-text error start of Serve's, until its body is in
        held_body = b""

        async def wrapped(message: dict[str, Any]) -> None:
            nonlocal started, completed, sse, held, held_body
            kind = message["type"]
            if kind == "http.response.start":
                ctype = _header(message, b"content-type")
                if message["status"] >= 400 and (not ctype or ctype.startswith(b"text/plain")):
                    held = message
                    return
                started, sse = True, ctype.startswith(b"text/event-stream")
            elif kind == "http.response.body":
                if held is not None:
                    held_body += message.get("body", b"")
                    if message.get("more_body", False):
                        return
                    status = held["status"]
                    text = held_body.decode("utf-8", "replace").strip() or f"HTTP {status}"
                    err = APIError(status, f"{text} (Ray Serve)", code=_SERVE_CODES.get(status))
                    body = json.dumps(err.body()).encode()
                    keep = [(bytes(k), bytes(v)) for k, v in held.get("headers") or ()
                            if bytes(k).lower() not in (b"content-type", b"content-length")]
                    held, started, completed = None, True, True
                    await send(_json_start(status, body, keep))
                    await send({"type": "http.response.body", "body": body})
                    return
                if not message.get("more_body", False):
                    completed = True
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        except Exception:  # the proxy's own failure: answered below like a lost replica
            log.exception("sparsedial proxy middleware: the proxy app raised")
        if completed:
            return
        try:
            err = replica_gone_error()
            if not started:
                body = json.dumps(err.body()).encode()
                await send(_json_start(err.status, body, [(b"retry-after", b"1")]))
                await send({"type": "http.response.body", "body": body})
            elif sse:
                event = b"data: " + json.dumps(err.body()).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": event + b"data: [DONE]\n\n"})
            # a JSON body cut off mid-way: nothing valid to add; the connection closes (Content-Length unmet)
        except Exception as exc:  # noqa: BLE001 - the client is gone (a disconnect ends requests this way too)
            log.debug("sparsedial proxy middleware: error response not sent: %s", exc)


def middlewares() -> list:
    """Serve's HTTP proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`): the middlewares to apply."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaErrorMiddleware)]
