"""The prefill calibration: an engine's measured prefill time over the profile's, per instance.

Unit tests feed hand-built snapshots (cumulative vLLM sums, as scrapes see them) to the estimator;
the gateway test runs real simulated engines, which follow the profile, so their factor is ~1.
"""

from __future__ import annotations

import httpx
import pytest
from gatewayutil import completion_body, gateway_app, sim_app, until
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from tandem.router.calibration import CalibrationSettings, PrefillCalibrator, PrefillWork
from tandem.router.enginemetrics import EngineSnapshot, parse_engine_metrics
from tandem.serve import serving


def linear(computed: int, cached: int) -> float:
    """A toy profile: 1 ms per prefilled token, cached ones free."""
    return computed * 1e-3


def snap(seconds: float, requests: float, prompt: float, computed: float) -> EngineSnapshot:
    return EngineSnapshot(flavor="vllm", prefill_time_sum=seconds, prefill_time_count=requests,
                          request_prompt_sum=prompt, request_computed_sum=computed)


class FakeVLLM:
    """An engine's cumulative sums: each window adds 2 requests of ``tokens`` prefilled tokens."""

    def __init__(self) -> None:
        self.work = PrefillWork(0.0, 0, 0, 0)

    def scrape(self) -> EngineSnapshot:
        w = self.work
        return snap(w.seconds, w.requests, w.prompt_tokens, w.computed_tokens)

    def run(self, cal: PrefillCalibrator, windows: int, *, s_per_token: float, tokens: int = 1000) -> float:
        for _ in range(windows):
            w = self.work
            self.work = PrefillWork(w.seconds + 2 * tokens * s_per_token, w.requests + 2,
                                    w.prompt_tokens + 2 * tokens, w.computed_tokens + 2 * tokens)
            cal.observe(self.scrape())
        return cal.scale


def test_steady_ratio_converges_to_measured_over_profiled() -> None:
    cal, engine = PrefillCalibrator(CalibrationSettings(window_tokens=1000, smoothing=0.5), linear), FakeVLLM()
    assert cal.observe(engine.scrape()) == 1.0  # the first scrape only starts a window
    assert engine.run(cal, 1, s_per_token=0.02) == pytest.approx(20.0)  # the first window sets the factor
    assert engine.run(cal, 1, s_per_token=0.004) == pytest.approx(12.0)  # then smoothed
    assert engine.run(cal, 12, s_per_token=0.004) == pytest.approx(4.0, rel=1e-3)
    assert cal.windows == 14


def test_prediction_uses_the_window_mean_request_with_its_cached_tokens() -> None:
    seen: list[tuple[int, int]] = []

    def profile(computed: int, cached: int) -> float:
        seen.append((computed, cached))
        return 0.5

    cal = PrefillCalibrator(CalibrationSettings(window_tokens=100), profile)
    cal.observe(snap(10.0, 10, 5000, 1000))
    assert cal.observe(snap(13.0, 14, 9000, 1400)) == pytest.approx(3.0 / (4 * 0.5))
    assert seen == [(100, 900)]


def test_a_window_with_too_few_prefilled_tokens_changes_nothing_until_it_fills() -> None:
    cal = PrefillCalibrator(CalibrationSettings(window_tokens=4096), linear)
    cal.observe(snap(0, 0, 0, 0))
    assert cal.observe(snap(30.0, 3, 30000, 3000)) == 1.0  # 3,000 cached-heavy tokens: not yet
    assert cal.windows == 0
    assert cal.observe(snap(50.0, 5, 50000, 5000)) == pytest.approx(10.0)  # the same window, now full
    assert cal.observe(snap(50.0, 5, 50000, 5000)) == pytest.approx(10.0)  # idle: kept


def test_counters_going_backwards_or_a_restart_start_over_at_one() -> None:
    cal, engine = PrefillCalibrator(CalibrationSettings(window_tokens=1000), linear), FakeVLLM()
    cal.observe(engine.scrape())
    assert engine.run(cal, 2, s_per_token=0.05) == pytest.approx(50.0)
    assert cal.observe(snap(0.1, 1, 10, 10)) == 1.0  # a new process: its sums start again
    assert cal.windows == 0
    assert cal.observe(snap(0.1 + 2.0, 3, 2010, 2010)) == pytest.approx(1.0)  # measured anew from there
    cal.reset()  # what the scrape path does on a restart it detects (new process start time)
    assert (cal.scale, cal.windows, cal.base) == (1.0, 0, None)


def test_the_factor_is_clamped() -> None:
    settings = CalibrationSettings(window_tokens=1000, min_scale=0.1, max_scale=100.0)
    for s_per_token, clamped in ((10.0, 100.0), (1e-6, 0.1)):
        cal, engine = PrefillCalibrator(settings, linear), FakeVLLM()
        cal.observe(engine.scrape())
        assert engine.run(cal, 1, s_per_token=s_per_token) == clamped
    with pytest.raises(ValidationError):
        CalibrationSettings(min_scale=2.0)


def test_engines_without_prefill_times_keep_the_profile() -> None:
    sglang = EngineSnapshot(flavor="sglang", prompt_tokens=5000.0, running=1)
    cal = PrefillCalibrator(CalibrationSettings(window_tokens=1), linear)
    assert PrefillWork.of(sglang) is None
    assert cal.observe(sglang) == cal.observe(sglang.model_copy(update={"prompt_tokens": 9e9})) == 1.0


