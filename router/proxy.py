"""Upstream HTTP to the engines: one pooled keep-alive client, and the 'started' boundary.

A request is *started* once the engine has sent its first body chunk (streaming) or its whole
answer (non-streaming). Everything that goes wrong before that point is an :class:`UpstreamFailure`
the gateway may retry on another instance; after it, bytes are already with the client and a
failure can only end the stream with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import Response as ASGIResponse

from tandem.openai_api import error_body
from tandem.router.http1 import HTTP1Client, HTTPConnectError, HTTPConnectionError, HTTPPoolBusy, Response
from tandem.router.observations import TokenCounter

T = TypeVar("T")

# Measured with ``tandem bench gateway`` (short streamed completions, one simulator, 2 shared cores):
# with httpx the gateway topped out near 100-170 req/s at 64 concurrent streams (its pool's
# per-request bookkeeping); with aiohttp it cost ~0.58 ms of gateway CPU per request; with the
# small keep-alive client in http1.py ~0.37 ms. httpx stays for low-rate calls (scrapes, joins).


class UpstreamFailure(Exception):
    """The engine did not start the request. ``fatal``: the instance itself looks broken
    (refused, reset, silent), which opens its circuit at once. ``summary`` says what happened without
    the engine's address (``detail``, the underlying error, may name it): what a client may be told."""

    def __init__(self, kind: str, summary: str, *, fatal: bool, status: int | None = None, detail: str = "") -> None:
        super().__init__(f"{summary}: {detail}" if detail else summary)
        self.kind, self.fatal, self.status, self.summary = kind, fatal, status, summary


