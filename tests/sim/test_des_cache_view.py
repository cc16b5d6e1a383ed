"""The DES routes on the shadow view or on the exact one (the engines' own caches), and the bench
compares both (``tandem bench routing --cache-view``)."""

from __future__ import annotations

import json
from pathlib import Path

from tandem.cli import main
from tandem.router.routing.config import RoutingConfig
from tandem.sim.des.simulator import DESConfig, prepare, simulate
from tandem.traces import TraceRequest

BS = 512


def request(t: float, ids: list[int], out: int = 16) -> TraceRequest:
    # len(ids) - 1 full blocks and one token: the engine serves the full blocks from cache.
    return TraceRequest(arrival=t, input_tokens=(len(ids) - 1) * BS + 1, output_tokens=out, hash_ids=tuple(ids),
                        block_size=BS)


def test_exact_view_knows_what_the_engine_evicted_and_the_shadow_does_not() -> None:
    """A conversation (blocks 1-4) alternates with long-output requests whose KV reservations squeeze
    the engine's cache: the engine evicts the conversation's tail, the shadow (what was routed, up
    to the engine's capacity) still holds it."""
    trace, t = [], 0.0
    for k in range(6):
        trace.append(request(t, [1, 2, 3, 4, 100 + k]))
        trace.append(request(t + 5, [200 + k, 300 + k, 400 + k], out=3500))
        t += 6
    results = {view: simulate(prepare(trace), "dualmap", RoutingConfig(),
                              DESConfig(instances=1, kv_capacity_tokens=6000, cache_view=view)).requests
               for view in ("shadow", "exact")}
    second = {view: (rs[2].estimated_hit_tokens, rs[2].hit_tokens) for view, rs in results.items()}
    assert second["exact"] == (1024, 1024)  # what the engine held when routing asked
    assert second["shadow"] == (2048, 1024)  # the shadow still had the evicted tail
    over = {view: sum(max(0, r.estimated_hit_tokens - r.hit_tokens) for r in rs) for view, rs in results.items()}
    assert over["exact"] < over["shadow"]


def test_bench_routing_runs_each_policy_under_both_views(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["bench", "routing", "--requests", "100", "--warmup", "20", "--instances", "4", "--slo-ttft", "20",
                 "--policies", "dualmap", "--tolerance", "0.3", "--cache-view", "both", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"dualmap@shadow", "dualmap@exact"}
    exact = data["policies"]["dualmap@exact"]
    assert exact["capacity_vs_shadow"] > 0 and "estimated_hit_ratio" in exact["points"][0]
    assert data["config"]["cache_view"] == "both"
