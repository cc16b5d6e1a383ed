"""The endpoint picker's process: a gRPC server (ext_proc + health) and a small HTTP side, one event loop.

The gateway core (:class:`~tandem.router.gateway.Gateway`) is started once and shared by the
ext_proc service and the HTTP side (``/metrics``, ``/healthz``, ``/readyz`` and the admin API with
``/admin/observations`` for the autoscaler), all on one event loop, as the routing state must be.

gRPC health checking (GIE's endpoint picker protocol): ``liveness`` is SERVING while the process
answers; ``readiness`` and ``envoy.service.ext_proc.v3.ExternalProcessor`` (and the overall ``""``)
once discovery has started and until the drain begins. A picker with no ready engine stays ready:
it answers each request 503 itself, which is the protocol's answer for that case.

Shutdown (SIGTERM/SIGINT): readiness goes NOT_SERVING and new requests get 503 (admission refuses
while draining), in-flight ones get ``drain_timeout`` to end, then the servers stop; a second
signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import grpc
import uvicorn
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from starlette.types import Receive, Scope, Send

from tandem.router.admin import admin_refusal, admin_router
from tandem.router.epp import EndpointPicker
from tandem.router.eppsettings import EppSettings
from tandem.router.gateway import Gateway
from tandem.router.probes import probe_router
from tandem.router.server import tune_gc, uvicorn_speedups

log = logging.getLogger("tandem.epp")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
READY_SERVICES = ("", "readiness", EXT_PROC_SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _PickerHttpApp(FastAPI):
    """FastAPI whose admin API is guarded as the HTTP gateway's is (:func:`admin_refusal` first)."""

    gateway: Gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (denied := admin_refusal(self.gateway, scope)) is not None:
            await denied(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def http_app(gw: Gateway) -> FastAPI:
    """The picker's HTTP side: health for Kubernetes probes, metrics, and the gateway's admin API."""
    app = _PickerHttpApp(title="tandem endpoint picker")
    app.gateway = gw
    app.state.gateway = gw

    app.include_router(probe_router(gw, ready_without_instances=True))
    app.include_router(admin_router(gw))
    return app


class _HttpServer(uvicorn.Server):
    """uvicorn without its signal handlers: the picker's own (``serve_epp``) drain both servers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EppServer:
    """The picker's servers around one gateway core, started and stopped together."""

    def __init__(self, settings: EppSettings) -> None:
        self.settings = settings
        self.gw = Gateway(settings)
        self.health = health_aio.HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.grpc_port = 0

    async def start(self) -> None:
        s = self.settings
        for service in (*READY_SERVICES, "liveness"):
            await self.health.set(service, NOT_SERVING)
        await self.health.set("liveness", SERVING)
        # One stream per request in flight, bounded like the gateway's own requests in progress.
        self.grpc = grpc.aio.server(maximum_concurrent_rpcs=s.max_active_requests + 64, options=[
            ("grpc.max_receive_message_length", s.max_body_bytes + (1 << 20)),
            ("grpc.max_send_message_length", s.max_body_bytes + (1 << 20)),
            ("grpc.max_concurrent_streams", s.max_active_requests + 64)])
        ep_grpc.add_ExternalProcessorServicer_to_server(EndpointPicker(self.gw), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.grpc_port = self.grpc.add_insecure_port(f"{s.host}:{s.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"grpc_port: cannot listen on {s.host}:{s.grpc_port}")
        await self.gw.start()
        await self.grpc.start()
        config = uvicorn.Config(http_app(self.gw), host=s.host, port=s.port, log_level=s.log_level, access_log=False,
                                lifespan="off", server_header=False, timeout_keep_alive=s.keep_alive_timeout)
        self.http = _HttpServer(config)
        self._http_task = asyncio.create_task(self.http.serve(), name="epp-http")
        for service in READY_SERVICES:
            await self.health.set(service, SERVING)
        log.info("endpoint picker: ext_proc on %s:%d, HTTP on %s:%d", s.host, self.grpc_port, s.host, s.port)

    async def drain(self) -> None:
        """Not ready any more; new requests are refused (503) while the data plane moves away."""
        self.gw.draining = True
        for service in READY_SERVICES:
            await self.health.set(service, NOT_SERVING)

    async def stop(self) -> None:
        await self.drain()
        await self.gw.stop()  # waits (bounded) for the requests in progress
        if self.grpc is not None:
            await self.grpc.stop(self.settings.grpc_grace)
        if self.http is not None:
            self.http.should_exit = True
        if self._http_task is not None:
            await asyncio.gather(self._http_task, return_exceptions=True)


async def serve_epp(settings: EppSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain (``shutdown_grace``, then ``drain_timeout``) and stop."""
    server = EppServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            raise SystemExit(1)  # a second signal: stop now
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await server.start()
    tune_gc(settings.gc_gen0_threshold)
    http_task = server._http_task
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *([http_task] if http_task else [])], return_when=asyncio.FIRST_COMPLETED)
    if http_task in done:  # the HTTP side failed to start (port taken): say why and stop
        waiter.cancel()
        await server.stop()
        http_task.result()
        raise SystemExit("tandem epp: the HTTP side stopped")
    await server.drain()
    await asyncio.sleep(settings.shutdown_grace)  # the data plane sees NOT_SERVING and moves away
    await server.stop()


def run_epp_process(settings: EppSettings) -> None:
    from tandem.router.security import ApiKeyError

    runner = "uvloop" if settings.loop == "uvloop" and "loop" in uvicorn_speedups("uvloop") else "asyncio"
    try:
        if runner == "uvloop":
            import uvloop

            uvloop.run(serve_epp(settings))
        else:
            asyncio.run(serve_epp(settings))
    except (ApiKeyError, ValueError, OSError) as exc:
        raise SystemExit(f"tandem epp: {exc}") from exc
