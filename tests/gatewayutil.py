"""Helpers for the gateway tests: real servers on ephemeral 127.0.0.1 ports, a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
from fastapi import FastAPI

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sim_app(**kwargs: object) -> FastAPI:
    from tandem.sim.server import create_app
    from tandem.sim.settings import SimSettings

    return create_app(SimSettings(**kwargs))


@contextlib.contextmanager
def sim_process(*args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``tandem sim`` as a real subprocess (for crash tests: a crash kills only it)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "sim", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tandem sim did not start")
            time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_process(*args: str) -> subprocess.Popen:
    """``tandem <args>`` as a subprocess of the test (output discarded)."""
    return subprocess.Popen([sys.executable, "-m", "tandem.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


class RedisServer:
    """A throwaway redis-server (no persistence) on an ephemeral port."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not installed (make test installs it with apt-get)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def gateway_app(instances: list[str], **kwargs: object) -> FastAPI:
    from tandem.router.app import create_app
    from tandem.router.settings import GatewaySettings

    defaults: dict[str, object] = {"scrape_interval": 0.2, "rebalance_interval": 0.05, "state_sync_interval": 0.1}
    return create_app(GatewaySettings(instances=instances, **{**defaults, **kwargs}))


def completion_body(prompt: str = "hello world", **kw: object) -> dict:
    return {"model": "Llama-3-8B", "prompt": prompt, "max_tokens": 8, **kw}


def sse_text(raw: str) -> str:
    """Concatenated completion text of an OpenAI SSE stream (chat or completions)."""
    import json

    out = []
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)


async def until(predicate: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    """Poll ``predicate`` every 50 ms until it holds; fail the test after ``limit`` seconds."""
    end = time.monotonic() + limit
    while not await predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.05)
