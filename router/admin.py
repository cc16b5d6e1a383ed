"""Admin API: what the gateway knows and why it routed as it did (read-only, plus drain)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import Scope

from tandem.api.observations import merge_counts
from tandem.openai_api import error_body
from tandem.router.observations import ObservationCounts, build_report, instance_loads, still_busy
from tandem.router.routing.capabilities import AdaptivelyKeyed, DualRinged
from tandem.router.siblings import FORWARDED

if TYPE_CHECKING:
    from tandem.router.gateway import Gateway

# How far a caller's ``now`` may be from this gateway's wall clock. NTP keeps nodes within
# milliseconds; a larger gap means a monotonic time sent by mistake or an unsynchronised node, and a
# window placed by it would count the wrong seconds without saying so.
MAX_CLOCK_SKEW_S = 60.0


def _describe_policy(sched: Any) -> dict[str, Any]:
    """Rings and adaptive keys for DualMap-like policies; the name and decision counts for all."""
    policy = sched.policy
    out: dict[str, Any] = {"policy": policy.name, "late_binding": sched.late_binding,
                           "reasons": dict(sched.reasons), "migrations": sched.migrations}
    if isinstance(policy, DualRinged):
        rings = policy.rings
        out["rings"] = {name: {"members": sorted(ring.members), "vnodes": ring.vnodes}
                        for name, ring in (("a", rings.a), ("b", rings.b))}
    if isinstance(policy, AdaptivelyKeyed):
        out["expanded_prefixes"] = [str(k) for k in sorted(policy.keyer.expanded)]
    return out


def _credentials(request: Request) -> dict[str, str]:
    """The caller's admin credentials, for a sibling worker to check again."""
    return {k: v for k in ("authorization", "x-api-key") if (v := request.headers.get(k))}


def _said_unseen(resp: httpx.Response) -> bool:
    """A sibling's 404 saying it has seen nothing of the service."""
    try:
        return resp.status_code == 404 and resp.json()["error"]["param"] == "service"
    except (ValueError, KeyError, TypeError):
        return False


def admin_denied(gw: Gateway, authorization: str | None, x_api_key: str | None) -> JSONResponse | None:
    """The refusal of an admin call: 404 while the admin API is off, 401 without a valid admin key."""
    if gw.admin_mode == "open":
        return None
    if gw.admin_mode == "disabled":
        return JSONResponse(status_code=404, content=error_body(
            "the admin API is disabled (set admin_api_keys to enable it)", type_="NotFoundError"))
    auth = gw.admin_keys.authenticate(authorization, x_api_key)
    if auth.ok:
        return None
    return JSONResponse(status_code=auth.status, content=error_body(auth.message, type_="authentication_error"))


def admin_refusal(gw: Gateway, scope: Scope) -> JSONResponse | None:
    """For an HTTP request under /admin, :func:`admin_denied` of its credentials; None for any other
    path. Each front end's app (the HTTP gateway's, the endpoint picker's HTTP side) calls it before
    routing, so the admin API is guarded the same way wherever it is served."""
    if not scope["path"].startswith("/admin"):
        return None
    headers = Headers(scope=scope)
    return admin_denied(gw, headers.get("authorization"), headers.get("x-api-key"))


