"""``tandem bench autoscale``: replay a time-varying trace on an elastic simulated cluster and
compare the Tandem autoscaler with the best static P:D allocation sized for the peak and with a
utilisation-threshold scaler (KV usage >= 0.8 or queue >= 5 per instance, HPA-style).

All three run through the same event loop, engines, router and drain contract; only the scaling
policy differs. Numbers are reported as measured plus ratios against the static baseline of the
same run.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from tandem.autoscaler.capacity import CapacityModel
from tandem.autoscaler.core import role_decision, size_pools, tick
from tandem.autoscaler.models import (
    SLO,
    AutoscalerSpec,
    AutoscalerState,
    LengthBucket,
    Observations,
    PoolBounds,
    Role,
)
from tandem.autoscaler.replay import ElasticCluster, ReplayConfig, ReplayResult, ScaleCommand, Scaler
from tandem.config import TandemSettings
from tandem.sim.profile import Profile, load_profile
from tandem.traces import TraceFormatError, TraceRequest, detect_format, load_trace, mean_qps, rescale_to_qps

# Per trace format: a profile whose memory fits the trace's prompts, and a mean rate at which the
# peak needs many instances while the replay stays a few minutes of CPU.
DEFAULTS: dict[str, dict[str, object]] = {
    "azure": {"profile": "qwen2.5-32b-h100", "load_factor": 4, "ttft_s": 2.0},
    # Mooncake prompts average 12k tokens (p99 85k): a 2 s TTFT is out of reach for its tail.
    "mooncake": {"profile": "llama3-8b-h100", "load_factor": 3, "ttft_s": 5.0},
}


def amplify(reqs: list[TraceRequest], factor: int, jitter_s: float, seed: int = 0) -> list[TraceRequest]:
    """``factor`` copies of the trace on the same time axis, each request jittered by +-``jitter_s``.

    Unlike compressing time (``--qps``), this keeps the trace's minutes-long load swings at their
    real pace relative to start-up delays and cooldowns, which is what autoscaling is about. The
    jitter decorrelates the copies' second-scale bursts; prefix block ids of each copy are made
    distinct so the copies do not invent cache hits.
    """
    if factor == 1:
        return list(reqs)
    rng = random.Random(seed)
    offset = 1 + max((h for r in reqs for h in r.hash_ids), default=0)
    out = [replace(r, arrival=max(0.0, r.arrival + rng.uniform(-jitter_s, jitter_s)),
                   hash_ids=tuple(h + k * offset for h in r.hash_ids))
           for k in range(factor) for r in reqs]
    out.sort(key=lambda r: r.arrival)
    t0 = out[0].arrival
    return [replace(r, arrival=r.arrival - t0) for r in out]


# Attainment is also checked per window of this length: a static allocation "sized for the peak"
# must hold the SLO in the busiest one, not only on average.
PEAK_WINDOW_S = 300.0


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
                        self.spec.scale_down_cooldown_s:
                    self.targets[role] = stable
                    self.last_change[role] = obs.time_s
            out[role] = _command(self.targets[role], obs, role)
        return out


def mix_of(reqs: list[TraceRequest], buckets: int = 8) -> list[LengthBucket]:
    ordered = sorted(reqs, key=lambda r: r.input_tokens)
    size = max(1, math.ceil(len(ordered) / buckets))
    out = []
    for i in range(0, len(ordered), size):
        part = ordered[i:i + size]
        out.append(LengthBucket(input_tokens=max(1, round(sum(r.input_tokens for r in part) / len(part))),
                                output_tokens=max(1, round(sum(r.output_tokens for r in part) / len(part))),
                                weight=len(part)))
    return out


def peak_rate(reqs: list[TraceRequest], window_s: float) -> float:
    """The highest arrival rate over any window of ``window_s`` (an oracle the static sizing gets)."""
    arrivals = [r.arrival for r in reqs]
    best, j = 0, 0
    for i, t in enumerate(arrivals):
        while arrivals[j] < t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best / window_s


def search_static(start: dict[Role, int], replay: Callable[[dict[Role, int]], ReplayResult], slo: SLO,
                  cfg: AutoscaleBench) -> list[tuple[dict[Role, int], ReplayResult]]:
    """Static allocations tried, walking from the model's peak sizing towards the cheapest one
    that holds the SLO in every window ("sized for the peak"): one instance fewer on the phase
    with more slack while it holds, one more on the phase that misses while it does not."""
    runs: list[tuple[dict[Role, int], ReplayResult]] = []
    alloc = dict(start)
    for _ in range(cfg.static_search):
        res = replay(dict(alloc))
        runs.append((dict(alloc), res))
        s = summarise(res, slo, cfg.cooldown_s)
        holds = s["worst_window_attainment"] >= slo.attainment
        if len(alloc) == 1:
            role = next(iter(alloc))
        elif holds:
            role = "prefill" if s["ttft_attainment"] > s["tpot_attainment"] else "decode"
        else:
            role = "prefill" if s["ttft_attainment"] < s["tpot_attainment"] else "decode"
        alloc = {**alloc, role: alloc[role] + (-1 if holds else 1)}
        if alloc[role] < 1 or any(a == alloc for a, _ in runs):
            break
    return runs


def oracle_gpu_hours(reqs: list[TraceRequest], cap: CapacityModel, spec: AutoscalerSpec, window_s: float,
                     start_s: float) -> float:
    """GPU-hours of a clairvoyant scaler: each window sized by the model for the rate and mix that
    actually arrive in it, with no start-up delay, forecast headroom or hysteresis. A reference
    for how much any scaler driven by this capacity model could save, not a reachable result."""
    buckets: dict[int, list[TraceRequest]] = defaultdict(list)
    for r in reqs:
        if r.arrival >= start_s:
            buckets[int(r.arrival // window_s)].append(r)
    gpu_s = 0.0
    for part in buckets.values():
        sizes = size_pools(cap, spec, len(part) / window_s, mix_of(part))
        gpu_s += window_s * sum(max(1, n) * spec.bounds(role).gpus_per_replica for role, n in sizes.items())
    return gpu_s / 3600


def worst_window(res: ReplayResult, slo: SLO, window_s: float, min_requests: int = 50) -> float:
    """The lowest attainment of both SLOs over consecutive windows of arrivals (the peak's), among
    the requests that can meet the TTFT at all: a prompt whose prefill alone exceeds it fails at any
    allocation, and counting it would make "holds the peak" unreachable for every scaler alike."""
    met: dict[int, int] = defaultdict(int)
    possible: dict[int, int] = defaultdict(int)
    for r in res.records:
        w = int(r.arrival // window_s)
        possible[w] += r.attainable
        met[w] += r.attainable and r.ttft() <= slo.ttft_s and r.tpot() <= slo.tpot_s
    values = [met[w] / n for w, n in possible.items() if n >= min_requests]
    return min(values) if values else 1.0


def summarise(res: ReplayResult, slo: SLO, cooldown_s: float) -> dict[str, float | int]:
    n = len(res.records)
    ttft_ok = [r.ttft() <= slo.ttft_s for r in res.records]
    tpot_ok = [r.tpot() <= slo.tpot_s for r in res.records]
    good = sum(a and b for a, b in zip(ttft_ok, tpot_ok, strict=True))
    gpu_hours = res.gpu_seconds / 3600
    changes = 0
    by_role: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for t, role, a, b in res.actions:
        by_role[role].append((t, 1 if b > a else -1))
    for acts in by_role.values():
        flips = [t for (t, d), (_, prev) in zip(acts[1:], acts, strict=False) if d != prev]
        for t in flips:
            changes = max(changes, sum(1 for u in flips if t <= u < t + cooldown_s))
    return {
        "ttft_attainment": sum(ttft_ok) / n,
        "tpot_attainment": sum(tpot_ok) / n,
        "slo_attainment": good / n,
        "slo_violations": n - good,
        "attainable_share": sum(r.attainable for r in res.records) / n,
        "worst_window_attainment": worst_window(res, slo, PEAK_WINDOW_S),
        "gpu_hours": gpu_hours,
        "goodput_per_gpu_hour": good / gpu_hours if gpu_hours else 0.0,
        "scaling_actions": len(res.actions),
        "direction_changes_max": changes,
    }


class AutoscaleBench(TandemSettings):
    """Replay a trace on an elastic simulated cluster: Tandem vs static-for-peak vs threshold scaler."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_AUTOSCALE_", populate_by_name=True)

    trace: Path = Field(description="Mooncake JSONL or Azure CSV trace (format detected from the file)")
    json_out: Path = Field(alias="json", description="write the results JSON here")
    plot: Path | None = Field(None, description="write a PNG timeline (load, replicas per role, attainment)")
    profile: str | None = Field(None, description="performance profile (default per trace format)")
    load_factor: int | None = Field(None, ge=1, le=16,
                                    description="superpose this many jittered copies of the trace (default per format)")
    qps: float | None = Field(None, gt=0, description="instead: compress/stretch time to this mean rate")
    requests: int | None = Field(None, gt=0, description="replay only the first N requests of the trace")
    mode: Literal["aggregated", "disaggregated"] = Field("disaggregated", description="pool layout")
    ttft_s: float | None = Field(None, gt=0, description="TTFT SLO (s; default per format: Azure 2, Mooncake 5)")
    tpot_s: float = Field(0.1, gt=0, description="TPOT SLO (s)")
    attainment: float = Field(0.95, gt=0, lt=1, description="target share of requests meeting both SLOs")
    startup_delay_s: float = Field(60.0, ge=0, description="instance start-up delay (pod + weights)")
    tick_s: float = Field(15.0, gt=0, description="autoscaler tick")
    cooldown_s: float = Field(300.0, ge=0, description="scale-down cooldown (also the oscillation window)")
    stabilization_s: float = Field(300.0, ge=0, description="scale-down stabilization window")
    max_replicas: int = Field(64, ge=1, description="upper bound per role")
    max_utilisation: float = Field(0.85, gt=0, lt=1, description="Tandem: highest planned prefill utilisation")
    decode_max_utilisation: float = Field(0.9, gt=0, lt=1, description="Tandem: highest planned decode utilisation")
    forecast_quantile: float = Field(0.9, gt=0.5, lt=1, description="Tandem: quantile of the rate forecast")
    warmup_s: float = Field(300.0, ge=0, description="replayed but not measured: every scaler starts cold")
    static_search: int = Field(6, ge=1, le=12, description="most DES runs spent finding the best static P:D")


    @model_validator(mode="after")
    def _trace_exists(self) -> AutoscaleBench:
        if not self.trace.is_file():
            raise ValueError(f"trace: file not found: {self.trace}")
        return self

    def cli_cmd(self) -> None:
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
            reqs = amplify(reqs, self.load_factor or int(defaults["load_factor"]), jitter_s=self.tick_s)  # type: ignore[call-overload]
        if self.ttft_s is None:
            self.ttft_s = float(defaults["ttft_s"])  # type: ignore[arg-type]
        result = run_bench(reqs, profile, self, fmt, log=lambda m: print(m, file=sys.stderr, flush=True))
        self.json_out.parent.mkdir(parents=True, exist_ok=True)
        self.json_out.write_text(json.dumps(result["json"], indent=2))
        print(json.dumps(result["json"]["scalers"], indent=2))
        if self.plot:
            plot_timelines(result["results"], self.plot, self.ttft_s, self.warmup_s)


