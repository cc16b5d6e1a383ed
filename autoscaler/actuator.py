"""The autoscaler's I/O shell: observe each LLMService, call the pure core, apply the decision.

Per tick and service: read the LLMService (skipped unless ``spec.autoscaling.enabled``), count its
pods per role from Kubernetes (ready / starting / draining / drained), take load and latency from a
pluggable :class:`ObservationSource` (the gateway's admin API by default), run
:func:`tandem.autoscaler.core.tick`, fit every service's decision into the global GPU budget
(:func:`~tandem.autoscaler.core.apply_budget`), then

1. mark / un-mark instances draining (pod annotations, see the contract in :mod:`.core`),
2. merge-patch the role replicas into the LLMService spec in one atomic patch: ``spec.replicas``
   (the scale subresource's path) for the primary pool, ``spec.pools.prefill.replicas`` for prefill,
3. record the decision and its reason in ``status.lastScalingDecision`` and as a Kubernetes Event,
4. export ``tandem_autoscaler_*`` metrics.

Nothing here decides anything; a failure for one service is logged, counted and does not stop
the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field

from tandem.api.labels import ANN_DRAINING, LABEL_ROLE, LABEL_SERVICE
from tandem.api.models import LLMService, Role
from tandem.api.observations import ObservationCounts, Observations, RoleObservation, build_report, merge_counts
from tandem.autoscaler.core import apply_budget, tick
from tandem.autoscaler.models import AutoscalerSpec, AutoscalerState, Decision, PoolBounds, ScalingSLO
from tandem.kube import LLMSERVICES, ApiError, Kind, KubeClient
from tandem.perf.profile import DEFAULT_PROFILE, load_profile

log = logging.getLogger("tandem.autoscaler")

PODS = Kind(group="", version="v1", plural="pods", kind="Pod")
EVENTS = Kind(group="", version="v1", plural="events", kind="Event")
ANN_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
ERROR_STAGES = ("observe", "apply")  # tandem_autoscaler_errors_total{stage}: where a tick failed
DRAINING_DELETION_COST = "-1000"  # the ReplicaSet removes the lowest cost first: exactly the drained pods


class GatewayCoverage(BaseModel):
    """Which gateway replicas a report was built from."""

    model_config = ConfigDict(extra="forbid")

    answered: int = Field(ge=0, description="replicas whose counts are in the report (one that had seen "
                                             "nothing of the service counts: it holds none of its load)")
    failed: list[str] = Field(default_factory=list, description="replicas that did not answer, and worker "
                                                                "processes of a replica that did not answer it: "
                                                                "the report lacks their share of the load")


class LoadReport(BaseModel):
    """What an observation source knows that Kubernetes does not: load, latency, in-flight work.

    ``observations.roles`` may be left empty: the actuator fills in the pod counts itself.
    ``inflight`` maps pod names to requests the gateway has sent and not seen finish; a draining
    pod with none is drained. ``gateways``: set by a source that merged several gateway replicas.
    """

    model_config = ConfigDict(extra="forbid")

    observations: Observations
    inflight: dict[str, int] = Field(default_factory=dict)
    gateways: GatewayCoverage | None = None


class ObservationSource(Protocol):
    async def report(self, namespace: str, service: str, window_s: float, now: float) -> LoadReport: ...


class ObservationUnavailable(Exception):
    """No gateway replica could report on a service: the tick for it fails (and is retried next tick)."""


class GatewayReplicas(Protocol):
    """Where the gateway replicas of a namespace's services are (base URLs, one per replica)."""

    async def urls(self, namespace: str) -> list[str]: ...


