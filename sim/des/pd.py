"""Discrete-event replay of the disaggregated paths: local PD and cross-datacenter prefill offload.

Three pools of the same :class:`~tandem.sim.engine.Engine` the simulator process serves: local
prefill, remote prefill (another datacenter) and local decode. A request is routed to a prefill
pool (all local, all remote, or by the :class:`~tandem.router.offload.OffloadController`'s
threshold on its uncached length), then to an instance by that pool's routing
:class:`~tandem.router.routing.scheduler.Scheduler` (DualMap by default), prefilled there with
``max_tokens=1``; at the prefill's end the decode instance is picked by
:func:`~tandem.router.pd.pick_decode`, which allocates the KV destination at once, and the KV
crosses a :class:`~tandem.sim.link.SharedLink` after one RTT: each decode instance's local ingress
link for local prefills, the one shared cross-datacenter link for remote ones. When the last byte
lands the decode engine recomputes the last prompt token and streams; that first decode token is
the client's first token, as with vLLM's disaggregated proxy.

Only the blocks the decode instance does not already cache cross the link (as NixlConnector
pulls only what is missing). Engine metrics reach the routing views only at scrape instants.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.blockcache import BlockCache
from tandem.router.offload import OffloadController, OffloadSettings, decode_rps_estimate, pool_speed
from tandem.router.pd import DecodeLoad, pick_decode
from tandem.router.routing.config import RoutingConfig
from tandem.router.routing.registry import make_policy
from tandem.router.routing.scheduler import QueueFullError, Scheduler
from tandem.router.routing.types import ClusterView, InstanceState, NoInstanceError, RouteRequest
from tandem.sim.costmodel import CostModel
from tandem.sim.des.simulator import PreparedRequest, RequestTiming, effective_prefill_s_per_token
from tandem.sim.engine import Engine, EngineLimits, SimRequest
from tandem.sim.link import SharedLink
from tandem.sim.profile import Profile, load_profile

OffloadMode = Literal["local", "remote", "selective"]
_ENGINE, _LINK, _FLOW, _TICK, _SCRAPE = 0, 1, 2, 3, 4
LOCAL, REMOTE, DECODE = 0, 1, 2


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
    scrape_interval_s: float = Field(0.5, gt=0)
    tick_s: float = Field(0.1, gt=0)
    estimate_prompt_tokens: int = Field(8192, gt=0)
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


@dataclass(slots=True)
class PDRun:
    requests: list[PDResult]
    remote_link: SharedLink
    thresholds: list[tuple[float, int]]  # (time, threshold) after each re-solve
    end_time: float
    events: int
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class _Pool:
    name: str
    ids: list[str]
    engines: list[Engine]
    cluster: ClusterView
    scheduler: Scheduler | None
    scheduled: list[float | None]
    tick_pending: bool = False


class PDSimulation:
    """One replay of a trace through the disaggregated deployment. Single use."""

    def __init__(self, requests: Sequence[PreparedRequest], config: PDConfig, routing: RoutingConfig | None = None,
                 policy: str = "dualmap") -> None:
        self.config = config
        routing = routing or RoutingConfig()
        if routing.ring_seed == 0 and config.seed:
            routing = routing.model_copy(update={"ring_seed": config.seed})
        self.requests = sorted(requests, key=lambda r: (r.arrival, r.index))
        local_p = load_profile(config.local_profile)
        remote_p = load_profile(config.remote_profile or config.local_profile)
        self.pools = [self._pool("local", "p", config.local_prefill, local_p, policy, routing),
                      self._pool("remote", "r", config.remote_prefill, remote_p, policy, routing),
                      self._pool("decode", "d", config.decode, local_p, None, routing)]
        if config.mode == "local" and config.local_prefill == 0:
            raise ValueError("mode local needs local_prefill >= 1")
        if config.mode in ("remote", "selective") and config.remote_prefill == 0:
            raise ValueError(f"mode {config.mode} needs remote_prefill >= 1")
        if config.mode == "selective" and config.local_prefill == 0:
            raise ValueError("mode selective needs local_prefill >= 1")
        self.local_links = [SharedLink(config.local_link_gbps) for _ in range(config.decode)]
        self.remote_link = SharedLink(config.link_gbps)
        self.links = [*self.local_links, self.remote_link]
        self._link_due: list[float | None] = [None] * len(self.links)
        n = len(self.requests)
        mean_prompt = sum(r.input_tokens for r in self.requests) / max(1, n)
        mean_output = sum(r.output_tokens for r in self.requests) / max(1, n)
        decode_rps = config.decode_rps_hint or decode_rps_estimate(local_p, config.decode, mean_prompt, mean_output)
        self.controller = OffloadController(
            config.offload, local=pool_speed(local_p, config.local_prefill),
            remote=pool_speed(remote_p, config.remote_prefill), decode_rps=decode_rps,
            link_gbps=config.link_gbps, kv_bytes_per_token=local_p.model.kv_bytes_per_token)
        self.remote_s_per_token = effective_prefill_s_per_token(CostModel.from_profile(remote_p),
                                                                config.estimate_prompt_tokens)
        self.results = [PDResult(r.index, r.arrival, r.input_tokens, r.output_tokens) for r in self.requests]
        self._by_id: dict[str, int] = {}
        self._pool_of: dict[str, int] = {}
        self._decode_of: dict[str, int] = {}
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self._outstanding = 0
        self.thresholds: list[tuple[float, int]] = []
        self.events = 0

    def _pool(self, name: str, prefix: str, count: int, profile: Profile, policy: str | None,
              routing: RoutingConfig) -> _Pool:
        cost = CostModel.from_profile(profile)
        limits = EngineLimits(profile.kv_capacity_tokens, profile.max_num_seqs, profile.max_num_batched_tokens,
                              profile.model.max_model_len)
        ids = [f"{prefix}{k:03d}" for k in range(count)]
        cluster = ClusterView({iid: InstanceState(iid, effective_prefill_s_per_token(
            cost, self.config.estimate_prompt_tokens), BlockCache(profile.kv_capacity_tokens)) for iid in ids})
        scheduler = Scheduler(make_policy(policy, routing), cluster, routing) if policy and count else None
        return _Pool(name, ids, [Engine(cost, limits, coalesce_decode=True) for _ in ids], cluster, scheduler,
                     [None] * count)

    # ----- plumbing ------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _reschedule(self, p: int, k: int) -> None:
        pool = self.pools[p]
        t = pool.engines[k].next_event_time()
        if t is not None and t != pool.scheduled[k]:
            pool.scheduled[k] = t
            self._push(t, _ENGINE, p * 100_000 + k)

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
        local = self.pools[LOCAL]
        hit = max((st.hit_tokens(rreq) for st in local.cluster.instances.values()), default=0)
        uncached = rreq.prompt_tokens - hit
        mode = self.config.mode
        if mode == "local":
            return LOCAL, uncached
        if mode == "remote":
            return REMOTE, uncached
        self.controller.observe(uncached, now)
        remote = self.pools[REMOTE]
        backlog = sum(st.pending_miss_tokens for st in remote.cluster.instances.values())
        queue_s = backlog * self.remote_s_per_token / max(1, len(remote.ids))
        if self.controller.maybe_resolve(now, remote_queue_s=queue_s) is not None:
            self.thresholds.append((now, self.controller.threshold))
        return (REMOTE if self.controller.should_offload(uncached) else LOCAL), uncached

    def _arrive(self, n: int) -> None:
        pr = self.requests[n]
        rid = f"r{pr.index}"
        self._by_id[rid] = n
        res = self.results[n]
        now = pr.arrival
        rreq = RouteRequest(rid, pr.input_tokens, pr.route_hashes, pr.block_size, now, pr.fallback_key)
        p, res.uncached_tokens = self._route_pool(rreq, now)
        res.route = self.pools[p].name
        sched = self.pools[p].scheduler
        assert sched is not None
        try:
            decision = sched.submit(rreq, now)
        except (QueueFullError, NoInstanceError) as exc:
            res.rejected = str(exc) or type(exc).__name__
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
        dpool = self.pools[DECODE]
        loads = [DecodeLoad(iid, eng.reserved_tokens / eng.limits.kv_capacity_tokens,
                            len(eng.running) + len(eng.waiting))
                 for iid, eng in zip(dpool.ids, dpool.engines, strict=True)]
        d = int(pick_decode(loads)[1:])
        eng = dpool.engines[d]
        why = eng.validate(pr.input_tokens, pr.output_tokens)
        if why:
            res.rejected = why
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
        self._push(now + rtt, _FLOW, n)

    def _start_flow(self, n: int, now: float) -> None:
        pr, res = self.requests[n], self.results[n]
        rid = f"r{pr.index}"
        j = len(self.local_links) if res.route == "remote" else self._decode_of[rid]
        link = self.links[j]
        self._link_done(j, link.advance(now))
        kvb = self.pools[DECODE].engines[0].cost.kv_bytes_per_token
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
            d = self._decode_of[c.flow_id]
            self.pools[DECODE].engines[d].kv_arrived(c.flow_id, c.time)
            self._reschedule(DECODE, d)

    def _engine_event(self, payload: int, now: float) -> None:
        p, k = divmod(payload, 100_000)
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
            for iid, eng in zip(pool.ids, pool.engines, strict=True):
                st = pool.cluster.instances[iid]
                st.engine_running, st.engine_waiting, st.kv_usage = len(eng.running), len(eng.waiting), eng.kv_usage()

    def run(self) -> PDRun:
        reqs, heap = self.requests, self._heap
        nxt, now = 0, 0.0
        if reqs:
            self._push(reqs[0].arrival, _SCRAPE, 0)
        while nxt < len(reqs) or heap:
            if nxt < len(reqs) and (not heap or reqs[nxt].arrival < heap[0][0]):
                now = reqs[nxt].arrival
                self._arrive(nxt)
                nxt += 1
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
            else:
                self._scrape()
                if nxt < len(reqs) or self._outstanding:
                    self._push(now + self.config.scrape_interval_s, _SCRAPE, 0)
            if nxt >= len(reqs) and not self._outstanding:
                break
        self.remote_link.advance(max(now, self.remote_link.clock))
        return PDRun(self.results, self.remote_link, self.thresholds, now, self.events)


def simulate_pd(requests: Sequence[PreparedRequest], config: PDConfig, routing: RoutingConfig | None = None,
                policy: str = "dualmap") -> PDRun:
    return PDSimulation(requests, config, routing, policy).run()
