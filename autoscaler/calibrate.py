"""``tandem bench capacity``: check the capacity model against the engine it models.

Poisson arrivals of requests drawn from a trace are fed, at the model's pool goodput x 0.8 / 1.0 /
1.2, into real :class:`~tandem.sim.engine.Engine` instances (least outstanding work routing), and
the attainment they reach is printed next to the model's target. A model that is right meets the
target at 1.0 and not far beyond; one sized from throughput alone would collapse at 1.0.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.autoscaler.bench import mix_of
from tandem.autoscaler.capacity import CapacityModel
from tandem.autoscaler.models import SLO, Role
from tandem.config import TandemSettings
from tandem.sim.engine import Engine, EngineLimits, SimRequest
from tandem.sim.profile import Profile, load_profile
from tandem.traces import TraceFormatError, TraceRequest, load_trace


def measure(role: Role, n: int, rate: float, trace: list[TraceRequest], profile: Profile, slo: SLO,
            requests: int, seed: int) -> float:
    """Attainment of the role's objective when ``n`` engines serve Poisson arrivals at ``rate``."""
    cap = CapacityModel(profile, slo)
    limits = EngineLimits(kv_capacity_tokens=profile.kv_capacity_tokens, max_num_seqs=profile.max_num_seqs,
                          max_num_batched_tokens=profile.max_num_batched_tokens,
                          max_model_len=profile.model.max_model_len)
    engines = [Engine(cap.cost, limits) for _ in range(n)]
    rng = random.Random(seed)
    t, reqs = 0.0, []
    for i in range(requests):
        t += rng.expovariate(rate)
        tr = rng.choice(trace)
        for e in engines:
            e.advance(t)
        target = min(engines, key=lambda e: sum(r.prompt_tokens - r.computed_tokens + r.max_tokens - r.generated
                                                for r in (*e.running, *e.waiting)))
        out = max(1, tr.output_tokens - 1) if role == "decode" else 1
        # decode: the prompt's KV has arrived from a prefill instance; only the last token is recomputed
        r = SimRequest(id=str(i), prompt_tokens=tr.input_tokens, max_tokens=out,
                       kv_ready_at=t if role == "decode" else None)
        if target.validate(r.prompt_tokens, r.max_tokens):
            continue
        target.submit(r, t)
        reqs.append(r)
    for e in engines:
        e.advance(math.inf)
    reqs = reqs[len(reqs) // 8:]  # warm-up
    if role == "decode":
        met = [(r.finished_at - r.arrival) / max(1, r.max_tokens) <= slo.tpot_s for r in reqs]
    else:
        met = [r.first_token_at - r.arrival <= slo.ttft_s for r in reqs]
    return sum(met) / len(met)


class CapacityBench(TandemSettings):
    """Check the autoscaler's capacity model against real engines at 0.8x / 1x / 1.2x its goodput."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_CAPACITY_")

    trace: Path = Field(description="trace whose length mix is replayed (Mooncake JSONL or Azure CSV)")
    profile: str = Field("qwen2.5-32b-h100", description="performance profile")
    ttft_s: float = Field(2.0, gt=0, description="TTFT SLO (s)")
    tpot_s: float = Field(0.1, gt=0, description="TPOT SLO (s)")
    attainment: float = Field(0.95, gt=0, lt=1, description="target share meeting both SLOs")
    requests: int = Field(4000, ge=100, description="requests per measurement")
    pools: list[int] = Field(default_factory=lambda: [1, 4], description="pool sizes to check, per role")
    seed: int = Field(1, description="arrival seed")
    max_utilisation: float = Field(0.85, gt=0, lt=1, description="planned prefill utilisation cap")
    decode_max_utilisation: float = Field(0.9, gt=0, lt=1, description="planned decode utilisation cap")

    def cli_cmd(self) -> None:
        try:
            trace = load_trace(self.trace)
        except TraceFormatError as exc:
            raise SystemExit(f"tandem bench capacity: trace: {exc}") from exc
        profile = load_profile(self.profile)
        slo = SLO(ttft_s=self.ttft_s, tpot_s=self.tpot_s, attainment=self.attainment)
        cap = CapacityModel(profile, slo, max_utilisation=self.max_utilisation,
                            decode_max_utilisation=self.decode_max_utilisation)
        w = cap.workload(mix_of(trace))
        rows = []
        for role, n in [(r, n) for r in ("prefill", "decode") for n in self.pools]:
            goodput = cap.pool_goodput(role, n, w)  # type: ignore[arg-type]
            row = {"role": role, "instances": n, "model_goodput_rps": goodput, "target": cap.target}
            for f in (0.8, 1.0, 1.2):
                row[f"attainment_at_{f}x"] = measure(role, n, goodput * f, trace, profile, slo,  # type: ignore[arg-type]
                                                     self.requests, self.seed)
            rows.append(row)
            print(json.dumps(row))
