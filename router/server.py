"""One gateway process: uvicorn around the app, garbage-collector tuning, signals and the drain.

``tandem gateway`` runs one such process, or a supervisor (``tandem.router.workers``) that runs N
of them on one port; each drains the same way on SIGTERM (:class:`DrainingServer`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import socket
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from tandem.router.connections import bounded_protocol
from tandem.router.settings import GatewaySettings

if TYPE_CHECKING:
    from tandem.router.workers import WorkerContext


def uvicorn_speedups(choice: str) -> dict[str, str]:
    """uvloop + httptools when chosen and installed (measured faster; see ``tandem bench gateway``)."""
    if choice == "asyncio":
        return {"loop": "asyncio", "http": "h11"}
    out = {}
    try:
        import uvloop  # noqa: F401

        out["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        out["http"] = "httptools"
    except ImportError:
        pass
    return out


def tune_gc(gen0_threshold: int) -> None:
    """Keep the cyclic collector off the request path.

    Everything alive at start-up (modules, the app, its routing state) lives as long as the process,
    yet every full collection walked all of it: 30-60 ms pauses of the one event loop, which every
    request in flight then waits out. Frozen, it is never scanned again; a larger generation-0
    threshold makes the young collections that remain rarer (the per-request objects are mostly freed
    by reference counting, not by the collector)."""
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT, keep listening for ``grace`` seconds while the gateway answers
    every new request 503 "shutting down" with ``Connection: close`` (and /readyz 503), so clients and
    Kubernetes move to another replica over connections the gateway itself closes; only then does
    uvicorn stop. Without this, uvicorn closes idle keep-alive connections at once and a client that
    sends on one at that moment sees a bare disconnect, not knowing whether its request was taken.
    A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, on_drain: Any, grace: float) -> None:
        super().__init__(config)
        self.on_drain, self.grace = on_drain, grace
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._timer is not None or self.grace <= 0:
            super().handle_exit(sig, frame)
            return
        self.on_drain()
        self._timer = threading.Timer(self.grace, super().handle_exit, (sig, frame))
        self._timer.daemon = True
        self._timer.start()


def run_gateway_process(settings: GatewaySettings, sockets: list[socket.socket] | None = None,
          worker: WorkerContext | None = None) -> None:
    """One gateway process: on ``settings.host:port``, or on ``sockets`` handed over by the supervisor."""
    from tandem.router.app import create_app
    from tandem.router.security import ApiKeyError

    try:
        app = create_app(settings, worker)
    except (ApiKeyError, ValueError) as exc:
        raise SystemExit(f"tandem gateway: {exc}") from exc
    # No proxy-headers middleware: nothing reads the client address behind a proxy, and it cost a
    # middleware hop on every request (tandem bench gateway).
    speedups = uvicorn_speedups(settings.loop)
    rejected = app.gateway.metrics.rejected
    protocol = bounded_protocol(speedups.pop("http", "h11"), settings.header_timeout, settings.max_header_bytes,
                                settings.max_client_connections, lambda reason: rejected.labels(reason).inc())
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, proxy_headers=False, server_header=False,
                            timeout_graceful_shutdown=int(settings.drain_timeout) or None,
                            timeout_keep_alive=settings.keep_alive_timeout, http=protocol,
                            h11_max_incomplete_event_size=settings.max_header_bytes, **speedups)

    def drain() -> None:
        app.gateway.draining = True

    tune_gc(settings.gc_gen0_threshold)
    server = DrainingServer(config, drain, settings.shutdown_grace)
    if worker is not None:
        # Signals come from the supervisor only (a terminal's Ctrl-C reaches the supervisor, which passes
        # it on once; had the worker seen it too, the second signal would skip the drain), and the kernel
        # sends SIGTERM if the supervisor dies without telling it (Linux), so the worker drains by itself.
        os.setpgrp()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != worker.supervisor_pid:  # it died before the line above
            return
    server.run(sockets)


_PR_SET_PDEATHSIG = 1
