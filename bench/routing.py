"""``tandem bench routing`` and ``tandem bench decision``.

Routing capacity is measured as in the DualMap paper: replay a trace slice with its arrival times
rescaled to a target QPS (burst shape kept), skip a warm-up prefix, and call the highest QPS at
which at least ``attainment`` of the measured requests meet the TTFT SLO the policy's capacity.
Attainment falls with QPS, so capacity is found coarse-to-fine: a geometric ramp until the first
failing rate, then bisection to a relative tolerance. Every policy runs in the same process on
the same trace slice and the same simulated cluster, and results are printed as ratios to
round_robin measured in the same run.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import SettingsConfigDict

from tandem.bench.stats import attainment, quantiles
from tandem.blockcache import BlockCache
from tandem.config import TandemSettings
from tandem.perf.profile import load_profile
from tandem.router.routing.config import RoutingConfig
from tandem.router.routing.registry import POLICIES, make_policy
from tandem.router.routing.rings import DualRing
from tandem.router.routing.scheduler import Scheduler
from tandem.router.routing.types import ClusterView, InstanceState, RouteRequest
from tandem.sim.des.search import search_capacity
from tandem.sim.des.simulator import (
    DESConfig,
    DESResult,
    PreparedRequest,
    Simulation,
    prepare,
    simulate,
    with_arrivals,
)
from tandem.traces import (
    TRACE_DIR,
    TraceFormatError,
    TraceRequest,
    detect_format,
    load_trace,
    mean_qps,
    rescale_to_qps,
    select,
)

DEFAULT_TRACE = TRACE_DIR / "conversation_trace.jsonl"


class Point(BaseModel):
    qps: float
    attainment: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    hit_ratio: float = Field(description="prompt tokens served from the prefix cache / prompt tokens")
    host_hit_ratio: float = Field(0.0, description="prompt tokens loaded from the host KV tier / prompt tokens "
                                  "(part of hit_ratio)")
    estimated_hit_ratio: float = Field(0.0, description="routing's hit estimates at decision time / prompt "
                                       "tokens (against hit_ratio: how right its cache view was)")
    imbalance: float = Field(description="max / mean uncached prefill tokens per instance")
    migrations: int = 0
    rejected: int = 0


def summarise(result: DESResult, qps: float, warmup: int, slo: float) -> Point:
    """Attainment and latency over the measured requests (trace order >= warmup); unserved ones miss."""
    measured = [r for r in result.requests if r.index >= warmup]
    ttfts = [r.ttft if r.ttft is not None else float("inf") for r in measured]
    p50, p90, p99 = quantiles(ttfts, (0.5, 0.9, 0.99))
    prompt = sum(r.prompt_tokens for r in measured) or 1
    work = list(result.prefill_tokens.values())
    mean_work = sum(work) / len(work) if work else 0.0
    return Point(
        qps=round(qps, 4),
        attainment=attainment(ttfts, slo),
        ttft_p50=p50, ttft_p90=p90, ttft_p99=p99,
        hit_ratio=sum(r.hit_tokens for r in measured) / prompt,
        host_hit_ratio=sum(r.host_hit_tokens for r in measured) / prompt,
        estimated_hit_ratio=sum(r.estimated_hit_tokens for r in measured) / prompt,
        imbalance=max(work) / mean_work if mean_work else 1.0,
        migrations=result.migrations,
        rejected=sum(1 for r in measured if r.rejected),
    )


class RoutingBench(TandemSettings):
    """Capacity (highest QPS meeting the TTFT SLO) of each routing policy on a trace, in the DES."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_ROUTING_")

    trace: Path = Field(DEFAULT_TRACE, description="Mooncake JSONL or Azure CSV trace (format detected)")
    instances: int = Field(8, ge=1, le=4096, description="simulated engine instances")
    policies: str = Field(",".join(POLICIES), description="comma-separated policies to compare")
    slo_ttft: float = Field(5.0, gt=0, description="TTFT SLO in seconds")
    attainment: float = Field(0.9, gt=0, le=1, description="share of measured requests that must meet the SLO")
    requests: int = Field(8000, ge=10, description="measured requests (after the warm-up)")
    warmup: int = Field(500, ge=0, description="leading requests replayed but not measured")
    profile: str = Field("llama3-8b-h100", description="performance profile of every instance")
    json_out: Path | None = Field(None, alias="json", description="write the results as JSON here")
    plot: Path | None = Field(None, description="write a PNG of attainment vs QPS per policy here")
    tolerance: float = Field(0.02, gt=0, lt=1, description="bisection stops at this relative QPS gap")
    start_qps: float | None = Field(None, gt=0, description="first QPS tried (default: the trace's own rate)")
    common_qps: float | None = Field(None, gt=0, description="QPS at which latency, hit ratio and imbalance "
                                     "are compared (default: the lowest capacity in the run)")
    alpha: float = Field(0.5, gt=0, le=4, description="DualMap's alpha (SLO switch and hotspot threshold)")
    dispatch_budget_s: float | None = Field(None, ge=0, description="DualMap late-binding token budget in "
                                            "seconds of prefill (default alpha x SLO; 0: one un-prefilled "
                                            "request per instance)")
    queue_order: Literal["hit", "prefill"] = Field("prefill", description="DualMap's gateway queue order: "
                                                   "'prefill' (default) or the paper's 'hit' (longest hit first)")
    seed: int = Field(0, ge=0, description="DES seed (ring layout)")
    host_cache_tokens: int = Field(0, ge=0, description="host-memory KV tier per instance in tokens (0: none, "
                                   "GPU prefix cache only); routing shadows follow GPU + host")
    host_link_gbytes_s: float = Field(25.0, gt=0, description="host-to-GPU KV load bandwidth in GB/s")
    cache_view: Literal["shadow", "exact", "both"] = Field(
        "shadow", description="routing's cache view: 'shadow' (what it routed, LRU-bounded), 'exact' (the "
        "engines' own caches, as their KV-cache events tell), or 'both' (each policy under each, rows "
        "policy@view, exact/shadow capacity ratios)")

    def views(self) -> list[Literal["shadow", "exact"]]:
        return ["shadow", "exact"] if self.cache_view == "both" else [self.cache_view]

    def labels(self) -> list[str]:
        """One run per (policy, view): the policy's name, or policy@view when both views run."""
        both = self.cache_view == "both"
        return [f"{p}@{v}" if both else p for p in self.policies.split(",") for v in self.views()]

    @field_validator("policies")
    @classmethod
    def _known(cls, v: str) -> str:
        names = [p.strip() for p in v.split(",") if p.strip()]
        unknown = [p for p in names if p not in POLICIES]
        if not names or unknown:
            raise ValueError(f"unknown policies {unknown}; available: {', '.join(POLICIES)}")
        return ",".join(names)

    def cli_cmd(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        console = Console(stderr=True)
        try:
            fmt = detect_format(self.trace)
            trace = load_trace(self.trace)
        except (TraceFormatError, OSError) as exc:
            raise SystemExit(f"tandem bench routing: trace: {exc}") from exc
        try:
            load_profile(self.profile)
        except ValueError as exc:
            raise SystemExit(f"tandem bench routing: profile: {exc}") from exc
        chosen = select(trace, count=self.warmup + self.requests)
        if len(chosen) < self.warmup + 10:
            raise SystemExit(f"tandem bench routing: trace has {len(trace)} requests, fewer than warmup + 10")
        prepared = prepare(chosen)
        console.print(f"trace {self.trace} ({fmt}, {len(chosen)} requests, native {mean_qps(chosen):.2f} QPS), "
                      f"{self.instances} x {self.profile}, SLO {self.slo_ttft}s @ {self.attainment:.0%}, "
                      f"cache view {self.cache_view}")
        policies = self.labels()
        runner = CapacitySearch(self, chosen, prepared)
        t0 = time.perf_counter()
        with Progress(TextColumn("{task.description:<40}"), BarColumn(), TextColumn("{task.completed} runs"),
                      TimeElapsedColumn(), console=console) as progress:
            for name in policies:
                task = progress.add_task(name, total=runner.expected_runs)
                runner.capacity(name, lambda q, n=name, t=task: progress.update(
                    t, advance=1, description=f"{n} @ {q:.2f} QPS"))
                progress.update(task, completed=runner.expected_runs, description=f"{name}: "
                                f"{runner.results[name]['capacity_qps']:.2f} QPS")
            common = self.common_qps or min(r["capacity_qps"] for r in runner.results.values()) or None
            if common:
                for name in policies:
                    runner.point(name, common)
        elapsed = time.perf_counter() - t0
        out = runner.report(common, elapsed)
        table = Table(title=f"capacity at {self.attainment:.0%} TTFT <= {self.slo_ttft}s; latency etc. at "
                      f"{common or 0:.2f} QPS")
        for col in ("policy", "capacity QPS", "x round_robin", "p50 s", "p90 s", "p99 s", "hit ratio", "est. hit",
                    "imbalance"):
            table.add_column(col, justify="right")
        for name in policies:
            res = out["policies"][name]
            pt = res.get("common") or {}
            ratio = f"{res['capacity_vs_round_robin']:.2f}" if "capacity_vs_round_robin" in res else "-"
            bound = ">= " if res["capacity_is_lower_bound"] else ""
            table.add_row(name, f"{bound}{res['capacity_qps']:.2f}", ratio,
                          *(f"{pt.get(k, float('nan')):.2f}" for k in ("ttft_p50", "ttft_p90", "ttft_p99")),
                          *(f"{pt.get(k, float('nan')):.3f}" for k in ("hit_ratio", "estimated_hit_ratio")),
                          f"{pt.get('imbalance', float('nan')):.2f}")
        Console(width=140).print(table)
        if self.json_out:
            self.json_out.write_text(json.dumps(out, indent=2))
        if self.plot:
            plot_attainment(out, self.plot, self.attainment)


class CapacitySearch:
    """Runs and caches DES points for one trace slice; finds each policy's capacity."""

    def __init__(self, bench: RoutingBench, chosen: list[TraceRequest], prepared: list[PreparedRequest]) -> None:
        self.bench = bench
        self.chosen = chosen
        self.prepared = prepared
        self.native = mean_qps(chosen) or 1.0
        self.results: dict[str, dict] = {}
        self._points: dict[str, dict[float, Point]] = {}
        self.expected_runs = 12
        self.routing = RoutingConfig(slo_ttft_s=bench.slo_ttft, alpha=bench.alpha,
                                     dispatch_budget_s=bench.dispatch_budget_s, queue_order=bench.queue_order)
        self.des = DESConfig(instances=bench.instances, profile=bench.profile, seed=bench.seed,
                             host_cache_tokens=bench.host_cache_tokens, host_link_gbytes_s=bench.host_link_gbytes_s,
                             cache_view=bench.views()[0])

    def point(self, label: str, qps: float) -> Point:
        """One DES run of ``label`` (a policy, or policy@view) at ``qps``, cached."""
        qps = round(qps, 4)
        cache = self._points.setdefault(label, {})
        if qps not in cache:
            policy, _, view = label.partition("@")
            des = self.des.model_copy(update={"cache_view": view}) if view else self.des
            arrivals = [r.arrival for r in rescale_to_qps(self.chosen, qps)]
            res = simulate(with_arrivals(self.prepared, arrivals), policy, self.routing, des)
            cache[qps] = summarise(res, qps, self.bench.warmup, self.bench.slo_ttft)
        return cache[qps]

    def capacity(self, policy: str, on_run: Callable[[float], None] | None = None) -> float:
        b = self.bench

        def ok(q: float) -> bool:
            p = self.point(policy, q)
            if on_run:
                on_run(q)
            return p.attainment >= b.attainment

        cap, bounded = search_capacity(ok, b.start_qps or self.native, b.tolerance)
        # No failing rate found: the slice is too small to load the pool (its whole burst fits in
        # the SLO), so the figure is only a lower bound.
        self.results[policy] = {"capacity_qps": round(cap, 4), "capacity_is_lower_bound": not bounded}
        return cap

    def report(self, common: float | None, elapsed: float) -> dict:
        b = self.bench
        out: dict = {"policies": {}, "config": {
            "trace": str(b.trace), "trace_format": detect_format(b.trace), "instances": b.instances,
            "profile": b.profile, "slo_ttft": b.slo_ttft, "attainment": b.attainment, "requests": b.requests,
            "warmup": b.warmup, "tolerance": b.tolerance, "alpha": b.alpha, "seed": b.seed,
            "host_cache_tokens": b.host_cache_tokens, "host_link_gbytes_s": b.host_link_gbytes_s,
            "cache_view": b.cache_view, "common_qps": common, "native_qps": round(self.native, 4),
            "elapsed_s": round(elapsed, 1),
            "routing": self.routing.model_dump(), "des": self.des.model_dump()}}
        for name, res in self.results.items():
            pts = sorted(self._points.get(name, {}).values(), key=lambda p: p.qps)
            entry = {"capacity_qps": res["capacity_qps"], "capacity_is_lower_bound": res["capacity_is_lower_bound"],
                     "points": [p.model_dump() for p in pts]}
            if common:
                entry["common"] = self.point(name, common).model_dump()
            _, at, view = name.partition("@")
            base = self.results.get("round_robin" + at + view, {}).get("capacity_qps")
            if base:
                entry["capacity_vs_round_robin"] = round(res["capacity_qps"] / base, 3)
            shadow = self.results.get(name.removesuffix("@exact") + "@shadow", {}).get("capacity_qps")
            if view == "exact" and shadow:
                entry["capacity_vs_shadow"] = round(res["capacity_qps"] / shadow, 3)
            out["policies"][name] = entry
        return out


def plot_attainment(out: dict, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in out["policies"].items():
        pts = res["points"]
        ax.plot([p["qps"] for p in pts], [p["attainment"] for p in pts], marker="o", ms=3,
                label=f"{name} ({res['capacity_qps']:.2f} QPS)")
    ax.axhline(target, color="grey", ls="--", lw=1)
    cfg = out["config"]
    ax.set_xlabel("QPS (rescaled trace arrivals)")
    ax.set_ylabel(f"share of requests with TTFT <= {cfg['slo_ttft']} s")
    ax.set_title(f"{Path(cfg['trace']).name}: {cfg['instances']} x {cfg['profile']}")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class DecisionBench(TandemSettings):
    """Time of one routing decision (policy.choose, no I/O) at several pool sizes."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_DECISION_")

    instances: str = Field("8,128,1024", description="comma-separated pool sizes")
    policies: str = Field(",".join(POLICIES), description="comma-separated policies to time")
    trace: Path = Field(DEFAULT_TRACE, description="requests (prefix hashes, lengths) to route")
    decisions: int = Field(20000, ge=100, description="timed decisions per (policy, pool size)")
    warm: int = Field(3000, ge=0, description="requests routed first to fill shadow caches and key windows")
    seed: int = Field(0, ge=0, description="seed of the synthetic instance loads")
    json_out: Path | None = Field(None, alias="json", description="write the results as JSON here")

    @field_validator("policies")
    @classmethod
    def _known(cls, v: str) -> str:
        return RoutingBench._known(v)

    @field_validator("instances")
    @classmethod
    def _sizes(cls, v: str) -> str:
        try:
            sizes = [int(x) for x in v.split(",") if x.strip()]
        except ValueError as exc:
            raise ValueError("instances must be comma-separated integers") from exc
        if not sizes or min(sizes) < 1:
            raise ValueError("instances must be positive")
        return ",".join(map(str, sizes))

    def cli_cmd(self) -> None:
        from rich.console import Console
        from rich.table import Table

        try:
            reqs = prepare(load_trace(self.trace))
        except (TraceFormatError, OSError) as exc:
            raise SystemExit(f"tandem bench decision: trace: {exc}") from exc
        sizes = [int(x) for x in self.instances.split(",")]
        results = {name: {str(n): time_decisions(name, n, reqs, self.decisions, self.warm, self.seed)
                          for n in sizes} for name in self.policies.split(",")}
        movement = {str(n): ring_movement(n, self.seed) for n in sizes}
        table = Table(title="routing decision time (us), policy.choose only")
        table.add_column("policy")
        for n in sizes:
            table.add_column(f"N={n} p50", justify="right")
            table.add_column(f"N={n} p99", justify="right")
        for name, per in results.items():
            table.add_row(name, *(f"{per[str(n)][k]:.1f}" for n in sizes for k in ("p50_us", "p99_us")))
        Console(width=140).print(table)
        moves = Table(title="DualMap candidate pairs that change when one instance joins / leaves")
        for col in ("instances", "join", "leave", "2/(N+1)"):
            moves.add_column(col, justify="right")
        for n in sizes:
            m = movement[str(n)]
            moves.add_row(str(n), f"{m['join']:.4f}", f"{m['leave']:.4f}", f"{m['expected']:.4f}")
        Console(width=140).print(moves)
        if self.json_out:
            self.json_out.write_text(json.dumps({"policies": results, "ring_movement": movement, "config": {
                "instances": sizes, "decisions": self.decisions, "warm": self.warm, "trace": str(self.trace),
                "python": sys.version.split()[0]}}, indent=2))


def ring_movement(n: int, seed: int, keys: int = 20000) -> dict[str, float]:
    """Share of keys whose DualMap candidate pair changes when one instance joins, and when one leaves."""
    rng = random.Random(seed)
    sample = [rng.getrandbits(64) for _ in range(keys)]
    ring = DualRing(RoutingConfig().vnodes, seed)
    ring.sync(f"i{k:04d}" for k in range(n))

    def pairs() -> list[frozenset[str]]:
        return [frozenset(ring.candidates(k, lambda _: True) or ()) for k in sample]

    base = pairs()
    ring.add("joined")
    joined = pairs()
    ring.remove("joined")
    ring.remove("i0000")
    left = pairs()
    return {"join": sum(a != b for a, b in zip(base, joined, strict=True)) / keys,
            "leave": sum(a != b for a, b in zip(base, left, strict=True)) / keys,
            "expected": 2 / (n + 1)}


def time_decisions(policy_name: str, n: int, reqs: list[PreparedRequest], decisions: int, warm: int,
                   seed: int) -> dict[str, float]:
    """Route ``warm`` requests through a scheduler (filling shadows), randomise loads, time ``choose``."""
    rng = random.Random(seed)
    profile = load_profile("llama3-8b-h100")
    cap = profile.kv_capacity_tokens
    cluster = ClusterView({f"i{k:04d}": InstanceState(f"i{k:04d}", 3.1e-5, BlockCache(cap)) for k in range(n)})
    policy = make_policy(policy_name, RoutingConfig())
    sched = Scheduler(policy, cluster, RoutingConfig(late_binding=False))
    route = [RouteRequest(f"r{k}", r.input_tokens, r.route_hashes, r.block_size, r.arrival, r.fallback_key)
             for k, r in enumerate(reqs)]
    for k in range(min(warm, len(route))):
        sched.submit(route[k], 0.0)
        for rr, _ in sched.release(0.0):
            sched.on_first_token(rr.request_id)
            sched.on_finished(rr.request_id)
    for inst in cluster.instances.values():
        inst.inflight_miss_tokens = rng.randrange(0, 150_000)
        inst.queued_miss_tokens = rng.randrange(0, 50_000)
        inst.inflight_requests = rng.randrange(0, 40)
    # Collector pauses are the runtime's, not the decision's: move the warm-up heap out of the
    # collector's sight (as a long-running gateway would after start-up) before timing.
    gc.collect()
    gc.freeze()
    samples: list[float] = []
    clock = time.perf_counter_ns
    for k in range(decisions):
        req = route[(warm + k) % len(route)]
        t0 = clock()
        policy.choose(req, cluster)
        samples.append((clock() - t0) / 1000)
    gc.unfreeze()
    p50, p99 = quantiles(samples, (0.5, 0.99))
    return {"p50_us": round(p50, 2), "p99_us": round(p99, 2),
            "mean_us": round(statistics.fmean(samples), 2)}


def tile_trace(trace: list[TraceRequest], count: int) -> list[TraceRequest]:
    """``count`` requests from repeated copies of ``trace``; each copy gets its own block-id space
    (so copies do not hit each other's caches) and follows the previous one in time."""
    if not trace:
        raise ValueError("empty trace")
    stride = max((max(r.hash_ids) for r in trace if r.hash_ids), default=0) + 1
    span = trace[-1].arrival - trace[0].arrival + 1.0
    out: list[TraceRequest] = []
    copy = 0
    while len(out) < count:
        for r in trace[: count - len(out)]:
            out.append(replace(r, arrival=r.arrival + copy * span,
                               hash_ids=tuple(h + copy * stride for h in r.hash_ids)))
        copy += 1
    return out


class DESBench(TandemSettings):
    """Wall-clock speed of the discrete-event simulator on a large replay (one policy, one QPS)."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_DES_")

    trace: Path = Field(DEFAULT_TRACE, description="Mooncake JSONL or Azure CSV trace, tiled to --requests")
    requests: int = Field(100_000, ge=1, description="requests to replay")
    instances: int = Field(64, ge=1, le=100_000, description="simulated engine instances")
    qps: float = Field(48.0, gt=0, description="arrival rate the trace is rescaled to")
    policy: str = Field("dualmap", description="routing policy")
    profile: str = Field("llama3-8b-h100", description="performance profile of every instance")
    json_out: Path | None = Field(None, alias="json", description="write the figures as JSON here")

    @field_validator("policy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; available: {', '.join(POLICIES)}")
        return v

    def cli_cmd(self) -> None:
        try:
            trace = load_trace(self.trace)
        except (TraceFormatError, OSError) as exc:
            raise SystemExit(f"tandem bench des: trace: {exc}") from exc
        t0 = time.perf_counter()
        reqs = prepare(rescale_to_qps(tile_trace(trace, self.requests), self.qps))
        t1 = time.perf_counter()
        sim = Simulation(reqs, self.policy, RoutingConfig(), DESConfig(instances=self.instances, profile=self.profile))
        res = sim.run()
        t2 = time.perf_counter()
        point = summarise(res, self.qps, 0, RoutingConfig().slo_ttft_s)
        figures = {"requests": self.requests, "instances": self.instances, "qps": self.qps, "policy": self.policy,
                   "prepare_s": round(t1 - t0, 2), "simulate_s": round(t2 - t1, 2), "events": res.events,
                   "events_per_s": round(res.events / (t2 - t1)), "simulated_s": round(res.end_time, 1),
                   "attainment": round(point.attainment, 4), "hit_ratio": round(point.hit_ratio, 4)}
        print(json.dumps(figures, indent=2))
        if self.json_out:
            self.json_out.write_text(json.dumps(figures, indent=2))
