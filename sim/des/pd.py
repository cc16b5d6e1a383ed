"""Discrete-event replay of the disaggregated paths: local PD and cross-datacenter prefill offload.

Three pools of the same :class:`~tandem.sim.engine.Engine` the simulator process serves: local
prefill, remote prefill (another datacenter) and local decode. A request is routed to a prefill
pool (all local, all remote, or by the :class:`~tandem.router.routing.offload.OffloadController`'s
threshold on its uncached length), then to an instance by that pool's routing
:class:`~tandem.router.routing.scheduler.Scheduler` (DualMap by default), prefilled there with
``max_tokens=1``; at the prefill's end the decode instance is picked by
:func:`~tandem.router.pd_bodies.pick_decode`, which allocates the KV destination at once, and the KV
crosses a :class:`~tandem.sim.link.SharedLink` after one RTT: each decode instance's local ingress
link for local prefills, the one shared cross-datacenter link for remote ones. When the last byte
lands the decode engine recomputes the last prompt token and streams; that first decode token is
the client's first token, as with vLLM's disaggregated proxy.

Only the blocks the decode instance does not already cache cross the link (as NixlConnector
pulls only what is missing). Engine metrics reach the routing views only at scrape instants.

Pools can change while the replay runs (the autoscaling benchmark): a :class:`PoolController`
called at a fixed interval may order instances (ready and routable after a start-up delay), mark
them draining (routing stops choosing them, what waited for them in the gateway is re-routed,
what they hold finishes) and remove them once idle; each instance's order, ready and removal
times come back with the run.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from tandem.perf.costmodel import CostModel
from tandem.perf.profile import Profile, load_profile
from tandem.router.routing.config import RoutingConfig
from tandem.router.routing.decode import DecodeLoad, pick_decode
from tandem.router.routing.offload import (
    OffloadController,
    OffloadSettings,
    SideChoice,
    best_estimate,
    decode_rps_estimate,
    pool_speed,
)
from tandem.router.routing.registry import make_policy
from tandem.router.routing.scheduler import QueueFullError, Scheduler
from tandem.router.routing.types import ClusterView, NoInstanceError, RouteRequest
from tandem.sim.des.simulator import PreparedRequest, RequestTiming, routing_state
from tandem.sim.engine import Engine, EngineLimits, SimRequest
from tandem.sim.link import SharedLink

OffloadMode = Literal["local", "remote", "selective"]
InstanceStatus = Literal["starting", "ready", "draining", "removed"]
_ENGINE, _LINK, _FLOW, _TICK, _SCRAPE, _READY, _CONTROL = 0, 1, 2, 3, 4, 5, 6
LOCAL, REMOTE, DECODE = 0, 1, 2
_PER_POOL = 100_000  # event payload: pool x _PER_POOL + instance index


class PDConfig(BaseModel):
    """The simulated disaggregated deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_prefill: int = Field(4, ge=0, le=10_000, description="local prefill instances")
    remote_prefill: int = Field(0, ge=0, le=10_000, description="remote prefill instances (other datacenter)")
    decode: int = Field(4, ge=1, le=10_000, description="local decode instances")
    local_profile: str = Field("llama3-8b-h100", description="profile of local prefill and decode instances")
    remote_profile: str | None = Field(None, description="profile of remote prefill instances (default: local)")
    mode: OffloadMode = Field("local", description="local: no offload; remote: every prefill remote; "
                              "selective: remote when the uncached length exceeds the solved threshold")
    offload: OffloadSettings = Field(default_factory=OffloadSettings)
    link_gbps: float = Field(100.0, gt=0, description="cross-datacenter link, Gbit/s")
    link_rtt_ms: float = Field(10.0, ge=0, description="cross-datacenter round trip")
    local_link_gbps: float = Field(400.0, gt=0, description="each decode instance's local KV ingress, Gbit/s")
    local_rtt_ms: float = Field(0.05, ge=0, description="local round trip before a KV pull")
    decode_rps_hint: float | None = Field(None, gt=0, description="decode capacity the offload solver assumes "
                                          "(requests/s; default: estimated from the profile)")
    decode_kv_capacity_tokens: int | None = Field(None, gt=0, description="decode instances admit at most this "
                                                  "much KV (default: the profile's capacity); a TPOT SLO bounds "
                                                  "the context one decode step can read")
    scrape_interval_s: float = Field(0.5, gt=0)
    tick_s: float = Field(0.1, gt=0)
    ttft_slo_s: float | None = Field(None, gt=0, description="each request's own TTFT SLO for routing: this plus "
                                     "ttft_slo_per_token_s x its prompt tokens; None: routing's fixed SLO")
    ttft_slo_per_token_s: float = Field(0.0, ge=0, description="per prompt token part of ttft_slo_s")
    seed: int = Field(0, ge=0, lt=2**32)


