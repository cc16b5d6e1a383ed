"""The autoscaling scenario suite: generators deterministic per seed and true to their parameters,
the peers and Tandem in the same replay (no oscillation on a short on/off scenario), the table's
verdicts, and the suite's flags. No wall clock: every time is simulated."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tandem import cli
from tandem.autoscaler.capacity import CapacityModel
from tandem.autoscaler.models import ScalingSLO
from tandem.bench.autoscale import (
    AutoscaleBench,
    TandemScaler,
    build_spec,
    direction_changes,
    distinct_text_keys,
    length_mix,
    size_pools,
)
from tandem.bench.peer_scalers import DynamoPlannerScaler, KnativeKPAScaler
from tandem.bench.replay import ReplayConfig, replay
from tandem.bench.scenarios import SYNTHETIC, Scenario, arrivals, generate, scenario, suite
from tandem.bench.suite import rows, verdicts, wins
from tandem.perf.profile import load_profile
from tandem.sim.des.simulator import prepare


def digest(s: Scenario) -> str:
    reqs = generate(s).requests
    return hashlib.sha256(repr([(round(r.arrival, 9), r.input_tokens, r.output_tokens) for r in reqs]).encode()
                          ).hexdigest()


@pytest.mark.parametrize("family", SYNTHETIC)
def test_generators_are_deterministic_per_seed(family: str) -> None:
    a, b = scenario(family, 0, duration_s=600.0), scenario(family, 0, duration_s=600.0)  # type: ignore[arg-type]
    assert a == b and digest(a) == digest(b)
    other = scenario(family, 1, duration_s=600.0)  # type: ignore[arg-type]
    assert other.params != a.params and digest(other) != digest(a)


def test_generation_does_not_depend_on_the_process() -> None:
    s = scenario("flash", 2, duration_s=600.0)
    code = ("from tandem.bench.scenarios import scenario; from tests.bench.test_autoscale_suite import digest; "
            "print(digest(scenario('flash', 2, duration_s=600.0)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=True)
    assert out.stdout.strip() == digest(s)


def test_drawn_parameters_stay_in_their_families_ranges() -> None:
    for seed in range(12):
        f = scenario("flash", seed).params
        for i in range(int(f["spikes"])):
            assert 3 <= float(f[f"spike{i}_x"]) <= 10 and 60 <= float(f[f"spike{i}_s"]) <= 300
        g = scenario("gamma", seed).params
        assert 1 <= float(g["cv"]) <= 8
        o = scenario("onoff", seed).params
        assert float(o["on_s"]) in (15.0, 60.0, 240.0)
        st = scenario("step", seed).params
        assert all(1.5 <= float(st[f"step{i}_x"]) <= 2.5 or 0.4 <= float(st[f"step{i}_x"]) <= 0.7
                   for i in range(int(st["steps"])))
    cvs = sorted(float(scenario("gamma", s).params["cv"]) for s in range(4))
    assert cvs[0] < 1.5 and cvs[-1] > 5  # the seeds cover the range


def test_arrivals_follow_the_rate_curve_with_the_asked_burstiness() -> None:
    rng = np.random.default_rng(0)

    def curve(t: np.ndarray) -> np.ndarray:
        return np.where(t < 1000, 5.0, 20.0)

    times = arrivals(curve, 2000.0, 1.0, rng)
    assert abs((times < 1000).sum() - 5000) < 4 * np.sqrt(5000)
    assert abs((times >= 1000).sum() - 20000) < 4 * np.sqrt(20000)
    flat = arrivals(lambda t: np.full_like(t, 10.0), 4000.0, 6.0, np.random.default_rng(1))
    gaps = np.diff(flat)
    assert gaps.std() / gaps.mean() == pytest.approx(6.0, rel=0.25)
    assert len(flat) == pytest.approx(40000, rel=0.25)


def test_mix_shift_turns_chat_into_code() -> None:
    s = scenario("mixshift", 0, duration_s=1200.0)
    reqs = generate(s).requests
    at = float(s.params["shift_at_s"])
    before = [r for r in reqs if r.arrival < at]
    after = [r for r in reqs if r.arrival > at + float(s.params["shift_s"])]
    assert np.mean([r.input_tokens for r in after]) > 1.5 * np.mean([r.input_tokens for r in before])
    assert np.mean([r.output_tokens for r in after]) < 0.3 * np.mean([r.output_tokens for r in before])


def test_suite_lists_every_family_with_unique_names() -> None:
    full, quick = suite(seeds=2), suite(quick=True)
    assert {s.family for s in full} == {"trace", "diurnal", *SYNTHETIC}
    assert len({s.name for s in full}) == len(full) and len({s.name for s in quick}) == len(quick)
    assert {s.family for s in quick} == {"diurnal", *SYNTHETIC}
    assert all(s.duration_s == (3600.0 if s.family == "diurnal" else 1200.0) for s in quick)
    assert {float(s.params["on_s"]) for s in full if s.family == "onoff"} == {15.0, 60.0, 240.0}


ONOFF = Scenario(name="onoff-test", family="onoff", seed=0, duration_s=1200.0,
                 params={"mix": "chat", "code_prompt_median": 2000.0, "code_output_median": 20.0, "base_rps": 3.0,
                         "on_s": 60.0, "off_s": 120.0, "on_x": 3.0, "off_x": 0.3, "phase_s": 0.0})


def test_tandem_does_not_oscillate_on_bursts_shorter_than_the_start_up() -> None:
    """15 s bursts at 2.3x every minute (the quick suite's on/off scenario): the previous controller
    changed direction three times in ten minutes chasing them; Tandem learns that they recur and
    miss the SLO, holds the pool they need, and changes direction at most once per pool in any 10
    minutes."""
    s = scenario("onoff", 0, duration_s=1200.0)
    assert float(s.params["on_s"]) == 15.0
    w = generate(s)
    profile = load_profile(w.profile)
    slo = ScalingSLO(ttft_s=w.ttft_s, tpot_s=0.1, attainment=0.95)
    spec = build_spec(AutoscaleBench(suite=True, json_out=Path("unused.json")), slo)
    cap = CapacityModel(profile, slo)
    first = [r for r in w.requests if r.arrival <= 60.0]
    initial = {r: max(1, n) for r, n in size_pools(cap, spec, len(first) / 60, length_mix(first)).items()}
    scaler = TandemScaler(profile, spec, initial)
    res = replay(distinct_text_keys(prepare(w.requests)), scaler, ReplayConfig(profile=w.profile, slo=slo),
                 measure_from_s=300.0)
    assert direction_changes(res.actions, 600.0) <= 1, res.actions
    assert any("recurring bursts" in d for d in scaler.decisions)
    assert len(res.actions) <= 6


def test_peers_act_on_their_own_clock_and_signals() -> None:
    w = generate(ONOFF.model_copy(update={"duration_s": 600.0}))
    profile = load_profile(w.profile)
    slo = ScalingSLO(ttft_s=w.ttft_s, tpot_s=0.1, attainment=0.95)
    spec = build_spec(AutoscaleBench(suite=True, json_out=Path("unused.json")), slo)
    cap = CapacityModel(profile, slo)
    prepared = distinct_text_keys(prepare(w.requests))
    dyn = DynamoPlannerScaler(cap, spec, {"prefill": 1, "decode": 1}, interval_s=60.0)
    res = replay(prepared, dyn, ReplayConfig(profile=w.profile, slo=slo))
    plans = sorted({t for t, *_ in res.actions})
    first = res.timeline.time[0]  # it plans on its first tick, then once per interval
    assert plans and all(abs((t - first) / 60.0 - round((t - first) / 60.0)) < 1e-9 for t in plans)
    kpa = KnativeKPAScaler.from_profile(cap, spec, {"prefill": 1, "decode": 1}, length_mix(w.requests[:100]))
    res = replay(prepared, kpa, ReplayConfig(profile=w.profile, slo=slo))
    assert res.timeline.time[1] - res.timeline.time[0] == pytest.approx(2.0)  # the KPA's 2 s tick
    ups = [a for a in res.actions if a[3] > a[2]]
    assert ups  # the 3x bursts push the concurrency over target: it scales up


def result(name: str, family: str, tandem: dict, dynamo: dict, kpa: dict) -> dict:
    base = {"scaling_actions": 3, "direction_changes_10min_max": 1, "worst_minute_attainment": 0.9,
            "oracle_headroom_share": 0.5}
    return {"scenario": {"name": name, "family": family}, "description": "", "error": None,
            "scalers": {k: {**base, **v} for k, v in (("tandem", tandem), ("dynamo", dynamo), ("kpa", kpa))}}


def test_verdicts_name_the_scenarios_that_miss_each_target() -> None:
    ok = {"slo_attainment": 0.97, "goodput_per_gpu_hour": 110.0, "goodput_per_gpu_hour_vs_static": 1.1}
    results = [
        result("a", "flash", ok, {"slo_attainment": 0.99, "goodput_per_gpu_hour": 100.0,
                                  "goodput_per_gpu_hour_vs_static": 1.0},
               {"slo_attainment": 0.90, "goodput_per_gpu_hour": 200.0, "goodput_per_gpu_hour_vs_static": 2.0}),
        result("b", "diurnal", {**ok, "goodput_per_gpu_hour_vs_static": 1.15, "direction_changes_10min_max": 2},
               {"slo_attainment": 0.99, "goodput_per_gpu_hour": 120.0, "goodput_per_gpu_hour_vs_static": 1.2},
               {"slo_attainment": 0.99, "goodput_per_gpu_hour": 90.0, "goodput_per_gpu_hour_vs_static": 0.9}),
        {"scenario": {"name": "c", "family": "step"}, "description": "", "error": "not run: budget"},
    ]
    v = verdicts(results, 0.95)
    assert v["ran"] == 2 and v["not_run"] == ["c"]
    assert v["diurnal_below_target"] == ["b"] and v["direction_changes_over_target"] == ["b"]
    assert v["beats_both_peers"] == 1 and v["not_better_than_both_peers"] == ["b"]
    assert v["attainment_below_target"] == [] and v["goodput_below_static"] == []
    table = rows(results, 0.95)
    assert table[0][-2] == "yes" and table[1][-2] == "no" and "budget" in table[2][2]
    # a peer that misses the target loses to a Tandem that meets it, whatever its goodput
    assert wins({"slo_attainment": 0.96, "goodput_per_gpu_hour": 1.0},
                {"slo_attainment": 0.94, "goodput_per_gpu_hour": 9.0}, 0.95)
    assert not wins({"slo_attainment": 0.94, "goodput_per_gpu_hour": 9.0},
                    {"slo_attainment": 0.90, "goodput_per_gpu_hour": 1.0}, 0.95)


@pytest.mark.parametrize(("args", "field", "message"), [
    (["--suite", "--trace", "x.csv"], "trace", "--suite replays its own scenarios"),
    (["--quick"], "quick", "apply only with --suite"),
    (["--suite", "--controller", '{"burst_threshold": -1}'], "controller", "burst_threshold"),
    (["--suite", "--controller", '{"no_such_field": 1}'], "controller", "no_such_field"),
])
def test_suite_flags_are_validated(args: list[str], field: str, message: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["bench", "autoscale", "--json", str(tmp_path / "x.json"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and field in err
    assert not (tmp_path / "x.json").exists()


def test_unknown_scenario_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="unknown nope"):
        cli.main(["bench", "autoscale", "--suite", "--quick", "--scenarios", "nope", "--json",
                  str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_suite_runs_a_scenario_end_to_end_and_writes_the_table(tmp_path: Path) -> None:
    """The whole path on one tiny scenario in one worker: JSON, Markdown table, verdicts."""
    out, md = tmp_path / "suite.json", tmp_path / "suite.md"
    from tandem.bench import suite as suite_mod

    tiny = ONOFF.model_copy(update={"name": "tiny", "duration_s": 420.0, "params": {**ONOFF.params,
                                                                                     "base_rps": 1.5}})
    cfg = AutoscaleBench(suite=True, json_out=out, markdown=md, workers=1, warmup_s=120.0)
    results = suite_mod.run_suite([tiny], cfg, workers=1, budget_s=600.0)
    assert results[0]["error"] is None, results[0]["error"]
    sc = results[0]["scalers"]
    assert set(sc) == {"tandem", "static_peak", "dynamo", "kpa", "reactive_oracle"}
    assert sc["static_peak"]["worst_minute_attainment"] >= 0.95
    text = suite_mod.markdown(results, verdicts(results, 0.95), 0.95)
    assert "| tiny |" in text and "better than both peers" in text
    json.dumps(results)  # the JSON the command writes
