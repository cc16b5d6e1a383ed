"""The asyncio shell around the routing core: instances, their schedulers, and release futures.

A request is submitted to its pool's :class:`~tandem.router.routing.scheduler.Scheduler`, which
queues it for an instance (late binding); the request's handler awaits a future that is resolved
when the scheduler releases it. Every event that may free budget (first token, finish, failure,
cancel) pumps ``release()`` right away; a background tick pumps it too (time-based budgets) and
runs ``rebalance()`` (hotspot migration). Everything here runs on the event loop thread, so the
scheduler, a pure object, is never touched concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tandem.blockcache import BlockCache
from tandem.kvindex import EventCacheView
from tandem.router.calibration import PrefillCalibrator
from tandem.router.discovery import Endpoint
from tandem.router.enginemetrics import EngineSnapshot
from tandem.router.metrics import GatewayMetrics
from tandem.router.observations import EngineKey, engine_hit_tokens
from tandem.router.resilience import CircuitBreaker
from tandem.router.routing.capabilities import AdaptivelyKeyed
from tandem.router.routing.types import (
    ClusterView,
    Decision,
    InstanceState,
    NoInstanceError,
    PrefillCost,
    RouteRequest,
)

log = logging.getLogger("tandem.gateway.pool")


@dataclass(slots=True)
class Instance:
    """One engine instance: where it is, what routing knows of it, and its health."""

    endpoint: Endpoint
    model: str
    state: InstanceState
    breaker: CircuitBreaker
    snapshot: EngineSnapshot | None = None
    last_scrape_ok: float = 0.0
    scrape_failures: int = 0
    suspect: bool = False
    removed: bool = False

    label: str = ""  # what clients and /metrics call it (an opaque id unless topology is exposed)
    engine_cache: BlockCache | None = None  # the observations' replica of its prefix cache, in its own blocks
    engine_block: int = 0  # the block size of that replica
    calibration: PrefillCalibrator | None = None  # the prefill factor's estimator; None: calibration is off

    def engine_hit(self, key: EngineKey | None, prompt_tokens: int, routed_hit: int, capacity_tokens: int) -> int:
        """Prompt tokens this engine will serve from its own prefix cache, as the observations count them:
        in the engine's KV blocks when its block size is known (``key``), else the routing estimate.
        The replica holds as many blocks as the engine reports (``num_gpu_blocks``), else ``capacity_tokens``."""
        if key is None:
            return routed_hit
        cache = self.engine_cache
        if cache is None or self.engine_block != key.block:
            blocks = self.snapshot.kv_blocks if self.snapshot is not None else None
            cache = self.engine_cache = BlockCache(blocks * key.block if blocks else capacity_tokens)
            self.engine_block = key.block
        return engine_hit_tokens(cache, key, prompt_tokens)

    @property
    def id(self) -> str:
        return self.endpoint.url

    def refresh_health(self, now: float) -> None:
        self.state.healthy = self.breaker.allows(now) and not self.suspect

    def describe(self) -> dict[str, Any]:
        s = self.state
        return {
            "id": self.id, "url": self.endpoint.url, "model": self.model, "role": self.endpoint.role,
            "pod": self.endpoint.name, "healthy": s.healthy, "draining": s.draining, "suspect": self.suspect,
            "breaker": self.breaker.state, "queued_requests": s.queued_requests,
            "inflight_requests": s.inflight_requests, "unprefilled_requests": s.unprefilled_requests,
            "queued_miss_tokens": s.queued_miss_tokens,
            "inflight_miss_tokens": s.inflight_miss_tokens, "queued_attn_pairs": s.queued_attn_pairs,
            "inflight_attn_pairs": s.inflight_attn_pairs, "pending_prefill_s": round(s.pending_s, 4),
            "engine_running": s.engine_running,
            "engine_waiting": s.engine_waiting, "kv_usage": s.kv_usage,
            "shadow_cache_tokens": s.shadow.tokens, "exact_cache_view": _describe_exact(s.exact),
            "prefill_s_per_token": s.prefill_s_per_token, "prefill_cost_scale": round(s.prefill_scale, 4),
            "prefill_calibration_windows": self.calibration.windows if self.calibration else None,
            "engine": self.snapshot.model_dump() if self.snapshot else None,
            "last_scrape_age_s": round(time.monotonic() - self.last_scrape_ok, 3) if self.last_scrape_ok else None,
        }


def _describe_exact(view: object) -> dict[str, Any] | None:
    """The exact view's state for /admin/instances: in sync or not, blocks indexed and on their way."""
    if not isinstance(view, EventCacheView):
        return None
    return {"live": view.live, "blocks": len(view.index), "block_size": view.index.block_size,
            "inflight_blocks": len(view.inflight), "skipped_blocks": view.index.skipped,
            "engine_blocks": view.engine_blocks, "pending_blocks": view.pending_blocks,
            "at_risk_blocks": view.at_risk_blocks()}


