"""The autoscaling replay on the DES and ``tandem bench autoscale`` end to end (small slices, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tandem import cli
from tandem.api.models import Role
from tandem.api.observations import Observations
from tandem.autoscaler.models import ScalingSLO
from tandem.bench.autoscale import (
    AutoscaleBench,
    LoadShape,
    StaticRun,
    distinct_text_keys,
    peak_rate,
    scale_load,
    search_static,
    worst_window,
)
from tandem.bench.replay import Outcome, ReplayConfig, ReplayResult, ScaleCommand, Scaler, Timeline, replay
from tandem.sim.des.simulator import prepare
from tandem.traces import TRACE_DIR, TraceRequest

SLO_ = ScalingSLO(ttft_s=2.0, tpot_s=0.1, attainment=0.95)
CFG = ReplayConfig(profile="llama3-8b-h100", slo=SLO_, startup_delay_s=20.0, tick_s=5.0)


class Scripted(Scaler):
    """Replays a fixed list of (time, role, command); records what it observed."""

    name = "scripted"

    def __init__(self, initial: dict[Role, int], script: list[tuple[float, Role, ScaleCommand]]) -> None:
        self._initial, self.script, self.seen = initial, list(script), []

    def initial(self) -> dict[Role, int]:
        return dict(self._initial)

    def step(self, obs: Observations) -> dict[Role, ScaleCommand]:
        self.seen.append(obs)
        due = [(t, r, c) for t, r, c in self.script if t <= obs.time_s]
        self.script = [x for x in self.script if x not in due]
        return {r: c for _, r, c in due}


def steady(n: int, rate: float, prompt: int = 2048, out: int = 50) -> list:
    blocks = prompt // 512
    return prepare([TraceRequest(i / rate, prompt, out, tuple(range(i * blocks, (i + 1) * blocks)))
                    for i in range(n)])


def test_scale_up_costs_from_the_order_and_observations_see_it_start() -> None:
    scaler = Scripted({"prefill": 1, "decode": 1}, [(10.0, "prefill", ScaleCommand(replicas=2))])
    res = replay(steady(600, 10.0), scaler, CFG)
    starting = [o.roles["prefill"].starting for o in scaler.seen if 10.0 < o.time_s < 30.0]
    assert starting and all(s == 1 for s in starting)
    assert all(o.roles["prefill"].ready == 2 for o in scaler.seen if o.time_s >= 30.0)
    # GPU time: one prefill and one decode instance from t=0, the new one from its order, to the end
    assert res.gpu_seconds == pytest.approx(2 * res.duration_s + (res.duration_s - 10.0))
    assert res.actions == [(10.0, "prefill", 1, 2)]
    assert all(o.met for o in res.outcomes)
    rates = [o.arrival_rate for o in scaler.seen if o.time_s >= 30.0]
    assert rates and all(r == pytest.approx(10.0, rel=0.05) for r in rates)


def test_scale_down_drains_first_and_removes_only_drained_instances() -> None:
    # at t=20: one of three prefill instances must drain; replicas stay 3 until it is drained
    scaler = Scripted({"prefill": 3, "decode": 1},
                      [(20.0, "prefill", ScaleCommand(replicas=3, drain=1, target=2)),
                       (40.0, "prefill", ScaleCommand(replicas=2, drain=1, target=2))])
    res = replay(steady(600, 10.0, prompt=4096), scaler, CFG)
    marked = [o.roles["prefill"] for o in scaler.seen if 20.0 < o.time_s < 40.0]
    assert marked and all(r.ready == 2 and r.draining + r.drained == 1 for r in marked)
    assert any(r.drained == 1 for r in marked)  # it went idle: the gateway sent it nothing new
    after = [o.roles["prefill"] for o in scaler.seen if o.time_s > 40.0]
    assert after and all(r.ready == 2 and r.draining + r.drained == 0 for r in after)
    assert res.actions == [(20.0, "prefill", 3, 2)]  # one action: the target moved once
    assert all(o.met for o in res.outcomes)  # nothing was cut


def test_scale_load_keeps_the_load_curve_and_gives_each_draw_its_own_prefix() -> None:
    trace = [TraceRequest(t / 4, 1000, 10, (0, 100 + t)) for t in range(2400)]  # 4 rps for 600 s
    trace += [TraceRequest(600 + t / 8, 1000, 10, (0, 10_000 + t)) for t in range(4800)]  # then 8 rps
    out = scale_load(trace, 3.0, window_s=60.0, seed=1)
    first = sum(1 for r in out if 60 <= r.arrival < 540) / 480
    second = sum(1 for r in out if 660 <= r.arrival < 1140) / 480
    assert first == pytest.approx(12.0, rel=0.05) and second == pytest.approx(24.0, rel=0.05)
    # a request drawn twice gets a second private copy of its blocks: no invented cache hits
    tails = [r.hash_ids[1] for r in out]
    assert len(set(tails)) == len(tails)
    # the block every request shares stays shared within each copy
    assert sum(1 for r in out if r.hash_ids[0] == 0) > len(out) / 4
    assert out == scale_load(trace, 3.0, window_s=60.0, seed=1) != scale_load(trace, 3.0, window_s=60.0, seed=2)


def test_diurnal_shape_multiplies_the_traces_own_rate() -> None:
    """Counts per 2-minute window follow factor x shape(t) x the trace's rate within Poisson noise
    (the trace's own step from 4 to 8 rps stays visible under the envelope); a flat shape (trough 1)
    draws exactly what no shape draws."""
    trace = [TraceRequest(t / 4, 1000, 10, (0, 100 + t)) for t in range(7200)]  # 4 rps for 1800 s
    trace += [TraceRequest(1800 + t / 8, 1000, 10, (0, 10_000 + t)) for t in range(14400)]  # then 8 rps
    shape = LoadShape(period_s=3600.0, trough=0.3)
    assert shape.factor(0.0) == pytest.approx(0.3) and shape.factor(1800.0) == pytest.approx(1.0)
    assert shape.factor(900.0) == pytest.approx(0.65) and shape.factor(3600.0) == pytest.approx(0.3)
    out = scale_load(trace, 2.0, window_s=60.0, seed=3, shape=shape)
    arrivals = [r.arrival for r in out]
    for lo in range(60, 3480, 120):
        if lo + 120 >= 1740 and lo <= 1860:
            continue  # the trace's own step is smoothed over the 60 s rate window
        base = 4.0 if lo < 1800 else 8.0
        expected = 2.0 * base * sum(shape.factor(lo + s + 0.5) for s in range(120))
        count = sum(1 for a in arrivals if lo <= a < lo + 120)
        assert abs(count - expected) < 4 * math.sqrt(expected), (lo, count, expected)
    assert out == scale_load(trace, 2.0, window_s=60.0, seed=3, shape=shape)
    assert scale_load(trace, 2.0, seed=3, shape=LoadShape(trough=1.0)) == scale_load(trace, 2.0, seed=3)


@pytest.mark.parametrize(("args", "field", "message"), [
    (["--shape-trough", "0.5"], "shape_trough", "applies only with --load-shape diurnal"),
    (["--shape-period-s", "600"], "shape_period_s", "applies only with --load-shape diurnal"),
    (["--load-shape", "diurnal", "--shape-trough", "1.5"], "shape_trough", "less than or equal to 1"),
    (["--load-shape", "diurnal", "--shape-period-s", "0"], "shape_period_s", "greater than 0"),
    (["--load-shape", "weekly"], "load_shape", "'none' or 'diurnal'"),
    (["--load-shape", "diurnal", "--qps", "5"], "load_shape", "cannot be combined with --qps"),
])
def test_load_shape_options_are_validated(args: list[str], field: str, message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["bench", "autoscale", "--trace", str(TRACE_DIR / "AzureLLMInferenceTrace_conv.csv"),
                     "--json", str(tmp_path / "x.json"), *args])
    err = capsys.readouterr().err
    assert code == 2 and f"{field} (--{field.replace('_', '-')}" in err and message in err
    assert not (tmp_path / "x.json").exists()


def test_load_shape_defaults_fill_in_what_is_not_given() -> None:
    trace = TRACE_DIR / "AzureLLMInferenceTrace_conv.csv"
    shaped = AutoscaleBench(trace=trace, json_out=Path("x.json"), load_shape="diurnal", shape_trough=0.5)
    assert shaped.shape() == LoadShape(period_s=3600.0, trough=0.5)
    assert AutoscaleBench(trace=trace, json_out=Path("x.json")).shape() is None


def test_load_shape_model_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="trough"):
        LoadShape(trough=-0.1)
    with pytest.raises(ValueError, match="period_s"):
        LoadShape(period_s=-1.0)


def test_requests_without_prefix_get_their_own_routing_key() -> None:
    reqs = distinct_text_keys(prepare([TraceRequest(float(i), 700, 5) for i in range(5)]))
    assert len({r.fallback_key for r in reqs}) == 5
    hashed = prepare([TraceRequest(0.0, 1024, 5, (1, 2))])
    assert distinct_text_keys(hashed) == hashed


def test_peak_rate_and_worst_window() -> None:
    reqs = [TraceRequest(t * 0.5, 10, 10) for t in range(480)] + [TraceRequest(200 + t * 0.1, 10, 10)
                                                                  for t in range(100)]
    assert peak_rate(sorted(reqs, key=lambda r: r.arrival), 10.0) == pytest.approx(12.0)
    outcomes = [Outcome(float(t), t % 60 != 0 or t < 60, True, True) for t in range(300)]
    res = ReplayResult(outcomes, 1.0, [], Timeline(), 300.0)
    assert worst_window(res, 60.0, min_requests=10) == pytest.approx(59 / 60)
    assert worst_window(res, 300.0, min_requests=10) == pytest.approx(296 / 300)


def test_search_static_finds_the_fewest_instances_that_hold() -> None:
    """On a made-up attainment surface (prefill needs 5, decode needs 7, or 6 with 6 prefill), the
    search returns the cheapest holding allocation and counts its runs."""
    runs: list[tuple[int, int]] = []

    def run(p: int, d: int) -> StaticRun:
        runs.append((p, d))
        ok = p >= 5 and (d >= 7 or (p >= 6 and d >= 6))
        return StaticRun({"prefill": p, "decode": d}, {"slo_attainment": 0.99 if ok else 0.5})

    best = search_static({"prefill": 8, "decode": 4}, run, lambda r: r.summary["slo_attainment"] >= 0.95, 64)
    assert best is not None and best.replicas == {"prefill": 5, "decode": 7}
    assert len(runs) < 15
    assert search_static({"prefill": 1, "decode": 1}, run, lambda r: False, 3) is None


def test_bench_cli_writes_json_shape_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "as.json", tmp_path / "as.png"
    args = ["bench", "autoscale", "--trace", str(TRACE_DIR / "AzureLLMInferenceTrace_conv.csv"), "--json", str(out),
            "--plot", str(png), "--requests", "1500", "--load-factor", "2", "--warmup-s", "60",
            "--startup-delay-s", "20", "--tick-s", "5", "--cooldown-s", "60", "--stabilization-s", "60",
            "--no-static-references"]
    try:
        cli.main(args)
    except SystemExit as exc:  # pydantic-settings' CliApp exits 0 after cli_cmd on some versions
        assert not exc.code
    data = json.loads(out.read_text())
    assert set(data) == {"scalers", "config"}
    assert set(data["scalers"]) == {"tandem", "static_peak", "threshold", "dynamo", "kpa", "reactive_oracle"}
    for s in data["scalers"].values():
        for key, kind in (("ttft_attainment", float), ("tpot_attainment", float), ("gpu_hours", float),
                          ("goodput_per_gpu_hour", float), ("scaling_actions", int), ("direction_changes_max", int)):
            assert isinstance(s[key], kind), key
        assert 0 <= s["ttft_attainment"] <= 1 and s["gpu_hours"] > 0
    static = data["scalers"]["static_peak"]
    assert static["scaling_actions"] == 0 and static["worst_minute_attainment"] >= 0.95
    assert data["config"]["static_peak_replicas"] == next(
        c["replicas"] for c in data["config"]["static_candidates"]
        if c["gpu_hours"] == static["gpu_hours"] and c["worst_minute_attainment"] >= 0.95)
    assert data["config"]["format"] == "azure" and data["config"]["requests"] > 2000
    assert data["config"]["load_shape"] is None
    assert png.stat().st_size > 10_000

