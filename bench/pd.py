"""``tandem bench offload`` and ``tandem bench pd``: the disaggregated paths in the DES.

Both find a deployment's throughput at its SLOs the way the routing bench finds capacity: scale
the arrival rate (a geometric ramp, then bisection) and keep the highest rate at which at least
``attainment`` of the measured requests meet every SLO. Every scenario runs in the same process
on the same requests and the same total GPU count; each scenario's pool split (prefill:decode, and
remote:local for offload) is sized by the same analytic throughput model (the offload solver's
Λ, DistServe style) before the DES measures it. Results are printed as ratios to the baseline
measured in the same run.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.bench.autoscale import distinct_text_keys
from tandem.bench.stats import quantile, quantiles
from tandem.config import TandemSettings
from tandem.perf.costmodel import CostModel
from tandem.perf.profile import load_profile
from tandem.router.routing.config import RoutingConfig
from tandem.router.routing.offload import (
    OffloadProblem,
    OffloadSettings,
    decode_rps_estimate,
    pool_speed,
    solve_threshold,
)
from tandem.sim.des.pd import PDConfig, PDResult, simulate_pd
from tandem.sim.des.search import search_capacity
from tandem.sim.des.simulator import DESConfig, PreparedRequest, prepare, simulate, with_arrivals
from tandem.traces import TRACE_DIR, TraceFormatError, TraceRequest, load_trace, rescale_to_qps, select

DEFAULT_TRACE = TRACE_DIR / "conversation_trace.jsonl"
AZURE_TRACE = TRACE_DIR / "AzureLLMInferenceTrace_conv.csv"


def lognormal_mix(count: int, *, mu: float, sigma: float, low: int, high: int, output_tokens: int,
                  seed: int, tail: Literal["clip", "truncate"] = "clip") -> list[TraceRequest]:
    """Prompt lengths ~ LogNormal(mu, sigma) on [low, high], unit-rate Poisson arrivals.

    ``clip`` moves lengths outside the range to its ends; ``truncate`` draws again (the truncated
    distribution: PrfaaS's mu 9.90, sigma 1.00 over [128, 128K] has a mean of ~27K, clipping gives ~30K).
    The prompts share no prefix (every token is uncached), as in PrfaaS's long-context mix.
    """
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(1.0)
        x = rng.lognormvariate(mu, sigma)
        if tail == "truncate":
            while not low <= x <= high:
                x = rng.lognormvariate(mu, sigma)
        out.append(TraceRequest(t, int(min(high, max(low, x))), output_tokens))
    return out


def steady_attainment(outcomes: Sequence[tuple[float, bool]], tail: float = 0.2) -> float:
    """Attainment over all (arrival, met) outcomes, and over the last ``tail`` of arrivals; the lower.

    A finite trace replayed above capacity builds a backlog that the run may end before it hurts
    most requests; the requests that arrive last see it. Requiring the tail to attain as well
    makes the capacity a steady-state one.
    """
    ordered = sorted(outcomes)
    if not ordered:
        return 0.0
    late = ordered[int(len(ordered) * (1 - tail)):] or ordered
    return min(sum(m for _, m in ordered) / len(ordered), sum(m for _, m in late) / len(late))


class PromptScaledSLO:
    """TTFT within ``base + per_token x prompt`` (long prompts are allowed their prefill) and TPOT."""

    def __init__(self, ttft_base: float, ttft_per_token: float, tpot: float) -> None:
        self.ttft_base, self.ttft_per_token, self.tpot = ttft_base, ttft_per_token, tpot

    def met(self, prompt: int, ttft: float | None, tpot: float | None) -> bool:
        if ttft is None or ttft > self.ttft_base + self.ttft_per_token * prompt:
            return False
        return tpot is None or tpot <= self.tpot


def slo_local_cap(profile: str, slo: PromptScaledSLO, share: float) -> int:
    """Longest prompt the profile prefills alone within ``share`` of its TTFT SLO (binary search)."""
    cost = CostModel.from_profile(load_profile(profile))
    lo, hi = 0, 10_000_000
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost.prefill_time(mid) <= share * (slo.ttft_base + slo.ttft_per_token * mid):
            lo = mid
        else:
            hi = mid
    return lo


def tpot_kv_cap(profile: str, tpot_s: float, mean_prompt: float, mean_output: float) -> int:
    """The most KV (tokens) a decode instance may hold so that a step reading all of it stays within
    the TPOT SLO: decode admits by KV reservation, so this bounds the batch's context whatever the
    mix (capped at the profile's capacity; at least one mean request)."""
    p = load_profile(profile)
    cost = CostModel.from_profile(p)
    per_request = mean_prompt + mean_output
    lo, hi = int(per_request), p.kv_capacity_tokens
    if cost.decode_step_time(max(1, int(hi // per_request)), hi) <= tpot_s:
        return hi
    while hi - lo > 256:
        mid = (lo + hi) // 2
        if cost.decode_step_time(max(1, int(mid // per_request)), mid) <= tpot_s:
            lo = mid
        else:
            hi = mid
    return lo


# ----- tandem bench offload ---------------------------------------------------------------------
Scenario = Literal["homogeneous", "naive", "selective", "selective_threshold"]
SCENARIOS: tuple[Scenario, ...] = ("homogeneous", "naive", "selective")
# Each scenario's offload mode, and how selective picks a request's side (selective_threshold: the
# solved threshold alone, the policy before queue-aware choice; kept to measure the difference).
_MODE = {"homogeneous": "local", "naive": "remote", "selective": "selective", "selective_threshold": "selective"}
# The PrfaaS setting (issue #19): its workload, a compute-dense remote prefill pool and a local PD
# pool of equal cost (an H200 priced at 2 H20s: 8 H200 + 16 H20, homogeneous 32 H20), and a link that
# binds: 60 Gbit/s carries the KV of about half of what the 8 H200s can prefill of this mix.
PRFAAS: dict[str, object] = {
    "workload": "lognormal", "mu": 9.90, "sigma": 1.0, "min_tokens": 128, "max_tokens": 128_000,
    "tail": "truncate", "output_tokens": 1024, "slo_tpot": 0.025, "gpus": 32, "remote_gpu_cost": 2.0,
    "remote_share": 0.5, "local_profile": "llama3-8b-h20", "remote_profile": "llama3-8b-h200",
    "link_gbps": 60.0, "link_rtt_ms": 10.0,
}


class Budget:
    """What a deployment may spend: ``units`` of local-GPU cost; a remote GPU costs ``remote_cost``.

    ``remote_share`` fixes the remote prefill pool's share of the budget for the scenarios that
    have one (PrfaaS: a remote prefill pool and a local PD pool at equal cost); None lets the
    planner choose it."""

    def __init__(self, units: int, remote_cost: float = 1.0, remote_share: float | None = None) -> None:
        self.units, self.remote_cost, self.remote_share = units, remote_cost, remote_share

    def splits(self) -> list[tuple[int, int]]:
        """(remote GPUs, local GPUs) options of a deployment with a remote pool."""
        if self.remote_share is not None:
            remote = max(1, round(self.remote_share * self.units / self.remote_cost))
            return [(remote, int(self.units - remote * self.remote_cost + 1e-9))]
        out = []
        remote = 1
        while (local := int(self.units - remote * self.remote_cost + 1e-9)) >= 1:
            out.append((remote, local))
            remote += 1
        return out


def plan_split(scenario: Scenario, budget: Budget | int, lengths: list[int], local: str, remote: str,
               link_gbps: float, mean_output: float, high_water: float, local_cap: int | None = None,
               decode_kv: int | None = None) -> tuple[int, int, int, float, int]:
    """(local prefill, remote prefill, decode, Λ, threshold) maximising the analytic throughput."""
    if isinstance(budget, int):
        budget = Budget(budget)
    lp, rp = load_profile(local), load_profile(remote)
    mean_prompt = statistics.fmean(lengths)
    kvb = lp.model.kv_bytes_per_token
    local_work = statistics.fmean(pool_speed(lp, 1).work(x) for x in lengths)
    remote_work = statistics.fmean(pool_speed(rp, 1).work(x) for x in lengths)
    best: tuple[float, int, int, int, int] | None = None
    pools = [(0, budget.units)] if scenario == "homogeneous" else budget.splits()
    for remote_n, local_total in pools:
        for decode in range(1, local_total + 1):
            decode_rps = decode_rps_estimate(lp, decode, mean_prompt, mean_output, decode_kv)
            local_n = local_total - decode
            if scenario == "naive":
                if local_n:
                    continue  # every local GPU decodes
                link_rps = high_water * link_gbps * 1e9 / 8 / (mean_prompt * kvb)
                lam, threshold = min(remote_n / remote_work, link_rps, decode_rps), 0
            elif local_n < 1:
                continue
            elif scenario == "homogeneous":
                lam, threshold = min(local_n / local_work, decode_rps), max(lengths)
            else:
                decision = solve_threshold(OffloadProblem(
                    uncached_lengths=lengths, local=pool_speed(lp, local_n), remote=pool_speed(rp, remote_n),
                    decode_rps=decode_rps, link_gbps=link_gbps, kv_bytes_per_token=kvb,
                    high_water=high_water, max_threshold=local_cap))
                lam, threshold = decision.max_rps, decision.threshold_tokens
            if best is None or lam > best[0] * (1 + 1e-9):
                best = (lam, local_n, remote_n, decode, threshold)
    if best is None:
        raise SystemExit(f"tandem bench offload: gpus: a budget of {budget.units} cannot hold a {scenario} "
                         f"deployment (remote GPU cost {budget.remote_cost})")
    return best[1], best[2], best[3], best[0], best[4]


class OffloadBench(TandemSettings):
    """Homogeneous local PD vs naive (all prefill remote) vs selective offload, at equal cost."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_OFFLOAD_")

    scenario: Literal["custom", "prfaas"] = Field("custom", description="prfaas: the PrfaaS setting (truncated "
                                                  "log-normal mu 9.90 sigma 1.00 over 128..128k, 1,024 output "
                                                  "tokens, TPOT 25 ms, 16 H20 local + 8 H200 remote at an H200 "
                                                  "cost of 2, 60 Gbit/s); flags given explicitly win")
    workload: Literal["lognormal", "mooncake", "azure"] = Field("lognormal", description="log-normal long-context "
                                                                 "mix, or a shipped trace")
    trace: Path | None = Field(None, description="trace file (default: the shipped Mooncake / Azure trace)")
    mu: float = Field(9.90, description="log-normal prompt length: mu")
    sigma: float = Field(1.0, gt=0, description="log-normal prompt length: sigma")
    min_tokens: int = Field(128, gt=0, description="shortest log-normal prompt")
    max_tokens: int = Field(128_000, gt=0, description="longest log-normal prompt")
    tail: Literal["clip", "truncate"] = Field("clip", description="log-normal lengths outside the range: clipped "
                                              "to it, or drawn again (truncated distribution)")
    output_tokens: int = Field(256, gt=0, description="output length of the log-normal mix")
    gpus: int = Field(32, ge=3, le=4096, description="budget of every scenario, in local GPUs (one per instance)")
    remote_gpu_cost: float = Field(1.0, gt=0, le=100, description="cost of one remote GPU in local GPUs")
    remote_share: float | None = Field(None, gt=0, lt=1, description="share of the budget on the remote prefill "
                                       "pool (naive and selective; default: planned)")
    local_profile: str = Field("llama3-8b-h20", description="local datacenter GPUs (prefill and decode)")
    remote_profile: str = Field("llama3-8b-h200", description="remote prefill datacenter GPUs")
    link_gbps: float = Field(100.0, gt=0, description="cross-datacenter link, Gbit/s")
    link_rtt_ms: float = Field(10.0, ge=0, description="cross-datacenter RTT")
    high_water: float = Field(0.85, gt=0, le=1, description="share of the link offload may plan to use")
    slo_ttft: float = Field(2.0, gt=0, description="TTFT SLO: seconds allowed to every request")
    slo_ttft_per_token: float = Field(0.001, ge=0, description="TTFT SLO: extra seconds per prompt token")
    slo_tpot: float = Field(0.1, gt=0, description="TPOT SLO in seconds")
    attainment: float = Field(0.9, gt=0, le=1, description="share of measured requests that must meet the SLOs")
    slo_share: float = Field(0.5, gt=0, le=1, description="selective: keep local only prompts whose prefill "
                             "alone takes at most this share of their TTFT SLO")
    scenarios: str = Field(",".join(SCENARIOS), description="comma-separated scenarios to run: homogeneous, "
                           "naive, selective, selective_threshold (the threshold alone)")
    split_search: int = Field(1, ge=0, le=8, description="also measure splits with up to this many GPUs moved "
                              "between local prefill and decode each way; the best measured is kept")
    requests: int = Field(500, ge=20, description="measured requests")
    warmup: int = Field(50, ge=0, description="leading requests replayed but not measured")
    tolerance: float = Field(0.05, gt=0, lt=1, description="bisection stops at this relative rate gap")
    util_window_s: float = Field(5.0, gt=0, description="link utilisation is averaged over windows this long "
                                 "(peak = the busiest window)")
    common_qps: float | None = Field(None, gt=0, description="rate at which latency and link use are compared "
                                     "(default: 0.8 x the homogeneous throughput)")
    seed: int = Field(0, ge=0, description="workload and ring seed")
    json_out: Path | None = Field(None, alias="json", description="write the results as JSON here")
    plot: Path | None = Field(None, description="write a PNG (attainment vs rate, TTFT CDF) here")

    def model_post_init(self, context: object) -> None:
        if self.scenario == "prfaas":
            for name, value in PRFAAS.items():
                if name not in self.model_fields_set:
                    setattr(self, name, value)

    def scenario_list(self) -> list[Scenario]:
        names = [x.strip() for x in self.scenarios.split(",") if x.strip()]
        bad = [x for x in names if x not in _MODE]
        if bad or not names:
            raise SystemExit(f"tandem bench offload: scenarios: unknown {bad or 'empty list'}; choose from "
                             f"{', '.join(_MODE)}")
        return [x for x in _MODE if x in names]  # type: ignore[misc]

    def budget(self) -> Budget:
        return Budget(self.gpus, self.remote_gpu_cost, self.remote_share)

    def workload_requests(self) -> list[TraceRequest]:
        count = self.warmup + self.requests
        if self.workload == "lognormal":
            if self.min_tokens >= self.max_tokens:
                raise SystemExit("tandem bench offload: min_tokens must be below max_tokens")
            return lognormal_mix(count, mu=self.mu, sigma=self.sigma, low=self.min_tokens, high=self.max_tokens,
                                 output_tokens=self.output_tokens, seed=self.seed, tail=self.tail)
        path = self.trace or (DEFAULT_TRACE if self.workload == "mooncake" else AZURE_TRACE)
        try:
            return select(load_trace(path), count=count)
        except (TraceFormatError, OSError) as exc:
            raise SystemExit(f"tandem bench offload: trace: {exc}") from exc

    def cli_cmd(self) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console(stderr=True)
        for name in (self.local_profile, self.remote_profile):
            try:
                load_profile(name)
            except ValueError as exc:
                raise SystemExit(f"tandem bench offload: profile: {exc}") from exc
        base = self.workload_requests()
        prepared = distinct_text_keys(prepare(base))
        lengths = [r.input_tokens for r in base]
        mean_out = statistics.fmean(r.output_tokens for r in base)
        slo = PromptScaledSLO(self.slo_ttft, self.slo_ttft_per_token, self.slo_tpot)
        scenarios = self.scenario_list()
        t0 = time.perf_counter()
        runner = OffloadRunner(self, base, prepared, slo)
        out: dict = {"scenarios": {}, "config": {}}
        splits = {}
        console.print(f"{self.workload}: {len(base)} requests, mean prompt {statistics.fmean(lengths):,.0f} "
                      f"tokens, output {mean_out:,.0f}; decode KV cap {runner.decode_kv:,} tokens "
                      f"(TPOT {self.slo_tpot * 1000:g} ms); budget {self.gpus} local GPUs, remote GPU cost "
                      f"{self.remote_gpu_cost:g}")
        for sc in scenarios:
            plan = "selective" if sc == "selective_threshold" else sc
            splits[sc] = plan_split(plan, self.budget(), lengths, self.local_profile, self.remote_profile,
                                    self.link_gbps, mean_out, self.high_water, runner.local_cap, runner.decode_kv)
            console.print(f"{sc}: planned {splits[sc][0]} local prefill + {splits[sc][1]} remote prefill + "
                          f"{splits[sc][2]} decode (analytic {splits[sc][3]:.2f} req/s)")
            runner.capacity(sc, splits[sc], start=max(0.01, 0.5 * splits[sc][3]))
            splits[sc] = runner.splits[sc]
            console.print(f"  throughput at SLOs: {runner.capacities[sc]:.3f} req/s with "
                          f"{'+'.join(str(x) for x in splits[sc][:3])} (tried {runner.tried[sc]})")
        if self.common_qps:
            common = self.common_qps
        elif "homogeneous" in runner.capacities:
            common = 0.8 * runner.capacities["homogeneous"] or 0.01
        else:
            common = 0.8 * min(runner.capacities.values()) or 0.01
        for sc in scenarios:
            out["scenarios"][sc] = runner.summary(sc, common)
        out["config"] = {**self.model_dump(mode="json", by_alias=False, exclude={"json_out", "plot"}),
                         "common_qps": round(common, 4), "elapsed_s": round(time.perf_counter() - t0, 1),
                         "mean_prompt": round(statistics.fmean(lengths), 1), "decode_kv_cap": runner.decode_kv,
                         "splits": {sc: {"local_prefill": s[0], "remote_prefill": s[1], "decode": s[2],
                                         "analytic_rps": round(s[3], 4), "planned_threshold": s[4]}
                                    for sc, s in splits.items()}}
        ref = out["scenarios"].get("homogeneous") or out["scenarios"][scenarios[0]]
        naive = out["scenarios"].get("naive")
        table = Table(title=f"{self.scenario if self.scenario != 'custom' else self.workload}: budget {self.gpus} "
                      f"local GPUs; throughput at SLOs; latency/link at {common:.3f} req/s")
        for col in ("scenario", "P+R+D", "req/s", "x homog.", "x naive", "TTFT mean", "TTFT p90", "p90 x homog.",
                    "p90 x naive", "t", "offloaded", "link max", "link mean"):
            table.add_column(col, justify="right")
        for sc in scenarios:
            r = out["scenarios"][sc]
            s = splits[sc]
            table.add_row(sc, f"{s[0]}+{s[1]}+{s[2]}", f"{r['throughput_rps']:.3f}",
                          _ratio(r["throughput_rps"], ref["throughput_rps"]),
                          _ratio(r["throughput_rps"], naive["throughput_rps"]) if naive else "-",
                          f"{r['ttft_mean']:.2f}", f"{r['ttft_p90']:.2f}", _ratio(r["ttft_p90"], ref["ttft_p90"]),
                          _ratio(r["ttft_p90"], naive["ttft_p90"]) if naive else "-", str(r["threshold_tokens"]),
                          f"{r['offload_fraction']:.2f}", f"{r['link_util_max']:.2f}", f"{r['link_util_mean']:.2f}")
        Console(width=180).print(table)
        if self.json_out:
            self.json_out.write_text(json.dumps(out, indent=2))
        if self.plot:
            plot_offload(out, self.plot)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and math.isfinite(a) and math.isfinite(b) else "-"


class OffloadRunner:
    """Runs and caches DES points per (scenario, pool split, rate)."""

    def __init__(self, bench: OffloadBench, base: list[TraceRequest], prepared: list[PreparedRequest],
                 slo: PromptScaledSLO) -> None:
        self.bench, self.base, self.prepared, self.slo = bench, base, prepared, slo
        self.splits: dict[str, tuple[int, int, int, float, int]] = {}
        self.capacities: dict[str, float] = {}
        self.tried: dict[str, list[dict]] = {}
        self.runs: dict[tuple[str, tuple[int, int, int], float], dict] = {}
        self.link_max_any: dict[str, float] = {}
        # The offload solver never leaves the local pool prompts it cannot prefill in half its SLO.
        self.local_cap = slo_local_cap(bench.local_profile, slo, bench.slo_share)
        # Decode instances hold no more KV than a step can read within the TPOT SLO.
        self.decode_kv = tpot_kv_cap(bench.local_profile, slo.tpot, statistics.fmean(r.input_tokens for r in base),
                                     statistics.fmean(r.output_tokens for r in base))

    def config(self, scenario: Scenario, split: tuple[int, int, int, float, int]) -> PDConfig:
        b = self.bench
        local_n, remote_n, decode, _, planned_t = split
        side = "threshold" if scenario == "selective_threshold" else "queue_aware"
        return PDConfig(local_prefill=local_n, remote_prefill=remote_n, decode=decode,
                        local_profile=b.local_profile, remote_profile=b.remote_profile, mode=_MODE[scenario],
                        link_gbps=b.link_gbps, link_rtt_ms=b.link_rtt_ms, seed=b.seed,
                        decode_kv_capacity_tokens=self.decode_kv,
                        ttft_slo_s=self.slo.ttft_base, ttft_slo_per_token_s=self.slo.ttft_per_token,
                        offload=OffloadSettings(high_water=b.high_water, min_samples=50, window=500,
                                                resolve_every_s=5.0, initial_threshold=planned_t,
                                                max_threshold=self.local_cap, side_choice=side))

    def point(self, scenario: Scenario, qps: float, split: tuple[int, int, int, float, int] | None = None) -> dict:
        split = split or self.splits[scenario]
        qps = round(qps, 5)
        key = (scenario, split[:3], qps)
        if key not in self.runs:
            arrivals = [r.arrival for r in rescale_to_qps(self.base, qps)]
            run = simulate_pd(with_arrivals(self.prepared, arrivals), self.config(scenario, split),
                              RoutingConfig(slo_ttft_s=30.0))
            measured = [r for r in run.requests if r.index >= self.bench.warmup]
            start = min(r.arrival for r in measured)
            end = max((r.finished_at or r.arrival) for r in measured)
            link = run.remote_link
            windows = link.window_utilisation(0.0, max(run.end_time, link.clock, 1e-9), self.bench.util_window_s) \
                if run.end_time > 0 else [0.0]
            self.runs[key] = {
                "qps": qps, "results": measured,
                "attainment": steady_attainment([(r.arrival, self.slo.met(r.prompt_tokens, r.ttft, r.tpot))
                                                 for r in measured]),
                "link_util_max": max(windows), "link_util_mean": link.utilisation(start, end) if end > start else 0.0,
                "threshold": run.thresholds[-1][1] if run.thresholds else None,
            }
            self.link_max_any[scenario] = max(self.link_max_any.get(scenario, 0.0), max(windows))
        return self.runs[key]

    def candidates(self, scenario: Scenario, planned: tuple[int, int, int, float, int]
                   ) -> list[tuple[int, int, int, float, int]]:
        """The planned split, then the same with up to ``split_search`` GPUs moved between local
        prefill and decode each way; naive, which has no local prefill, trades remote GPUs for
        decode ones instead (unless the remote share is fixed)."""
        out = [planned]
        local_n, remote_n, decode, lam, t = planned
        if scenario == "naive":
            if self.bench.remote_share is None:
                budget = self.bench.budget()
                for r in sorted({o[0] for o in budget.splits()}, key=lambda x: abs(x - remote_n)):
                    if 0 < abs(r - remote_n) <= self.bench.split_search:
                        d = int(budget.units - r * budget.remote_cost + 1e-9)
                        out.append((0, r, d, lam, t))
            return out
        for k in range(1, self.bench.split_search + 1):
            for d in (decode + k, decode - k):
                if d >= 1 and local_n + decode - d >= 1:
                    out.append((local_n + decode - d, remote_n, d, lam, t))
        return out

    def capacity(self, scenario: Scenario, planned: tuple[int, int, int, float, int], start: float) -> float:
        """Throughput at the SLOs of the best measured split among :meth:`candidates`."""
        best: tuple[float, tuple[int, int, int, float, int]] | None = None
        self.tried[scenario] = []
        for split in self.candidates(scenario, planned):
            cap, _ = search_capacity(
                lambda q, sp=split: self.point(scenario, q, sp)["attainment"] >= self.bench.attainment, start,
                self.bench.tolerance)
            self.tried[scenario].append({"local_prefill": split[0], "remote_prefill": split[1], "decode": split[2],
                                         "throughput_rps": round(cap, 4)})
            if best is None or cap > best[0]:
                best = (cap, split)
        assert best is not None
        self.capacities[scenario], self.splits[scenario] = best
        return best[0]

    def summary(self, scenario: Scenario, common: float) -> dict:
        p = self.point(scenario, common)
        res: list[PDResult] = p["results"]
        ttfts = [r.ttft if r.ttft is not None else math.inf for r in res]
        at_cap = self.point(scenario, self.capacities[scenario])
        if scenario == "homogeneous":
            threshold = t_cap = self.bench.max_tokens if self.bench.workload == "lognormal" else 10**9
        elif scenario == "naive":
            threshold = t_cap = 0
        else:
            threshold = int(p["threshold"] if p["threshold"] is not None else self.local_cap)
            t_cap = int(at_cap["threshold"] if at_cap["threshold"] is not None else self.local_cap)
        split = self.splits[scenario][:3]
        return {
            "throughput_rps": round(self.capacities[scenario], 4),
            "ttft_mean": round(statistics.fmean(ttfts), 3), "ttft_p90": round(quantile(ttfts, 0.9), 3),
            "threshold_tokens": threshold, "threshold_at_capacity": t_cap,
            "offload_fraction": round(sum(r.route == "remote" for r in res) / len(res), 4),
            "offload_fraction_at_capacity": round(sum(r.route == "remote" for r in at_cap["results"])
                                                  / len(at_cap["results"]), 4),
            "link_util_max": round(p["link_util_max"], 4), "link_util_mean": round(p["link_util_mean"], 4),
            "link_util_mean_at_capacity": round(at_cap["link_util_mean"], 4),
            "attainment_at_common": round(p["attainment"], 4),
            "tpot_p90": round(quantile([r.tpot for r in res if r.tpot is not None], 0.9), 4),
            "link_util_max_any_run": round(self.link_max_any.get(scenario, 0.0), 4),
            "gpus": {"local_prefill": split[0], "remote_prefill": split[1], "decode": split[2]},
            "splits_tried": self.tried.get(scenario, []),
            "points": sorted([q, round(r["attainment"], 4)] for (s, sp, q), r in self.runs.items()
                             if s == scenario and sp == split),
        }


def plot_offload(out: dict, path: Path) -> None:
    """Attainment vs arrival rate per scenario, and TTFT mean/P90 at the common rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = out["config"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for sc, r in out["scenarios"].items():
        pts = r["points"]
        ax1.plot([q for q, _ in pts], [a for _, a in pts], marker="o", ms=3,
                 label=f"{sc} ({r['throughput_rps']:.2f} req/s)")
    ax1.axhline(cfg["attainment"], color="grey", ls="--", lw=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("arrival rate (req/s)")
    ax1.set_ylabel("share meeting TTFT and TPOT SLOs")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=8)
    names = list(out["scenarios"])
    xs = range(len(names))
    ax2.bar([x - 0.2 for x in xs], [out["scenarios"][n]["ttft_mean"] for n in names], 0.4, label="mean")
    ax2.bar([x + 0.2 for x in xs], [out["scenarios"][n]["ttft_p90"] for n in names], 0.4, label="P90")
    ax2.set_xticks(list(xs), names)
    ax2.set_ylabel(f"TTFT (s) at {cfg['common_qps']:.3f} req/s")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{cfg['workload']}: {cfg['gpus']} GPUs, local {cfg['local_profile']}, remote "
                 f"{cfg['remote_profile']}, link {cfg['link_gbps']:g} Gbit/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- tandem bench pd --------------------------------------------------------------------------
class PDBench(TandemSettings):
    """Aggregated vs disaggregated serving at equal GPUs: goodput at TTFT and TPOT SLOs."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_PD_")

    trace: Path = Field(DEFAULT_TRACE, description="Mooncake JSONL or Azure CSV trace (format detected)")
    gpus: int = Field(8, ge=2, le=4096, description="total GPUs (one instance each) of both deployments")
    profile: str = Field("llama3-8b-h100", description="performance profile of every instance")
    slo_ttft: float = Field(5.0, gt=0, description="TTFT SLO in seconds")
    slo_tpots: str = Field("0.025,0.05,0.1", description="comma-separated TPOT SLOs (s); goodput for each")
    attainment: float = Field(0.9, gt=0, le=1, description="share of measured requests that must meet both SLOs")
    requests: int = Field(1500, ge=20, description="measured requests")
    warmup: int = Field(200, ge=0, description="leading requests replayed but not measured")
    prefill_share: str = Field("auto", description="disaggregated prefill instances: 'auto' (analytic) or a "
                               "comma-separated list of counts to measure, best reported")
    tolerance: float = Field(0.03, gt=0, lt=1, description="bisection stops at this relative rate gap")
    seed: int = Field(0, ge=0, description="ring seed")
    json_out: Path | None = Field(None, alias="json", description="write the results as JSON here")

    def cli_cmd(self) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console(stderr=True)
        try:
            base = select(load_trace(self.trace), count=self.warmup + self.requests)
            profile = load_profile(self.profile)
        except (TraceFormatError, OSError, ValueError) as exc:
            raise SystemExit(f"tandem bench pd: {exc}") from exc
        try:
            tpots = [float(x) for x in self.slo_tpots.split(",") if x.strip()]
        except ValueError as exc:
            raise SystemExit("tandem bench pd: slo_tpots must be comma-separated seconds") from exc
        prepared = prepare(base)
        lengths = [r.input_tokens for r in base]
        mean_out = statistics.fmean(r.output_tokens for r in base)
        if self.prefill_share == "auto":
            shares = [plan_split("homogeneous", self.gpus, lengths, self.profile, self.profile, 1.0, mean_out,
                                 1.0)[0]]
        else:
            try:
                shares = sorted({int(x) for x in self.prefill_share.split(",") if x.strip()})
            except ValueError as exc:
                raise SystemExit("tandem bench pd: prefill_share must be 'auto' or integers") from exc
            if not shares or min(shares) < 1 or max(shares) >= self.gpus:
                raise SystemExit(f"tandem bench pd: prefill_share must be between 1 and {self.gpus - 1}")
        cache: dict[tuple[str, float], list[tuple[float, int, float | None, float | None]]] = {}
        routing = RoutingConfig(slo_ttft_s=self.slo_ttft)

        def outcomes(kind: str, qps: float) -> list[tuple[float, int, float | None, float | None]]:
            qps = round(qps, 5)
            if (kind, qps) not in cache:
                reqs = with_arrivals(prepared, [r.arrival for r in rescale_to_qps(base, qps)])
                if kind == "aggregated":
                    res = simulate(reqs, "dualmap", routing, DESConfig(instances=self.gpus, profile=self.profile,
                                                                     seed=self.seed)).requests
                else:
                    prefill = int(kind.split(":")[1])
                    res = simulate_pd(reqs, PDConfig(local_prefill=prefill, decode=self.gpus - prefill,
                                                     local_profile=self.profile, seed=self.seed),
                                      routing).requests
                cache[(kind, qps)] = [(r.arrival, r.prompt_tokens, r.ttft, r.tpot) for r in res
                                      if r.index >= self.warmup]
            return cache[(kind, qps)]

        def attained(kind: str, qps: float, tpot: float) -> float:
            slo = PromptScaledSLO(self.slo_ttft, 0.0, tpot)
            return steady_attainment([(t, slo.met(p, a, b)) for t, p, a, b in outcomes(kind, qps)])

        t0 = time.perf_counter()
        start = max(0.05, (len(base) - 1) / max(1e-9, base[-1].arrival - base[0].arrival))
        out: dict = {"slo_tpot": {}, "config": {}}
        kinds = ["aggregated", *(f"disaggregated:{p}" for p in shares)]
        for tpot in tpots:
            row: dict = {}
            for kind in kinds:
                row[kind], _ = search_capacity(lambda q, k=kind, t=tpot: attained(k, q, t) >= self.attainment, start,
                                          self.tolerance)
            best = max(kinds[1:], key=lambda k: row[k])
            common = min(row["aggregated"], row[best]) or start
            entry = {}
            for name, kind in (("aggregated", "aggregated"), ("disaggregated", best)):
                got = outcomes(kind, common)
                ttfts = [a if a is not None else math.inf for _, _, a, _ in got]
                tp = [b for _, _, _, b in got if b is not None]
                ttft_p50, ttft_p90 = quantiles(ttfts, (0.5, 0.9))
                tpot_p50, tpot_p90 = quantiles(tp, (0.5, 0.9))
                entry[name] = {"goodput_rps": round(row[kind], 4), "prefill_instances": int(kind.split(":")[1])
                               if ":" in kind else None, "ttft_p50": round(ttft_p50, 3),
                               "ttft_p90": round(ttft_p90, 3), "tpot_p50": round(tpot_p50, 4),
                               "tpot_p90": round(tpot_p90, 4), "at_rps": round(common, 4)}
            entry["disaggregated_vs_aggregated"] = round(row[best] / row["aggregated"], 3) \
                if row["aggregated"] else None
            out["slo_tpot"][str(tpot)] = entry
            console.print(f"TPOT SLO {tpot}s: aggregated {row['aggregated']:.3f} req/s, disaggregated "
                          f"({best}) {row[best]:.3f} req/s")
        out["config"] = {**self.model_dump(mode="json", exclude={"json_out"}), "prefill_counts": shares,
                         "mean_prompt": round(statistics.fmean(lengths), 1), "mean_output": round(mean_out, 1),
                         "kv_capacity_tokens": profile.kv_capacity_tokens,
                         "elapsed_s": round(time.perf_counter() - t0, 1)}
        table = Table(title=f"{self.trace.name}: {self.gpus} x {self.profile}; goodput at TTFT <= {self.slo_ttft}s "
                      f"and TPOT SLO, {self.attainment:.0%}")
        for col in ("TPOT SLO", "aggregated req/s", "disagg. req/s", "P:D", "disagg / agg", "agg TTFT p90",
                    "disagg TTFT p90", "agg TPOT p90", "disagg TPOT p90"):
            table.add_column(col, justify="right")
        for tpot, e in out["slo_tpot"].items():
            a, d = e["aggregated"], e["disaggregated"]
            table.add_row(tpot, f"{a['goodput_rps']:.3f}", f"{d['goodput_rps']:.3f}",
                          f"{d['prefill_instances']}:{self.gpus - d['prefill_instances']}",
                          f"{e['disaggregated_vs_aggregated']}", f"{a['ttft_p90']:.2f}", f"{d['ttft_p90']:.2f}",
                          f"{a['tpot_p90']:.4f}", f"{d['tpot_p90']:.4f}")
        Console(width=160).print(table)
        if self.json_out:
            self.json_out.write_text(json.dumps(out, indent=2))
