"""Upstream HTTP to the engines: one pooled keep-alive client, and the 'started' boundary.

A request is *started* once the engine has sent its first body chunk (streaming) or its whole
answer (non-streaming). Everything that goes wrong before that point is an :class:`UpstreamFailure`
the gateway may retry on another instance; after it, bytes are already with the client and a
failure can only end the stream with an error event.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tandem.router.http1 import HTTP1Client, HTTPConnectError, HTTPConnectionError, HTTPPoolBusy, Response

# Measured with ``tandem bench gateway`` (short streamed completions, one simulator, 2 shared cores):
# with httpx the gateway topped out near 100-170 req/s at 64 concurrent streams (its pool's
# per-request bookkeeping); with aiohttp it cost ~0.58 ms of gateway CPU per request; with the
# small keep-alive client in http1.py ~0.37 ms. httpx stays for low-rate calls (scrapes, joins).


class UpstreamFailure(Exception):
    """The engine did not start the request. ``fatal``: the instance itself looks broken
    (refused, reset, silent), which opens its circuit at once."""

    def __init__(self, kind: str, message: str, *, fatal: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.fatal, self.status = kind, fatal, status


@dataclass(slots=True)
class Started:
    status: int
    headers: dict[str, str]
    first: bytes  # the first body chunk (streaming) or the whole body (non-streaming)
    response: Response | None  # open streaming response; None when ``first`` is the whole body

    async def close(self) -> None:
        """Release the connection when the body was read to its end, else drop it: a connection
        closed mid-answer is how the engine learns the client went away (it aborts the request)."""
        if self.response is not None:
            if self.response.at_eof:
                self.response.release()
            else:
                self.response.close()


_FORWARD = ("content-type", "cache-control")


class Upstream:
    def __init__(self, *, max_connections: int, connect_timeout: float, first_byte_timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout, self.first_byte_timeout = connect_timeout, first_byte_timeout
        self.max_connections = max_connections
        self.ssl_context = ssl_context
        self._client: HTTP1Client | None = None

    @property
    def client(self) -> HTTP1Client:
        if self._client is None:  # created on the serving loop
            self._client = HTTP1Client(self.max_connections, ssl_context=self.ssl_context)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def start(self, url: str, body: bytes, *, stream: bool, budget_s: float,
                    headers: dict[str, str] | None = None) -> Started:
        """Send and wait for the start; ``budget_s`` bounds the whole wait (the request's deadline)."""
        read = min(self.first_byte_timeout, budget_s) if stream else budget_s
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        response: Response | None = None
        try:
            try:
                response = await self.client.post(url, body, hdrs, connect_timeout=min(self.connect_timeout, budget_s),
                                                  read_timeout=read)
            except HTTPConnectError as exc:
                raise UpstreamFailure("connect", f"cannot connect: {exc}", fatal=True) from None
            except HTTPPoolBusy as exc:  # our own limit: no mark against the engine, the client retries later
                raise UpstreamFailure("busy", str(exc), fatal=False) from None
            out_headers = {k: v for k, v in response.headers.items() if k in _FORWARD}
            if response.status >= 400 or not stream:
                content = await response.read()
                if response.status >= 500:
                    raise UpstreamFailure("status", f"engine answered {response.status}", fatal=False,
                                          status=response.status)
                return Started(response.status, out_headers, content, None)
            first = await response.read_chunk()
            if not first:
                raise UpstreamFailure("empty", "engine closed the stream before the first token", fatal=True)
            return Started(response.status, out_headers, first, response)
        except UpstreamFailure:
            _abort(response)
            raise
        except TimeoutError:
            # Not fatal on its own: an overloaded engine is slow, not broken; repeated ones open the circuit.
            _abort(response)
            raise UpstreamFailure("timeout", "engine did not answer in time", fatal=False) from None
        except HTTPConnectionError as exc:
            _abort(response)
            raise UpstreamFailure("protocol", f"connection broke: {exc}", fatal=True) from None
        except BaseException:
            _abort(response)  # cancelled (client went away): close the upstream connection
            raise


def _abort(response: Response | None) -> None:
    if response is not None:
        response.close()


async def relay(started: Started) -> AsyncIterator[bytes]:
    """The rest of a started stream, chunk by chunk as the engine sends it (no buffering)."""
    assert started.response is not None
    yield started.first
    while chunk := await started.response.read_chunk():
        yield chunk
