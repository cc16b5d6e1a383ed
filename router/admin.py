"""Admin API: what the gateway knows and why it routed as it did (read-only, plus drain)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tandem.openai_api import error_body

if TYPE_CHECKING:
    from tandem.router.app import Gateway


def _describe_policy(sched: Any) -> dict[str, Any]:
    """Rings and adaptive keys for DualMap-like policies; the name and decision counts for all."""
    policy = sched.policy
    out: dict[str, Any] = {"policy": policy.name, "late_binding": sched.late_binding,
                           "reasons": dict(sched.reasons), "migrations": sched.migrations}
    rings = getattr(policy, "rings", None)
    if rings is not None:
        out["rings"] = {name: {"members": sorted(ring.members), "vnodes": ring.vnodes}
                        for name, ring in (("a", rings.a), ("b", rings.b))}
    keyer = getattr(policy, "keyer", None)
    if keyer is not None:
        out["expanded_prefixes"] = [str(k) for k in sorted(keyer.expanded)]
    return out


def admin_router(gw: Gateway) -> APIRouter:
    router = APIRouter(prefix="/admin")

    def denied(request: Request) -> JSONResponse | None:
        auth = gw.keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if auth.ok:
            return None
        return JSONResponse(status_code=auth.status, content=error_body(auth.message, type_="authentication_error"))

    @router.get("/instances")
    async def instances(request: Request) -> Any:
        return denied(request) or {
            "instances": [i.describe() for i in gw.all_instances()],
            "joining": sorted(gw._joining),
            "shared_members": gw.shared_members,
            "peers": gw.peers,
            "state_backend": gw.backend.name,
        }

    @router.get("/rings")
    async def rings(request: Request) -> Any:
        return denied(request) or {
            model: {policy: _describe_policy(s) for policy, s in pool.schedulers.items()}
            for model, pool in gw.pools.items()}

    @router.get("/queues")
    async def queues(request: Request) -> Any:
        return denied(request) or {
            model: {"waiting": len(pool.waiters), "per_instance": pool.queue_lengths(),
                    "queued": {policy: {iid: [r.request_id for r in s.queued(iid)] for iid in pool.instances}
                               for policy, s in pool.schedulers.items()}}
            for model, pool in gw.pools.items()}

    @router.get("/decisions")
    async def decisions(request: Request, limit: int = 50) -> Any:
        rows = [d for pool in gw.pools.values() for d in pool.decisions]
        rows.sort(key=lambda d: d["time"])
        return denied(request) or {"decisions": rows[-max(1, min(limit, 10_000)):]}

    @router.get("/offload")
    async def offload(request: Request) -> Any:
        """Per model with a remote prefill pool: the threshold, why (last solve), and the link's use."""
        return denied(request) or {
            "remote_link_gbps": gw.settings.remote_link_gbps,
            "models": {m: st.model_dump() for m, st in gw.pd_router.offload_status().items()}}

    @router.post("/drain")
    async def drain(request: Request, instance: str) -> Any:
        if (resp := denied(request)) is not None:
            return resp
        for pool in gw.pools.values():
            if instance in pool.instances:
                pool.drain(instance)
                return {"draining": instance}
        return JSONResponse(status_code=404, content=error_body(f"instance: unknown instance '{instance}'",
                                                                param="instance"))

    return router
