"""``tandem bench capacity``: check the capacity model against the simulator it models.

Poisson arrivals of requests drawn from a trace are fed, at the model's pool goodput x 0.8 / 1.0 /
1.2, into the disaggregated DES (:class:`tandem.sim.des.pd.PDSimulation`, the same one the
autoscaling benchmark replays on) with the role under test at ``n`` instances and the other role
at twice what the model gives it for 1.2x the rate, so that only the role under test can miss.
The attainment of both SLOs is printed next to the model's per-phase target. A model that is
right meets the target at 1.0 and not far beyond; one sized from throughput alone would
collapse at 1.0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.api.models import Role
from tandem.autoscaler.capacity import CapacityModel
from tandem.autoscaler.models import ScalingSLO
from tandem.bench.autoscale import distinct_text_keys
from tandem.bench.replay import judge, length_mix, prefill_alone_s
from tandem.config import TandemSettings
from tandem.perf.profile import Profile, load_profile
from tandem.router.routing.config import RoutingConfig
from tandem.sim.des.pd import PDConfig, simulate_pd
from tandem.sim.des.simulator import prepare
from tandem.traces import TraceFormatError, TraceRequest, load_trace


def poisson_draw(trace: list[TraceRequest], rate: float, count: int, seed: int) -> list[TraceRequest]:
    """``count`` requests drawn from ``trace`` (with replacement) arriving as a Poisson process."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        r = rng.choice(trace)
        out.append(TraceRequest(t, r.input_tokens, r.output_tokens, r.hash_ids, r.block_size))
    return out


def measure(role: Role, n: int, rate: float, trace: list[TraceRequest], cap: CapacityModel, profile: Profile,
            requests: int, seed: int, policy: str = "dualmap") -> float:
    """Share of requests meeting both SLOs when ``n`` instances of ``role`` serve Poisson arrivals
    at ``rate`` in the DES, among those whose prompt alone prefills within the TTFT (the model's
    target is relative to that ceiling too); the first eighth is a warm-up."""
    other: Role = "decode" if role == "prefill" else "prefill"
    w = cap.workload(length_mix(trace))
    wide = 2 * (cap.pool_size(other, 1.2 * rate, w, 1024) or 1024)
    pools = {role: n, other: wide}
    run = simulate_pd(distinct_text_keys(prepare(poisson_draw(trace, rate, requests, seed))),
                      PDConfig(local_prefill=pools["prefill"], decode=pools["decode"], local_profile=profile.name),
                      RoutingConfig(slo_ttft_s=cap.slo.ttft_s), policy)
    chunk = profile.max_num_batched_tokens
    measured = [r for r in run.requests[requests // 8:]
                if prefill_alone_s(cap.cost, chunk, r.prompt_tokens) <= cap.slo.ttft_s]
    return sum(all(judge(r, cap.slo)) for r in measured) / len(measured)


class CapacityBench(TandemSettings):
    """Check the autoscaler's capacity model against the DES at 0.8x / 1x / 1.2x its goodput."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_CAPACITY_", populate_by_name=True)

    trace: Path = Field(description="trace whose length mix is replayed (Mooncake JSONL or Azure CSV)")
    profile: str = Field("qwen2.5-32b-h100", description="performance profile")
    ttft_s: float = Field(2.0, gt=0, description="TTFT SLO (s)")
    tpot_s: float = Field(0.1, gt=0, description="TPOT SLO (s)")
    attainment: float = Field(0.95, gt=0, lt=1, description="target share meeting both SLOs")
    requests: int = Field(4000, ge=100, description="requests per measurement")
    pools: list[int] = Field(default_factory=lambda: [1, 4, 8], description="pool sizes to check, per role")
    seed: int = Field(1, description="arrival seed")
    policy: str = Field("dualmap", description="routing policy in front of the prefill pool")
    max_utilisation: float = Field(0.85, gt=0, lt=1, description="planned prefill utilisation cap")
    decode_max_utilisation: float = Field(0.9, gt=0, lt=1, description="planned decode utilisation cap")
    json_out: Path | None = Field(None, alias="json", description="also write the rows here (JSON lines)")

    def cli_cmd(self) -> None:
        try:
            trace = load_trace(self.trace)
        except TraceFormatError as exc:
            raise SystemExit(f"tandem bench capacity: trace: {exc}") from exc
        profile = load_profile(self.profile)
        slo = ScalingSLO(ttft_s=self.ttft_s, tpot_s=self.tpot_s, attainment=self.attainment)
        cap = CapacityModel(profile, slo, max_utilisation=self.max_utilisation,
                            decode_max_utilisation=self.decode_max_utilisation)
        w = cap.workload(length_mix(trace))
        rows = []
        for role, n in [(r, n) for r in ("prefill", "decode") for n in self.pools]:
            goodput = cap.pool_goodput(role, n, w)  # type: ignore[arg-type]
            row = {"role": role, "instances": n, "model_goodput_rps": goodput, "target": cap.target}
            for f in (0.8, 1.0, 1.2):
                row[f"attainment_at_{f}x"] = measure(role, n, goodput * f, trace, cap, profile,  # type: ignore[arg-type]
                                                     self.requests, self.seed, self.policy)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if self.json_out:
            self.json_out.parent.mkdir(parents=True, exist_ok=True)
            self.json_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