@dataclass(slots=True)
class PDResult(RequestTiming):
    route: str = ""  # "local" or "remote" prefill
    uncached_tokens: int = 0
    prefill_instance: str = ""
    decode_instance: str = ""
    prefill_done_at: float | None = None
    transfer_tokens: int = 0
    transfer_s: float | None = None


@dataclass(frozen=True, slots=True)
class InstanceLife:
    """When one instance was ordered, became ready and left (GPU time runs from order to removal)."""

    pool: str
    id: str
    ordered_at: float
    ready_at: float
    removed_at: float | None


@dataclass(slots=True)
class PDRun:
    requests: list[PDResult]
    remote_link: SharedLink
    thresholds: list[tuple[float, int]]  # (time, threshold) after each re-solve
    end_time: float
    events: int
    instances: list[InstanceLife] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)


class PoolController(Protocol):
    """Called every ``interval_s`` of simulated time with the running simulation (an autoscaler)."""

    interval_s: float

    def __call__(self, sim: PDSimulation, now: float) -> None: ...


@dataclass(slots=True)
class _Pool:
    """One pool; instances are never re-indexed (an id's number is its index), removed ones stay listed."""

    name: str
    prefix: str
    profile: Profile
    cost: CostModel
    limits: EngineLimits
    policy: str | None
    routing: RoutingConfig
    ids: list[str] = field(default_factory=list)
    engines: list[Engine] = field(default_factory=list)
    cluster: ClusterView = field(default_factory=ClusterView)
    scheduler: Scheduler | None = None
    scheduled: list[float | None] = field(default_factory=list)
    status: list[InstanceStatus] = field(default_factory=list)
    ordered_at: list[float] = field(default_factory=list)
    ready_at: list[float] = field(default_factory=list)
    removed_at: list[float | None] = field(default_factory=list)
    tick_pending: bool = False

    def count(self, status: InstanceStatus) -> int:
        return sum(s == status for s in self.status)

    def idle(self, k: int) -> bool:
        """Nothing left on the instance: no request queued for it in the gateway or held by its engine."""
        eng = self.engines[k]
        if eng.running or eng.waiting:
            return False
        return self.scheduler is None or not self.scheduler.queued(self.ids[k])


