"""The gateway's upstream HTTP/1.1 client against real sockets (raw asyncio servers and a simulator)."""

from __future__ import annotations

import asyncio
import json

import pytest
from gatewayutil import free_port, sim_app

from tandem.router.http1 import HTTP1Client, HTTPConnectError, HTTPConnectionError
from tandem.serve import serving


async def _raw_server(handler) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/x"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


async def test_keep_alive_reuse_streaming_and_idle_close_retry() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = True
        while True:
            try:
                body = await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n")
            for part in (b"one ", b"two ", body):
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            if not first:  # the second exchange on a connection: close it while idle
                break
            first = False
        writer.close()

    server, url = await _raw_server(handler)
    client = HTTP1Client()
    try:
        for i in range(4):
            resp = await client.post(url, f"b{i}".encode(), {}, connect_timeout=1, read_timeout=1)
            assert resp.status == 200 and resp.headers["content-type"] == "text/plain"
            chunks = []
            while chunk := await resp.read_chunk():
                chunks.append(chunk)
            assert b"".join(chunks) == f"one two b{i}".encode()
            assert len(chunks) >= 2  # delivered as they came, not buffered to the end
            await asyncio.sleep(0.05)  # let the server close after every second exchange
        assert connections == 2  # reused once per connection; a closed idle one is replaced transparently
    finally:
        await client.close()
        server.close()


async def test_connect_refused_timeout_and_broken_response() -> None:
    client = HTTP1Client()
    with pytest.raises(HTTPConnectError):
        await client.post(f"http://127.0.0.1:{free_port()}/", b"{}", {}, connect_timeout=1, read_timeout=1)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)

    server, url = await _raw_server(silent)
    with pytest.raises(TimeoutError):
        await client.post(url, b"{}", {}, connect_timeout=1, read_timeout=0.2)
    server.close()

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    server, url = await _raw_server(broken)
    resp = await client.post(url, b"{}", {}, connect_timeout=1, read_timeout=1)
    assert await resp.read_chunk() == b"partial"
    with pytest.raises(HTTPConnectionError):
        await resp.read_chunk()
    server.close()
    await client.close()


async def test_against_the_simulator() -> None:
    async with serving(sim_app(port=0)) as url:
        client = HTTP1Client()
        body = b'{"model": "Llama-3-8B", "prompt": "hi", "max_tokens": 3}'
        headers = {"Content-Type": "application/json"}
        results = await asyncio.gather(*(client.post(url + "/v1/completions", body, headers, connect_timeout=1,
                                                     read_timeout=5) for _ in range(20)))
        texts = [json.loads(await r.read())["choices"][0]["text"] for r in results]
        assert all(r.status == 200 for r in results) and len(set(texts)) == 1 and texts[0]
        await client.close()
