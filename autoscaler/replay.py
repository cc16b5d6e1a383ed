"""Discrete-event replay of a trace on an elastic cluster: pools that grow and shrink at run time.

The scheduling core of every instance is :class:`tandem.sim.engine.Engine` (the same one behind
``tandem sim`` and the routing DES); this module adds only what autoscaling needs on top:
instances that start (``startup_delay_s`` after they were ordered, costing GPU time from the
moment they were ordered), drain (no new requests, removed once idle) and leave, a PD hand-off
(prefill instance -> KV transfer -> decode instance), and a periodic scaler tick fed with the
same :class:`~tandem.autoscaler.models.Observations` the live controller builds from metrics.

Routing inside a pool is least outstanding work (prefill: un-prefilled tokens; decode: running
plus waiting sequences). Routing policies are not what this benchmark compares, and the same
router serves every scaler.
"""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from tandem.autoscaler.models import (
    ROLES_BY_MODE,
    SLO,
    LengthBucket,
    Mode,
    Observations,
    Role,
    RoleObservation,
)
from tandem.sim.costmodel import CostModel
from tandem.sim.engine import Engine, EngineLimits, SimRequest
from tandem.sim.profile import Profile
from tandem.traces import TraceRequest

InstanceStatus = Literal["starting", "ready", "draining"]


@dataclass(eq=False)
class Instance:
    id: str
    role: Role
    engine: Engine
    ordered_at: float
    ready_at: float
    status: InstanceStatus = "starting"
    removed_at: float | None = None
    outstanding_tokens: int = 0  # prefill: un-prefilled prompt tokens; others: running + waiting requests
    assigned: int = 0  # requests routed here: breaks ties so idle instances share the load
    version: int = 0

    @property
    def idle(self) -> bool:
        return not self.engine.running and not self.engine.waiting


@dataclass(slots=True)
class RequestRecord:
    trace: TraceRequest
    arrival: float
    first_token: float | None = None
    finished: float | None = None
    rejected: bool = False
    attainable: bool = True  # False when the prompt alone (no cache, no queue) takes longer than the TTFT SLO

    def ttft(self) -> float:
        return math.inf if self.first_token is None else self.first_token - self.arrival

    def tpot(self) -> float:
        if self.finished is None or self.first_token is None:
            return math.inf
        out = self.trace.output_tokens
        return 0.0 if out <= 1 else (self.finished - self.first_token) / (out - 1)


@dataclass(frozen=True, slots=True)
class ScaleCommand:
    """What a scaler asks of one pool: replicas now, how many instances should be draining, and
    the size the pool settles at once they are gone (what scaling actions are counted on)."""

    replicas: int
    drain: int = 0
    target: int | None = None

    @property
    def settles_at(self) -> int:
        return self.replicas - self.drain if self.target is None else self.target


class Scaler:
    """A scaling policy under test; it sees only observations, like the live controller."""

    name: str = "scaler"

    def initial(self) -> dict[Role, int]:
        raise NotImplementedError

    def step(self, obs: Observations) -> dict[Role, ScaleCommand] | None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    profile: Profile
    mode: Mode
    slo: SLO
    startup_delay_s: float = 60.0
    tick_s: float = 10.0
    window_s: float = 30.0
    link_gbps: float = 100.0  # prefill -> decode KV transfer inside the cluster
    gpus_per_instance: int = 1
    mix_buckets: int = 8
    mix_window_s: float = 300.0  # the length mix moves slower than the rate; a longer window is steadier


@dataclass
class Timeline:
    time: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    replicas: dict[str, list[int]] = field(default_factory=dict)
    ttft_attainment: list[float] = field(default_factory=list)
    tpot_attainment: list[float] = field(default_factory=list)


@dataclass
class ReplayResult:
    records: list[RequestRecord]
    gpu_seconds: float
    actions: list[tuple[float, Role, int, int]]  # (time, role, from, to) of every target change
    timeline: Timeline
    duration_s: float


def prefill_alone_s(cost: CostModel, chunk: int, tokens: int) -> float:
    """A prompt prefilled alone on an idle engine, chunk by chunk: the floor of its TTFT."""
    t, done = 0.0, 0
    while done < tokens:
        step = min(chunk, tokens - done)
        t += cost.prefill_time(step, done)
        done += step
    return t


