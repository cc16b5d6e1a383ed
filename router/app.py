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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from tandem.openai_api import ChatCompletionRequest, CompletionRequest, describe_validation_error, error_body
from tandem.router.admin import admin_refusal, admin_router
from tandem.router.gateway import Gateway
from tandem.router.passthrough import PROBES, TOKENIZER_ROUTES, Passthrough
from tandem.router.probes import probe_router
from tandem.router.requestview import PATHS, Kind
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
        if scope["type"] == "http":
            if scope["method"] == "POST" and (kind := _FAST_PATHS.get(scope["path"])) is not None:
                response = await self.gateway.handle(Request(scope, receive), kind)
                await response(scope, receive, send)
                return
            # Under /admin, the key first: nothing is validated for a caller without it.
            if (denied := admin_refusal(self.gateway, scope)) is not None:
                await denied(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _with_header(send: Any, name: bytes, value: bytes) -> Any:
    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return sending


_FAST_PATHS: dict[str, Kind] = {path: kind for kind, path in PATHS.items()}


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

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        """The Responses API, routed as a chat (instructions and input messages key the prompt)."""
        return await gw.handle(request, "responses")

    # The engine's other routes clients and probes use: to one engine, answered as it answers.
    passthrough = Passthrough(gw)

    async def forward(request: Request) -> Response:
        return await passthrough.forward(request, request.url.path)

    routes = [(path, "GET", "from one engine") for path in PROBES] + [("/ping", "POST", "from one engine")]
    routes += [(path, "POST", "from an engine of the body's model (any without one)") for path in TOKENIZER_ROUTES]
    for path, method, where in routes:
        app.add_api_route(path, forward, methods=[method], summary=f"the engine's {path}, {where}",
                          operation_id=f"engine{path.replace('/', '_')}_{method.lower()}")

    @app.get("/v1/models")
    async def models() -> dict:
        counts: dict[str, int] = {}
        for inst in gw.all_instances():
            if not inst.removed:
                counts[inst.model] = counts.get(inst.model, 0) + 1
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "tandem",
                                            "instances": n} for m, n in sorted(counts.items())]}

    app.include_router(probe_router(gw, ready_without_instances=False))
    app.include_router(admin_router(gw), include_in_schema=settings.expose_topology)
    app.add_exception_handler(RequestValidationError, invalid_parameters)
    return app


async def invalid_parameters(request: Request, exc: Exception) -> JSONResponse:
    """A route's parameters that FastAPI refused: 422 in the OpenAI error shape, naming the field."""
    assert isinstance(exc, RequestValidationError)
    message, field = describe_validation_error(exc)
    return JSONResponse(status_code=422, content=error_body(message, param=field))