def run_bench(reqs: list[TraceRequest], profile: Profile, cfg: AutoscaleBench, fmt: str,
              log=lambda m: None) -> dict:
    slo = SLO(ttft_s=cfg.ttft_s, tpot_s=cfg.tpot_s, attainment=cfg.attainment)
    roles: tuple[Role, ...] = ("unified",) if cfg.mode == "aggregated" else ("prefill", "decode")
    spec = AutoscalerSpec(
        mode=cfg.mode, slo=slo, pools={r: PoolBounds(min_replicas=1, max_replicas=cfg.max_replicas) for r in roles},
        startup_delay_s=cfg.startup_delay_s, scale_down_cooldown_s=cfg.cooldown_s,
        scale_down_stabilization_s=cfg.stabilization_s, scale_up_cooldown_s=cfg.tick_s,
        max_utilisation=cfg.max_utilisation, decode_max_utilisation=cfg.decode_max_utilisation,
        forecast_quantile=cfg.forecast_quantile)
    rcfg = ReplayConfig(profile=profile, mode=cfg.mode, slo=slo, startup_delay_s=cfg.startup_delay_s,
                        tick_s=cfg.tick_s)
    cap = CapacityModel(profile, slo, max_utilisation=spec.max_utilisation,
                       decode_max_utilisation=spec.decode_max_utilisation)
    mix = mix_of(reqs)
    first = [r for r in reqs if r.arrival <= 60.0]
    initial = size_pools(cap, spec, len(first) / 60.0, mix)
    initial = {r: max(1, n) for r, n in initial.items()}
    peak = peak_rate(reqs, 60.0)
    sized = {r: max(1, n) for r, n in size_pools(cap, spec, peak, mix).items()}

    def replay(scaler: Scaler) -> ReplayResult:
        start = time.monotonic()
        res = ElasticCluster(rcfg).run(reqs, scaler, measure_from_s=cfg.warmup_s)
        log(f"{scaler.name} {getattr(scaler, 'replicas', '')}: {time.monotonic() - start:.1f}s, "
            f"{summarise(res, slo, cfg.cooldown_s)}")
        return res

    results: dict[str, ReplayResult] = {}
    results["tandem"] = replay(TandemScaler(profile, spec, initial))
    results["threshold"] = replay(ThresholdScaler(spec, initial))
    static_runs = search_static(sized, lambda alloc: replay(StaticScaler(alloc)), slo, cfg)
    peak_ok = [(a, r) for a, r in static_runs if summarise(r, slo, cfg.cooldown_s)["worst_window_attainment"]
               >= slo.attainment]
    if peak_ok:
        best_alloc, results["static_peak"] = min(peak_ok, key=lambda item: item[1].gpu_seconds)
    else:  # nothing held the peak within the search budget: the closest one
        best_alloc, results["static_peak"] = max(
            static_runs, key=lambda item: summarise(item[1], slo, cfg.cooldown_s)["worst_window_attainment"])
    scalers = {name: summarise(res, slo, cfg.cooldown_s) for name, res in results.items()}
    base = scalers["static_peak"]
    for s in scalers.values():
        s["goodput_per_gpu_hour_vs_static"] = s["goodput_per_gpu_hour"] / base["goodput_per_gpu_hour"] \
            if base["goodput_per_gpu_hour"] else 0.0
        s["gpu_hours_vs_static"] = s["gpu_hours"] / base["gpu_hours"] if base["gpu_hours"] else 0.0
    config = {
        "trace": str(cfg.trace), "format": fmt, "requests": len(reqs), "mean_qps": mean_qps(reqs),
        "peak_qps_60s": peak, "duration_s": reqs[-1].arrival if reqs else 0.0, "profile": profile.name,
        "mode": cfg.mode, "slo": slo.model_dump(), "startup_delay_s": cfg.startup_delay_s, "tick_s": cfg.tick_s,
        "cooldown_s": cfg.cooldown_s, "stabilization_s": cfg.stabilization_s, "warmup_s": cfg.warmup_s,
        "max_utilisation": cfg.max_utilisation, "decode_max_utilisation": cfg.decode_max_utilisation,
        "forecast_quantile": cfg.forecast_quantile,
        "peak_sized_replicas": sized, "initial_replicas": initial,
        "oracle_gpu_hours_60s": oracle_gpu_hours(reqs, cap, spec, 60.0, cfg.warmup_s),
        "static_peak_replicas": best_alloc,
        "static_candidates": [{"replicas": a, **summarise(r, slo, cfg.cooldown_s)} for a, r in static_runs],
        "threshold_rule": "KV usage >= 0.8 or queue per instance >= 5 (HPA-style proportional, 10% tolerance)",
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
    styles = {"tandem": "-", "threshold": "--", "static_peak": ":"}
    for name, res in results.items():
        tl = res.timeline
        for role, counts in tl.replicas.items():
            axes[1].step(tl.time, counts, styles[name], where="post", label=f"{name} {role}")
        axes[2].plot(tl.time, [min(a, b) for a, b in zip(tl.ttft_attainment, tl.tpot_attainment, strict=True)],
                     styles[name], label=name)
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
