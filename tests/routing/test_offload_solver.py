"""The offload threshold solver on hand-made length distributions, and its periodic controller."""

import pytest

from tandem.router.routing.offload import (
    OffloadController,
    OffloadProblem,
    OffloadSettings,
    PrefillPoolSpeed,
    solve_threshold,
)

A = 1e-4  # seconds per token
LINEAR = PrefillPoolSpeed(instances=1, per_token_s=A, attn_pair_s=0.0)
UNIFORM = list(range(1, 1001))  # token mass below t grows like t^2


def problem(**kw) -> OffloadProblem:
    base = dict(uncached_lengths=UNIFORM, local=LINEAR, remote=LINEAR, decode_rps=1e9, link_gbps=1e6,
                kv_bytes_per_token=131072)
    return OffloadProblem(**{**base, **kw})


def test_equal_pools_split_the_token_mass_in_half() -> None:
    d = solve_threshold(problem())
    # sum_{L<=t} L = sum_{L>t} L  ->  t^2 ~ 1000^2 / 2  ->  t ~ 707; p = 1 - t/1000
    assert 700 <= d.threshold_tokens <= 712
    assert d.offload_fraction == pytest.approx(0.293, abs=0.01)
    mean_work_half = A * sum(UNIFORM) / len(UNIFORM) / 2
    assert d.max_rps == pytest.approx(1 / mean_work_half, rel=0.01)
    assert d.bottleneck in ("local_prefill", "remote_prefill")


def test_a_bigger_remote_pool_takes_more_and_quadratic_cost_moves_t_down() -> None:
    three = solve_threshold(problem(remote=LINEAR.model_copy(update={"instances": 3})))
    assert three.threshold_tokens < 707 and three.offload_fraction > 0.4
    # Attention makes long prompts dearer: the same balance is reached offloading fewer requests.
    quad = PrefillPoolSpeed(instances=1, per_token_s=A, attn_pair_s=A / 100)
    q = solve_threshold(problem(local=quad, remote=quad))
    assert q.threshold_tokens > 707 and q.offload_fraction < 0.293


def test_a_narrow_link_raises_t_and_caps_traffic_at_the_high_water_mark() -> None:
    thresholds = []
    for gbps in (1e6, 100.0, 30.0, 10.0, 3.0):
        d = solve_threshold(problem(link_gbps=gbps))
        thresholds.append(d.threshold_tokens)
        assert d.link_gbps_at_max <= 0.85 * gbps * (1 + 1e-9)
    assert thresholds == sorted(thresholds)
    assert thresholds[-1] > thresholds[0]
    assert solve_threshold(problem(link_gbps=10.0)).bottleneck == "link"
    # Once the link binds, the chosen t runs the link right up to (not past) its high-water mark.
    assert solve_threshold(problem(link_gbps=3.0)).link_gbps_at_max == pytest.approx(0.85 * 3.0, rel=0.05)


def test_rising_load_raises_t_before_the_link_saturates() -> None:
    thresholds = []
    for rps in (1.0, 5.0, 10.0, 20.0, 40.0):
        d = solve_threshold(problem(link_gbps=10.0, arrival_rps=rps))
        thresholds.append(d.threshold_tokens)
        assert d.link_gbps_at_arrival is not None and d.link_gbps_at_arrival <= 0.85 * 10.0 * (1 + 1e-9)
    assert thresholds == sorted(thresholds) and thresholds[-1] > thresholds[0]
    # Traffic on the link that is not ours shrinks the budget the same way.
    busy = solve_threshold(problem(link_gbps=10.0, arrival_rps=5.0, link_other_gbps=6.0))
    assert busy.threshold_tokens > thresholds[1]


def test_remote_backlog_and_missing_remote_pool() -> None:
    backlog = solve_threshold(problem(remote_queue_s=5.0, horizon_s=10.0))  # half the remote capacity
    assert backlog.threshold_tokens > 707
    none = solve_threshold(problem(remote=LINEAR.model_copy(update={"instances": 0})))
    assert none.offload_fraction == 0.0 and none.threshold_tokens == 1000


