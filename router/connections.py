"""Client connections bounded in number and in the time their request headers may take.

uvicorn bounds a connection's idle time only between two requests (its keep-alive timer, armed when
a response ends and disarmed by the next byte): a connection that sends nothing at all, or that
trickles its headers a byte at a time, stays open as long as the client likes, each holding a file
descriptor (slowloris). :func:`bounded_protocol` wraps uvicorn's HTTP protocol class (httptools or
h11) with a deadline for the headers: from the connection's opening, and from the first byte of each
later request on it, the request line and headers must be complete within ``header_timeout`` or the
connection is closed. Once the headers are in, the body is the application's to bound (admission
reads it under its own deadline, ``--body-timeout``). The headers are bounded in size too (httptools
takes any number of header bytes, h11 only bounds what arrives in pieces): past ``max_header_bytes``,
counted as they arrive (up to the blank line that ends them) and as httptools parses them, the client
gets 431 and the connection is closed. Beyond ``max_connections`` open connections in this process, a
new one is closed at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class _HeaderDeadline:
    """Mixed in before uvicorn's protocol class (which provides ``cycle``, ``loop``, ``connections``)."""

    header_timeout: float
    max_header_bytes: int
    max_connections: int
    on_close: Callable[[str], None]
    cycle: Any
    loop: asyncio.AbstractEventLoop
    connections: set[Any]
    transport: asyncio.Transport
    _deadline: asyncio.TimerHandle | None = None
    _header_bytes = 0  # bytes received of the request whose headers are not complete yet
    _parsed_header_bytes = 0  # header names and values parsed so far (httptools)
    _tail = b""  # the last bytes of the headers so far (a terminator split over two reads)
    _too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.max_connections:
            self.on_close("too_many_connections")
            transport.close()
            return
        self._deadline = self.loop.call_later(self.header_timeout, self._expire, transport)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        if before is None or before.response_complete:  # reading a request's headers
            # Measured before the parser sees them: headers arriving whole in one read never look
            # incomplete to h11's own bound.
            window = self._tail + data
            ends = [i for i in (window.find(b"\r\n\r\n"), window.find(b"\n\n")) if i >= 0]
            head = min(ends) - len(self._tail) if ends else len(data)
            if self._header_bytes + max(0, head) > self.max_header_bytes:
                self._refuse_headers()
                return
            self._tail = window[-3:]
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:  # a request's headers are complete
            self._disarm()
            self._header_bytes = self._parsed_header_bytes = 0
            self._tail = b""
        elif self.cycle is None or self.cycle.response_complete:  # still reading a request's headers
            self._header_bytes += len(data)
            if self._deadline is None:
                # The first bytes of a new request on a kept-alive connection: its headers start now.
                self._deadline = self.loop.call_later(self.header_timeout, self._expire, self.transport)

    def on_header(self, name: bytes, value: bytes) -> None:
        """httptools, per header: past the bound, parsing stops (uvicorn then calls send_400_response)."""
        self._parsed_header_bytes += len(name) + len(value) + 4
        if self._parsed_header_bytes > self.max_header_bytes:
            self._too_large = True
            raise ValueError("request headers too large")
        super().on_header(name, value)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._refuse_headers()
        else:
            super().send_400_response(msg)  # type: ignore[misc]

    def _refuse_headers(self) -> None:
        if not self.transport.is_closing():
            self.on_close("headers_too_large")
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, transport: asyncio.Transport) -> None:
        self._deadline = None
        if not transport.is_closing():
            self.on_close("header_timeout")
            transport.close()


def bounded_protocol(http: str, header_timeout: float, max_header_bytes: int, max_connections: int,
                     on_close: Callable[[str], None]) -> type[asyncio.Protocol]:
    """uvicorn's protocol class for ``http`` ("httptools" or "h11") with the bounds above."""
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    attrs = {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes, "max_connections": max_connections,
             "on_close": staticmethod(on_close)}
    return type(f"Bounded{base.__name__}", (_HeaderDeadline, base), attrs)