# Shared-state bounds on what one sync publishes: keys deeper than 16 blocks are rare in practice.
OBSERVED_DEPTH = 16
OBSERVED_CAP = 4096


class QueueFull(Exception):
    """The gateway's bounded queues are full: 429 with Retry-After."""


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[str]
    policy: str
    enqueued: float


@dataclass
class Pool:
    """One routable pool (a model's unified instances) and one scheduler per policy in use.

    Several schedulers (one per policy, for per-request policy experiments) share the same
    :class:`ClusterView`, so every scheduler's accounting shows up in the load the others see.
    """

    model: str
    default_policy: str
    make_scheduler: Callable[[str, ClusterView], Any]
    metrics: GatewayMetrics
    max_queue: int
    cluster: ClusterView = field(default_factory=ClusterView)
    instances: dict[str, Instance] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    waiters: dict[str, _Waiter] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # request id -> policy (scheduler) that holds it
    decisions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=256))
    observed: list[list[int]] = field(default_factory=list)  # paths routed since the last state sync

    def scheduler(self, policy: str) -> Any:
        sched = self.schedulers.get(policy)
        if sched is None:
            sched = self.schedulers[policy] = self.make_scheduler(policy, self.cluster)
            self.metrics.policy_known(policy, sched.policy.reasons)
        return sched

    # --- membership -------------------------------------------------------------------------

    @property
    def service(self) -> str:
        """The service the pool belongs to: its pods' ``serving.tandem.dev/service`` label, else the model."""
        first = next(iter(self.instances.values()), None)
        return (first.endpoint.service if first is not None else None) or self.model

    def add(self, inst: Instance) -> None:
        old = self.instances.get(inst.id)
        if old is not None and old.removed:
            # Back before its drain finished (the autoscaler un-drained it): keep the instance and its
            # in-flight accounting, which the requests still running will release.
            old.endpoint, old.removed, old.state.draining = inst.endpoint, False, False
            old.state.exact = inst.state.exact  # its event subscription was restarted with the new endpoint
            self._membership_changed()
            return
        self.instances[inst.id] = inst
        self.cluster.instances[inst.id] = inst.state
        self._membership_changed()

    def drain(self, instance_id: str) -> None:
        """Stop routing to an instance; it leaves once its in-flight requests are done."""
        inst = self.instances.get(instance_id)
        if inst is not None and not inst.state.draining:
            inst.state.draining = True
            inst.removed = True
            self._membership_changed()
            self.requeue(instance_id)
            self.pump()
        self.collect_drained()

    def collect_drained(self) -> None:
        for iid in [i.id for i in self.instances.values() if i.removed and i.state.inflight_requests <= 0
                    and i.state.queued_requests <= 0]:
            del self.instances[iid]
            del self.cluster.instances[iid]
            self._membership_changed()

    def _membership_changed(self) -> None:
        for sched in self.schedulers.values():
            sched.on_membership()

    def requeue(self, instance_id: str) -> None:
        """Re-route what is queued for an instance that turned unhealthy or is draining; a request
        that now fits nowhere is failed (its handler answers 503)."""
        now = time.monotonic()
        for sched in self.schedulers.values():
            for req, decision in sched.requeue(instance_id, now):
                if decision is None:
                    self.owner.pop(req.request_id, None)
                    waiter = self.waiters.pop(req.request_id, None)
                    if waiter is not None and not waiter.future.done():
                        inst = self.instances.get(instance_id)
                        waiter.future.set_exception(NoInstanceError(f"instance {inst.label if inst else ''} went away"))

    # --- request lifecycle ------------------------------------------------------------------

    def submit(self, req: RouteRequest, policy: str, exclude: Iterable[str] = ()
               ) -> tuple[Decision, asyncio.Future[str]]:
        """Queue ``req``; ``exclude`` keeps retries off instances that just failed it (unless nothing
        else is left: then the same instance is better than no instance)."""
        if len(self.waiters) >= self.max_queue:
            raise QueueFull(f"gateway queue full ({self.max_queue} waiting)")
        sched = self.scheduler(policy)
        excluded = set(exclude)
        if excluded and not any(i.id not in excluded for i in self.cluster.routable()):
            excluded = set()
        decision = sched.submit(req, time.monotonic(), exclude=excluded)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiters[req.request_id] = _Waiter(future, policy, time.monotonic())
        self.owner[req.request_id] = policy
        self.metrics.choices.labels(policy, decision.reason).inc()
        self.decisions.append({"time": time.time(), "request_id": req.request_id, "policy": policy,
                               "instance": decision.instance_id, "reason": decision.reason,
                               "candidates": list(decision.candidates), "hit_tokens": decision.hit_tokens,
                               "estimates": {k: round(v, 4) for k, v in decision.estimates.items()},
                               "cache_views": {c: self.cache_view(c, req) for c in decision.candidates},
                               "prompt_tokens": req.prompt_tokens})
        if req.block_hashes and len(self.observed) < OBSERVED_CAP:
            self.observed.append(list(req.block_hashes[:OBSERVED_DEPTH]))
        self.pump()
        return decision, future

    def cache_view(self, instance_id: str, req: RouteRequest) -> str:
        """Which view estimated the request's hit on an instance: "exact" (engine events) or "shadow"."""
        inst = self.instances.get(instance_id)
        exact = inst.state.exact if inst is not None else None
        return "exact" if exact is not None and exact.hit_tokens(req) is not None else "shadow"

    async def wait(self, request_id: str, future: asyncio.Future[str], limit_s: float) -> str:
        """Wait until the scheduler releases the request; returns the instance id."""
        try:
            async with asyncio.timeout(limit_s):  # (not wait_for: it can swallow a racing cancel on 3.11)
                return await asyncio.shield(future)
        except BaseException:
            if not future.done():
                self.cancel(request_id)
            raise

    def pump(self) -> None:
        """Release every request whose instance has budget now and wake its handler."""
        now = time.monotonic()
        for sched in self.schedulers.values():
            for req, instance_id in sched.release(now):
                waiter = self.waiters.pop(req.request_id, None)
                if waiter is None or waiter.future.done():
                    sched.cancel(req.request_id)
                    self.owner.pop(req.request_id, None)
                    continue
                inst = self.instances.get(instance_id)
                self.metrics.queue_wait.labels(inst.label if inst else "").observe(now - waiter.enqueued)
                inst = self.instances.get(instance_id)
                if inst is not None:
                    inst.breaker.on_dispatch()
                waiter.future.set_result(instance_id)

    def _sched_of(self, request_id: str) -> Any:
        policy = self.owner.get(request_id)
        return self.schedulers.get(policy) if policy else None

    def first_token(self, request_id: str) -> None:
        if (sched := self._sched_of(request_id)) is not None:
            sched.on_first_token(request_id)
            self.pump()

    def finished(self, request_id: str) -> None:
        if (sched := self._sched_of(request_id)) is not None:
            self.owner.pop(request_id, None)
            sched.on_finished(request_id)
            self.collect_drained()
            self.pump()

    def failed(self, request_id: str) -> None:
        if (sched := self._sched_of(request_id)) is not None:
            self.owner.pop(request_id, None)
            sched.on_failed(request_id)
            self.collect_drained()
            self.pump()

    def cancel(self, request_id: str) -> None:
        waiter = self.waiters.pop(request_id, None)
        if waiter is not None and not waiter.future.done():
            waiter.future.cancel()
        if (sched := self._sched_of(request_id)) is not None:
            self.owner.pop(request_id, None)
            sched.cancel(request_id)
            self.pump()

    def tick(self) -> int:
        """Periodic work: health transitions, migration, releases. Returns migrations done."""
        now = time.monotonic()
        for inst in list(self.instances.values()):
            was = inst.state.healthy
            inst.refresh_health(now)
            if was != inst.state.healthy:
                log.warning("instance %s is now %s", inst.id, "healthy" if inst.state.healthy else "unhealthy")
                if not inst.state.healthy:
                    self.requeue(inst.id)
        moved = 0
        for sched in self.schedulers.values():
            moved += len(sched.rebalance(now) or ())
        if moved:
            self.metrics.migrations.inc(moved)
        self.pump()
        return moved

    def observe_peers(self, paths: list[list[int]]) -> None:
        """Feed the requests other replicas routed to our policies' adaptive keys (shared state)."""
        keyers = [s.policy.keyer for s in self.schedulers.values() if isinstance(s.policy, AdaptivelyKeyed)]
        for path in paths:
            req = RouteRequest(request_id="peer", prompt_tokens=len(path), block_hashes=tuple(path), block_size=1,
                               arrival=0.0)
            for keyer in keyers:
                keyer.observe(req)

    def queue_lengths(self) -> dict[str, int]:
        return {iid: inst.state.queued_requests for iid, inst in self.instances.items()}


def new_instance_state(instance_id: str, prefill_s_per_token: float, cost: PrefillCost,
                       shadow_tokens: int) -> InstanceState:
    return InstanceState(id=instance_id, prefill_s_per_token=prefill_s_per_token, shadow=BlockCache(shadow_tokens),
                         cost=cost)
