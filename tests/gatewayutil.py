"""Helpers for the gateway tests: real servers on ephemeral 127.0.0.1 ports, a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from fastapi import FastAPI

from tandem.bench import harness
from tandem.bench.harness import Process, free_port, tandem_argv

ROOT = Path(__file__).resolve().parent.parent


def sim_app(**kwargs: object) -> FastAPI:
    from tandem.sim.server import create_app
    from tandem.sim.settings import SimSettings

    return create_app(SimSettings(**kwargs))


@contextlib.contextmanager
def sim_process(*args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``tandem sim`` as a real subprocess (for crash tests: a crash kills only it)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Process("tandem sim", tandem_argv("sim", "--port", str(port), *args), cwd=ROOT) as proc:
        proc.wait_http(url + "/health", limit_s=30)
        yield url, proc.popen


def start_process(*args: str) -> subprocess.Popen:
    """``tandem <args>`` as a subprocess of the test (output discarded)."""
    return subprocess.Popen(tandem_argv(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class RedisServer(harness.RedisServer):
    """A throwaway redis-server (no persistence) on an ephemeral port, answering PING once built;
    ``kill()`` it when done (make test installs redis-server with apt-get)."""

    def __init__(self) -> None:
        super().__init__()
        self.start()
        self.wait_ready()


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