def admin_router(gw: Gateway) -> APIRouter:
    """The admin routes. Who may call them is checked before any of them runs (:func:`admin_refusal`,
    called by the app for every path under /admin), so that no parameter is validated for a caller
    without the admin key."""
    router = APIRouter(prefix="/admin")

    @router.get("/instances")
    async def instances() -> Any:
        return {
            "instances": [i.describe() for i in gw.all_instances()],
            "joining": sorted(gw._joining),
            "shared_members": gw.shared_members,
            "peers": gw.peers,
            "state_backend": gw.backend.name,
        }

    @router.get("/rings")
    async def rings() -> Any:
        return {
            model: {policy: _describe_policy(s) for policy, s in pool.schedulers.items()}
            for model, pool in gw.pools.items()}

    @router.get("/queues")
    async def queues() -> Any:
        return {
            model: {"waiting": len(pool.waiters), "per_instance": pool.queue_lengths(),
                    "queued": {policy: {iid: [r.request_id for r in s.queued(iid)] for iid in pool.instances}
                               for policy, s in pool.schedulers.items()}}
            for model, pool in gw.pools.items()}

    @router.get("/decisions")
    async def decisions(limit: int = 50) -> Any:
        rows = [d for pool in gw.pools.values() for d in pool.decisions]
        rows.sort(key=lambda d: d["time"])
        return {"decisions": rows[-max(1, min(limit, 10_000)):]}

    @router.get("/offload")
    async def offload() -> Any:
        """Per model with a remote prefill pool: the threshold, why (last solve), and the link's use."""
        return {
            "remote_link_gbps": gw.settings.remote_link_gbps,
            "models": {m: st.model_dump() for m, st in gw.pd_router.offload_status().items()}}

    @router.post("/drain")
    async def drain(request: Request, instance: str) -> Any:
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

    def unseen(service: str) -> JSONResponse:
        return JSONResponse(status_code=404, content=error_body(
            f"service: no instance or traffic of service '{service}' seen by this gateway", param="service"))

    async def sibling_counts(request: Request, service: str, namespace: str | None, window: float, wall: float
                             ) -> tuple[list[ObservationCounts], list[str]]:
        """With ``--workers``: the other workers' counts of the same wall-clock window (each answers for
        itself only), and which of them did not answer. A worker that has seen nothing of the service
        holds none of its load: neither."""
        if not gw.siblings or gw.worker is None or FORWARDED in request.headers:
            return [], []
        params = {"service": service, "window": repr(window), "now": repr(wall),
                  **({"namespace": namespace} if namespace is not None else {})}
        answers = await gw.siblings.call("GET", "/admin/observation-counts", params, _credentials(request))
        counts: list[ObservationCounts] = []
        missing: list[str] = []
        for path, answer in zip(gw.worker.sibling_sockets, answers, strict=True):
            if isinstance(answer, Exception):
                missing.append(f"worker {path.name}: {type(answer).__name__}: {answer}")
            elif _said_unseen(answer):
                continue
            elif answer.status_code != 200:
                missing.append(f"worker {path.name}: HTTP {answer.status_code}")
            else:
                try:
                    counts.append(ObservationCounts.model_validate(answer.json()))
                except ValueError as exc:
                    missing.append(f"worker {path.name}: {type(exc).__name__}")
        return counts, missing

    async def gateway_counts(request: Request, service: str, namespace: str | None, window: float,
                             wall: float | None, *, own_only: bool) -> ObservationCounts | JSONResponse:
        """This gateway's counts of one service: this process's, merged with its sibling workers'; or
        the 404 saying it cannot speak for the service (another namespace, nothing of it seen)."""
        s = gw.settings
        if s.discovery == "kubernetes" and namespace not in (None, s.k8s_namespace):
            return JSONResponse(status_code=404, content=error_body(
                f"namespace: this gateway watches namespace '{s.k8s_namespace}', not '{namespace}'", param="namespace"))
        gw.leaving = still_busy(gw.leaving)
        peers = {iid: load.inflight_requests for iid, load in gw._remote.items()} if own_only else None
        mono = time.monotonic()
        loads = instance_loads([*gw.all_instances(), *gw.leaving,
                                *(i for p in gw.pd_router.pools.values() for i in p.instances.values())], mono, peers)
        known = (gw.observer.knows(service) or any(load.service == service for load in loads)
                 or (gw.discovery is not None and service in gw.discovery.pods.services()))
        own = gw.observer.counts(service, window, mono if wall is None else wall - gw.observer.clock_offset_s, loads)
        models = {i.model for i in gw.all_instances() if (i.endpoint.service or i.model) == service}
        for model in sorted(models):  # an LLMService serves one model
            if (offload := gw.pd_router.offload_counts(model, gw._remote if own_only else None)) is not None:
                own = own.model_copy(update={"offload": offload})
                break
        others, missing = await sibling_counts(request, service, namespace, window,
                                               time.time() if wall is None else wall)
        if not (known or others):
            if missing:
                return JSONResponse(status_code=502, content=error_body(
                    f"service: not seen by the gateway workers that answered; {len(missing)} did not "
                    f"({'; '.join(missing)})", type_="APIError", param="service"))
            return unseen(service)
        merged = merge_counts([own, *others])
        return merged.model_copy(update={"missing": [*merged.missing, *missing]}) if missing else merged

    @router.get("/observations")
    async def observations(request: Request, service: str = Query(min_length=1),
                           namespace: str | None = None, window: float = Query(60.0, gt=0, allow_inf_nan=False),
                           now: float | None = Query(None, allow_inf_nan=False)) -> Any:
        """The autoscaler's LoadReport (docs/autoscaler.md): the last ``window`` s of one service and
        the in-flight requests per pod; ``now`` (the caller's clock) is echoed as ``time_s``. A gateway
        with ``--workers`` answers for all of them (with their own in-flight requests, which add up)."""
        counts = await gateway_counts(request, service, namespace, window, None, own_only=gw.siblings is not None)
        if isinstance(counts, JSONResponse):
            return counts
        report = build_report(counts, time.monotonic() if now is None else now)
        if gw.siblings is not None:  # which workers it covers
            report["gateways"] = {"answered": len(gw.siblings) + 1 - len(counts.missing), "failed": counts.missing}
        return report

    @router.get("/observation-counts")
    async def observation_counts(request: Request, service: str = Query(min_length=1),
                                 namespace: str | None = None,
                                 window: float = Query(60.0, gt=0, allow_inf_nan=False),
                                 now: float | None = Query(None, allow_inf_nan=False)) -> Any:
        """This gateway's share of a LoadReport, raw (``ObservationCounts``; with ``--workers``, all its
        workers'), for a caller that asks every replica and merges (docs/gateway.md). ``now`` is
        wall-clock (Unix) seconds: every replica asked with the same ``now`` sums the same wall-clock
        buckets. In-flight requests are this gateway's own (not what shared state says of its
        peers), so that they add up."""
        wall = time.time()
        if now is not None and abs(now - wall) > MAX_CLOCK_SKEW_S:
            return JSONResponse(status_code=422, content=error_body(
                f"now: {now} is {now - wall:+.1f} s from this gateway's wall clock (more than "
                f"{MAX_CLOCK_SKEW_S:g} s): not a Unix time, or the clocks are not synchronised", param="now"))
        counts = await gateway_counts(request, service, namespace, window, now, own_only=True)
        return counts if isinstance(counts, JSONResponse) else counts.model_dump(mode="json")

    return router
