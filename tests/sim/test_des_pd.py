"""The disaggregated DES: both paths, the link never above capacity, the offload threshold honoured."""

from __future__ import annotations

import pytest

from tandem.bench.pd import lognormal_mix, plan_split
from tandem.perf.costmodel import CostModel
from tandem.perf.profile import load_profile
from tandem.router.routing.offload import OffloadSettings
from tandem.sim.des.pd import PDConfig, PDSimulation, simulate_pd
from tandem.sim.des.search import search_capacity
from tandem.sim.des.simulator import prepare, with_arrivals
from tandem.traces import TraceRequest, rescale_to_qps

KVB = 131072


def mix(n: int = 120, qps: float = 1.0, seed: int = 1):
    base = lognormal_mix(n, mu=9.0, sigma=1.0, low=128, high=64_000, output_tokens=32, seed=seed)
    return with_arrivals(prepare(base), [r.arrival for r in rescale_to_qps(base, qps)])


def test_local_pd_serves_everything_and_ttft_covers_prefill_and_transfer() -> None:
    run = simulate_pd(mix(), PDConfig(local_prefill=3, decode=2, local_link_gbps=100.0, local_rtt_ms=1.0))
    cost = CostModel.from_profile(load_profile("llama3-8b-h100"))
    assert all(r.finished_at is not None and not r.rejected for r in run.requests)
    for r in run.requests:
        assert r.route == "local" and r.decode_instance.startswith("d") and r.prefill_instance.startswith("p")
        assert r.transfer_tokens == r.prompt_tokens  # no shared prefixes: the whole KV moves
        floor = cost.prefill_time(r.prompt_tokens) + 0.001 + r.prompt_tokens * KVB * 8 / 100e9
        assert r.ttft >= floor * (1 - 1e-9)
        assert r.transfer_s >= 0.001 + r.prompt_tokens * KVB * 8 / 100e9 * (1 - 1e-9)
    assert run.remote_link.delivered_bytes == 0


def test_all_remote_link_is_shared_and_never_exceeds_capacity() -> None:
    reqs = mix(150, qps=3.0)
    run = simulate_pd(reqs, PDConfig(local_prefill=0, remote_prefill=6, decode=2, mode="remote", link_gbps=20.0,
                                     link_rtt_ms=10.0))
    link = run.remote_link
    assert all(r.route == "remote" and r.finished_at is not None for r in run.requests)
    assert link.delivered_bytes == pytest.approx(sum(r.transfer_tokens for r in run.requests) * KVB, rel=1e-9)
    end = max(r.finished_at for r in run.requests)
    for window in (0.1, 1.0, 10.0):
        assert max(link.window_utilisation(0.0, end, window)) <= 1.0 + 1e-9
    # 20 Gbit/s carries ~19k tokens of KV per second: at 3 req/s of ~13k-token prompts it is the
    # bottleneck, so transfers queue behind each other and take far longer than alone.
    alone = [0.01 + r.transfer_tokens * KVB * 8 / 20e9 for r in run.requests]
    assert sum(r.transfer_s for r in run.requests) > 2 * sum(alone)


def test_selective_offload_honours_the_threshold_and_caps_the_link() -> None:
    reqs = mix(200, qps=2.0)
    fixed = simulate_pd(reqs, PDConfig(local_prefill=2, remote_prefill=2, decode=2, mode="selective",
                                       offload=OffloadSettings(fixed_threshold=8192)))
    for r in fixed.requests:
        assert (r.route == "remote") == (r.uncached_tokens > 8192)
    assert 0 < sum(r.route == "remote" for r in fixed.requests) < len(reqs)
    solved = simulate_pd(reqs, PDConfig(local_prefill=2, remote_prefill=2, decode=2, mode="selective",
                                        link_gbps=5.0, offload=OffloadSettings(min_samples=20, resolve_every_s=2.0)))
    assert solved.thresholds, "the controller re-solved t during the run"
    # A 5 Gbit/s link cannot carry much KV: the solver keeps most prompts local.
    share = sum(r.route == "remote" for r in solved.requests) / len(reqs)
    assert share < 0.3
    end = max(r.finished_at for r in solved.requests)
    assert max(solved.remote_link.window_utilisation(0.0, end, 1.0)) <= 1.0 + 1e-9


