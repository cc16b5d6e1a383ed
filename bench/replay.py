"""Replay a trace on elastic prefill and decode pools in the DES, driven by a scaling policy.

The cluster is :class:`tandem.sim.des.pd.PDSimulation`, the same discrete-event simulator as
``tandem bench pd`` (the same :class:`~tandem.sim.engine.Engine` as ``tandem sim``, the gateway's
routing :class:`~tandem.router.routing.scheduler.Scheduler` in front of the prefill pool, the
gateway's decode choice, the KV hand-off over each decode instance's ingress link). Its pools are
elastic: an ordered instance costs GPU time from the order and serves after ``startup_delay_s``; a
draining one gets no new requests and is removed once idle. This module is only the controller
plugged into it (:class:`ElasticController`): every ``tick_s`` it builds the
:class:`~tandem.autoscaler.models.Observations` the live controller gets from the gateway, asks the
scaler, and carries out its commands with the Kubernetes actuator's drain contract.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.api.models import Role
from tandem.api.observations import LengthBucket, Observations, RoleObservation
from tandem.autoscaler.models import ScalingSLO
from tandem.perf.costmodel import CostModel
from tandem.perf.profile import load_profile
from tandem.router.routing.config import RoutingConfig
from tandem.sim.des.pd import DECODE, LOCAL, PDConfig, PDResult, PDSimulation
from tandem.sim.des.simulator import PreparedRequest
from tandem.traces import TraceRequest

ROLES: tuple[Role, ...] = ("prefill", "decode")
POOL_OF: dict[Role, int] = {"prefill": LOCAL, "decode": DECODE}


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
    """A scaling policy under test; it sees only observations, like the live controller.

    ``tick_s``, ``window_s`` and ``mix_window_s`` are the policy's own loop period and observation
    windows (rate/attainment/queues, and length mix); None takes the replay's (the Tandem
    actuator's defaults). Peer policies differ in these too (Knative's autoscaler ticks every 2 s).
    """

    name: str = "scaler"
    tick_s: float | None = None
    window_s: float | None = None
    mix_window_s: float | None = None

    def initial(self) -> dict[Role, int]:
        raise NotImplementedError

    def step(self, obs: Observations) -> dict[Role, ScaleCommand] | None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    profile: str
    slo: ScalingSLO
    startup_delay_s: float = 60.0
    tick_s: float = 15.0
    window_s: float = 30.0
    policy: str = "dualmap"  # the gateway's default routing in front of the prefill pool
    gpus_per_instance: int = 1  # the shipped profiles are one-GPU engines
    mix_window_s: float = 300.0  # the actuator's default: the mix moves slower than the rate and is noisier


@dataclass(frozen=True, slots=True)
class Outcome:
    """One measured request against the SLOs."""

    arrival: float
    ttft_ok: bool
    tpot_ok: bool
    attainable: bool  # False when the prompt alone (no cache, no queue) takes longer than the TTFT SLO

    @property
    def met(self) -> bool:
        return self.ttft_ok and self.tpot_ok


@dataclass
class Timeline:
    time: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    replicas: dict[str, list[int]] = field(default_factory=dict)
    ttft_attainment: list[float] = field(default_factory=list)
    tpot_attainment: list[float] = field(default_factory=list)


@dataclass
class ReplayResult:
    outcomes: list[Outcome]
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


def length_mix(reqs: Iterable[TraceRequest] | Iterable[PreparedRequest]) -> list[LengthBucket]:
    """Requests in power-of-two classes of (prompt, output) tokens, each at its exact mean: the
    gateway's classes (``router/observations.py``), fine where the tail is (a few long prompts set
    the prefill queue's second moment)."""
    cells: dict[tuple[int, int], list[int]] = {}
    for r in reqs:
        cell = cells.setdefault((r.input_tokens.bit_length(), r.output_tokens.bit_length()), [0, 0, 0])
        cell[0] += 1
        cell[1] += r.input_tokens
        cell[2] += r.output_tokens
    return [LengthBucket(input_tokens=max(1, round(i / n)), output_tokens=max(1, round(o / n)), weight=n)
            for _, (n, i, o) in sorted(cells.items())]


def judge(res: PDResult, slo: ScalingSLO) -> tuple[bool, bool]:
    """(TTFT met, TPOT met); a request that never ran meets neither, a one-token answer has no TPOT."""
    ttft, tpot = res.ttft, res.tpot
    ran = not res.rejected and res.finished_at is not None
    return (ran and ttft is not None and ttft <= slo.ttft_s,
            ran and (tpot is None or tpot <= slo.tpot_s))