def test_older_vllm_falls_back_to_the_prompt_and_hit_counters() -> None:
    old = EngineSnapshot(flavor="vllm", prefill_time_sum=2.0, prefill_time_count=4, prompt_tokens=1000.0,
                         prefix_hits=400.0)
    assert PrefillWork.of(old) == PrefillWork(2.0, 4, 1000.0, 600.0)


def test_vllm_exposition_yields_the_prefill_sums() -> None:
    text = "\n".join([
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 1.0',
        "# TYPE vllm:request_prefill_time_seconds histogram",
        'vllm:request_prefill_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 3.0',
        'vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 3.0',
        'vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 1.5',
        "# TYPE vllm:request_prompt_tokens histogram",
        'vllm:request_prompt_tokens_count{engine="0",model_name="m"} 3.0',
        'vllm:request_prompt_tokens_sum{engine="0",model_name="m"} 3000.0',
        "# TYPE vllm:request_prefill_kv_computed_tokens histogram",
        'vllm:request_prefill_kv_computed_tokens_count{engine="0",model_name="m"} 3.0',
        'vllm:request_prefill_kv_computed_tokens_sum{engine="0",model_name="m"} 1200.0',
    ]) + "\n"
    assert PrefillWork.of(parse_engine_metrics(text)) == PrefillWork(1.5, 3.0, 3000.0, 1200.0)


def scale_gauge(exposition: str) -> dict[str, float]:
    return {s.labels["instance"]: s.value for f in text_string_to_metric_families(exposition)
            if f.name == "tandem_instance_prefill_cost_scale" for s in f.samples}


async def test_simulated_engines_calibrate_to_about_one_and_the_factor_is_exposed() -> None:
    """The simulator times prefill with the profile the gateway assumes: measured ~ predicted."""
    prompt = " ".join(f"w{i}" for i in range(1500))
    async with serving(sim_app(port=0)) as a, \
            serving(gateway_app([a], calibration={"window_tokens": 2000})) as gw, \
            httpx.AsyncClient(timeout=30) as c:
        inst = (await c.get(gw + "/admin/instances")).json()["instances"][0]
        assert inst["prefill_cost_scale"] == 1.0 and inst["prefill_calibration_windows"] == 0
        assert list(scale_gauge((await c.get(gw + "/metrics")).text).values()) == [1.0]
        for i in range(6):  # distinct prompts: no prefix hits, each ~1.5k prefilled tokens
            r = await c.post(gw + "/v1/completions", json=completion_body(f"{i} {prompt}", max_tokens=2))
            assert r.status_code == 200

        async def calibrated() -> bool:
            got = (await c.get(gw + "/admin/instances")).json()["instances"][0]
            return got["prefill_calibration_windows"] >= 1

        await until(calibrated, limit=10)
        inst = (await c.get(gw + "/admin/instances")).json()["instances"][0]
        assert inst["prefill_cost_scale"] == pytest.approx(1.0, abs=0.15)
        gauge = scale_gauge((await c.get(gw + "/metrics")).text)
        assert list(gauge.values()) == [pytest.approx(inst["prefill_cost_scale"], abs=1e-3)]


async def test_calibration_can_be_turned_off() -> None:
    async with serving(sim_app(port=0)) as a, serving(gateway_app([a], prefill_calibration=False)) as gw, \
            httpx.AsyncClient(timeout=30) as c:
        inst = (await c.get(gw + "/admin/instances")).json()["instances"][0]
        assert inst["prefill_cost_scale"] == 1.0 and inst["prefill_calibration_windows"] is None


async def test_the_scrape_path_scales_the_estimates_and_a_restart_resets_them() -> None:
    from tandem.router.discovery import Endpoint
    from tandem.router.gateway import Gateway
    from tandem.router.routing.types import RouteRequest
    from tandem.router.scrape import calibrate
    from tandem.router.settings import GatewaySettings

    gw = Gateway(GatewaySettings(instances="http://127.0.0.1:1", calibration={"window_tokens": 1000}))
    await gw._join(Endpoint(url="http://a", model="m"))
    inst = gw.pools["m"].instances["http://a"]
    req = RouteRequest("r", 2000, (), 512, 0.0, fallback_key=1)
    profiled = inst.state.ttft_estimate(req)
    predicted = gw.cost.prefill_time(1000, 0)  # what the profile says of each request below
    calibrate(inst, snap(0.0, 0, 0, 0), restarted=False)
    calibrate(inst, snap(2 * 7 * predicted, 2, 2000, 2000), restarted=False)  # 7x slower than profiled
    assert inst.state.prefill_scale == pytest.approx(7.0)
    assert inst.state.ttft_estimate(req) == pytest.approx(7 * profiled)
    calibrate(inst, snap(0.5, 1, 100, 100), restarted=True)  # a new process: back to the profile
    assert inst.state.prefill_scale == 1.0 and inst.calibration is not None and inst.calibration.windows == 0


def test_the_offload_solver_sees_a_pool_as_slow_as_its_engines_measured() -> None:
    from tandem.blockcache import BlockCache
    from tandem.perf.profile import load_profile
    from tandem.router.routing.offload import mean_prefill_scale, pool_speed
    from tandem.router.routing.types import InstanceState

    profile = load_profile("llama3-8b-h100")
    states = [InstanceState(id=str(i), prefill_s_per_token=1e-4, shadow=BlockCache(1024), prefill_scale=s)
              for i, s in enumerate((2.0, 4.0))]
    assert mean_prefill_scale([]) == 1.0 and mean_prefill_scale(states) == 3.0
    measured = pool_speed(profile, len(states), mean_prefill_scale(states))
    assert measured.work(4096) == pytest.approx(3 * pool_speed(profile, 2).work(4096))