def test_decode_pulls_only_what_it_does_not_cache() -> None:
    shared = tuple(range(8))  # 8 x 512-token blocks shared by every prompt
    base = [TraceRequest(i * 2.0, 4096 + 512, 8, (*shared, 100 + i)) for i in range(4)]
    run = simulate_pd(prepare(base), PDConfig(local_prefill=1, decode=1))
    transfers = [r.transfer_tokens for r in run.requests]
    assert transfers[0] == 4608 and all(t == 512 for t in transfers[1:])  # the decode caches the prefix


def test_planner_and_capacity_search() -> None:
    lengths = [r.input_tokens for r in lognormal_mix(300, mu=9.9, sigma=1.0, low=128, high=128_000,
                                                    output_tokens=256, seed=0)]
    hom = plan_split("homogeneous", 16, lengths, "llama3-8b-h20", "llama3-8b-h200", 100.0, 256, 0.85)
    sel = plan_split("selective", 16, lengths, "llama3-8b-h20", "llama3-8b-h200", 100.0, 256, 0.85)
    assert hom[1] == 0 and hom[0] + hom[2] == 16
    assert sel[0] >= 1 and sel[1] >= 1 and sum(sel[:3]) == 16 and sel[3] > hom[3]
    cap, bounded = search_capacity(lambda q: q <= 3.3, 1.0, 0.01)
    assert cap == pytest.approx(3.3, rel=0.02) and bounded
    assert search_capacity(lambda q: False, 1.0, 0.01) == (0.0, True)
    assert search_capacity(lambda q: True, 1.0, 0.01)[1] is False  # never failed: a lower bound


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="remote_prefill"):
        simulate_pd(mix(5), PDConfig(local_prefill=1, decode=1, mode="selective"))


def test_steady_attainment_sees_a_backlog_that_only_late_arrivals_suffer() -> None:
    from tandem.bench.pd import steady_attainment

    outcomes = [(float(i), i < 85) for i in range(100)]  # 85% overall, the last 15 all miss
    assert steady_attainment(outcomes) == pytest.approx(0.25)  # last 20%: 5 of 20 met
    assert steady_attainment([(float(i), True) for i in range(10)]) == 1.0


def test_bench_offload_and_pd_write_the_documented_json(tmp_path) -> None:
    import json

    from tandem.bench.pd import OffloadBench, PDBench

    out = tmp_path / "offload.json"
    OffloadBench(requests=30, warmup=5, gpus=6, json=out).cli_cmd()
    data = json.loads(out.read_text())
    assert set(data) == {"scenarios", "config"}
    assert set(data["scenarios"]) == {"homogeneous", "naive", "selective"}
    required = {"throughput_rps": float, "ttft_mean": float, "ttft_p90": float, "threshold_tokens": int,
                "offload_fraction": float, "link_util_max": float, "link_util_mean": float}
    keys = [set(s) for s in data["scenarios"].values()]
    assert keys[0] == keys[1] == keys[2] and set(required) <= keys[0]
    for scenario in data["scenarios"].values():
        for key, kind in required.items():
            assert isinstance(scenario[key], kind) or (kind is float and isinstance(scenario[key], int)), key
        assert scenario["link_util_max_any_run"] <= 1.0 + 1e-9
    assert data["scenarios"]["naive"]["offload_fraction"] == 1.0
    assert data["scenarios"]["homogeneous"]["offload_fraction"] == 0.0
    pd_out = tmp_path / "pd.json"
    PDBench(requests=30, warmup=5, gpus=3, slo_tpots="0.05", json=pd_out).cli_cmd()
    pd = json.loads(pd_out.read_text())
    entry = pd["slo_tpot"]["0.05"]
    assert {"aggregated", "disaggregated", "disaggregated_vs_aggregated"} <= set(entry)
    assert entry["disaggregated"]["prefill_instances"] in (1, 2)


