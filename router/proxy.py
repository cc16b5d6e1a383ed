"""Upstream HTTP to the engines: one pooled keep-alive client, and the 'started' boundary.

A request is *started* once the engine has sent its first body chunk (streaming) or its whole
answer (non-streaming). Everything that goes wrong before that point is an :class:`UpstreamFailure`
the gateway may retry on another instance; after it, bytes are already with the client and a
failure can only end the stream with an error event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

# Measured (``tandem bench gateway``, 64 concurrent short streams against one simulator on this
# 2-core machine): httpx's pool topped out near 100-170 req/s, aiohttp's near the simulator's own
# limit, so upstream traffic goes through aiohttp; httpx stays for low-rate calls (scrapes).


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
    response: aiohttp.ClientResponse | None  # open streaming response; None when ``first`` is the whole body

    async def close(self) -> None:
        """Close the upstream connection (not back to the pool: the engine must see the abort)."""
        if self.response is not None and not self.response.closed:
            if self.response.content.at_eof():
                self.response.release()
            else:
                self.response.close()


_FORWARD = ("content-type", "cache-control")
# Failures of the connection itself, before or while reading the first chunk.
_BROKEN = (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
           aiohttp.ClientResponseError, ConnectionError)


class Upstream:
    def __init__(self, *, max_connections: int, connect_timeout: float, first_byte_timeout: float) -> None:
        self.connect_timeout, self.first_byte_timeout = connect_timeout, first_byte_timeout
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created on the serving loop
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0, keepalive_timeout=30,
                                             enable_cleanup_closed=True)
            # Engines are internal: no environment proxies; bodies are relayed as sent (no decompression).
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def start(self, url: str, body: bytes, *, stream: bool, budget_s: float,
                    headers: dict[str, str] | None = None) -> Started:
        """Send and wait for the start; ``budget_s`` bounds the whole wait (the request's deadline)."""
        read = min(self.first_byte_timeout, budget_s) if stream else budget_s
        timeout = aiohttp.ClientTimeout(total=None, connect=min(self.connect_timeout, budget_s), sock_read=read)
        hdrs = {"content-type": "application/json", **(headers or {})}
        response: aiohttp.ClientResponse | None = None
        try:
            response = await self.session.post(url, data=body, headers=hdrs, timeout=timeout)
            out_headers = {k: v for k, v in response.headers.items() if k.lower() in _FORWARD}
            if response.status >= 400 or not stream:
                content = await response.read()
                response.release()
                if response.status >= 500:
                    raise UpstreamFailure("status", f"engine answered {response.status}", fatal=False,
                                          status=response.status)
                return Started(response.status, out_headers, content, None)
            first = await response.content.readany()
            if not first:
                response.close()
                raise UpstreamFailure("empty", "engine closed the stream before the first token", fatal=True)
            return Started(response.status, out_headers, first, response)
        except UpstreamFailure:
            raise
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamFailure("connect", f"cannot connect: {exc}", fatal=True) from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            # Not fatal on its own: an overloaded engine is slow, not broken; repeated ones open the circuit.
            _abort(response)
            raise UpstreamFailure("timeout", "engine did not answer in time", fatal=False) from None
        except _BROKEN as exc:
            _abort(response)
            raise UpstreamFailure("protocol", f"connection broke: {type(exc).__name__}", fatal=True) from None
        except BaseException:
            _abort(response)  # cancelled (client went away): close the upstream connection
            raise


def _abort(response: aiohttp.ClientResponse | None) -> None:
    if response is not None:
        response.close()


async def relay(started: Started) -> AsyncIterator[bytes]:
    """The rest of a started stream, chunk by chunk as the engine sends it (no buffering)."""
    assert started.response is not None
    yield started.first
    async for chunk in started.response.content.iter_any():
        if chunk:
            yield chunk
