"""A small HTTP/1.1 client for the gateway's upstream traffic: keep-alive pool, httptools parser.

The gateway sends one kind of request (a POST with a JSON body to an engine it knows) and relays
the answer chunk by chunk, so it needs only a sliver of a general client: a per-host pool of
keep-alive connections, a response parser, and a way to read body chunks as they arrive. Built on
asyncio protocols and the same httptools parser uvicorn uses, it spends a fraction of the CPU per
request that a general client does (``tandem bench gateway`` measures it).

TLS is optional (``https://`` engine URLs with an ``ssl.SSLContext`` from the gateway's settings).
Not handled on purpose: redirects, proxies, compression, HTTP/2, 1xx responses.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import urlsplit

import httptools


class HTTPConnectionError(ConnectionError):
    """The connection failed or closed before the response was complete."""


class HTTPConnectError(Exception):
    """No connection could be opened (refused, unreachable, or not within the connect timeout)."""


class HTTPPoolBusy(Exception):
    """All of the client's connections are in use: the gateway's own limit, not the engine's fault."""


class _Connection(asyncio.Protocol):
    """One TCP connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.complete = False
        self.received_any = False
        self.error: BaseException | None = None
        self.chunks: deque[bytes] = deque()
        self.headers_done = False
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HTTPConnectionError(f"malformed response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(HTTPConnectionError(f"connection closed: {exc}" if exc else "connection closed"))

    # --- httptools callbacks ----------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # --- used by the client -----------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, limit_s: float) -> None:
        """Until the parser has news, at most ``limit_s``. One timer handle per wait rather than
        ``asyncio.wait_for``'s timeout context: this runs once per relayed chunk."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(limit_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Response:
    """A response whose headers have arrived; read the body with :meth:`read_chunk`."""

    def __init__(self, conn: _Connection, client: HTTP1Client, key: tuple[str, str, int], read_timeout: float) -> None:
        self._conn, self._client, self._key, self.read_timeout = conn, client, key, read_timeout
        self.status = conn.status
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in conn.headers}
        self._done = False

    async def read_chunk(self) -> bytes:
        """The next body bytes as they arrive; b"" once the body is complete."""
        conn = self._conn
        while True:
            if conn.chunks:
                data = b"".join(conn.chunks)
                conn.chunks.clear()
                return data
            if conn.complete:
                self.release()
                return b""
            if conn.error is not None:
                self.close()
                raise conn.error
            await conn._wait(self.read_timeout)

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Hand the connection back for reuse (only a complete, keep-alive exchange is reused)."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None:
            self._client._put(self._key, conn)
        else:
            conn.close()
        self._client._slots.release()

    def close(self) -> None:
        """Drop the connection (the engine sees the client go away and aborts the request)."""
        if self._done:
            return
        self._done = True
        self._conn.close()
        self._client._slots.release()

    @property
    def at_eof(self) -> bool:
        return self._conn.complete and not self._conn.chunks


class HTTP1Client:
    def __init__(self, max_connections: int = 1024, max_idle_per_host: int = 256,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl = ssl_context
        self._slots = asyncio.Semaphore(max_connections)
        self.max_idle_per_host = max_idle_per_host

    def _put(self, key: tuple[str, str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle_per_host:
            conn._reset()
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, key: tuple[str, str, int], limit_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        scheme, host, port = key
        tls = (self._ssl or ssl.create_default_context()) if scheme == "https" else None
        try:
            async with asyncio.timeout(limit_s):  # (not wait_for: it can swallow a racing cancel on 3.11)
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None)
        except TimeoutError:  # (an OSError too: first) its message is empty
            raise HTTPConnectError(f"{host}:{port}: no connection within {limit_s:.3g} s") from None
        except OSError as exc:  # ssl.SSLError (bad certificate) is an OSError
            raise HTTPConnectError(f"{host}:{port}: {str(exc) or type(exc).__name__}") from None
        return conn

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, connect_timeout: float,
                   read_timeout: float) -> Response:
        """Send a POST and wait for the response headers (``read_timeout`` bounds the wait)."""
        return await self.request("POST", url, body, headers, connect_timeout=connect_timeout,
                                  read_timeout=read_timeout)

    async def get(self, url: str, headers: dict[str, str], *, connect_timeout: float,
                  read_timeout: float) -> Response:
        return await self.request("GET", url, b"", headers, connect_timeout=connect_timeout,
                                  read_timeout=read_timeout)

    async def request(self, method: str, url: str, body: bytes, headers: dict[str, str], *,
                      connect_timeout: float, read_timeout: float) -> Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"only http:// and https:// URLs are supported, not {url!r}")
        key = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        if self._slots.locked():  # only then can acquiring wait (a timeout costs a timer every time)
            try:
                async with asyncio.timeout(connect_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise HTTPPoolBusy("all upstream connections are busy") from None
        else:
            await self._slots.acquire()
        try:
            conn = self._take_idle(key)
            reused = conn is not None
            while True:
                if conn is None:
                    conn = await self._connect(key, connect_timeout)
                assert conn.transport is not None
                conn.transport.write(payload)
                try:
                    while not conn.headers_done:
                        if conn.error is not None:
                            raise conn.error
                        await conn._wait(read_timeout)
                except HTTPConnectionError:
                    conn.close()
                    if reused and not conn.received_any:
                        # The engine closed this idle keep-alive connection as we reused it: once more, fresh.
                        conn, reused = None, False
                        continue
                    raise
                except BaseException:
                    conn.close()
                    raise
                return Response(conn, self, key, read_timeout)
        except BaseException:
            self._slots.release()
            raise

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