# ----- elastic pools (the autoscaling replay's cluster) --------------------------------------------
class _Script:
    """A controller that runs ``(time, action)`` pairs against the simulation and samples it each tick."""

    interval_s = 1.0

    def __init__(self, actions) -> None:
        self.actions, self.samples = sorted(actions, key=lambda a: a[0]), []

    def __call__(self, sim, now: float) -> None:
        from tandem.sim.des.pd import LOCAL

        while self.actions and self.actions[0][0] <= now:
            self.actions.pop(0)[1](sim, now)
        pool = sim.pools[LOCAL]
        self.samples.append((now, list(pool.status), sorted(pool.cluster.instances)))


def steady(n: int, rate: float, prompt: int = 2048, out: int = 16) -> list:
    """Equal requests at a steady rate; each its own prefix (distinct routing keys)."""
    blocks = prompt // 512
    return prepare([TraceRequest(i / rate, prompt, out, tuple(range(i * blocks, (i + 1) * blocks)))
                    for i in range(n)])


def test_an_ordered_instance_serves_only_after_its_start_up_and_costs_from_the_order() -> None:
    from tandem.sim.des.pd import LOCAL, PDSimulation

    script = _Script([(10.0, lambda sim, now: sim.add_instance(LOCAL, now, 20.0))])
    run = PDSimulation(steady(400, 8.0), PDConfig(local_prefill=1, decode=1)).run(script)
    new = [life for life in run.instances if life.pool == "local" and life.ordered_at > 0]
    assert len(new) == 1 and new[0].ordered_at == 10.0 and new[0].ready_at == 30.0 and new[0].removed_at is None
    for now, status, routable in script.samples:
        if 10.0 <= now < 30.0:
            assert status[1] == "starting" and routable == ["p000"]  # ordered, not routable yet
        elif now >= 30.0:
            assert status[1] == "ready" and routable == ["p000", "p001"]
    served = {r.prefill_instance for r in run.requests}
    assert served == {"p000", "p001"}
    assert min(r.arrival for r in run.requests if r.prefill_instance == "p001") >= 30.0
    assert all(r.finished_at is not None and not r.rejected for r in run.requests)


def test_a_draining_instance_gets_nothing_new_keeps_its_work_and_leaves_once_idle() -> None:
    from tandem.sim.des.pd import LOCAL, PDSimulation

    removed: list[bool] = []
    script = _Script([(20.0, lambda sim, now: sim.set_draining(LOCAL, 1, True, now)),
                      (20.0, lambda sim, now: removed.append(sim.remove_instance(LOCAL, 1, now))),
                      (40.0, lambda sim, now: removed.append(sim.remove_instance(LOCAL, 1, now)))])
    # 3 prefill instances near saturation: the drained one holds queued and running work at t=20
    run = PDSimulation(steady(900, 20.0, prompt=6144), PDConfig(local_prefill=3, decode=3)).run(script)
    assert removed == [False, True]  # busy at the mark, idle (and removed) 20 s later
    life = next(x for x in run.instances if x.id == "p001")
    assert life.removed_at == 40.0
    late = [r for r in run.requests if r.arrival >= 20.0]
    assert late and all(r.prefill_instance != "p001" for r in late)
    assert any(r.prefill_instance == "p001" for r in run.requests)
    assert all(r.finished_at is not None and not r.rejected for r in run.requests)  # nothing was cut
    assert next(s for t, s, _ in script.samples if t >= 41.0)[1] == "removed"


