"""Plain ASGI middleware (no buffering, so streams and cancellation pass through): API key, body size and
body deadline."""

from __future__ import annotations

import asyncio
import json
import secrets

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenloom.server.errors import error_body

# Paths open without a key: liveness probes, version and Prometheus scraping.
OPEN_PATHS = ("/health", "/version", "/metrics")


async def send_error(send: Send, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] = ()
                     ) -> None:
    """Send a complete OpenAI-shaped JSON error response."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Require `Authorization: Bearer <key>` on every path but the open ones."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.strip().partition(b" ")
        # the scheme is case-insensitive (RFC 7235); the key is compared in constant time
        if not (secrets.compare_digest(token.strip(), self.expected) and scheme.lower() == b"bearer"):
            message = "missing API key" if not given else "incorrect API key provided"
            return await send_error(send, 401, f"{message}: send 'Authorization: Bearer <key>'", "invalid_api_key",
                                    [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413 (by Content-Length up front, or while streaming in), a
    Content-Length that is not a number with 400, and a body not complete `timeout` seconds after its
    headers with 408. Once the body is in, `receive` passes through (it then waits for a disconnect)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 60.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.strip().isdigit():
            return await send_error(send, 400, "Content-Length must be a non-negative integer", "invalid_request")
        if length is not None and int(length) > self.max_bytes:
            return await send_error(send, 413, self._message(int(length)), "request_too_large")
        seen, done = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def limited_receive() -> Message:
            nonlocal seen, done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0))
            except TimeoutError:  # an HTTPException: FastAPI turns other errors while reading a body into 400s
                raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # a chunked body, without Content-Length
                    raise HTTPException(413, self._message(seen))
                done = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: int) -> str:
        return f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes"