class ElasticController:
    """The scaler's loop inside the DES: observe, decide, actuate, every ``tick_s``."""

    def __init__(self, cfg: ReplayConfig, scaler: Scaler, requests: Sequence[PreparedRequest],
                 attainable: Sequence[bool]) -> None:
        self.cfg, self.scaler = cfg, scaler
        self.interval_s = scaler.tick_s or cfg.tick_s
        self.window_s = scaler.window_s or cfg.window_s
        self.mix_window_s = scaler.mix_window_s or cfg.mix_window_s
        self.arrivals = [r.arrival for r in requests]
        self.attainable = attainable
        self.actions: list[tuple[float, Role, int, int]] = []
        self.timeline = Timeline(replicas={r: [] for r in ROLES})
        self.targets: dict[Role, int] = {}
        self._open: list[int] = []  # arrived, not finished or rejected
        self._seen = 0
        self._done_at: list[float] = []  # completion times, ascending
        self._done: list[tuple[bool, bool, bool, bool]] = []  # (ttft ok, tpot ok, attainable, prefill leg ok)

    # ----- observation ---------------------------------------------------------------------------
    def _collect(self, sim: PDSimulation) -> None:
        self._open.extend(range(self._seen, sim.arrived))
        self._seen = sim.arrived
        finished, still = [], []
        for n in self._open:
            res = sim.results[n]
            if res.rejected or res.finished_at is not None:
                finished.append((res.finished_at if res.finished_at is not None else res.arrival, n))
            else:
                still.append(n)
        self._open = still
        for t, n in sorted(finished):
            res = sim.results[n]
            leg = res.prefill_done_at is not None and res.prefill_done_at - res.arrival <= self.cfg.slo.ttft_s
            self._done_at.append(t)
            self._done.append((*judge(res, self.cfg.slo), self.attainable[n], leg))

    def observe(self, sim: PDSimulation, now: float) -> Observations:
        self._collect(sim)
        w = min(self.window_s, now) if now > 0 else self.window_s
        hi = sim.arrived
        lo = bisect_left(self.arrivals, now - w, 0, hi)
        mix_lo = min(bisect_left(self.arrivals, now - self.mix_window_s, 0, hi), max(0, hi - 1))
        # Like the actuator: length mix and hit ratio (prompt tokens routing found cached) over the
        # longer window, the rest over the short one.
        window = sim.results[mix_lo:hi]
        prompt = sum(r.prompt_tokens for r in window)
        hit = sum(r.prompt_tokens - r.uncached_tokens for r in window if not r.rejected)
        roles: dict[Role, RoleObservation] = {}
        for role in ROLES:
            pool = sim.pools[POOL_OF[role]]
            live = [k for k, s in enumerate(pool.status) if s in ("ready", "draining")]
            drained = sum(pool.status[k] == "draining" and pool.idle(k) for k in live)
            queued = pool.scheduler.queued_total if pool.scheduler is not None else 0
            kv = [pool.engines[k].kv_usage() for k, s in enumerate(pool.status) if s == "ready"]
            serving = [k for k in live if pool.status[k] == "ready"]
            roles[role] = RoleObservation(
                ready=pool.count("ready"), starting=pool.count("starting"),
                draining=pool.count("draining") - drained, drained=drained,
                queue_depth=queued + sum(len(pool.engines[k].waiting) for k in live),
                in_flight=queued + sum(len(pool.engines[k].waiting) + len(pool.engines[k].running) for k in serving),
                kv_usage=float(np.mean(kv)) if kv else 0.0)
        done = self._done[bisect_left(self._done_at, now - w):]
        return Observations(
            time_s=now, window_s=w, arrival_rate=(hi - lo) / w,
            length_mix=length_mix(sim.requests[mix_lo:hi]) if hi else [LengthBucket(input_tokens=1, output_tokens=1)],
            recent_length_mix=length_mix(sim.requests[lo:hi]) if hi > lo else None, recent_mix_requests=hi - lo,
            prefix_hit_ratio=hit / prompt if prompt else 0.0, roles=roles,
            ttft_attainment=float(np.mean([x[0] for x in done])) if done else None,
            ttft_attainable=max(1e-3, float(np.mean([x[2] for x in done]))) if done else 1.0,
            tpot_attainment=float(np.mean([x[1] for x in done])) if done else None,
            prefill_attainment=float(np.mean([x[3] for x in done])) if done else None, completed=len(done))

    # ----- actuation -----------------------------------------------------------------------------
    def apply(self, sim: PDSimulation, role: Role, cmd: ScaleCommand, now: float) -> None:
        """Carry out a scale command with the Kubernetes actuator's drain contract."""
        p = POOL_OF[role]
        pool = sim.pools[p]

        def load(k: int) -> int:
            eng = pool.engines[k]
            queued = len(pool.scheduler.queued(pool.ids[k])) if pool.scheduler is not None else 0
            return len(eng.running) + len(eng.waiting) + queued

        live = [k for k, s in enumerate(pool.status) if s != "removed"]
        draining = [k for k in live if pool.status[k] == "draining"]
        active = [k for k in live if pool.status[k] != "draining"]
        want = max(0, min(cmd.drain, len(live)))
        # Un-drain first (no pod has to start): a ready instance that still holds work is the
        # cheapest capacity; then mark instances draining, one still starting first (it holds
        # nothing), else the least loaded.
        while len(draining) > want:
            k = max(draining, key=lambda k: (now >= pool.ready_at[k], load(k)))
            sim.set_draining(p, k, False, now)
            draining.remove(k)
            active.append(k)
        while len(draining) < want and active:
            k = min(active, key=lambda k: (pool.status[k] != "starting", load(k), -pool.ordered_at[k]))
            sim.set_draining(p, k, True, now)
            active.remove(k)
            draining.append(k)
        excess = len(live) - cmd.replicas
        for k in [k for k in draining if pool.idle(k)][:max(0, excess)]:
            sim.remove_instance(p, k, now)
        alive = sum(s != "removed" for s in pool.status)
        for _ in range(cmd.replicas - alive):
            sim.add_instance(p, now, self.cfg.startup_delay_s)

    def __call__(self, sim: PDSimulation, now: float) -> None:
        obs = self.observe(sim, now)
        commands = self.scaler.step(obs) or {}
        for role in ROLES:
            if role in commands:
                cmd = commands[role]
                self.apply(sim, role, cmd, now)
                if cmd.settles_at != self.targets[role]:
                    self.actions.append((now, role, self.targets[role], cmd.settles_at))
                    self.targets[role] = cmd.settles_at
        tl = self.timeline
        tl.time.append(now)
        tl.rate.append(obs.arrival_rate)
        for role in ROLES:
            tl.replicas[role].append(sum(s != "removed" for s in sim.pools[POOL_OF[role]].status))
        tl.ttft_attainment.append(1.0 if obs.ttft_attainment is None else obs.ttft_attainment)
        tl.tpot_attainment.append(1.0 if obs.tpot_attainment is None else obs.tpot_attainment)


