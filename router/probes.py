"""The probe and metrics routes of a gateway process, the same for the embedded gateway and the
endpoint picker: Kubernetes probes and Prometheus read both alike."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tandem.router.gateway import Gateway


def routable_instances(gw: Gateway) -> int:
    """Instances a request could be sent to now: the unified pools', and a disaggregated model's
    prefill instances (either pool) while a decode instance is routable."""
    routable = sum(len(p.cluster.routable()) for p in gw.pools.values())
    if any(i.state.routable for i in gw.pd["decode"].values()):
        routable += sum(1 for role in ("prefill", "remote-prefill") for i in gw.pd[role].values()
                        if i.state.routable)
    return routable


def probe_router(gw: Gateway, *, ready_without_instances: bool) -> APIRouter:
    """``/healthz``, ``/readyz`` and ``/metrics``. ``ready_without_instances``: ready while nothing is
    routable (the picker: it answers such requests with the 503 the GIE contract asks for); the
    embedded gateway is not, so that a Service sends no traffic to a gateway that can only refuse it."""
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> Response:
        routable = routable_instances(gw)
        if gw.draining or (routable == 0 and not ready_without_instances):
            why = "draining" if gw.draining else "no routable instance"
            return JSONResponse(status_code=503, content={"status": why, "routable_instances": routable})
        return JSONResponse({"status": "ready", "routable_instances": routable})

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(gw.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router
