"""Admin API: what the gateway knows and why it routed as it did (read-only, plus drain)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from tandem.openai_api import error_body
from tandem.router.observations import InstanceLoad, instance_loads, still_busy
from tandem.router.siblings import FORWARDED

if TYPE_CHECKING:
    from tandem.router.app import Gateway

# How far a caller's ``now`` may be from this gateway's wall clock. NTP keeps nodes within
# milliseconds; a larger gap means a monotonic time sent by mistake or an unsynchronised node, and a
# window placed by it would count the wrong seconds without saying so.
MAX_CLOCK_SKEW_S = 60.0


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


def _credentials(request: Request) -> dict[str, str]:
    """The caller's admin credentials, for a sibling worker to check again."""
    return {k: v for k in ("authorization", "x-api-key") if (v := request.headers.get(k))}


def admin_router(gw: Gateway) -> APIRouter:
    router = APIRouter(prefix="/admin")

    def denied(request: Request) -> JSONResponse | None:
        if gw.admin_mode == "open":
            return None
        if gw.admin_mode == "disabled":
            return JSONResponse(status_code=404, content=error_body(
                "the admin API is disabled (set admin_api_keys to enable it)", type_="NotFoundError"))
        auth = gw.admin_keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
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
        known = False
        for pool in gw.pools.values():
            if instance in pool.instances:
                pool.drain(instance)
                known = True
        if gw.siblings and FORWARDED not in request.headers:  # every worker of this gateway drains it
            answers = await gw.siblings.call("POST", "/admin/drain", {"instance": instance}, _credentials(request))
            failed = [str(a) if isinstance(a, Exception) else f"HTTP {a.status_code}" for a in answers
                      if isinstance(a, Exception) or a.status_code not in (200, 404)]
            if failed:
                return JSONResponse(status_code=502, content=error_body(
                    f"instance: draining on {len(failed)} of {len(answers) + 1} gateway workers not confirmed "
                    f"({'; '.join(failed)}); retry the call", type_="APIError", param="instance"))
            known = known or any(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers)
        if known:
            return {"draining": instance}
        return JSONResponse(status_code=404, content=error_body(f"instance: unknown instance '{instance}'",
                                                                param="instance"))

    def service_loads(service: str, namespace: str | None, *, own_only: bool) -> list[InstanceLoad] | JSONResponse:
        """The instances' live state for one service's report, or the 404 saying this gateway cannot
        speak for it (another namespace, or nothing of the service seen)."""
        s = gw.settings
        if s.discovery == "kubernetes" and namespace not in (None, s.k8s_namespace):
            return JSONResponse(status_code=404, content=error_body(
                f"namespace: this gateway watches namespace '{s.k8s_namespace}', not '{namespace}'", param="namespace"))
        gw.leaving = still_busy(gw.leaving)
        peers = {iid: load.inflight_requests for iid, load in gw._remote.items()} if own_only else None
        loads = instance_loads([*gw.all_instances(), *gw.leaving,
                                *(i for p in gw.pd_router.pools.values() for i in p.instances.values())],
                               time.monotonic(), peers)
        if not (gw.observer.knows(service) or any(load.service == service for load in loads)
                or (gw.discovery is not None and service in gw.discovery.pods.services())):
            return JSONResponse(status_code=404, content=error_body(
                f"service: no instance or traffic of service '{service}' seen by this gateway", param="service"))
        return loads

    @router.get("/observations")
    async def observations(request: Request, service: str = Query(min_length=1),
                           namespace: str | None = None, window: float = Query(60.0, gt=0, allow_inf_nan=False),
                           now: float | None = Query(None, allow_inf_nan=False)) -> Any:
        """The autoscaler's LoadReport (docs/autoscaler.md): the last ``window`` s of one service and
        the in-flight requests per pod; ``now`` (the caller's clock) is echoed as ``time_s``."""
        if (resp := denied(request)) is not None:
            return resp
        loads = service_loads(service, namespace, own_only=False)
        if isinstance(loads, JSONResponse):
            return loads
        return gw.observer.report(service, window, time.monotonic(), loads, time_s=now)

    @router.get("/observation-counts")
    async def observation_counts(request: Request, service: str = Query(min_length=1),
                                 namespace: str | None = None,
                                 window: float = Query(60.0, gt=0, allow_inf_nan=False),
                                 now: float | None = Query(None, allow_inf_nan=False)) -> Any:
        """This replica's share of a LoadReport, raw (``ObservationCounts``), for a caller that asks
        every replica and merges (docs/gateway.md). ``now`` is wall-clock (Unix) seconds: every replica
        asked with the same ``now`` sums the same wall-clock buckets. In-flight requests are this
        replica's own (not what shared state says of its peers), so that they add up."""
        if (resp := denied(request)) is not None:
            return resp
        wall, mono = time.time(), time.monotonic()
        if now is not None and abs(now - wall) > MAX_CLOCK_SKEW_S:
            return JSONResponse(status_code=422, content=error_body(
                f"now: {now} is {now - wall:+.1f} s from this gateway's wall clock (more than "
                f"{MAX_CLOCK_SKEW_S:g} s): not a Unix time, or the clocks are not synchronised", param="now"))
        loads = service_loads(service, namespace, own_only=True)
        if isinstance(loads, JSONResponse):
            return loads
        at = mono if now is None else now - gw.observer.clock_offset_s
        return gw.observer.counts(service, window, at, loads).model_dump(mode="json")

    return router
