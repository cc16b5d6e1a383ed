"""Run an ASGI app on an ephemeral loopback port inside the current event loop.

The demo and the tests start simulated engines and gateways this way: real sockets and real HTTP,
without subprocess start-up cost, and the port is read back from the bound socket (no races).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.types import ASGIApp


@asynccontextmanager
async def serving(app: ASGIApp, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 10.0,
                  ) -> AsyncIterator[str]:
    """Serve ``app`` in this event loop while the ``async with`` block runs; yields its base URL and
    shuts it down (gracefully) on exit."""
    # A bounded graceful shutdown: a hung handler (an injected fault) must not keep the server alive.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(startup_timeout):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("server exited during start-up")
                await asyncio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()
        yield f"http://{host}:{bound[1]}"
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
