"""uvicorn's h11 protocol with the guards a public server needs and OpenAI-shaped answers where uvicorn's own
are plain text: a malformed request (a negative Content-Length, bad chunked encoding) gets a JSON 400; a
connection that has not finished its request line and headers within `header_timeout` seconds (slowloris) is
answered 408 and closed; connections past `max_connections` are answered 503 with Retry-After and closed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from tokenloom.server.errors import error_body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a header deadline, a connection cap and JSON errors (`configure` sets the limits)."""

    header_timeout: float = 30.0
    max_connections: int = 1024

    @classmethod
    def configure(cls, header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
        """A subclass with these limits (uvicorn builds the protocol from a class)."""
        return type("ConfiguredH11Protocol", (cls,), {"header_timeout": header_timeout,
                                                      "max_connections": max_connections})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._refused = False  # answered with an error: what else arrives is discarded until the close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Refuse a connection past the cap; otherwise start the clock on its first request's headers."""
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._send_error(503, "too many open connections; retry later", "server_busy",
                             [(b"retry-after", b"1")])
            return
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the header clock with the connection."""
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse as uvicorn does; once a request's headers are in, its header clock stops."""
        if self._refused:
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        """A kept-alive connection's next request gets the same header deadline."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, in OpenAI's error shape."""
        self._send_error(400, f"malformed HTTP request: {msg}", "invalid_request")

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_timed_out(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] == b"":
            self.transport.close()  # nothing sent at all: no request to answer
            return
        self._send_error(408, f"the request line and headers did not arrive within {self.header_timeout:g} s",
                         "request_timeout")

    def _send_error(self, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
        body = json.dumps(error_body(status, message, code=code)).encode()
        head = [f"HTTP/1.1 {status} {_REASONS[status]}".encode(), b"content-type: application/json",
                b"content-length: " + str(len(body)).encode(), b"connection: close",
                *(name + b": " + value for name, value in headers)]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        # Half-close and drain rather than close: closing with the client's bytes unread would reset the
        # connection, and the client might lose the answer before reading it.
        self._refused = True
        self._disarm_header_deadline()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(1.0, self.transport.close)


_REASONS = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}