@dataclass(slots=True)
class Started:
    status: int
    headers: dict[str, str]
    first: bytes  # the first body chunk (streaming) or the whole body (non-streaming)
    response: Response | None  # open streaming response; None when ``first`` is the whole body
    ends_by: float = float("inf")  # monotonic time past which a stream is cut (a trickling engine)

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
    """Timeouts: ``connect_timeout`` to open a connection; a stream's headers and first chunk within its
    first-byte budget, then at most ``stream_idle_timeout`` between two chunks and ``max_stream_s`` in
    all; a non-streamed answer within the request's own budget (its deadline)."""

    def __init__(self, *, max_connections: int, connect_timeout: float, first_byte_timeout: float,
                 stream_idle_timeout: float = 30.0, max_stream_s: float = 3600.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout, self.first_byte_timeout = connect_timeout, first_byte_timeout
        self.stream_idle_timeout, self.max_stream_s = stream_idle_timeout, max_stream_s
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
                    headers: dict[str, str] | None = None, first_byte_s: float | None = None) -> Started:
        """Send and wait for the start; ``budget_s`` bounds the whole wait (the request's deadline), and a
        stream's first byte comes within ``first_byte_s`` (default: the first-byte timeout)."""
        first_byte = self.first_byte_timeout if first_byte_s is None else first_byte_s
        read = min(first_byte, budget_s) if stream else budget_s
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        held = _Held()
        with _as_upstream_failure(held):
            response = held.response = await self.client.post(
                url, body, hdrs, connect_timeout=min(self.connect_timeout, budget_s), read_timeout=read)
            out_headers = {k: v for k, v in response.headers.items() if k in _FORWARD}
            if response.status >= 400 or not stream:
                content = await response.read()
                if response.status >= 500:
                    raise UpstreamFailure("status", f"engine answered {response.status}", fatal=False,
                                          status=response.status)
                return Started(response.status, out_headers, content, None)
            async with asyncio.timeout(read):  # the first event, however many keep-alive comments come first
                first = await response.read_chunk()
                while first and sse_comments_only(first):  # ": keep-alive" while it waits: no answer yet
                    if not (more := await response.read_chunk()):
                        break
                    first += more
            if not first or sse_comments_only(first):
                raise UpstreamFailure("empty", "engine closed the stream before the first token", fatal=True)
            response.read_timeout = self.stream_idle_timeout  # from here on: the longest silence in a stream
            return Started(response.status, out_headers, first, response, time.monotonic() + self.max_stream_s)

    async def exchange(self, method: str, url: str, body: bytes, *, budget_s: float,
                       headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One whole request and answer, whatever its status (the engine's routes besides generation:
        probes, tokenizer): (status, forwarded headers, body), or an :class:`UpstreamFailure`."""
        hdrs = {"Content-Type": "application/json", **(headers or {})} if body else dict(headers or {})
        held = _Held()
        with _as_upstream_failure(held):
            async with asyncio.timeout(budget_s):
                response = held.response = await self.client.request(
                    method, url, body, hdrs, read_timeout=budget_s,
                    connect_timeout=min(self.connect_timeout, budget_s))
                content = await response.read()
            return response.status, {k: v for k, v in response.headers.items() if k in _FORWARD}, content


@dataclass(slots=True)
class _Held:
    """The engine's response once it has one, for :func:`_as_upstream_failure` to close."""

    response: Response | None = None


@contextlib.contextmanager
def _as_upstream_failure(held: _Held) -> Iterator[None]:
    """Transport errors of one exchange with an engine as :class:`UpstreamFailure`; on any failure or
    cancellation (the client went away) the engine's response is closed, so its connection is not reused."""
    try:
        yield
    except BaseException as exc:
        if held.response is not None:
            held.response.close()
        if isinstance(exc, HTTPConnectError):
            raise UpstreamFailure("connect", "cannot connect", fatal=True, detail=str(exc)) from None
        if isinstance(exc, HTTPPoolBusy):  # our own limit: no mark against the engine, the client retries later
            raise UpstreamFailure("busy", str(exc), fatal=False) from None
        if isinstance(exc, TimeoutError):
            # Not fatal on its own: an overloaded engine is slow, not broken; repeated ones open the circuit.
            raise UpstreamFailure("timeout", "engine did not answer in time", fatal=False) from None
        if isinstance(exc, HTTPConnectionError):
            raise UpstreamFailure("protocol", "connection broke", fatal=True, detail=str(exc)) from None
        raise


def sse_comments_only(data: bytes) -> bool:
    """Whether stream bytes hold nothing but SSE comment lines (``: keep-alive``, which vLLM's
    ``--sse-keep-alive-interval`` sends while a request waits) and blank lines. Such bytes are not the
    answer's start: neither the first token's time nor the point after which a failure is not retried."""
    return all(not line.strip() or line.startswith(b":") for line in data.split(b"\n"))


async def relay(started: Started) -> AsyncIterator[bytes]:
    """The rest of a started stream, chunk by chunk as the engine sends it (no buffering)."""
    assert started.response is not None
    yield started.first
    while chunk := await started.response.read_chunk():
        yield chunk
        if time.monotonic() > started.ends_by:
            raise TimeoutError("stream longer than the longest allowed")


class ClientGone(Exception):
    """The client disconnected while its request was queued or starting."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise :class:`ClientGone`.

    ``work`` runs in the caller's task and a watcher cancels that task on disconnect (the watcher's
    cancel is told apart from any other by ``gone``): one task per call, not two plus an
    ``asyncio.wait``, on a path every request takes."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()




class RelayedStream:
    """One relayed stream and its accounting, closed exactly once however it ends."""

    def __init__(self, started: Started, finish: Callable[[str, int], None]) -> None:
        self.started, self.finish = started, finish
        self.outcome = "ok"
        self.closed = False
        self.tokens = TokenCounter()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in relay(self.started):
                self.tokens.feed(chunk)
                yield chunk
        except (ConnectionError, TimeoutError) as exc:
            self.outcome = "upstream_error"
            err = error_body(f"engine connection broke mid-stream: {type(exc).__name__}", type_="server_error")
            yield f"data: {json.dumps(err)}\n\n".encode()

    async def close(self, outcome: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        await self.started.close()  # before the first token reached the end: aborts the engine's work
        self.finish(outcome or self.outcome, self.tokens.tokens)


class RelayResponse(ASGIResponse):
    """A streamed answer written straight to the ASGI ``send``, chunk by chunk as it comes.

    Starlette's StreamingResponse does the same through an anyio task group per response; this
    keeps one watcher task that cancels the relay when the client disconnects, after which the
    stream is closed (the upstream connection too, which aborts the request on the engine).
    """

    def __init__(self, stream: RelayedStream, status_code: int, headers: dict[str, str]) -> None:
        self.stream = stream
        self.status_code = status_code
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if task is not None:
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        outcome = None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.stream.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            outcome = "client_gone"
            if not gone.is_set() or task is None:
                raise
            task.uncancel()  # our own cancellation: the client left, nothing more to do
        except OSError:  # the client's socket broke while we were writing
            outcome = "client_gone"
        finally:
            watcher.cancel()
            with anyio.CancelScope(shield=True):
                await self.stream.close(outcome)
