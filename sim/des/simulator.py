"""Discrete-event replay of a trace against N simulated engines behind the routing scheduler.

Each instance is the same :class:`~tandem.sim.engine.Engine` that ``tandem sim`` serves over HTTP,
and routing goes through the same :class:`~tandem.router.routing.scheduler.Scheduler` and policy
objects as the live gateway, updated with the same accounting: uncached tokens are queued at
submit, in flight at release, cleared at the first token; engine metrics (running, waiting, KV
usage) reach the routing view only at scrape instants, as they would over ``/metrics``.

Events: trace arrivals (a sorted cursor, not heap items), engine iteration ends (one per planned
iteration or coalesced decode run, never per token), scheduler ticks (rebalance + release, only
while requests wait in the gateway) and metric scrapes. Simultaneous events run in the order they
were scheduled, so a run is a pure function of (trace, policy, configs): no clock, no randomness
other than the seeded ring layout.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandem.blockcache import BlockCache
from tandem.perf.costmodel import CostModel
from tandem.perf.profile import load_profile
from tandem.prefix import chain_hashes
from tandem.router.routing.config import RoutingConfig
from tandem.router.routing.registry import make_policy
from tandem.router.routing.scheduler import QueueFullError, Scheduler
from tandem.router.routing.types import (
    ClusterView,
    InstanceState,
    NoInstanceError,
    PrefillCost,
    RouteRequest,
    RoutingPolicy,
)
from tandem.sim.des.cacheview import EngineCacheView
from tandem.sim.engine import Engine, EngineLimits, SimRequest
from tandem.traces import TraceRequest

_ENGINE, _TICK, _SCRAPE = 0, 1, 2


class DESConfig(BaseModel):
    """The simulated cluster and the gateway's timing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instances: int = Field(8, ge=1, le=100_000, description="number of engine instances")
    profile: str = Field("llama3-8b-h100", description="performance profile of every instance")
    profiles: list[str] | None = Field(None, description="one profile per instance (heterogeneous pool); "
                                       "overrides `profile`, its length must equal `instances`")
    kv_capacity_tokens: int | None = Field(None, gt=0, description="override the profile's KV capacity")
    host_cache_tokens: int = Field(0, ge=0, description="host-memory KV tier per instance in tokens (0: none); "
                                   "the routing shadow caches hold GPU + host tokens")
    host_link_gbytes_s: float = Field(25.0, gt=0, description="host-to-GPU KV load bandwidth in GB/s")
    cache_view: Literal["shadow", "exact"] = Field("shadow", description="routing's hit estimate: 'shadow' (what "
                                                   "it routed, LRU-bounded) or 'exact' (the engine's own cache, "
                                                   "as its KV-cache events tell a gateway)")
    scrape_interval_s: float = Field(0.5, gt=0, description="engine metrics reach the routing view this often")
    tick_s: float = Field(0.1, gt=0, description="scheduler tick (rebalance + release) while requests wait")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds the ring layout (the only randomness)")

    @model_validator(mode="after")
    def _profiles(self) -> DESConfig:
        if self.profiles is not None and len(self.profiles) != self.instances:
            raise ValueError(f"profiles has {len(self.profiles)} entries, instances is {self.instances}")
        return self

    def profile_of(self, i: int) -> str:
        return self.profiles[i] if self.profiles is not None else self.profile


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A trace request in both shapes: what routing sees and what the engine needs."""

    index: int
    arrival: float
    route_hashes: tuple[int, ...]  # full blocks only
    engine_hashes: tuple[int, ...]  # every block, the partial tail too (its size is the remainder)
    input_tokens: int
    output_tokens: int
    block_size: int
    fallback_key: int


def prepare(trace: Sequence[TraceRequest]) -> list[PreparedRequest]:
    """Chain the trace's block ids once, so repeated runs (a QPS sweep) do not redo it."""
    out: list[PreparedRequest] = []
    for i, r in enumerate(trace):
        chained = tuple(chain_hashes(r.hash_ids)) if r.hash_ids else ()
        full = min(len(chained), r.input_tokens // r.block_size)
        fallback = chained[-1] if chained else r.input_tokens
        out.append(PreparedRequest(i, r.arrival, chained[:full], chained, r.input_tokens, r.output_tokens,
                                   r.block_size, fallback))
    return out


def with_arrivals(reqs: Sequence[PreparedRequest], arrivals: Sequence[float]) -> list[PreparedRequest]:
    """The same requests at other arrival times (e.g. ``rescale_to_qps`` of the trace)."""
    return [PreparedRequest(r.index, a, r.route_hashes, r.engine_hashes, r.input_tokens, r.output_tokens,
                            r.block_size, r.fallback_key) for r, a in zip(reqs, arrivals, strict=True)]


@dataclass(slots=True)
class RequestTiming:
    """When one replayed request got its first token and finished; shared by every DES result type."""

    index: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    first_token_at: float | None = None
    finished_at: float | None = None
    rejected: str = ""  # why the request never ran ("" when it ran)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finished_at is None or self.first_token_at is None or self.output_tokens <= 1:
            return None
        return (self.finished_at - self.first_token_at) / (self.output_tokens - 1)


@dataclass(slots=True)
class RequestResult(RequestTiming):
    instance: str = ""
    reason: str = ""
    hit_tokens: int = 0
    host_hit_tokens: int = 0  # of hit_tokens, loaded from the host tier
    estimated_hit_tokens: int = 0  # routing's estimate of hit_tokens when it chose the instance
    dispatched_at: float | None = None


@dataclass(slots=True)
class DESResult:
    requests: list[RequestResult]
    prefill_tokens: dict[str, int]  # uncached prompt tokens each instance computed
    migrations: int
    reasons: dict[str, int]
    events: int
    end_time: float
    extra: dict[str, float] = field(default_factory=dict)


def routing_state(instance_id: str, cost: CostModel, limits: EngineLimits, shadow_tokens: int) -> InstanceState:
    """Routing's view of a fresh engine: its prefill timing from the cost model, an empty shadow cache."""
    per_token, extra = PrefillCost.from_cost_model(cost, limits.max_num_batched_tokens, limits.kv_capacity_tokens)
    return InstanceState(instance_id, per_token, BlockCache(shadow_tokens), extra)


class Simulation:
    """One replay. Build, then :meth:`run`; the object is single-use."""

    def __init__(self, requests: Sequence[PreparedRequest], policy: str | RoutingPolicy,
                 routing: RoutingConfig | None = None, config: DESConfig | None = None) -> None:
        self.config = config or DESConfig()
        routing = routing or RoutingConfig()
        if routing.ring_seed == 0 and self.config.seed:
            routing = routing.model_copy(update={"ring_seed": self.config.seed})
        self.routing = routing
        self.requests = sorted(requests, key=lambda r: (r.arrival, r.index))
        self.ids = [f"i{k:04d}" for k in range(self.config.instances)]
        self.engines: list[Engine] = []
        cluster = ClusterView()
        for k, iid in enumerate(self.ids):
            profile = load_profile(self.config.profile_of(k))
            cost = CostModel.from_profile(profile)
            kv = self.config.kv_capacity_tokens or profile.kv_capacity_tokens
            limits = EngineLimits(kv, profile.max_num_seqs, profile.max_num_batched_tokens,
                                  profile.model.max_model_len, self.config.host_cache_tokens,
                                  self.config.host_link_gbytes_s)
            engine = Engine(cost, limits, coalesce_decode=True)
            self.engines.append(engine)
            # The shadow follows everything the engine can hit: its GPU cache and its host tier.
            state = cluster.instances[iid] = routing_state(iid, cost, limits, kv + self.config.host_cache_tokens)
            if self.config.cache_view == "exact":
                state.exact = EngineCacheView(engine.cache)
        self.cluster = cluster
        self.index_of = {iid: k for k, iid in enumerate(self.ids)}
        pol = make_policy(policy, routing) if isinstance(policy, str) else policy
        self.scheduler = Scheduler(pol, cluster, routing)
        self.results = [RequestResult(r.index, r.arrival, r.input_tokens, r.output_tokens) for r in self.requests]
        self._by_id: dict[str, int] = {}
        self._sim: list[SimRequest | None] = [None] * len(self.requests)
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self._scheduled: list[float | None] = [None] * len(self.engines)
        self._tick_pending = False
        self._outstanding = 0  # submitted to the scheduler, not finished or rejected
        self.prefill_tokens = dict.fromkeys(self.ids, 0)
        self.events = 0

    # ----- event plumbing ------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _reschedule(self, k: int) -> None:
        t = self.engines[k].next_event_time()
        if t is not None and t != self._scheduled[k]:
            self._scheduled[k] = t
            self._push(t, _ENGINE, k)

    def _dispatch(self, released: list[tuple[RouteRequest, str]], now: float) -> None:
        touched: set[int] = set()
        for rreq, iid in released:
            n = self._by_id[rreq.request_id]
            pr = self.requests[n]
            res = self.results[n]
            k = self.index_of[iid]
            eng = self.engines[k]
            why = eng.validate(pr.input_tokens, pr.output_tokens)
            if why:
                res.rejected = why
                self.scheduler.on_failed(rreq.request_id)
                self._outstanding -= 1
                continue
            res.dispatched_at = now
            sreq = SimRequest(rreq.request_id, pr.input_tokens, pr.output_tokens, pr.engine_hashes, pr.block_size)
            self._sim[n] = sreq
            eng.submit(sreq, now)
            touched.add(k)
        for k in sorted(touched):
            self._reschedule(k)

    # ----- handlers ------------------------------------------------------------------------
    def _arrive(self, n: int) -> None:
        pr = self.requests[n]
        rid = f"r{pr.index}"
        self._by_id[rid] = n
        res = self.results[n]
        rreq = RouteRequest(rid, pr.input_tokens, pr.route_hashes, pr.block_size, pr.arrival, pr.fallback_key)
        now = pr.arrival
        try:
            decision = self.scheduler.submit(rreq, now)
        except (QueueFullError, NoInstanceError) as exc:
            res.rejected = str(exc) or type(exc).__name__
            return
        self._outstanding += 1
        res.instance, res.reason, res.estimated_hit_tokens = decision.instance_id, decision.reason, decision.hit_tokens
        self._dispatch(self.scheduler.release(now, (decision.instance_id,)), now)
        self._ensure_tick(now)

    def _ensure_tick(self, now: float) -> None:
        if not self._tick_pending and self.scheduler.queued_total:
            self._tick_pending = True
            self._push(now + self.config.tick_s, _TICK, 0)

    def _engine_event(self, k: int, now: float) -> None:
        eng = self.engines[k]
        if self._scheduled[k] != now or eng.next_event_time() != now:
            return  # superseded: the plan was cut or rescheduled
        self._scheduled[k] = None
        sched = self.scheduler
        results = self.results
        by_id = self._by_id
        for em in eng.advance(now):
            if em.first:
                sched.on_first_token(em.request_id)
                n = by_id[em.request_id]
                res = results[n]
                res.first_token_at = now
                sreq = self._sim[n]
                res.hit_tokens = sreq.cached_tokens
                res.host_hit_tokens = sreq.host_tokens
                self.prefill_tokens[res.instance] += sreq.prompt_tokens - sreq.cached_tokens
            if em.finished:
                sched.on_finished(em.request_id)
                results[by_id[em.request_id]].finished_at = now
                self._outstanding -= 1
                self._sim[by_id[em.request_id]] = None
        iid = self.ids[k]
        self._dispatch(sched.release(now, (iid,)), now)
        self._reschedule(k)

    def _tick(self, now: float) -> None:
        self._tick_pending = False
        moves = self.scheduler.rebalance(now)
        for m in moves:
            self.results[self._by_id[m.request_id]].instance = m.target
        self._dispatch(self.scheduler.release(now), now)
        self._ensure_tick(now)

    def _scrape(self, now: float) -> None:
        for iid, eng in zip(self.ids, self.engines, strict=True):
            st = self.cluster.instances[iid]
            st.engine_running = len(eng.running)
            st.engine_waiting = len(eng.waiting)
            st.kv_usage = eng.kv_usage()

    # ----- main loop -----------------------------------------------------------------------
    def run(self, progress: Callable[[int], None] | None = None) -> DESResult:
        reqs = self.requests
        heap = self._heap
        n_req = len(reqs)
        nxt = 0
        if n_req:
            self._push(reqs[0].arrival, _SCRAPE, 0)
        now = 0.0
        while nxt < n_req or heap:
            if nxt < n_req and (not heap or reqs[nxt].arrival < heap[0][0]):
                now = reqs[nxt].arrival
                self._arrive(nxt)
                nxt += 1
                self.events += 1
                if progress is not None and nxt % 1000 == 0:
                    progress(1000)
                continue
            now, _, kind, payload = heapq.heappop(heap)
            self.events += 1
            if kind == _ENGINE:
                self._engine_event(payload, now)
            elif kind == _TICK:
                self._tick(now)
            else:
                self._scrape(now)
                if nxt < n_req or self._outstanding:
                    self._push(now + self.config.scrape_interval_s, _SCRAPE, 0)
            if nxt >= n_req and not self._outstanding and not self.scheduler.queued_total:
                break
        if progress is not None and n_req % 1000:
            progress(n_req % 1000)
        return DESResult(self.results, self.prefill_tokens, self.scheduler.migrations,
                         dict(self.scheduler.reasons), self.events, now)


def simulate(requests: Sequence[PreparedRequest], policy: str | RoutingPolicy,
             routing: RoutingConfig | None = None, config: DESConfig | None = None,
             progress: Callable[[int], None] | None = None) -> DESResult:
    return Simulation(requests, policy, routing, config).run(progress)