class StaticGateways:
    """A fixed list of gateway base URLs, one per replica (a Service URL would reach one random replica)."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._urls = [u.rstrip("/") for u in urls]

    async def urls(self, namespace: str) -> list[str]:
        return list(self._urls)


def parse_label_selector(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` (equality only, what :meth:`KubeClient.list` matches) as a mapping."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip().lstrip("=")
        if not sep or not key or key.endswith("!"):
            raise ValueError(f"label selector '{text}': '{part}' is not key=value (only equality is supported)")
        out[key] = value
    if not out:
        raise ValueError("label selector: empty (it would match every pod)")
    return out


def gateway_urls(pods: list[Mapping[str, Any]], port: str, scheme: str = "http") -> list[str]:
    """Base URLs of the gateway pods that can answer: running, with an address (pure).

    ``port`` is a number or the name of a container port (as a Service's ``targetPort``); a pod
    without a port of that name is left out. Terminating pods are kept: until they exit they hold
    the window's arrivals they received and the streams they still relay (an engine pod they stream
    from is not drained yet).
    """
    out = []
    for pod in pods:
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if status.get("phase") != "Running" or not ip:
            continue
        number: Any = int(port) if port.isdigit() else next(
            (p.get("containerPort") for c in (pod.get("spec") or {}).get("containers") or []
             for p in c.get("ports") or [] if p.get("name") == port), None)
        if number is None:
            log.warning("autoscaler: gateway pod %s has no port named '%s'; not asked",
                        (pod.get("metadata") or {}).get("name"), port)
            continue
        host = f"[{ip}]" if ":" in ip else ip
        out.append(f"{scheme}://{host}:{number}")
    return out


class KubernetesGateways:
    """The gateway replicas are the pods matching a label selector, each asked at its own address
    (not through the Service, which would pick one of them at random).

    ``namespace`` None: the pods are looked for in the namespace of the LLMService observed (where
    the operator puts a service's own gateway).
    """

    def __init__(self, client: KubeClient, selector: str, port: str = "http", namespace: str | None = None,
                 scheme: str = "http") -> None:
        self.client = client
        self.selector = parse_label_selector(selector)
        self.port, self.namespace, self.scheme = port, namespace, scheme

    async def urls(self, namespace: str) -> list[str]:
        return gateway_urls(await self.client.list(PODS, self.namespace or namespace, self.selector), self.port,
                            self.scheme)


def _unseen(resp: httpx.Response) -> bool:
    """A 404 by which a gateway says it has seen nothing of the service (or watches another namespace),
    as opposed to a 404 for an admin API that is off or a path that does not exist."""
    try:
        return resp.json()["error"]["param"] in ("service", "namespace")
    except (ValueError, KeyError, TypeError):
        return False


class GatewayObservationSource:
    """Every gateway replica's admin API, merged: ``GET {replica}/admin/observation-counts?namespace=
    &service=&window=&now=`` asked of each replica concurrently, the answers added up
    (:func:`~tandem.api.observations.merge_counts`) and built into one :class:`LoadReport`
    (:func:`~tandem.api.observations.build_report`, the gateway's own single-replica builder).

    Each replica sees only the requests that reached it; asking one behind a Service would size the
    pools for 1/K of the load. ``now`` sent to the replicas is this process's wall clock, so every
    replica sums the same wall-clock seconds; the report's ``time_s`` is the caller's ``now``. A
    replica that does not answer in ``timeout_s`` (or answers wrongly) is logged and left out, and
    the report says so (:attr:`LoadReport.gateways`); when none answers, :class:`ObservationUnavailable`.
    """

    def __init__(self, gateways: str | Sequence[str] | GatewayReplicas, timeout_s: float = 5.0,
                 admin_key: str | None = None, wall_clock: Callable[[], float] = time.time) -> None:
        if isinstance(gateways, str):
            gateways = [gateways]
        self.replicas: GatewayReplicas = StaticGateways(gateways) if isinstance(gateways, Sequence) else gateways
        self.timeout_s = timeout_s
        self.wall_clock = wall_clock
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else None
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers)

    async def report(self, namespace: str, service: str, window_s: float, now: float) -> LoadReport:
        urls = await self.replicas.urls(namespace)
        if not urls:
            raise ObservationUnavailable(f"no gateway replica to ask about {namespace}/{service}")
        params = {"namespace": namespace, "service": service, "window": window_s, "now": self.wall_clock()}
        answers = await asyncio.gather(*(self._counts(url, params) for url in urls))
        # a replica's worker processes that did not answer it (--workers) are named under the replica
        counts = [a.model_copy(update={"missing": [f"{url} {m}" for m in a.missing]})
                  for url, a in zip(urls, answers, strict=True) if isinstance(a, ObservationCounts)]
        failed = {url: a for url, a in zip(urls, answers, strict=True) if isinstance(a, str)}
        answered = len(urls) - len(failed)
        if not counts:
            why = "; ".join(f"{u}: {w}" for u, w in failed.items()) or "none has seen the service"
            raise ObservationUnavailable(f"no gateway replica reported on {namespace}/{service} "
                                         f"({len(urls)} asked): {why}")
        merged = merge_counts(counts)
        for what, why in [*failed.items(), *((m, "no answer from it") for m in merged.missing)]:
            log.warning("autoscaler: %s/%s: gateway %s left out of the report (%d of %d replicas answered): %s",
                        namespace, service, what, answered, len(urls), why)
        report = LoadReport.model_validate(build_report(merged, now))
        return report.model_copy(update={"gateways": GatewayCoverage(
            answered=answered, failed=[*sorted(failed), *merged.missing])})

    async def _counts(self, url: str, params: dict[str, Any]) -> ObservationCounts | str | None:
        """One replica's counts; None when it has seen nothing of the service; else why it failed."""
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self._client.get(f"{url}/admin/observation-counts", params=params)
            if resp.status_code == 404 and _unseen(resp):
                return None
            resp.raise_for_status()
            return ObservationCounts.model_validate(resp.json())
        except TimeoutError:
            return f"no answer within {self.timeout_s:g} s"
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: not JSON, or not counts
            return f"{type(exc).__name__}: {str(exc)[:300]}"

    async def close(self) -> None:
        await self._client.aclose()


def spec_from_service(svc: LLMService, defaults: AutoscalerSpec, gpu_budget: int | None = None) -> AutoscalerSpec:
    """The core's spec from an LLMService: its mode, pool bounds, GPUs per replica, SLO and cooldown."""
    pools: dict[Role, PoolBounds] = {}
    for role in svc.spec.roles():
        pool = svc.spec.pool(role)
        pools[role] = PoolBounds(
            min_replicas=pool.min_replicas if pool.min_replicas is not None else 1,
            max_replicas=pool.max_replicas if pool.max_replicas is not None
            else max(svc.spec.replicas_of(role), 64),
            gpus_per_replica=max(1, pool.resources.gpu))
    slo = svc.spec.slo
    return defaults.model_copy(update={
        "mode": str(svc.spec.mode),
        "pools": pools,
        "slo": ScalingSLO(ttft_s=slo.ttft_seconds, tpot_s=slo.tpot_seconds, attainment=min(slo.attainment, 0.999)),
        "scale_down_cooldown_s": float(svc.spec.autoscaling.cooldown_seconds),
        "gpu_budget": gpu_budget,
    })


def _ready(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _drain_started(pod: Mapping[str, Any]) -> datetime | None:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANN_DRAINING)
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)  # unreadable: treat as long draining


def count_pods(pods: list[Mapping[str, Any]], inflight: Mapping[str, int], now: datetime,
               drain_timeout_s: float) -> RoleObservation:
    """Ready / starting / draining / drained instances of one role (pure)."""
    ready = starting = draining = drained = 0
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        started = _drain_started(pod)
        if started is not None:
            idle = inflight.get(pod["metadata"]["name"], 0) == 0
            if idle or (now - started).total_seconds() >= drain_timeout_s:
                drained += 1
            else:
                draining += 1
        elif _ready(pod):
            ready += 1
        else:
            starting += 1
    return RoleObservation(ready=ready, starting=starting, draining=draining, drained=drained)


class AutoscalerMetrics:
    """The ``tandem_autoscaler_*`` series, in a registry owned by one controller."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ["namespace", "service", "role"]
        self.desired = Gauge("tandem_autoscaler_desired_replicas", "Replicas set by the last decision",
                             labels, registry=registry)
        self.target = Gauge("tandem_autoscaler_target_replicas", "Replicas the role settles at after draining",
                            labels, registry=registry)
        self.draining = Gauge("tandem_autoscaler_draining_instances", "Instances asked to drain", labels,
                              registry=registry)
        self.goodput = Gauge("tandem_autoscaler_goodput_rps", "Modelled per-instance goodput under the SLO",
                             labels, registry=registry)
        self.needed = Gauge("tandem_autoscaler_needed_replicas", "Fractional replicas the model needs at R-hat",
                            labels, registry=registry)
        self.forecast = Gauge("tandem_autoscaler_forecast_rps", "R-hat: the arrival rate pools are sized for",
                              ["namespace", "service"], registry=registry)
        self.actions = Counter("tandem_autoscaler_scaling_actions", "Changes of a role's replicas",
                               [*labels, "direction"], registry=registry)
        self.ticks = Counter("tandem_autoscaler_ticks", "Decisions taken", ["namespace", "service"],
                             registry=registry)
        self.errors = Counter("tandem_autoscaler_errors", "Ticks that failed", ["namespace", "service", "stage"],
                              registry=registry)
        self.gateway_replicas = Gauge(
            "tandem_autoscaler_gateway_replicas", "Gateway replicas asked for the last observation, by whether "
            "they answered (state: answered or failed; a failed one's share of the load is missing)",
            ["namespace", "service", "state"], registry=registry)

    def service_known(self, ns: str, name: str, roles: Iterable[str] = ()) -> None:
        """Create a service's counters at 0 when it is first seen: a counter born at 1 is invisible to
        rate() and increase(), so the first failure or scaling action would read 0 on the dashboards."""
        self.ticks.labels(ns, name)
        for stage in ERROR_STAGES:
            self.errors.labels(ns, name, stage)
        for role in roles:
            for direction in ("up", "down"):
                self.actions.labels(ns, name, role, direction)


class Actuator:
    """One controller over the LLMServices of some namespaces, holding each service's core state."""

    def __init__(self, client: KubeClient, source: ObservationSource, *, namespaces: list[str],
                 defaults: AutoscalerSpec, window_s: float = 30.0, mix_window_s: float = 300.0,
                 drain_timeout_s: float = 300.0,
                 gpu_budget: int | None = None, registry: CollectorRegistry | None = None,
                 clock=time.monotonic) -> None:
        self.client = client
        self.source = source
        self.namespaces = namespaces
        self.defaults = defaults
        self.window_s = window_s
        self.mix_window_s = mix_window_s
        self.drain_timeout_s = drain_timeout_s
        self.gpu_budget = gpu_budget
        self.metrics = AutoscalerMetrics(registry or CollectorRegistry())
        self.clock = clock
        self.states: dict[tuple[str, str], AutoscalerState] = {}

    async def _pods(self, ns: str, name: str, role: str) -> list[dict[str, Any]]:
        return await self.client.list(PODS, ns, {LABEL_SERVICE: name, LABEL_ROLE: role})

    async def _decide(self, ns: str, obj: dict[str, Any], now: float
                      ) -> tuple[LLMService, AutoscalerSpec, Observations, Decision, dict[str, list[dict]]]:
        svc = LLMService.model_validate(obj)
        name = svc.metadata.name
        spec = spec_from_service(svc, self.defaults)
        self.metrics.service_known(ns, name, spec.roles)
        report = await self.source.report(ns, name, self.window_s, now)
        if report.gateways is not None:
            self.metrics.gateway_replicas.labels(ns, name, "answered").set(report.gateways.answered)
            self.metrics.gateway_replicas.labels(ns, name, "failed").set(len(report.gateways.failed))
        if self.mix_window_s > self.window_s:
            # The length mix moves slower than the rate and a short window of it is noisy (a few
            # long requests swing it); the rate, attainment and queues stay those of the short one.
            # The short window's own mix goes along as the recent mix: the core tests it against the
            # long one for a change of mix (a shift the long window has not caught up with yet).
            longer = await self.source.report(ns, name, self.mix_window_s, now)
            short = report.observations
            report = report.model_copy(update={"observations": short.model_copy(
                update={"length_mix": longer.observations.length_mix,
                        "prefix_hit_ratio": longer.observations.prefix_hit_ratio,
                        "recent_length_mix": short.length_mix, "recent_mix_requests": short.completed})})
        wall = datetime.now(UTC)
        pods = {role: await self._pods(ns, name, role) for role in spec.roles}
        roles = {role: count_pods(pods[role], report.inflight, wall, self.drain_timeout_s)
                 .model_copy(update=_load_fields(report.observations.roles.get(role)))
                 for role in spec.roles}
        obs = report.observations.model_copy(update={"roles": roles, "time_s": now})
        profile = load_profile(svc.spec.autoscaling.profile or DEFAULT_PROFILE)
        decision = tick(obs, profile, spec, self.states.get((ns, name)))
        return svc, spec, obs, decision, pods

    async def tick_once(self) -> dict[tuple[str, str], Decision]:
        """One pass over every autoscaled service; returns the decisions it applied."""
        now = self.clock()
        planned: dict[str, tuple[LLMService, AutoscalerSpec, Observations, Decision, dict[str, list[dict]]]] = {}
        for ns in self.namespaces:
            for obj in await self.client.list(LLMSERVICES, ns):
                if not ((obj.get("spec") or {}).get("autoscaling") or {}).get("enabled"):
                    continue
                key = f"{ns}/{obj['metadata']['name']}"
                self.metrics.service_known(ns, obj["metadata"]["name"])
                try:
                    planned[key] = await self._decide(ns, obj, now)
                except (ApiError, aiohttp.ClientError, TimeoutError, httpx.HTTPError, ValueError,
                        ObservationUnavailable) as exc:
                    log.warning("autoscaler: %s: cannot decide: %s", key, exc)
                    self.metrics.errors.labels(ns, obj["metadata"]["name"], "observe").inc()
        decisions = {k: v[3] for k, v in planned.items()}
        if self.gpu_budget is not None and planned:
            decisions = apply_budget({k: (v[3], v[1], v[2]) for k, v in planned.items()}, self.gpu_budget)
        applied: dict[tuple[str, str], Decision] = {}
        for key, (svc, spec, _, _, pods) in planned.items():
            ns, name = key.split("/", 1)
            decision = decisions[key]
            try:
                await self._apply(ns, svc, spec, decision, pods)
            except (ApiError, aiohttp.ClientError, TimeoutError, httpx.HTTPError) as exc:
                log.warning("autoscaler: %s: cannot apply: %s", key, exc)
                self.metrics.errors.labels(ns, name, "apply").inc()
                continue
            self.states[(ns, name)] = decision.state
            applied[(ns, name)] = decision
        return applied

    async def _apply(self, ns: str, svc: LLMService, spec: AutoscalerSpec, decision: Decision,
                     pods: dict[str, list[dict]]) -> None:
        name = svc.metadata.name
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for role, d in decision.roles.items():
            await self._mark_draining(ns, pods[role], d.drain, stamp)
        # The primary pool (unified / decode) is sized by spec.replicas, the scale subresource's
        # field; the other role by spec.pools.<role>.replicas. One merge patch sets both, so
        # prefill and decode never move out of step.
        primary = str(svc.spec.primary_role)
        spec_patch: dict[str, Any] = {}
        changed = []
        for role, d in decision.roles.items():
            current = svc.spec.replicas_of(Role(role))
            if d.replicas != current:
                changed.append(f"{role} {current}->{d.replicas}")
                self.metrics.actions.labels(ns, name, role, "up" if d.replicas > current else "down").inc()
            if role == primary:
                spec_patch["replicas"] = d.replicas
            else:
                spec_patch.setdefault("pools", {})[role] = {"replicas": d.replicas}
            self._export(ns, name, role, d)
        patch: dict[str, Any] = {"spec": spec_patch}
        if changed:
            await self.client.merge_patch(LLMSERVICES, ns, name, patch)
        record = {"time": stamp, "reason": decision.reason[:4096], "replicas": decision.replicas}
        await self.client.merge_patch(LLMSERVICES, ns, name, {"status": {"lastScalingDecision": record}}, "status")
        if changed:
            await self._event(ns, svc, "Scaled", "; ".join(changed) + " | " + decision.reason, stamp)
        self.metrics.forecast.labels(ns, name).set(decision.forecast_rps)
        self.metrics.ticks.labels(ns, name).inc()

    def _export(self, ns: str, name: str, role: str, d: Any) -> None:
        self.metrics.desired.labels(ns, name, role).set(d.replicas)
        self.metrics.target.labels(ns, name, role).set(d.target)
        self.metrics.draining.labels(ns, name, role).set(d.drain)
        self.metrics.goodput.labels(ns, name, role).set(d.goodput_rps)
        self.metrics.needed.labels(ns, name, role).set(d.needed)

    async def _mark_draining(self, ns: str, pods: list[dict[str, Any]], want: int, stamp: str) -> None:
        """Make exactly ``want`` pods of the role carry the draining annotation."""
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        marked = [p for p in live if _drain_started(p) is not None]
        unmarked = [p for p in live if _drain_started(p) is None]
        if len(marked) > want:  # load came back: un-drain the most recently marked first
            marked.sort(key=lambda p: _drain_started(p) or datetime.min.replace(tzinfo=UTC), reverse=True)
            for pod in marked[: len(marked) - want]:
                await self.client.merge_patch(PODS, ns, pod["metadata"]["name"], {"metadata": {"annotations": {
                    ANN_DRAINING: None, ANN_DELETION_COST: None}}})
        elif len(marked) < want:  # not-ready pods first: they hold no requests
            unmarked.sort(key=lambda p: (_ready(p), p["metadata"].get("creationTimestamp") or ""), )
            for pod in unmarked[: want - len(marked)]:
                await self.client.merge_patch(PODS, ns, pod["metadata"]["name"], {"metadata": {"annotations": {
                    ANN_DRAINING: stamp, ANN_DELETION_COST: DRAINING_DELETION_COST}}})

    async def _event(self, ns: str, svc: LLMService, reason: str, message: str, stamp: str) -> None:
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{svc.metadata.name}.", "namespace": ns},
            "involvedObject": {"apiVersion": svc.api_version, "kind": "LLMService", "name": svc.metadata.name,
                               "namespace": ns, "uid": svc.metadata.uid},
            "reason": reason, "message": message[:1024], "type": "Normal",
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "source": {"component": "tandem-autoscaler"}, "reportingComponent": "tandem-autoscaler",
        }
        try:
            await self.client.create(EVENTS, ns, body)
        except ApiError as exc:  # an event is a record, not part of the decision
            log.info("autoscaler: event for %s/%s not recorded: %s", ns, svc.metadata.name, exc)

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick_once()
            except (ApiError, aiohttp.ClientError, TimeoutError, httpx.HTTPError) as exc:
                log.warning("autoscaler: tick failed: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):  # (not wait_for: it can swallow a racing cancel on 3.11)
                    await stop.wait()


def _load_fields(o: RoleObservation | None) -> dict[str, Any]:
    """The load part of a source's per-role observation (queue, concurrency, KV); pod counts come from
    Kubernetes."""
    if o is None:
        return {}
    return {"queue_depth": o.queue_depth, "queue_time_s": o.queue_time_s, "in_flight": o.in_flight,
            "kv_usage": o.kv_usage}