def test_un_draining_brings_the_same_instance_back_and_decode_pools_grow_too() -> None:
    from tandem.sim.des.pd import DECODE, LOCAL, PDSimulation

    script = _Script([(5.0, lambda sim, now: sim.set_draining(LOCAL, 0, True, now)),
                      (15.0, lambda sim, now: sim.set_draining(LOCAL, 0, False, now)),
                      (5.0, lambda sim, now: sim.add_instance(DECODE, now, 5.0))])
    run = PDSimulation(steady(300, 10.0), PDConfig(local_prefill=2, decode=1)).run(script)
    window = [r.prefill_instance for r in run.requests if 6.0 <= r.arrival < 15.0]
    assert window and set(window) == {"p001"}
    assert "p000" in {r.prefill_instance for r in run.requests if r.arrival >= 16.0}
    assert {r.decode_instance for r in run.requests if r.arrival >= 11.0} == {"d000", "d001"}
    assert all(r.finished_at is not None for r in run.requests)


def test_routing_judges_each_request_against_its_own_slo() -> None:
    """With ``ttft_slo_s`` (+ per token) every request reaches routing with its own SLO: DualMap's
    switch then fires where one generous fixed SLO would never let it."""
    from gatewayutil import ROOT

    from tandem.router.routing.config import RoutingConfig
    from tandem.sim.des.pd import PDSimulation
    from tandem.traces import load_trace, select

    base = select(load_trace(ROOT / "data" / "traces" / "conversation_trace.jsonl"), warmup=0, count=300)
    reqs = with_arrivals(prepare(base), [r.arrival for r in rescale_to_qps(base, 4.0)])

    def switches(**slo: float) -> int:
        sim = PDSimulation(reqs, PDConfig(local_prefill=3, decode=3, **slo), RoutingConfig(slo_ttft_s=1000.0))
        sim.run()
        return sim.pools[0].scheduler.reasons["slo_switch"]

    assert switches() == 0
    assert switches(ttft_slo_s=0.5, ttft_slo_per_token_s=1e-5) > 0


def test_queue_aware_selective_measures_the_link_and_moves_prompts_the_slow_pool_would_delay() -> None:
    """H20 local prefill, H200 remote: at light load the remote side is sooner for most prompts;
    the controller sends them there (the threshold alone keeps them local), reads the link as the
    DES's fair-shared 100 Gbit/s, and has nothing committed once the run is over."""
    reqs = mix(150, qps=0.6)
    config = dict(local_prefill=2, remote_prefill=2, decode=2, mode="selective", local_profile="llama3-8b-h20",
                  remote_profile="llama3-8b-h200", link_gbps=100.0)
    runs = {}
    for side in ("threshold", "queue_aware"):
        sim = PDSimulation(reqs, PDConfig(**config, offload=OffloadSettings(
            min_samples=20, resolve_every_s=2.0, side_choice=side, initial_threshold=64_000)))
        runs[side] = (sim, sim.run())
    sim, run = runs["queue_aware"]
    base = runs["threshold"][1]
    remote = sum(r.route == "remote" for r in run.requests)
    assert remote > sum(r.route == "remote" for r in base.requests)
    assert sim.controller.choices.get("remote:faster", 0) > 0
    mean = lambda rs: sum(r.ttft for r in rs) / len(rs)  # noqa: E731
    assert mean(run.requests) < mean(base.requests)
    end = max(r.finished_at for r in run.requests)
    assert sim.controller.link.measured_gbps(end) == pytest.approx(100.0, rel=1e-6)
    assert sim.controller.link.committed_bytes == 0 and not sim._choices
    assert sim.controller.calibration["remote"].samples == remote


def test_decode_admits_no_more_kv_than_its_cap() -> None:
    reqs = mix(60, qps=4.0)
    cap = 100_000
    sim = PDSimulation(reqs, PDConfig(local_prefill=4, decode=1, decode_kv_capacity_tokens=cap))
    peak = 0

    class Watch:
        interval_s = 0.05

        def __call__(self, s, now) -> None:
            nonlocal peak
            peak = max(peak, s.pools[2].engines[0].reserved_tokens)

    run = sim.run(Watch())
    assert sim.pools[2].engines[0].limits.kv_capacity_tokens == cap
    assert 0 < peak <= cap and all(r.finished_at is not None for r in run.requests)
