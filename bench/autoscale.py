"""``tandem bench autoscale``: replay a time-varying trace on elastic prefill and decode pools in
the DES and compare the Tandem autoscaler with the best static P:D allocation sized for the peak
and with a utilisation-threshold scaler (KV usage >= 0.8 or queue >= 5 per instance, HPA-style).

All three run in the same simulator (:mod:`tandem.bench.replay` on
:class:`tandem.sim.des.pd.PDSimulation`) with the same engines, routing and drain contract; only
the scaling policy differs. Numbers are reported as measured plus ratios against the static
baseline of the same run.

"Sized for the peak" (the issue's baseline) is taken literally: a static allocation must hold the
SLO target at the trace's peaks, not only on average. The best static allocation is the one with
the fewest GPUs (then the higher attainment) that meets the target in every 60 s window of the
replay (the start-up delay: a shorter peak no scaler can follow either, a longer window would
average a peak away). Peaks differ per role (prefill work follows the prompt tokens arriving,
decode the KV held by long outputs), and the replay judges both where they occur. Two lenient
static references are reported next to it: every 5-minute window, and the whole trace's average.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from tandem.api.observations import Observations
from tandem.autoscaler.capacity import CapacityModel
from tandem.autoscaler.core import role_decision, size_pools, tick
from tandem.autoscaler.models import AutoscalerSpec, AutoscalerState, PoolBounds, Role, ScalingSLO
from tandem.bench.peer_scalers import DynamoPlannerScaler, KnativeKPAScaler
from tandem.bench.replay import ReplayConfig, ReplayResult, ScaleCommand, Scaler, length_mix, replay
from tandem.config import TandemSettings
from tandem.perf.profile import Profile, load_profile
from tandem.sim.des.simulator import PreparedRequest, prepare
from tandem.traces import TraceFormatError, TraceRequest, detect_format, load_trace, mean_qps, rescale_to_qps

# Per trace format: a profile whose memory fits the trace's prompts, and a mean rate at which the
# peak needs many instances while the replay stays a few minutes of CPU.
DEFAULTS: dict[str, dict[str, object]] = {
    "azure": {"profile": "qwen2.5-32b-h100", "load_factor": 4, "ttft_s": 2.0},
    # Mooncake prompts average 12k tokens (p99 85k): a 2 s TTFT is out of reach for its tail.
    "mooncake": {"profile": "llama3-8b-h100", "load_factor": 3, "ttft_s": 5.0},
}


class LoadShape(BaseModel):
    """A synthetic day-like envelope laid over the trace's own load (``--load-shape diurnal``).

    One hour of the shipped traces has little dynamic range (Azure: mean 22 req/s, 60 s peak 35),
    so a static pool sized for the peak wastes little and autoscaling has little to save. A
    production day does: night traffic is a fraction of the afternoon's. The envelope is a raised
    cosine from ``trough`` at t = 0 (night) up to 1 at ``period_s`` / 2 (the day's peak) and back,
    multiplying the trace's sliding-window rate, so the trace's mix and its minute-to-minute
    variation stay while the load also follows a compressed day. Synthetic: results on it are not
    results on the shipped traces.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["diurnal"] = "diurnal"
    period_s: float = Field(3600.0, gt=0, description="length of one day of the envelope")
    trough: float = Field(0.3, ge=0, le=1, description="the night's load as a share of the peak's")

    def factor(self, t: float) -> float:
        """The envelope at ``t`` seconds, between ``trough`` and 1."""
        return self.trough + (1 - self.trough) * (1 - math.cos(2 * math.pi * t / self.period_s)) / 2


def scale_load(reqs: Sequence[TraceRequest], factor: float, window_s: float = 60.0,
               seed: int = 0, shape: LoadShape | None = None) -> list[TraceRequest]:
    """The trace at ``factor`` times its load, on its own time axis: a Poisson process whose rate is
    ``factor`` x the trace's arrival rate over a sliding ``window_s`` (times ``shape.factor(t)``
    with a load shape); each arrival is a request drawn at random from the trace's requests in that
    window.

    This keeps what autoscaling is about, the load curve and the drift of the length mix at their
    real pace relative to start-up delays and cooldowns (compressing time, ``--qps``, would not),
    and gives the sub-minute arrivals and the mix of each minute the noise of ``factor`` times more
    independent users. Superposing copies of the trace would not: every burst of long prompts would
    come ``factor`` times within seconds, and a static pool sized for that burst looks worse than it
    is. The j-th draw of a request gets the j-th private copy of its prefix block ids, so draws do not
    invent cache hits, while the requests of one conversation keep sharing theirs as in the trace.
    """
    if not reqs:
        return []
    rng = random.Random(seed)
    arrivals = [r.arrival for r in reqs]
    end, half = arrivals[-1], window_s / 2

    def window(t: float) -> tuple[int, int]:
        return bisect_left(arrivals, t - half), bisect_right(arrivals, t + half)

    def rate(t: float) -> float:
        lo, hi = window(t)
        return (hi - lo) / max(min(end, t + half) - max(0.0, t - half), 1e-9)

    ceiling = 1.1 * factor * max(rate(i * half / 8) for i in range(int(end / (half / 8)) + 1))
    offset = 1 + max((h for r in reqs for h in r.hash_ids), default=0)
    uses: dict[int, int] = defaultdict(int)
    out: list[TraceRequest] = []
    t = 0.0
    while True:
        t += rng.expovariate(ceiling)
        if t > end:
            return out
        # The shape is at most 1, so the unshaped ceiling still bounds the rate (thinning stays exact).
        if rng.random() * ceiling < factor * rate(t) * (1.0 if shape is None else shape.factor(t)):
            lo, hi = window(t)
            i = rng.randrange(lo, hi)
            j = uses[i]
            uses[i] += 1
            out.append(replace(reqs[i], arrival=t, hash_ids=tuple(h + j * offset for h in reqs[i].hash_ids)))


def distinct_text_keys(reqs: list[PreparedRequest]) -> list[PreparedRequest]:
    """Requests without prefix blocks (the Azure trace) keyed by their own text, as the gateway keys
    them, rather than by their length (the DES's stand-in): two users' prompts of one length are
    different texts and must not share a routing key."""
    return [r if r.engine_hashes else replace(r, fallback_key=(1 << 48) + r.index) for r in reqs]


# The static baseline must hold the SLO target in every window of this length: the start-up delay.
PEAK_WINDOW_S = 60.0
# A more lenient static reference, and the worst window reported for every scaler.
REPORT_WINDOW_S = 300.0
# Windows with fewer requests that can meet the TTFT are not judged (too few to say anything).
MIN_WINDOW_REQUESTS = 50
# Direction changes are counted per pool over sliding windows of this length (the criterion).
DIRECTION_WINDOW_S = 600.0
# Below this share of static_peak's GPU-hours the oracle's headroom is too small for a share of it to mean much.
MIN_HEADROOM = 0.05


def _command(target: int, obs: Observations, role: Role) -> ScaleCommand:
    d = role_decision(role, target, obs.roles[role], 0.0, 0.0, "")
    return ScaleCommand(replicas=d.replicas, drain=d.drain, target=target)


class TandemScaler(Scaler):
    name = "tandem"

    def __init__(self, profile: Profile, spec: AutoscalerSpec, initial: dict[Role, int]) -> None:
        self.profile, self.spec, self._initial = profile, spec, initial
        self.capacity = CapacityModel(profile, spec.slo, max_utilisation=spec.max_utilisation,
                                       decode_max_utilisation=spec.decode_max_utilisation)
        self.state: AutoscalerState | None = None
        self.decisions: list[str] = []

    def initial(self) -> dict[Role, int]:
        return dict(self._initial)

    def step(self, obs: Observations) -> dict[Role, ScaleCommand]:
        d = tick(obs, self.profile, self.spec, self.state, capacity=self.capacity)
        self.state = d.state
        self.decisions.append(d.reason)
        return {role: ScaleCommand(replicas=r.replicas, drain=r.drain, target=r.target) for role, r in d.roles.items()}


class StaticScaler(Scaler):
    name = "static_peak"

    def __init__(self, replicas: dict[Role, int]) -> None:
        self.replicas = replicas

    def initial(self) -> dict[Role, int]:
        return dict(self.replicas)

    def step(self, obs: Observations) -> None:
        return None


class ReactiveOracleScaler(Scaler):
    """A reference, not a policy: the calibrated oracle's pools (each minute's actual load, sized at
    static_peak's capacity per need) ordered the moment each minute begins, but still ready only
    after the start-up delay. What any scaler that follows the load (rather than holding capacity
    ahead of it) can at best attain: where this misses the target, only held headroom meets it."""

    name = "reactive_oracle"

    def __init__(self, schedule: Sequence[dict[Role, int]], window_s: float) -> None:
        self.schedule, self.minute = list(schedule), window_s

    def initial(self) -> dict[Role, int]:
        return dict(self.schedule[0])

    def step(self, obs: Observations) -> dict[Role, ScaleCommand]:
        k = min(int(obs.time_s // self.minute), len(self.schedule) - 1)
        return {role: _command(n, obs, role) for role, n in self.schedule[k].items()}


class ThresholdScaler(Scaler):
    """The common default: scale a pool when KV usage >= 0.8 or the queue per instance >= 5.

    HPA's rule: desired = ceil(current x metric / threshold) for the worse of the two metrics, a
    10 % tolerance band, immediate scale-up and a stabilization window for scale-down.
    """

    name = "threshold"

    def __init__(self, spec: AutoscalerSpec, initial: dict[Role, int], kv_threshold: float = 0.8,
                 queue_threshold: float = 5.0) -> None:
        self.spec, self._initial = spec, initial
        self.kv_threshold, self.queue_threshold = kv_threshold, queue_threshold
        self.targets = dict(initial)
        self.history: dict[Role, list[tuple[float, int]]] = defaultdict(list)
        self.last_change: dict[Role, float] = {}

    def initial(self) -> dict[Role, int]:
        return dict(self._initial)

    def step(self, obs: Observations) -> dict[Role, ScaleCommand]:
        out = {}
        for role, o in obs.roles.items():
            current = self.targets[role]
            serving = max(o.ready, 1)
            ratio = max(o.kv_usage / self.kv_threshold, o.queue_depth / serving / self.queue_threshold)
            desired = current if abs(ratio - 1) <= 0.1 else math.ceil(current * ratio)
            bounds = self.spec.bounds(role)
            desired = max(bounds.min_replicas, min(bounds.max_replicas, desired))
            hist = [(t, n) for t, n in self.history[role] if t > obs.time_s - self.spec.scale_down_stabilization_s]
            hist.append((obs.time_s, desired))
            self.history[role] = hist
            if desired > current and obs.roles[role].starting == 0:
                self.targets[role] = desired
                self.last_change[role] = obs.time_s
            elif desired < current:
                stable = max(n for _, n in hist)
                if stable < current and obs.time_s - self.last_change.get(role, -math.inf) >= \
                        self.spec.scale_down_stabilization_s:
                    self.targets[role] = stable
                    self.last_change[role] = obs.time_s
            out[role] = _command(self.targets[role], obs, role)
        return out


def peak_rate(reqs: Sequence[TraceRequest], window_s: float) -> float:
    """The highest arrival rate over any window of ``window_s``."""
    arrivals = [r.arrival for r in reqs]
    best, j = 0, 0
    for i, t in enumerate(arrivals):
        while arrivals[j] <= t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best / window_s


@dataclass(frozen=True, slots=True)
class StaticRun:
    replicas: dict[Role, int]
    summary: dict[str, float | int]

    @property
    def gpus(self) -> int:
        return sum(self.replicas.values())


def search_static(start: dict[Role, int], run: Callable[[int, int], StaticRun], holds: Callable[[StaticRun], bool],
                  max_replicas: int) -> StaticRun | None:
    """The static allocation with the fewest instances for which ``holds``, searched in the DES.

    Prefill first, with twice the start's decode instances (so decode is not what fails): the
    smallest prefill pool that holds; then the smallest decode pool that holds with it; then one
    more prefill instance for one fewer decode, in case decode was left with too little of the
    miss budget. ``run`` is memoised by the caller, so searches for several criteria share runs.
    None when nothing up to ``max_replicas`` per role holds.
    """
    def smallest(n: int, ok: Callable[[int], bool]) -> int | None:
        if ok(n):
            while n > 1 and ok(n - 1):
                n -= 1
            return n
        while n < max_replicas:
            n += 1
            if ok(n):
                return n
        return None

    wide = min(max_replicas, 2 * start["decode"])
    p = smallest(start["prefill"], lambda p: holds(run(p, wide)))
    if p is None:
        return None
    d = smallest(start["decode"], lambda d: holds(run(p, d)))
    if d is None:
        return None
    candidates = [run(p, d)]
    if d > 1 and p < max_replicas and holds(run(p + 1, d - 1)):
        candidates.append(run(p + 1, d - 1))
    return min(candidates, key=lambda c: (c.gpus, -c.summary["slo_attainment"]))


def oracle_sizes(reqs: Sequence[TraceRequest], cap: CapacityModel, spec: AutoscalerSpec, window_s: float,
                 start_s: float) -> list[dict[Role, int]]:
    """Per window of ``window_s`` from ``start_s``: the pools the model sizes for the rate and mix that
    actually arrive in it (at least one instance per role; an empty window keeps one of each)."""
    buckets: dict[int, list[TraceRequest]] = defaultdict(list)
    for r in reqs:
        if r.arrival >= start_s:
            buckets[int((r.arrival - start_s) // window_s)].append(r)
    out: list[dict[Role, int]] = []
    for k in range(max(buckets, default=-1) + 1):
        part = buckets.get(k)
        sizes = size_pools(cap, spec, len(part) / window_s, length_mix(part)) if part else {}
        out.append({role: max(1, sizes.get(role, 1)) for role in spec.roles})
    return out


def oracle_gpu_hours(reqs: Sequence[TraceRequest], cap: CapacityModel, spec: AutoscalerSpec, window_s: float,
                     start_s: float) -> float:
    """GPU-hours of a clairvoyant scaler: each window sized by the model for the rate and mix that
    actually arrive in it, with no start-up delay, forecast headroom or hysteresis. A reference
    for how much any scaler driven by this capacity model could save, not a reachable result."""
    return window_s * sum(n * spec.bounds(role).gpus_per_replica for sizes in oracle_sizes(reqs, cap, spec, window_s,
                                                                                            start_s)
                          for role, n in sizes.items()) / 3600


def calibrate(sizes: Sequence[dict[Role, int]], static: dict[Role, int], spec: AutoscalerSpec,
              peak: dict[Role, int] | None = None) -> list[dict[Role, int]]:
    """Each window's model sizing scaled so that the hardest window gets exactly ``static`` (per role,
    rounded up; ``peak``: the hardest window's sizing, default the largest in ``sizes``)."""
    peak = peak or {role: max((s[role] for s in sizes), default=1) for role in spec.roles}
    return [{role: max(spec.bounds(role).min_replicas, 1, math.ceil(s[role] * static[role] / peak[role] - 1e-9))
             for role in spec.roles} for s in sizes]


def calibrated_oracle_gpu_hours(sizes: Sequence[dict[Role, int]], static: dict[Role, int], spec: AutoscalerSpec,
                                window_s: float) -> float:
    """The oracle at static_peak's attainment: each window's pools are the model's sizing scaled so
    that the window the model finds hardest gets exactly static_peak's pool (per role, rounded up).

    The raw oracle (:func:`oracle_gpu_hours`) carries the model's own bias: where the model is
    conservative it needs more than static_peak even at the peak, where optimistic less, so its
    distance from static_peak says as much about the model as about the load. Scaled to static_peak
    at the peak, the oracle keeps static_peak's capacity per unit of need everywhere and follows the
    load with perfect foresight and no start-up delay: (static_peak - oracle) is the headroom any
    scaler could capture at the same attainment."""
    return window_s * sum(n * spec.bounds(role).gpus_per_replica for s in calibrate(sizes, static, spec)
                          for role, n in s.items()) / 3600


def headroom_share(static_gpu_h: float, scaler_gpu_h: float, oracle_gpu_h: float,
                   least: float = MIN_HEADROOM) -> float | None:
    """(static_peak - scaler) / (static_peak - oracle) GPU-hours; None when the oracle itself saves less
    than ``least`` of static_peak's GPU-hours (there is no headroom to capture: a flat load)."""
    room = static_gpu_h - oracle_gpu_h
    if room < least * static_gpu_h:
        return None
    return (static_gpu_h - scaler_gpu_h) / room


def worst_window(res: ReplayResult, window_s: float, min_requests: int = MIN_WINDOW_REQUESTS) -> float:
    """The lowest attainment of both SLOs over consecutive windows of arrivals, among the requests
    that can meet the TTFT at all (a prompt whose prefill alone exceeds it fails at any allocation)."""
    met: dict[int, int] = defaultdict(int)
    possible: dict[int, int] = defaultdict(int)
    for o in res.outcomes:
        w = int(o.arrival // window_s)
        possible[w] += o.attainable
        met[w] += o.attainable and o.met
    values = [met[w] / n for w, n in possible.items() if n >= min_requests]
    return min(values) if values else 1.0


def direction_changes(actions: Sequence[tuple[float, Role, int, int]], window_s: float) -> int:
    """The most changes of direction (an up after a down or the reverse) one pool made within any
    ``window_s``; a change counts at the action that reverses."""
    worst = 0
    by_role: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for t, role, a, b in actions:
        by_role[role].append((t, 1 if b > a else -1))
    for acts in by_role.values():
        flips = [t for (t, d), (_, prev) in zip(acts[1:], acts, strict=False) if d != prev]
        for t in flips:
            worst = max(worst, sum(1 for u in flips if t <= u < t + window_s))
    return worst


def summarise(res: ReplayResult, slo: ScalingSLO, cooldown_s: float) -> dict[str, float | int]:
    outs = res.outcomes
    n = len(outs)
    good = sum(o.met for o in outs)
    gpu_hours = res.gpu_seconds / 3600
    return {
        "ttft_attainment": sum(o.ttft_ok for o in outs) / n,
        "tpot_attainment": sum(o.tpot_ok for o in outs) / n,
        "slo_attainment": good / n,
        "slo_violations": n - good,
        "attainable_share": sum(o.attainable for o in outs) / n,
        "worst_minute_attainment": worst_window(res, PEAK_WINDOW_S),
        "worst_5min_attainment": worst_window(res, REPORT_WINDOW_S),
        "gpu_hours": gpu_hours,
        "goodput_per_gpu_hour": good / gpu_hours if gpu_hours else 0.0,
        "scaling_actions": len(res.actions),
        "direction_changes_max": direction_changes(res.actions, cooldown_s),
        "direction_changes_10min_max": direction_changes(res.actions, DIRECTION_WINDOW_S),
    }


class AutoscaleBench(TandemSettings):
    """Replay a trace (or, with --suite, the scenario suite) on elastic DES pools: Tandem vs the best static
    allocation for the peak, the Dynamo-planner-style and Knative-KPA-style peers and a threshold scaler."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_AUTOSCALE_", populate_by_name=True)

    trace: Path | None = Field(None, description="Mooncake JSONL or Azure CSV trace (format detected from the "
                                                 "file); not with --suite")
    json_out: Path = Field(alias="json", description="write the results JSON here")
    plot: Path | None = Field(None, description="write a PNG timeline (load, replicas per role, attainment)")
    suite: bool = Field(False, description="run the scenario suite (bench/scenarios.py) instead of one trace")
    quick: bool = Field(False, description="suite: one seed per synthetic family, 20-minute scenarios (2 cores)")
    seeds: int = Field(3, ge=1, le=50, description="suite: seeds per synthetic family (on/off: per burst length, "
                                                    "halved)")
    scenarios: str | None = Field(None, description="suite: only these scenarios or families, comma-separated")
    workers: int | None = Field(None, ge=1, le=512, description="suite: processes, one scenario each (default: "
                                                                "the CPUs)")
    budget_s: float = Field(3600.0, gt=0, description="suite: wall-clock budget; scenarios not done by then are "
                                                      "reported as not run")
    markdown: Path | None = Field(None, description="suite: also write the table as Markdown here")
    controller: dict[str, Any] = Field(default_factory=dict,
                                       description="Tandem: overrides of any AutoscalerSpec field, as JSON "
                                                   "(e.g. '{\"burst_hold_s\": 600}')")
    peers: bool = Field(True, description="also replay the Dynamo-planner-style and Knative-KPA-style scalers")
    threshold: bool = Field(True, description="single trace: also replay the utilisation-threshold scaler")
    dynamo_interval_s: float = Field(60.0, gt=0, description="Dynamo-style planner: adjustment interval")
    reactive_oracle: bool = Field(True, description="also replay the reactive oracle (each minute's calibrated "
                                                    "oracle pools ordered as the minute begins, ready after the "
                                                    "start-up delay): the best a scaler that follows the load "
                                                    "can attain")
    profile: str | None = Field(None, description="performance profile (default per trace format)")
    load_factor: float | None = Field(None, gt=0, le=32,
                                      description="replay the trace at this many times its load, on its own time "
                                                  "axis (default per format)")
    rate_window_s: float = Field(60.0, gt=0, description="the load curve kept when scaling: arrival rate over this")
    seed: int = Field(0, ge=0, description="seed of the scaled trace's arrivals and draws")
    qps: float | None = Field(None, gt=0, description="instead: compress/stretch time to this mean rate")
    load_shape: Literal["none", "diurnal"] = Field(
        "none", description="synthetic envelope over the scaled load: 'diurnal' = a raised cosine from "
                            "--shape-trough x (at t=0) up to 1x the load factor and back over --shape-period-s")
    shape_period_s: float | None = Field(None, gt=0, description="diurnal: period of the envelope (s; default 3600)")
    shape_trough: float | None = Field(None, ge=0, le=1,
                                       description="diurnal: the trough as a share of the peak (default 0.3)")
    requests: int | None = Field(None, gt=0, description="replay only the first N requests of the trace")
    policy: str = Field("dualmap", description="routing policy in front of the prefill pool (the gateway's)")
    ttft_s: float | None = Field(None, gt=0, description="TTFT SLO (s; default per format: Azure 2, Mooncake 5)")
    tpot_s: float = Field(0.1, gt=0, description="TPOT SLO (s)")
    attainment: float = Field(0.95, gt=0, lt=1, description="target share of requests meeting both SLOs")
    startup_delay_s: float = Field(60.0, ge=0, description="instance start-up delay (pod + weights)")
    tick_s: float = Field(15.0, gt=0, description="autoscaler tick")
    cooldown_s: float = Field(120.0, ge=0, description="Tandem: least time after a scale-up before a scale-down")
    stabilization_s: float = Field(300.0, ge=0, description="scale-down stabilization window")
    max_replicas: int = Field(64, ge=1, description="upper bound per role")
    max_utilisation: float = Field(0.85, gt=0, lt=1, description="Tandem: highest planned prefill utilisation")
    decode_max_utilisation: float = Field(0.9, gt=0, lt=1, description="Tandem: highest planned decode utilisation")
    forecast_quantile: float = Field(0.9, gt=0.5, lt=1, description="Tandem: quantile of the rate forecast")
    hysteresis: float = Field(0.05, ge=0, lt=1, description="Tandem: shrink only when the need is this far below")
    warmup_s: float = Field(300.0, ge=0, description="replayed but not measured: every scaler starts cold")
    static_references: bool = Field(True, description="single trace: also search the lenient static references "
                                                        "(every 5-minute window, whole-trace average)")

    @field_validator("load_shape")
    @classmethod
    def _shape_needs_scaling(cls, v: str, info: ValidationInfo) -> str:
        if v != "none" and info.data.get("qps") is not None:
            raise ValueError("a load shape modulates --load-factor scaling; it cannot be combined with --qps")
        return v

    @field_validator("shape_period_s", "shape_trough")
    @classmethod
    def _shape_parameter_needs_shape(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("load_shape", "none") == "none":
            raise ValueError("applies only with --load-shape diurnal")
        return v

    @field_validator("controller")
    @classmethod
    def _controller_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        AutoscalerSpec(**v)  # the same validation as the live spec: an unknown or bad field is named
        return v

    def shape(self) -> LoadShape | None:
        """The load shape asked for, with its defaults filled in; None for the trace's own curve."""
        if self.load_shape == "none":
            return None
        given = {"period_s": self.shape_period_s, "trough": self.shape_trough}
        return LoadShape(**{k: v for k, v in given.items() if v is not None})

    @model_validator(mode="after")
    def _trace_or_suite(self) -> AutoscaleBench:
        if self.suite:
            if self.trace is not None:
                raise ValueError("trace: --suite replays its own scenarios; give no trace")
            return self
        if self.quick or self.scenarios is not None:
            raise ValueError("quick/scenarios: apply only with --suite")
        if self.trace is None:
            raise ValueError("trace: required (or --suite)")
        if not self.trace.is_file():
            raise ValueError(f"trace: file not found: {self.trace}")
        return self

    def cli_cmd(self) -> None:
        if self.suite:
            from tandem.bench.suite import run_suite_command

            run_suite_command(self)
            return
        assert self.trace is not None
        try:
            fmt = detect_format(self.trace)
            reqs = load_trace(self.trace)
        except TraceFormatError as exc:
            raise SystemExit(f"tandem bench autoscale: trace: {exc}") from exc
        if self.requests:
            reqs = reqs[: self.requests]
        defaults = DEFAULTS[fmt]
        profile = load_profile(self.profile or str(defaults["profile"]))
        if self.qps:
            reqs = rescale_to_qps(reqs, self.qps)
        else:
            reqs = scale_load(reqs, self.load_factor or float(defaults["load_factor"]),  # type: ignore[arg-type]
                              self.rate_window_s, self.seed, self.shape())
        if self.ttft_s is None:
            self.ttft_s = float(defaults["ttft_s"])  # type: ignore[arg-type]
        result = run_bench(reqs, profile, self, fmt, log=lambda m: print(m, file=sys.stderr, flush=True))
        self.json_out.parent.mkdir(parents=True, exist_ok=True)
        self.json_out.write_text(json.dumps(result["json"], indent=2))
        print(json.dumps(result["json"]["scalers"], indent=2))
        if self.plot:
            plot_timelines(result["results"], self.plot, self.ttft_s, self.warmup_s)


class OverBudget(RuntimeError):
    """The suite's wall-clock budget ran out before this scenario's replays were done."""


def build_spec(cfg: AutoscaleBench, slo: ScalingSLO) -> AutoscalerSpec:
    """Tandem's spec for a replay: the bench's flags, then ``--controller`` overrides of any field."""
    roles: tuple[Role, ...] = ("prefill", "decode")
    fields: dict[str, Any] = dict(
        mode="disaggregated", slo=slo,
        pools={r: PoolBounds(min_replicas=1, max_replicas=cfg.max_replicas) for r in roles},
        startup_delay_s=cfg.startup_delay_s, scale_down_cooldown_s=cfg.cooldown_s,
        scale_down_stabilization_s=cfg.stabilization_s, scale_up_cooldown_s=cfg.tick_s,
        max_utilisation=cfg.max_utilisation, decode_max_utilisation=cfg.decode_max_utilisation,
        forecast_quantile=cfg.forecast_quantile, hysteresis=cfg.hysteresis)
    fields.update(cfg.controller)
    return AutoscalerSpec(**fields)


def run_bench(reqs: list[TraceRequest], profile: Profile, cfg: AutoscaleBench, fmt: str,
              log: Callable[[str], None] = lambda m: None, *, deadline: float | None = None,
              references: bool | None = None, threshold: bool | None = None) -> dict:
    """Every scaler on one workload: static_peak (searched), Tandem, the peers and the threshold scaler.

    ``deadline`` (``time.time()``) stops before a replay that would start after it (:class:`OverBudget`).
    """
    assert cfg.ttft_s is not None
    references = cfg.static_references if references is None else references
    threshold = cfg.threshold if threshold is None else threshold
    slo = ScalingSLO(ttft_s=cfg.ttft_s, tpot_s=cfg.tpot_s, attainment=cfg.attainment)
    spec = build_spec(cfg, slo)
    rcfg = ReplayConfig(profile=profile.name, slo=slo, startup_delay_s=cfg.startup_delay_s, tick_s=cfg.tick_s,
                        policy=cfg.policy)
    cap = CapacityModel(profile, slo, max_utilisation=spec.max_utilisation,
                        decode_max_utilisation=spec.decode_max_utilisation)
    mix = length_mix(reqs)
    first = [r for r in reqs if r.arrival <= 60.0] or reqs[:1]
    first_mix = length_mix(first)
    initial = {r: max(1, n) for r, n in size_pools(cap, spec, len(first) / 60.0, first_mix).items()}
    peak = peak_rate(reqs, PEAK_WINDOW_S)
    sized = {r: max(1, n) for r, n in size_pools(cap, spec, peak, mix).items()}
    prepared = distinct_text_keys(prepare(reqs))

    def run(scaler: Scaler, what: str = "") -> ReplayResult:
        if deadline is not None and time.time() > deadline:
            raise OverBudget(f"budget spent before {scaler.name}{what}")
        start = time.monotonic()
        res = replay(prepared, scaler, rcfg, measure_from_s=cfg.warmup_s)
        log(f"{scaler.name}{what}: {time.monotonic() - start:.1f}s, {summarise(res, slo, cfg.stabilization_s)}")
        return res

    static_runs: dict[tuple[int, int], tuple[StaticRun, ReplayResult]] = {}

    def run_static(p: int, d: int) -> StaticRun:
        if (p, d) not in static_runs:
            res = run(StaticScaler({"prefill": p, "decode": d}), f" {p}P+{d}D")
            summary = summarise(res, slo, cfg.stabilization_s)
            static_runs[(p, d)] = (StaticRun({"prefill": p, "decode": d}, summary), res)
        return static_runs[(p, d)][0]

    target = slo.attainment
    best = search_static(sized, run_static, lambda r: r.summary["worst_minute_attainment"] >= target, cfg.max_replicas)
    if best is None:
        raise SystemExit(f"tandem bench autoscale: no static allocation up to {cfg.max_replicas} instances per "
                         "role holds the SLO target in every minute")
    results: dict[str, ReplayResult] = {"static_peak": static_runs[(best.replicas["prefill"],
                                                                    best.replicas["decode"])][1]}
    results["tandem"] = run(TandemScaler(profile, spec, initial))
    if cfg.peers:
        results["dynamo"] = run(DynamoPlannerScaler(cap, spec, initial, interval_s=cfg.dynamo_interval_s))
        results["kpa"] = run(KnativeKPAScaler.from_profile(cap, spec, initial, first_mix))
    if threshold:
        results["threshold"] = run(ThresholdScaler(spec, initial))
    oracle_windows = oracle_sizes(reqs, cap, spec, PEAK_WINDOW_S, cfg.warmup_s)
    oracle_raw = PEAK_WINDOW_S * sum(sum(w.values()) for w in oracle_windows) / 3600
    oracle = calibrated_oracle_gpu_hours(oracle_windows, best.replicas, spec, PEAK_WINDOW_S)
    if cfg.reactive_oracle:
        every = oracle_sizes(reqs, cap, spec, PEAK_WINDOW_S, 0.0)
        peak_sizes = {role: max((w[role] for w in oracle_windows), default=1) for role in spec.roles}
        results["reactive_oracle"] = run(ReactiveOracleScaler(calibrate(every, best.replicas, spec, peak_sizes),
                                                              PEAK_WINDOW_S))
    order = ["tandem", "static_peak", *(n for n in ("dynamo", "kpa", "threshold", "reactive_oracle") if n in results)]
    scalers = {name: summarise(results[name], slo, cfg.stabilization_s) for name in order}
    base = scalers["static_peak"]
    for s in scalers.values():
        s["goodput_per_gpu_hour_vs_static"] = s["goodput_per_gpu_hour"] / base["goodput_per_gpu_hour"] \
            if base["goodput_per_gpu_hour"] else 0.0
        s["gpu_hours_vs_static"] = s["gpu_hours"] / base["gpu_hours"] if base["gpu_hours"] else 0.0
        s["oracle_headroom_share"] = headroom_share(base["gpu_hours"], s["gpu_hours"], oracle)
    references_out: dict[str, dict | None] = {}
    if references:
        for name, holds in (("every_5min_window", lambda r: r.summary["worst_5min_attainment"] >= target),
                            ("whole_trace_average", lambda r: r.summary["slo_attainment"] >= target)):
            ref = search_static(best.replicas, run_static, holds, cfg.max_replicas)
            references_out[name] = None if ref is None else {
                "replicas": ref.replicas, **ref.summary,
                "tandem_goodput_per_gpu_hour_vs_it":
                    scalers["tandem"]["goodput_per_gpu_hour"] / ref.summary["goodput_per_gpu_hour"]}
    config = {
        "trace": None if cfg.trace is None else str(cfg.trace), "format": fmt, "requests": len(reqs),
        "mean_qps": mean_qps(reqs),
        "peak_qps_60s": peak, "duration_s": reqs[-1].arrival if reqs else 0.0, "profile": profile.name,
        "load_factor": None if cfg.qps else cfg.load_factor or DEFAULTS.get(fmt, {}).get("load_factor"),
        "rate_window_s": cfg.rate_window_s, "seed": cfg.seed, "policy": cfg.policy,
        "load_shape": None if (shape := cfg.shape()) is None else shape.model_dump(),
        "slo": slo.model_dump(), "startup_delay_s": cfg.startup_delay_s, "tick_s": cfg.tick_s,
        "cooldown_s": cfg.cooldown_s, "stabilization_s": cfg.stabilization_s, "warmup_s": cfg.warmup_s,
        "max_utilisation": cfg.max_utilisation, "decode_max_utilisation": cfg.decode_max_utilisation,
        "forecast_quantile": cfg.forecast_quantile, "hysteresis": cfg.hysteresis, "initial_replicas": initial,
        "tandem_spec": spec.model_dump(mode="json"),
        "static_peak_definition": (
            f"fewest instances (then the higher attainment) whose attainment of both SLOs, among the requests "
            f"that can meet the TTFT, is >= {target} in every {PEAK_WINDOW_S:.0f} s window of arrivals of this "
            f"replay (windows with fewer than {MIN_WINDOW_REQUESTS} such requests not judged; first "
            f"{cfg.warmup_s:.0f} s not measured)"),
        "model_sizing_at_peak": sized, "static_peak_replicas": best.replicas,
        "static_references": references_out,
        "static_candidates": [{"replicas": r.replicas, **r.summary} for r, _ in static_runs.values()],
        "oracle_gpu_hours_60s": oracle_raw,
        "oracle_calibrated_gpu_hours_60s": oracle,
        "threshold_rule": "KV usage >= 0.8 or queue per instance >= 5 (HPA-style proportional, 10% tolerance)",
        "dynamo_interval_s": cfg.dynamo_interval_s,
    }
    return {"json": {"scalers": scalers, "config": config}, "results": results}


def plot_timelines(results: dict[str, ReplayResult], path: Path, ttft_s: float, warmup_s: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    tl0 = results["tandem"].timeline
    axes[0].plot(tl0.time, tl0.rate, color="black")
    axes[0].set_ylabel("arrivals (req/s)")
    styles = {"tandem": "-", "threshold": "--", "static_peak": ":", "dynamo": "-.", "kpa": (0, (1, 3)),
              "reactive_oracle": (0, (5, 1))}
    for name, res in results.items():
        tl = res.timeline
        for role, counts in tl.replicas.items():
            axes[1].step(tl.time, counts, linestyle=styles[name], where="post", label=f"{name} {role}")
        axes[2].plot(tl.time, [min(a, b) for a, b in zip(tl.ttft_attainment, tl.tpot_attainment, strict=True)],
                     linestyle=styles[name], label=name)
    axes[1].set_ylabel("instances")
    axes[1].legend(fontsize=7, ncol=3)
    axes[2].set_ylabel(f"SLO attainment (window, TTFT<={ttft_s}s & TPOT)")
    for ax in axes:
        if warmup_s > 0:
            ax.axvspan(0, warmup_s, color="grey", alpha=0.15, label=None)
    axes[0].set_title("grey: warm-up, replayed but not measured", fontsize=9)
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylim(0, 1.02)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
