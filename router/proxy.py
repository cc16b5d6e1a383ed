"""Upstream HTTP to the engines: one pooled keep-alive client, and the 'started' boundary.

A request is *started* once the engine has sent its first body chunk (streaming) or its whole
answer (non-streaming). Everything that goes wrong before that point is an :class:`UpstreamFailure`
the gateway may retry on another instance; after it, bytes are already with the client and a
failure can only end the stream with an error event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx


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
    response: httpx.Response | None  # open streaming response; None when ``first`` is the whole body
    rest: AsyncIterator[bytes] | None = None  # the response's raw chunk iterator, after ``first``


_FORWARD = ("content-type", "cache-control")


class Upstream:
    def __init__(self, *, max_connections: int, connect_timeout: float, first_byte_timeout: float) -> None:
        self.connect_timeout, self.first_byte_timeout = connect_timeout, first_byte_timeout
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                keepalive_expiry=30.0),
            timeout=httpx.Timeout(first_byte_timeout, connect=connect_timeout), http2=False,
            trust_env=False)  # engines are internal: no environment proxies

    async def close(self) -> None:
        await self.client.aclose()

    async def start(self, url: str, body: bytes, *, stream: bool, budget_s: float,
                    headers: dict[str, str] | None = None) -> Started:
        """Send and wait for the start; ``budget_s`` bounds the whole wait (the request's deadline)."""
        read = min(self.first_byte_timeout, budget_s) if stream else budget_s
        t = httpx.Timeout(connect=min(self.connect_timeout, budget_s), read=read, write=read,
                          pool=min(self.connect_timeout, budget_s))
        hdrs = {"content-type": "application/json", **(headers or {})}
        request = self.client.build_request("POST", url, content=body, headers=hdrs, timeout=t)
        response: httpx.Response | None = None
        try:
            response = await self.client.send(request, stream=True)
            out_headers = {k: v for k, v in response.headers.items() if k.lower() in _FORWARD}
            if response.status_code >= 500 or not stream or response.status_code >= 400:
                content = await response.aread()
                await response.aclose()
                if response.status_code >= 500:
                    raise UpstreamFailure("status", f"engine answered {response.status_code}", fatal=False,
                                          status=response.status_code)
                return Started(response.status_code, out_headers, content, None)
            chunks = response.aiter_raw()
            first = b""
            while not first:  # skip empty reads; the first non-empty chunk is the start
                first = await anext(chunks)
            return Started(response.status_code, out_headers, first, response, chunks)
        except UpstreamFailure:
            raise
        except StopAsyncIteration:
            await _close(response)
            raise UpstreamFailure("empty", "engine closed the stream before the first token", fatal=True) from None
        except httpx.ConnectError as exc:
            raise UpstreamFailure("connect", f"cannot connect: {exc}", fatal=True) from None
        except httpx.TimeoutException:
            await _close(response)
            raise UpstreamFailure("timeout", "engine did not answer in time", fatal=True) from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            await _close(response)
            raise UpstreamFailure("protocol", f"connection broke: {type(exc).__name__}", fatal=True) from None
        except BaseException:
            await _close(response)  # cancelled (client went away): close the upstream connection
            raise


async def _close(response: httpx.Response | None) -> None:
    if response is not None:
        await response.aclose()


async def relay(started: Started) -> AsyncIterator[bytes]:
    """The rest of a started stream, chunk by chunk as the engine sends it (no buffering)."""
    assert started.rest is not None
    yield started.first
    async for chunk in started.rest:
        if chunk:
            yield chunk