class PDSimulation:
    """One replay of a trace through the disaggregated deployment. Single use.

    Pools are elastic: a :class:`PoolController` may order instances (ready after a start-up
    delay, not routable until then), mark them draining (the routing stops sending them requests
    and re-routes what waited for them in the gateway, as the gateway does for a pod annotated
    draining), un-drain them and remove them once idle.
    """

    def __init__(self, requests: Sequence[PreparedRequest], config: PDConfig, routing: RoutingConfig | None = None,
                 policy: str = "dualmap") -> None:
        self.config = config
        routing = routing or RoutingConfig()
        if routing.ring_seed == 0 and config.seed:
            routing = routing.model_copy(update={"ring_seed": config.seed})
        self.requests = sorted(requests, key=lambda r: (r.arrival, r.index))
        local_p = load_profile(config.local_profile)
        remote_p = load_profile(config.remote_profile or config.local_profile)
        if config.mode == "local" and config.local_prefill == 0:
            raise ValueError("mode local needs local_prefill >= 1")
        if config.mode in ("remote", "selective") and config.remote_prefill == 0:
            raise ValueError(f"mode {config.mode} needs remote_prefill >= 1")
        if config.mode == "selective" and config.local_prefill == 0:
            raise ValueError("mode selective needs local_prefill >= 1")
        self.remote_link = SharedLink(config.link_gbps)
        self.links = [self.remote_link]  # then one local ingress link per decode instance, at 1 + its index
        self._link_due: list[float | None] = [None]
        self.pools = [self._pool("local", "p", local_p, policy, routing),
                      self._pool("remote", "r", remote_p, policy, routing),
                      self._pool("decode", "d", local_p, None, routing, config.decode_kv_capacity_tokens)]
        n = len(self.requests)
        mean_prompt = sum(r.input_tokens for r in self.requests) / max(1, n)
        mean_output = sum(r.output_tokens for r in self.requests) / max(1, n)
        decode_rps = config.decode_rps_hint or decode_rps_estimate(
            local_p, config.decode, mean_prompt, mean_output, config.decode_kv_capacity_tokens)
        offload = config.offload
        if "link_rtt_s" not in offload.model_fields_set:  # the controller knows the link's RTT as the gateway does
            offload = offload.model_copy(update={"link_rtt_s": config.link_rtt_ms / 1000})
        self.controller = OffloadController(
            offload, local=pool_speed(local_p, config.local_prefill),
            remote=pool_speed(remote_p, config.remote_prefill), decode_rps=decode_rps,
            link_gbps=config.link_gbps, kv_bytes_per_token=local_p.model.kv_bytes_per_token)
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        for p, count in ((LOCAL, config.local_prefill), (REMOTE, config.remote_prefill), (DECODE, config.decode)):
            for _ in range(count):
                self.add_instance(p, 0.0, 0.0)
        self.results = [PDResult(r.index, r.arrival, r.input_tokens, r.output_tokens) for r in self.requests]
        self._by_id: dict[str, int] = {}
        self._pool_of: dict[str, int] = {}
        self._decode_of: dict[str, int] = {}
        self._outstanding = 0
        self.thresholds: list[tuple[float, int]] = []
        self._choices: dict[str, SideChoice] = {}  # selective: each request's side choice until its prefill ends
        self.events = 0
        self.arrived = 0  # requests whose arrival has been processed (a prefix of ``results``)

    def _pool(self, name: str, prefix: str, profile: Profile, policy: str | None, routing: RoutingConfig,
              kv_capacity_tokens: int | None = None) -> _Pool:
        kv = min(kv_capacity_tokens or profile.kv_capacity_tokens, profile.kv_capacity_tokens)
        limits = EngineLimits(kv, profile.max_num_seqs, profile.max_num_batched_tokens, profile.model.max_model_len)
        return _Pool(name, prefix, profile, CostModel.from_profile(profile), limits, policy, routing)

    # ----- elastic pools (the controller's interface) ----------------------------------------------
    def add_instance(self, p: int, now: float, delay_s: float) -> int:
        """Order an instance of pool ``p``; it serves from ``now + delay_s``. Returns its index."""
        pool = self.pools[p]
        k = len(pool.ids)
        pool.ids.append(f"{pool.prefix}{k:03d}")
        pool.engines.append(Engine(pool.cost, pool.limits, coalesce_decode=True))
        pool.scheduled.append(None)
        pool.status.append("starting")
        pool.ordered_at.append(now)
        pool.ready_at.append(now + delay_s)
        pool.removed_at.append(None)
        if p == DECODE:
            self.links.append(SharedLink(self.config.local_link_gbps))
            self._link_due.append(None)
        if delay_s <= 0:
            self._ready(p, k)
        else:
            self._push(now + delay_s, _READY, p * _PER_POOL + k)
        return k

    def _ready(self, p: int, k: int) -> None:
        pool = self.pools[p]
        if pool.status[k] != "starting":
            return  # drained away before it started: it stays out of routing
        pool.status[k] = "ready"
        iid = pool.ids[k]
        pool.cluster.instances[iid] = routing_state(iid, pool.cost, pool.limits, pool.profile.kv_capacity_tokens)
        if pool.policy is not None:
            if pool.scheduler is None:
                pool.scheduler = Scheduler(make_policy(pool.policy, pool.routing), pool.cluster, pool.routing)
            else:
                pool.scheduler.on_membership()
        self._membership_changed(p)

    def _membership_changed(self, p: int) -> None:
        """The offload solver plans with the prefill instances that serve now."""
        if p != DECODE:
            pool = self.pools[p]
            speed = pool_speed(pool.profile, max(1, pool.count("ready")))
            if p == LOCAL:
                self.controller.local = speed
            else:
                self.controller.remote = speed

    def set_draining(self, p: int, k: int, draining: bool, now: float) -> None:
        """Mark an instance draining (no new requests; its gateway queue re-routed) or bring it back."""
        pool = self.pools[p]
        status = pool.status[k]
        if status == "removed" or (status == "draining") == draining:
            return
        iid = pool.ids[k]
        if iid not in pool.cluster.instances:  # not started yet: only the mark changes
            pool.status[k] = "draining" if draining else "starting"
            if not draining and now >= pool.ready_at[k]:
                self._ready(p, k)
            return
        st = pool.cluster.instances[iid]
        st.draining = draining
        pool.status[k] = "draining" if draining else "ready"
        self._membership_changed(p)
        if pool.scheduler is None:
            return
        pool.scheduler.on_membership()
        if draining:
            touched: set[str] = set()
            for rreq, decision in pool.scheduler.requeue(iid, now):
                res = self.results[self._by_id[rreq.request_id]]
                if decision is None:
                    res.rejected = "no routable instance to re-route to"
                    self._forget(rreq.request_id)
                    self._outstanding -= 1
                else:
                    res.prefill_instance = decision.instance_id
                    touched.add(decision.instance_id)
            self._dispatch(p, pool.scheduler.release(now, sorted(touched)), now)
            self._ensure_tick(p, now)

    def remove_instance(self, p: int, k: int, now: float) -> bool:
        """Remove a draining instance once it is idle (one that never started is); False while it is not."""
        pool = self.pools[p]
        if pool.status[k] != "draining" or not pool.idle(k):
            return False
        pool.status[k] = "removed"
        pool.removed_at[k] = now
        if pool.cluster.instances.pop(pool.ids[k], None) is not None and pool.scheduler is not None:
            pool.scheduler.on_membership()
        return True

    def instance_lives(self) -> list[InstanceLife]:
        return [InstanceLife(pool.name, pool.ids[k], pool.ordered_at[k], pool.ready_at[k], pool.removed_at[k])
                for pool in self.pools for k in range(len(pool.ids))]

    # ----- plumbing ------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _reschedule(self, p: int, k: int) -> None:
        pool = self.pools[p]
        t = pool.engines[k].next_event_time()
        if t is not None and t != pool.scheduled[k]:
            pool.scheduled[k] = t
            self._push(t, _ENGINE, p * _PER_POOL + k)

    def _reschedule_link(self, j: int) -> None:
        t = self.links[j].next_completion()
        if t is not None and t != self._link_due[j]:
            self._link_due[j] = t
            self._push(t, _LINK, j)

    def _ensure_tick(self, p: int, now: float) -> None:
        pool = self.pools[p]
        if pool.scheduler is not None and not pool.tick_pending and pool.scheduler.queued_total:
            pool.tick_pending = True
            self._push(now + self.config.tick_s, _TICK, p)

    # ----- phases --------------------------------------------------------------------------------
    def _route_pool(self, rreq: RouteRequest, now: float) -> tuple[int, int]:
        """(pool, uncached tokens): the offload decision on the best local cache hit."""
        local, remote = self.pools[LOCAL], self.pools[REMOTE]
        hit = max((st.hit_tokens(rreq) for st in local.cluster.instances.values()), default=0)
        uncached = rreq.prompt_tokens - hit
        mode = self.config.mode
        if mode == "local":
            return LOCAL, uncached
        if mode == "remote":
            return REMOTE, uncached
        ctl = self.controller
        ctl.observe(uncached, now)
        if ctl.maybe_resolve(now) is not None:
            self.thresholds.append((now, ctl.threshold))
        kv_bytes = rreq.prompt_tokens * self.pools[DECODE].cost.kv_bytes_per_token
        choice = ctl.choose(uncached, local_s=best_estimate(local.cluster, rreq),
                            remote_prefill_s=best_estimate(remote.cluster, rreq), kv_bytes=kv_bytes, now=now,
                            slo_s=rreq.slo_ttft_s)
        self._choices[rreq.request_id] = choice
        if choice.side == "local":
            return LOCAL, uncached
        ctl.link.commit(rreq.request_id, kv_bytes)
        return REMOTE, uncached

    def _forget(self, rid: str) -> None:
        """A request ended before its KV crossed: nothing of it is committed to the link any more."""
        self.controller.link.release(rid)
        self._choices.pop(rid, None)

    def _arrive(self, n: int) -> None:
        pr = self.requests[n]
        rid = f"r{pr.index}"
        self._by_id[rid] = n
        res = self.results[n]
        now = pr.arrival
        slo = None
        if (base := self.config.ttft_slo_s) is not None:
            slo = base + self.config.ttft_slo_per_token_s * pr.input_tokens
        rreq = RouteRequest(rid, pr.input_tokens, pr.route_hashes, pr.block_size, now, pr.fallback_key,
                            slo_ttft_s=slo)
        p, res.uncached_tokens = self._route_pool(rreq, now)
        res.route = self.pools[p].name
        sched = self.pools[p].scheduler
        if sched is None:
            res.rejected = "no routable instance"
            self._forget(rid)
            return
        try:
            decision = sched.submit(rreq, now)
        except (QueueFullError, NoInstanceError) as exc:
            res.rejected = str(exc) or type(exc).__name__
            self._forget(rid)
            return
        self._pool_of[rid] = p
        self._outstanding += 1
        res.prefill_instance = decision.instance_id
        self._dispatch(p, sched.release(now, (decision.instance_id,)), now)
        self._ensure_tick(p, now)

    def _dispatch(self, p: int, released: list[tuple[RouteRequest, str]], now: float) -> None:
        pool = self.pools[p]
        touched: set[int] = set()
        for rreq, iid in released:
            n = self._by_id[rreq.request_id]
            pr, res = self.requests[n], self.results[n]
            k = int(iid[1:])
            eng = pool.engines[k]
            why = eng.validate(pr.input_tokens, 1)
            if why:
                res.rejected = why
                self._forget(rreq.request_id)
                assert pool.scheduler is not None
                pool.scheduler.on_failed(rreq.request_id)
                self._outstanding -= 1
                continue
            res.prefill_instance = iid
            eng.submit(SimRequest(rreq.request_id, pr.input_tokens, 1, pr.engine_hashes, pr.block_size), now)
            touched.add(k)
        for k in sorted(touched):
            self._reschedule(p, k)

    def _prefill_done(self, p: int, rid: str, now: float) -> None:
        sched = self.pools[p].scheduler
        assert sched is not None
        sched.on_first_token(rid)
        sched.on_finished(rid)
        n = self._by_id[rid]
        pr, res = self.requests[n], self.results[n]
        res.prefill_done_at = now
        if (choice := self._choices.pop(rid, None)) is not None:
            self.controller.learn(choice, now - pr.arrival)
        dpool = self.pools[DECODE]
        loads = [DecodeLoad(iid, eng.reserved_tokens / eng.limits.kv_capacity_tokens,
                            len(eng.running) + len(eng.waiting), routable=status == "ready")
                 for iid, eng, status in zip(dpool.ids, dpool.engines, dpool.status, strict=True)]
        try:
            d = int(pick_decode(loads)[1:])
        except NoInstanceError as exc:
            res.rejected = str(exc)
            self._forget(rid)
            self._outstanding -= 1
            return
        eng = dpool.engines[d]
        why = eng.validate(pr.input_tokens, pr.output_tokens)
        if why:
            res.rejected = why
            self._forget(rid)
            self._outstanding -= 1
            return
        res.decode_instance = dpool.ids[d]
        sreq = SimRequest(rid, pr.input_tokens, pr.output_tokens, pr.engine_hashes, pr.block_size,
                          kv_ready_at=math.inf)
        cached = eng.cache.peek(pr.engine_hashes).tokens
        res.transfer_tokens = pr.input_tokens - min(cached, pr.input_tokens - 1)
        eng.submit(sreq, now)
        self._decode_of[rid] = d
        self._reschedule(DECODE, d)
        rtt = (self.config.link_rtt_ms if p == REMOTE else self.config.local_rtt_ms) / 1000
        if p == REMOTE and self.config.mode == "selective":
            self.controller.transfer_started(rid, now)
        self._push(now + rtt, _FLOW, n)

    def _start_flow(self, n: int, now: float) -> None:
        pr, res = self.requests[n], self.results[n]
        rid = f"r{pr.index}"
        j = 0 if res.route == "remote" else 1 + self._decode_of[rid]
        link = self.links[j]
        self._link_done(j, link.advance(now))
        kvb = self.pools[DECODE].cost.kv_bytes_per_token
        link.start(rid, res.transfer_tokens * kvb, now)
        self._reschedule_link(j)

    def _link_event(self, j: int, now: float) -> None:
        if self._link_due[j] != now:
            return
        self._link_due[j] = None
        self._link_done(j, self.links[j].advance(now))
        self._reschedule_link(j)

    def _link_done(self, j: int, done: list) -> None:
        for c in done:
            n = self._by_id[c.flow_id]
            res = self.results[n]
            assert res.prefill_done_at is not None
            res.transfer_s = c.time - res.prefill_done_at
            if j == 0:  # the cross-datacenter link: the controller measures it as the gateway does
                self.controller.record_transfer(int(c.size), c.time, key=c.flow_id)
            d = self._decode_of[c.flow_id]
            self.pools[DECODE].engines[d].kv_arrived(c.flow_id, c.time)
            self._reschedule(DECODE, d)

    def _engine_event(self, payload: int, now: float) -> None:
        p, k = divmod(payload, _PER_POOL)
        pool = self.pools[p]
        eng = pool.engines[k]
        if pool.scheduled[k] != now or eng.next_event_time() != now:
            return
        pool.scheduled[k] = None
        for em in eng.advance(now):
            if p == DECODE:
                res = self.results[self._by_id[em.request_id]]
                if em.first:
                    res.first_token_at = now
                if em.finished:
                    res.finished_at = now
                    self._outstanding -= 1
            elif em.first:
                self._prefill_done(p, em.request_id, now)
        if pool.scheduler is not None:
            self._dispatch(p, pool.scheduler.release(now, (pool.ids[k],)), now)
        self._reschedule(p, k)

    def _tick(self, p: int, now: float) -> None:
        pool = self.pools[p]
        pool.tick_pending = False
        assert pool.scheduler is not None
        for m in pool.scheduler.rebalance(now):
            self.results[self._by_id[m.request_id]].prefill_instance = m.target
        self._dispatch(p, pool.scheduler.release(now), now)
        self._ensure_tick(p, now)

    def _scrape(self) -> None:
        for pool in self.pools:
            for iid, st in pool.cluster.instances.items():
                eng = pool.engines[int(iid[1:])]
                st.engine_running, st.engine_waiting, st.kv_usage = len(eng.running), len(eng.waiting), eng.kv_usage()

    def run(self, controller: PoolController | None = None) -> PDRun:
        reqs, heap = self.requests, self._heap
        nxt, now = 0, 0.0
        if reqs:
            self._push(reqs[0].arrival, _SCRAPE, 0)
        if controller is not None:
            self._push(controller.interval_s, _CONTROL, 0)
        while nxt < len(reqs) or heap:
            if nxt < len(reqs) and (not heap or reqs[nxt].arrival < heap[0][0]):
                now = reqs[nxt].arrival
                self._arrive(nxt)
                nxt += 1
                self.arrived = nxt
                self.events += 1
                continue
            now, _, kind, payload = heapq.heappop(heap)
            self.events += 1
            if kind == _ENGINE:
                self._engine_event(payload, now)
            elif kind == _LINK:
                self._link_event(payload, now)
            elif kind == _FLOW:
                self._start_flow(payload, now)
            elif kind == _TICK:
                self._tick(payload, now)
            elif kind == _READY:
                self._ready(*divmod(payload, _PER_POOL))
            elif kind == _CONTROL:
                assert controller is not None
                controller(self, now)
                if nxt < len(reqs) or self._outstanding:
                    self._push(now + controller.interval_s, _CONTROL, 0)
            else:
                self._scrape()
                if nxt < len(reqs) or self._outstanding:
                    self._push(now + self.config.scrape_interval_s, _SCRAPE, 0)
            if nxt >= len(reqs) and not self._outstanding:
                break
        self.remote_link.advance(max(now, self.remote_link.clock))
        return PDRun(self.results, self.remote_link, self.thresholds, now, self.events, self.instance_lives())

def simulate_pd(requests: Sequence[PreparedRequest], config: PDConfig, routing: RoutingConfig | None = None,
                policy: str = "dualmap", controller: PoolController | None = None) -> PDRun:
    return PDSimulation(requests, config, routing, policy).run(controller)
