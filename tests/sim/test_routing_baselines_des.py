"""Baselines on hand-built views; the DES end to end on a slice of the Mooncake trace; the bench CLIs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tandem.bench.routing import tile_trace
from tandem.blockcache import BlockCache
from tandem.cli import main
from tandem.router.routing.config import RoutingConfig
from tandem.router.routing.registry import POLICIES, make_policy
from tandem.router.routing.types import ClusterView, InstanceState, RouteRequest
from tandem.sim.des import DESConfig, prepare, simulate
from tandem.traces import TRACE_DIR, load_trace, rescale_to_qps, select

BS = 512
TRACE = TRACE_DIR / "conversation_trace.jsonl"


def view(n: int) -> ClusterView:
    return ClusterView({f"i{k}": InstanceState(f"i{k}", 3e-5, BlockCache(1_000_000)) for k in range(n)})


def req(rid: str, prompt: int, hashes: tuple[int, ...] = ()) -> RouteRequest:
    return RouteRequest(rid, prompt, hashes, BS, 0.0, fallback_key=len(rid))


def test_registry_knows_every_policy_and_rejects_unknown() -> None:
    assert set(POLICIES) == {"dualmap", "round_robin", "least_request", "least_loaded", "consistent_hash",
                             "prefix_tree", "min_ttft"}
    with pytest.raises(ValueError, match="unknown routing policy 'nope'"):
        make_policy("nope")


def test_round_robin_cycles_and_skips_unhealthy() -> None:
    c = view(3)
    c["i1"].healthy = False
    pol = make_policy("round_robin")
    assert [pol.choose(req("r", 10), c).instance_id for _ in range(4)] == ["i0", "i2", "i0", "i2"]


def test_load_baselines_pick_the_least_loaded() -> None:
    c = view(3)
    c["i0"].inflight_miss_tokens, c["i1"].inflight_miss_tokens, c["i2"].inflight_miss_tokens = 900, 100, 500
    c["i0"].inflight_requests, c["i1"].inflight_requests, c["i2"].inflight_requests = 1, 5, 2
    assert make_policy("least_loaded").choose(req("r", 10), c).instance_id == "i1"
    assert make_policy("least_request").choose(req("r", 10), c).instance_id == "i0"
    # min_ttft weighs the hit: i2 holds the whole prompt, so its estimate is lowest despite load
    c["i2"].shadow.insert([1, 2, 3], [BS] * 3)
    assert make_policy("min_ttft").choose(req("r", 3 * BS, (1, 2, 3)), c).instance_id == "i2"


def test_prefix_tree_longest_match_unless_imbalanced() -> None:
    c = view(3)
    c["i2"].shadow.insert([1, 2], [BS] * 2)
    pol = make_policy("prefix_tree", RoutingConfig(balance_abs_threshold=32, balance_rel_threshold=1.0001))
    d = pol.choose(req("r", 3 * BS, (1, 2, 3)), c)
    assert (d.instance_id, d.reason) == ("i2", "prefix_match")
    # below the cache threshold: the instance with the least cached
    c["i0"].shadow.insert([50], [BS])
    d = pol.choose(req("r", 3 * BS, (7, 8, 9)), c)
    assert (d.instance_id, d.reason) == ("i1", "most_free_cache")
    # imbalanced (max - min > 32 and max > min x 1.0001): shortest queue wins over the match
    c["i2"].inflight_requests = 40
    c["i0"].inflight_requests = 3
    d = pol.choose(req("r", 3 * BS, (1, 2, 3)), c)
    assert (d.instance_id, d.reason) == ("i1", "shortest_queue")


def test_consistent_hash_is_sticky_per_prefix() -> None:
    c = view(8)
    pol = make_policy("consistent_hash")
    a = pol.choose(req("a", 4 * BS, (1, 2, 3, 4)), c).instance_id
    assert pol.choose(req("b", 4 * BS, (1, 2, 5, 6)), c).instance_id == a


@pytest.fixture(scope="module")
def trace_slice():
    return select(load_trace(TRACE), count=700)


def _run(policy: str, reqs, instances: int = 4):
    # 2 QPS keeps 4 instances below saturation. At 3 QPS round_robin's attainment falls to ~0.66 and
    # DualMap's default prefill-ordered queues trade cache hits for latency (hit ratio 0.053 vs 0.057,
    # attainment 0.95 vs 0.66; docs/benchmarks.md).
    return simulate(prepare(rescale_to_qps(reqs, 2.0)), policy, RoutingConfig(), DESConfig(instances=instances))


def _hit_ratio(res) -> float:
    return sum(r.hit_tokens for r in res.requests) / sum(r.prompt_tokens for r in res.requests)


def test_des_dualmap_hits_more_than_round_robin_and_everything_completes(trace_slice) -> None:
    dm, rr = _run("dualmap", trace_slice), _run("round_robin", trace_slice)
    assert _hit_ratio(dm) > _hit_ratio(rr) > 0
    for res in (dm, rr):
        assert all(r.ttft is not None and r.finished_at is not None and not r.rejected for r in res.requests)
        assert all(r.ttft >= 0 and (r.tpot is None or r.tpot > 0) for r in res.requests)
        assert sum(res.prefill_tokens.values()) == sum(r.prompt_tokens - r.hit_tokens for r in res.requests)
    met = [sum(r.ttft <= 5.0 for r in res.requests) for res in (dm, rr)]
    assert met[0] > met[1]  # within a 5 s TTFT SLO


def test_des_is_deterministic_and_leaves_no_accounting(trace_slice) -> None:
    from tandem.sim.des import Simulation

    reqs = prepare(rescale_to_qps(trace_slice[:300], 4.0))
    sims = [Simulation(reqs, "dualmap", RoutingConfig(), DESConfig(instances=3, seed=5)) for _ in range(2)]
    a, b = (s.run() for s in sims)
    assert [(r.ttft, r.instance, r.hit_tokens) for r in a.requests] == \
        [(r.ttft, r.instance, r.hit_tokens) for r in b.requests]
    for st in sims[0].cluster.instances.values():
        assert (st.queued_miss_tokens, st.inflight_miss_tokens, st.inflight_requests, st.unprefilled_requests,
                st.queued_requests) == (0, 0, 0, 0, 0)


def test_des_heterogeneous_pool_runs_and_validates() -> None:
    reqs = prepare(rescale_to_qps(select(load_trace(TRACE), count=120), 2.0))
    res = simulate(reqs, "least_loaded", RoutingConfig(),
                   DESConfig(instances=2, profiles=["llama3-8b-h100", "llama3-8b-h200"]))
    assert all(r.ttft is not None for r in res.requests)
    with pytest.raises(ValueError, match="profiles has 1 entries"):
        DESConfig(instances=2, profiles=["llama3-8b-h100"])


def test_tile_trace_gives_copies_their_own_prefixes() -> None:
    base = select(load_trace(TRACE), count=50)
    tiled = tile_trace(base, 120)
    assert len(tiled) == 120
    assert tiled[50].input_tokens == base[0].input_tokens
    assert not set(tiled[50].hash_ids) & set(base[0].hash_ids)
    assert all(x.arrival <= y.arrival for x, y in itertools.pairwise(tiled))


def test_bench_routing_cli_writes_json_and_plot(tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "routing", "--requests", "120", "--warmup", "20", "--instances", "4", "--slo-ttft", "20",
               "--policies", "dualmap,round_robin", "--tolerance", "0.2", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["trace_format"] == "mooncake"
    for name in ("dualmap", "round_robin"):
        pol = data["policies"][name]
        assert pol["capacity_qps"] > 0 and isinstance(pol["capacity_is_lower_bound"], bool)
        keys = {"qps", "attainment", "ttft_p50", "ttft_p90", "ttft_p99", "hit_ratio", "imbalance"}
        assert all(keys <= set(p) for p in pol["points"])
        passing = [p["qps"] for p in pol["points"] if p["attainment"] >= 0.9]
        assert max(passing) == pol["capacity_qps"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_cli_rejects_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["bench", "routing", "--policies", "dualmap,bogus"]) == 2
    assert "policies" in capsys.readouterr().err
    bad = tmp_path / "t.txt"
    bad.write_text("hello\n")
    with pytest.raises(SystemExit, match="neither Mooncake JSONL nor Azure CSV"):
        main(["bench", "routing", "--trace", str(bad)])


def test_bench_decision_cli(tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    rc = main(["bench", "decision", "--instances", "8,64", "--policies", "dualmap,min_ttft", "--decisions", "200",
               "--warm", "100", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["policies"]["dualmap"]) == {"8", "64"}
    assert data["policies"]["dualmap"]["64"]["p99_us"] >= data["policies"]["dualmap"]["64"]["p50_us"] > 0