class ElasticCluster:
    """The event loop: arrivals, engine iterations, KV hand-offs, instance starts and scaler ticks."""

    def __init__(self, config: ReplayConfig) -> None:
        self.cfg = config
        self.cost = CostModel.from_profile(config.profile)
        p = config.profile
        self.limits = EngineLimits(kv_capacity_tokens=p.kv_capacity_tokens, max_num_seqs=p.max_num_seqs,
                                   max_num_batched_tokens=p.max_num_batched_tokens,
                                   max_model_len=p.model.max_model_len)
        self.roles = ROLES_BY_MODE[config.mode]
        self.pools: dict[Role, list[Instance]] = {r: [] for r in self.roles}
        self.retired: list[Instance] = []
        self._heap: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._req_of: dict[str, RequestRecord] = {}
        self._owner: dict[str, Instance] = {}
        self._done: list[RequestRecord] = []  # finished or rejected, in completion order
        self._done_at: list[float] = []

    def _all_instances(self) -> list[Instance]:
        return [*self.retired, *(i for p in self.pools.values() for i in p)]

    def _complete(self, rec: RequestRecord, now: float) -> None:
        self._done.append(rec)
        self._done_at.append(now)

    # ----- instances ---------------------------------------------------------------------------
    def _new_instance(self, role: Role, now: float, delay: float) -> Instance:
        inst = Instance(f"{role}-{next(self._ids)}", role, Engine(self.cost, self.limits), now, now + delay)
        self.pools[role].append(inst)
        if delay <= 0:
            inst.status = "ready"
        else:
            self._push(inst.ready_at, "ready", inst)
        return inst

    def _remove(self, inst: Instance, now: float) -> None:
        inst.removed_at = now
        self.pools[inst.role].remove(inst)
        self.retired.append(inst)

    def apply(self, role: Role, cmd: ScaleCommand, now: float) -> None:
        """Carry out a scale command with the same drain contract as the Kubernetes actuator."""
        pool = self.pools[role]
        draining = [i for i in pool if i.status == "draining"]
        active = [i for i in pool if i.status != "draining"]
        want_draining = max(0, min(cmd.drain, len(pool)))
        # Un-drain first (cheapest capacity), then mark the least loaded ready instances.
        while len(draining) > want_draining:
            inst = max(draining, key=lambda i: i.outstanding_tokens)
            inst.status = "ready" if now >= inst.ready_at else "starting"
            draining.remove(inst)
            active.append(inst)
        while len(draining) < want_draining and active:
            # A starting instance is the cheapest to give up: it holds no requests.
            inst = min(active, key=lambda i: (i.status != "starting", i.outstanding_tokens, -i.ordered_at))
            inst.status = "draining"
            active.remove(inst)
            draining.append(inst)
        # Remove drained instances down to the replica count; add new ones up to it.
        excess = len(pool) - cmd.replicas
        for inst in [i for i in draining if i.idle][:max(0, excess)]:
            self._remove(inst, now)
        for _ in range(cmd.replicas - len(self.pools[role])):
            self._new_instance(role, now, self.cfg.startup_delay_s)

    # ----- events ------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, obj: object) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, obj))

    def _wake(self, inst: Instance) -> None:
        t = inst.engine.next_event_time()
        if t is not None:
            inst.version += 1
            self._push(t, "engine", (inst, inst.version))

    def _route(self, role: Role) -> Instance | None:
        ready = [i for i in self.pools[role] if i.status == "ready"]
        if not ready:
            return None
        return min(ready, key=lambda i: (i.outstanding_tokens, i.assigned))

    def _submit(self, inst: Instance, rec: RequestRecord, now: float, prompt: int, max_tokens: int) -> None:
        tr = rec.trace
        # A decode instance gets the prompt's KV from the prefill instance (the hand-off already
        # waited for the transfer): it recomputes only the last prompt token, as the engine does
        # for requests whose KV has landed.
        req = SimRequest(id=f"{id(rec)}:{inst.role}", prompt_tokens=prompt, max_tokens=max_tokens,
                         block_hashes=tr.hash_ids, block_size=tr.block_size,
                         kv_ready_at=now if inst.role == "decode" else None)
        if inst.engine.validate(prompt, max_tokens):
            rec.rejected = True
            self._complete(rec, now)
            return
        self._req_of[req.id] = rec
        self._owner[req.id] = inst
        inst.engine.advance(now)
        inst.engine.submit(req, now)
        inst.outstanding_tokens += prompt if inst.role == "prefill" else 1
        inst.assigned += 1
        self._wake(inst)

    def _dispatch(self, rec: RequestRecord, now: float, pending: deque[RequestRecord]) -> None:
        first_role: Role = "unified" if self.cfg.mode == "aggregated" else "prefill"
        inst = self._route(first_role)
        if inst is None:
            pending.append(rec)  # no ready instance yet: the gateway queues it
            return
        tr = rec.trace
        max_tokens = tr.output_tokens if first_role == "unified" else 1
        self._submit(inst, rec, now, tr.input_tokens, max_tokens)

    def _engine_event(self, inst: Instance, now: float) -> None:
        for em in inst.engine.advance(now):
            rec = self._req_of.get(em.request_id)
            if rec is None:
                continue
            if em.first and inst.role in ("prefill", "unified"):
                rec.first_token = em.time
                if inst.role == "prefill":
                    inst.outstanding_tokens -= rec.trace.input_tokens
                    delay = self.cost.kv_transfer_time(rec.trace.input_tokens, self.cfg.link_gbps)
                    self._push(em.time + delay, "handoff", rec)
            if em.finished:
                del self._req_of[em.request_id]
                del self._owner[em.request_id]
                if inst.role != "prefill":
                    inst.outstanding_tokens -= 1
                    rec.finished = em.time
                    self._complete(rec, em.time)
        self._wake(inst)

    # ----- observations ------------------------------------------------------------------------
    def _length_mix(self, reqs: Sequence[TraceRequest]) -> list[LengthBucket]:
        ins = np.array([r.input_tokens for r in reqs])
        outs = np.array([r.output_tokens for r in reqs])
        order = np.argsort(ins)
        out = []
        for chunk in np.array_split(order, min(self.cfg.mix_buckets, len(order))):
            if len(chunk):
                out.append(LengthBucket(input_tokens=max(1, int(ins[chunk].mean())),
                                        output_tokens=max(1, int(outs[chunk].mean())), weight=len(chunk)))
        return out

    def observe(self, now: float, arrivals: list[float], arrived: list[RequestRecord],
                done: list[RequestRecord], hits: tuple[int, int], pending: int) -> Observations:
        w = min(self.cfg.window_s, now) if now > 0 else self.cfg.window_s
        lo = bisect_left(arrivals, now - w)
        mix_lo = bisect_left(arrivals, now - self.cfg.mix_window_s)
        recent = [r.trace for r in arrived[mix_lo:]] or ([arrived[-1].trace] if arrived else [])
        roles: dict[Role, RoleObservation] = {}
        for role, pool in self.pools.items():
            ready = sum(i.status == "ready" for i in pool)
            starting = sum(i.status == "starting" for i in pool)
            drained = sum(i.status == "draining" and i.idle for i in pool)
            draining = sum(i.status == "draining" for i in pool) - drained
            queue = sum(len(i.engine.waiting) for i in pool) + (pending if role != "decode" else 0)
            kv = [i.engine.kv_usage() for i in pool if i.status == "ready"]
            roles[role] = RoleObservation(ready=ready, starting=starting, draining=draining, drained=drained,
                                          queue_depth=queue, kv_usage=float(np.mean(kv)) if kv else 0.0)
        slo = self.cfg.slo
        ttft = [r.ttft() <= slo.ttft_s for r in done]
        tpot = [r.tpot() <= slo.tpot_s for r in done]
        query, hit = hits
        return Observations(
            time_s=now, window_s=w, arrival_rate=(len(arrivals) - lo) / w,
            length_mix=self._length_mix(recent) if recent else [LengthBucket(input_tokens=1, output_tokens=1)],
            prefix_hit_ratio=hit / query if query else 0.0, roles=roles,
            ttft_attainment=float(np.mean(ttft)) if done else None,
            ttft_attainable=max(1e-3, float(np.mean([r.attainable for r in done]))) if done else 1.0,
            tpot_attainment=float(np.mean(tpot)) if done else None, completed=len(done))

    # ----- the run -----------------------------------------------------------------------------
    def run(self, trace: Sequence[TraceRequest], scaler: Scaler, *, measure_from_s: float = 0.0,
            progress: Callable[[float], None] | None = None) -> ReplayResult:
        """Replay ``trace``; requests, GPU time and scaling actions before ``measure_from_s`` are a
        warm-up (every scaler starts cold) and are left out of the result."""
        for role, n in scaler.initial().items():
            for _ in range(n):
                self._new_instance(role, 0.0, 0.0)
        alone: dict[int, float] = {}
        for tr in trace:
            if tr.input_tokens not in alone:
                alone[tr.input_tokens] = prefill_alone_s(self.cost, self.limits.max_num_batched_tokens, tr.input_tokens)
        records = [RequestRecord(tr, tr.arrival, attainable=alone[tr.input_tokens] <= self.cfg.slo.ttft_s)
                   for tr in trace]
        for i, rec in enumerate(records):
            self._push(rec.arrival, "arrival", i)
        end = trace[-1].arrival if trace else 0.0
        self._push(self.cfg.tick_s, "tick", None)
        pending: deque[RequestRecord] = deque()
        arrivals: list[float] = []
        arrived: list[RequestRecord] = []
        actions: list[tuple[float, Role, int, int]] = []
        timeline = Timeline(replicas={r: [] for r in self.roles})
        targets = {r: len(p) for r, p in self.pools.items()}
        last_counters = (0, 0)
        while self._heap:
            now, _, kind, obj = heapq.heappop(self._heap)
            if kind == "arrival":
                rec = records[obj]  # type: ignore[index]
                arrivals.append(now)
                arrived.append(rec)
                self._dispatch(rec, now, pending)
            elif kind == "engine":
                inst, version = obj  # type: ignore[misc]
                if version == inst.version and inst.removed_at is None:
                    self._engine_event(inst, now)
            elif kind == "handoff":
                rec = obj  # type: ignore[assignment]
                target = self._route("decode")
                if target is None:
                    self._push(now + 0.1, "handoff", rec)
                else:
                    self._submit(target, rec, now, rec.trace.input_tokens, max(1, rec.trace.output_tokens - 1))
            elif kind == "ready":
                inst = obj  # type: ignore[assignment]
                if inst.status == "starting":
                    inst.status = "ready"
                while pending and inst.role != "decode" and self._route(inst.role) is not None:
                    self._dispatch(pending.popleft(), now, pending)
            elif kind == "tick":
                q = sum(i.engine.counters.prefix_query_tokens for i in self._all_instances())
                h = sum(i.engine.counters.prefix_hit_tokens for i in self._all_instances())
                hits = (q - last_counters[0], h - last_counters[1])
                last_counters = (q, h)
                lo = bisect_left(self._done_at, now - self.cfg.window_s)
                obs = self.observe(now, arrivals, arrived, self._done[lo:], hits, len(pending))
                commands = scaler.step(obs)
                for role in self.roles:
                    if commands and role in commands:
                        cmd = commands[role]
                        self.apply(role, cmd, now)
                        new_target = cmd.settles_at
                        if new_target != targets[role]:
                            actions.append((now, role, targets[role], new_target))
                            targets[role] = new_target
                timeline.time.append(now)
                timeline.rate.append(obs.arrival_rate)
                for role in self.roles:
                    timeline.replicas[role].append(len(self.pools[role]))
                timeline.ttft_attainment.append(obs.ttft_attainment if obs.ttft_attainment is not None else 1.0)
                timeline.tpot_attainment.append(obs.tpot_attainment if obs.tpot_attainment is not None else 1.0)
                if progress:
                    progress(now)
                if now < end or len(self._done) < len(records):
                    self._push(now + self.cfg.tick_s, "tick", None)
        stop = max([r.finished or r.arrival for r in records] + [end])
        gpu_seconds = sum(max(0.0, (i.removed_at if i.removed_at is not None else stop)
                              - max(i.ordered_at, measure_from_s)) for i in self._all_instances())
        return ReplayResult([r for r in records if r.arrival >= measure_from_s],
                            gpu_seconds * self.cfg.gpus_per_instance,
                            [a for a in actions if a[0] >= measure_from_s], timeline, stop)
