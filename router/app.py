"""The gateway's ASGI application: the OpenAI-compatible routes, health, metrics and admin.

Wiring only: what a request does is in :class:`tandem.router.gateway.Gateway` (state and lifecycle),
``tandem.router.admission`` (what a request must pass), ``tandem.router.unified`` and
``tandem.router.pdgateway`` (the two request paths) and ``tandem.router.proxy`` (upstream and the
relay to the client). The process around it (uvicorn, signals, the drain) is ``tandem.router.server``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tandem.openai_api import ChatCompletionRequest, CompletionRequest
from tandem.router.gateway import Gateway
from tandem.router.settings import GatewaySettings

if TYPE_CHECKING:
    from tandem.router.workers import WorkerContext


class GatewayApp(FastAPI):
    """FastAPI for everything, except the two generation endpoints, which skip the middleware
    stack and routing (they are the hot path; ``tandem bench gateway`` measures the difference)."""

    gateway: Gateway

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        header = self.gateway.worker_header
        if header is not None and scope["type"] == "http":  # which worker answered (admin reads are per worker)
            send = _with_header(send, b"x-tandem-worker", header)
        if scope["type"] == "http" and scope["method"] == "POST":
            kind = _FAST_PATHS.get(scope["path"])
            if kind is not None:
                response = await self.gateway.handle(Request(scope, receive), kind)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _with_header(send: Any, name: bytes, value: bytes) -> Any:
    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return sending


_FAST_PATHS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


def create_app(settings: GatewaySettings, worker: WorkerContext | None = None) -> FastAPI:
    gw = Gateway(settings, worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = GatewayApp(title="tandem gateway", lifespan=lifespan)
    app.gateway = gw
    app.state.gateway = gw

    # Also routed through FastAPI so they appear in the OpenAPI schema (with their body models, which
    # the schema fuzz test generates requests from); GatewayApp serves them directly and validates itself.
    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await gw.handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await gw.handle(request, "chat")

    @app.get("/v1/models")
    async def models() -> dict:
        counts: dict[str, int] = {}
        for inst in gw.all_instances():
            if not inst.removed:
                counts[inst.model] = counts.get(inst.model, 0) + 1
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "tandem",
                                            "instances": n} for m, n in sorted(counts.items())]}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        routable = sum(len(p.cluster.routable()) for p in gw.pools.values())
        if any(i.state.routable for i in gw.pd["decode"].values()):  # disaggregated: prefill (either pool) + decode
            routable += sum(1 for role in ("prefill", "remote-prefill") for i in gw.pd[role].values()
                            if i.state.routable)
        if gw.draining or routable == 0:
            why = "draining" if gw.draining else "no routable instance"
            return JSONResponse(status_code=503, content={"status": why, "routable_instances": routable})
        return JSONResponse({"status": "ready", "routable_instances": routable})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gw.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    from tandem.router.admin import admin_router

    app.include_router(admin_router(gw))
    return app