def test_decode_bound_keeps_everything_local_and_ties_go_to_larger_t() -> None:
    d = solve_threshold(problem(decode_rps=1.0))
    assert d.bottleneck == "decode" and d.offload_fraction == 0.0 and d.threshold_tokens == 1000


def test_bimodal_mix_offloads_exactly_the_long_mode() -> None:
    lengths = [500] * 90 + [50_000] * 10
    remote = LINEAR.model_copy(update={"instances": 10})
    d = solve_threshold(problem(uncached_lengths=lengths, remote=remote))
    assert 500 <= d.threshold_tokens < 50_000 and d.offload_fraction == pytest.approx(0.1)


def test_bad_problem_names_the_field() -> None:
    with pytest.raises(ValueError, match="uncached_lengths"):
        problem(uncached_lengths=[])
    with pytest.raises(ValueError, match="link_gbps"):
        problem(link_gbps=0)


def test_controller_resolves_periodically_from_its_window() -> None:
    ctl = OffloadController(OffloadSettings(window=1000, resolve_every_s=5.0, min_samples=100, min_threshold=0,
                                            initial_threshold=999_999),
                            local=LINEAR, remote=LINEAR, decode_rps=1e9, link_gbps=1e6, kv_bytes_per_token=131072)
    assert ctl.threshold == 999_999
    for i, length in enumerate(UNIFORM[:50]):
        ctl.observe(length, i * 0.01)
    assert ctl.maybe_resolve(1.0) is None  # too few samples
    for i, length in enumerate(UNIFORM[50:]):
        ctl.observe(length, 0.5 + i * 0.01)
    d = ctl.maybe_resolve(10.0)
    assert d is not None and ctl.threshold == d.threshold_tokens and 700 <= ctl.threshold <= 712
    assert ctl.maybe_resolve(12.0) is None  # within the period
    threshold_only = dict(local_s=1.0, remote_prefill_s=1.0, kv_bytes=1, now=12.0)
    assert ctl.choose(900, **threshold_only).side == "remote" and ctl.choose(100, **threshold_only).side == "local"
    pinned = OffloadController(OffloadSettings(fixed_threshold=4096), local=LINEAR, remote=LINEAR,
                               decode_rps=1.0, link_gbps=1.0, kv_bytes_per_token=1)
    for i in range(100):
        pinned.observe(10, float(i))
    assert pinned.maybe_resolve(1e3) is None and pinned.threshold == 4096


def test_latency_cap_keeps_long_prompts_off_the_local_pool_unless_the_link_forbids_it() -> None:
    capped = solve_threshold(problem(max_threshold=500))
    assert capped.threshold_tokens <= 500 and capped.offload_fraction >= 0.5
    # Equal pools would balance at ~707; the cap moves t below that at some cost in throughput.
    assert capped.max_rps < solve_threshold(problem()).max_rps
    # With a link that cannot carry the tail at today's load, the link wins over the latency cap.
    squeezed = solve_threshold(problem(max_threshold=500, link_gbps=1.0, arrival_rps=20.0))
    assert squeezed.threshold_tokens > 500
    assert squeezed.link_gbps_at_arrival is not None and squeezed.link_gbps_at_arrival <= 0.85


def test_controller_measures_link_egress_over_its_window() -> None:
    ctl = OffloadController(OffloadSettings(link_window_s=10.0, fixed_threshold=100), local=LINEAR, remote=LINEAR,
                            decode_rps=1.0, link_gbps=8.0, kv_bytes_per_token=1)
    assert ctl.link_utilization(0.0) == 0.0
    # 5 GB = 40 Gbit in a 10 s window: 4 Gbit/s of 8 (untimed: only the bytes count, the capacity stays nominal)
    ctl.record_transfer(5_000_000_000, 1.0)
    ctl.record_transfer(5_000_000_000, 6.0)
    assert ctl.egress_gbps(6.0) == pytest.approx(8.0) and ctl.link_utilization(6.0) == pytest.approx(1.0)
    assert ctl.link_utilization(11.5) == pytest.approx(0.5)  # the first transfer left the window
    assert ctl.link_utilization(16.0) == 0.0
    status = ctl.status(16.0)
    assert status.pinned and status.threshold_tokens == 100 and status.link_egress_gbps == 0.0
    assert status.last_decision is None and status.samples == 0