def replay(requests: Sequence[PreparedRequest], scaler: Scaler, cfg: ReplayConfig, *,
           measure_from_s: float = 0.0) -> ReplayResult:
    """Replay ``requests`` under ``scaler``. Requests, GPU time and scaling actions before
    ``measure_from_s`` are a warm-up (every scaler starts cold) and are left out of the result."""
    profile = load_profile(cfg.profile)
    cost = CostModel.from_profile(profile)
    alone: dict[int, bool] = {}
    for r in requests:
        if r.input_tokens not in alone:
            alone[r.input_tokens] = prefill_alone_s(cost, profile.max_num_batched_tokens,
                                                    r.input_tokens) <= cfg.slo.ttft_s
    ordered = sorted(requests, key=lambda r: (r.arrival, r.index))
    attainable = [alone[r.input_tokens] for r in ordered]
    initial = scaler.initial()
    controller = ElasticController(cfg, scaler, ordered, attainable)
    controller.targets = dict(initial)
    sim = PDSimulation(ordered, PDConfig(local_prefill=initial["prefill"], decode=initial["decode"],
                                         local_profile=cfg.profile),
                       RoutingConfig(slo_ttft_s=cfg.slo.ttft_s), cfg.policy)
    run = sim.run(controller)
    end = ordered[-1].arrival if ordered else 0.0
    stop = max([r.finished_at for r in run.requests if r.finished_at is not None] + [end])
    gpu_seconds = sum(max(0.0, (life.removed_at if life.removed_at is not None else stop)
                          - max(life.ordered_at, measure_from_s)) for life in run.instances)
    outcomes = [Outcome(r.arrival, *judge(r, cfg.slo), a)
                for r, a in zip(run.requests, attainable, strict=True) if r.arrival >= measure_from_s]
    return ReplayResult(outcomes, gpu_seconds * cfg.gpus_per_instance,
                        [a for a in controller.actions if a[0] >= measure_from_s], controller.timeline, stop)
