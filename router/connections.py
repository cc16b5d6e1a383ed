"""Client connections bounded in number and in the time their request headers may take.

uvicorn bounds a connection's idle time only between two requests (its keep-alive timer, armed when
a response ends and disarmed by the next byte): a connection that sends nothing at all, or that
trickles its headers a byte at a time, stays open as long as the client likes, each holding a file
descriptor (slowloris). :func:`bounded_protocol` wraps uvicorn's HTTP protocol class (httptools or
h11) with a deadline for the headers: from the connection's opening, and from the first byte of each
later request on it, the request line and headers must be complete within ``header_timeout`` or the
connection is closed. Once the headers are in, the body is the application's to bound (admission
reads it under its own deadline, ``--body-timeout``). Beyond ``max_connections`` open connections in
this process, a new one is closed at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class _HeaderDeadline:
    """Mixed in before uvicorn's protocol class (which provides ``cycle``, ``loop``, ``connections``)."""

    header_timeout: float
    max_connections: int
    on_close: Callable[[str], None]
    cycle: Any
    loop: asyncio.AbstractEventLoop
    connections: set[Any]
    transport: asyncio.Transport
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.max_connections:
            self.on_close("too_many_connections")
            transport.close()
            return
        self._deadline = self.loop.call_later(self.header_timeout, self._expire, transport)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:  # a request's headers are complete
            self._disarm()
        elif (self.cycle is None or self.cycle.response_complete) and self._deadline is None:
            # The first bytes of a new request on a kept-alive connection: its headers start now.
            self._deadline = self.loop.call_later(self.header_timeout, self._expire, self.transport)

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


def bounded_protocol(http: str, header_timeout: float, max_connections: int,
                     on_close: Callable[[str], None]) -> type[asyncio.Protocol]:
    """uvicorn's protocol class for ``http`` ("httptools" or "h11") with the bounds above."""
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    attrs = {"header_timeout": header_timeout, "max_connections": max_connections,
             "on_close": staticmethod(on_close)}
    return type(f"Bounded{base.__name__}", (_HeaderDeadline, base), attrs)
