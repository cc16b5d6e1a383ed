"""The controller's multi-tick rules with hand-built inputs: burst detection and the pool held for
recurring bursts, the mix-shift test behind the P:D ratio, the scale-down step and look-back, and
how the tick combines them (no wall clock anywhere: every time is a plain number)."""

import itertools
import random

import pytest

from tandem.api.observations import LengthBucket, Observations, RoleObservation
from tandem.autoscaler import rules
from tandem.autoscaler.capacity import CapacityModel
from tandem.autoscaler.core import tick
from tandem.autoscaler.models import AutoscalerSpec, AutoscalerState, RoleState, ScalingSLO
from tandem.perf.profile import load_profile

PROFILE = load_profile("qwen2.5-32b-h100")
SLO_ = ScalingSLO(ttft_s=2.0, tpot_s=0.1, attainment=0.95)
CAP = CapacityModel(PROFILE, SLO_)
CHAT = [LengthBucket(input_tokens=700, output_tokens=250, weight=0.6),
        LengthBucket(input_tokens=2000, output_tokens=300, weight=0.3),
        LengthBucket(input_tokens=5000, output_tokens=150, weight=0.1)]
CODE = [LengthBucket(input_tokens=2500, output_tokens=20, weight=0.6),
        LengthBucket(input_tokens=6000, output_tokens=30, weight=0.4)]


def hist(rates: list[float], tick_s: float = 15.0) -> list[tuple[float, float]]:
    return [(i * tick_s, r) for i, r in enumerate(rates)]


BURSTS = dict(threshold=0.3, max_length_s=300.0, min_episodes=2)


# ----- burst detection -------------------------------------------------------------------------
def test_flat_noisy_load_has_no_bursts_and_no_floor() -> None:
    rng = random.Random(1)
    view = rules.bursts(hist([10 + rng.gauss(0, 0.8) for _ in range(120)]), **BURSTS)
    assert view.base_rps == pytest.approx(10, abs=0.5)
    assert view.episodes == () and view.hold_rps is None and not view.holding


def test_recurring_short_bursts_hold_their_peak_rate() -> None:
    # every 5 minutes a 45 s burst at 3x the base (4 ticks of 15 s: the fourth at 30 rps)
    rates = []
    for _ in range(6):
        rates += [10.0] * 16 + [25.0, 30.0, 28.0, 22.0]
    misses = [t for t, r in hist(rates) if r == 30.0][:1]  # the first burst missed the SLO
    view = rules.bursts(hist(rates), misses=misses, miss_lag_s=90.0, **BURSTS)
    assert len(view.episodes) == 6 and len(view.short) == 6
    assert all(e.length_s == 45.0 for e in view.short)
    assert view.short[0].missed and not any(e.missed for e in view.short[1:])
    assert view.hold_rps == 30.0  # the highest tick inside one
    # the same bursts absorbed by the pools as they were (no miss): nothing to hold
    assert rules.bursts(hist(rates), **BURSTS).hold_rps is None
    # a miss long after every burst is not theirs
    assert rules.bursts(hist(rates), misses=[hist(rates)[-1][0] + 500], miss_lag_s=90.0, **BURSTS).hold_rps is None


def test_a_burst_shorter_than_the_window_is_read_at_its_own_rate() -> None:
    # a 15 s burst at 24 rps over a base of 4, seen through 30 s windows: one tick reads (24 + 4) / 2
    one_tick = rules.Burst(start_s=100.0, end_s=100.0, peak_rps=14.0)
    assert rules.undiluted_peak(one_tick, 4.0, 30.0, 15.0, 2.0) == pytest.approx(24.0)
    assert rules.undiluted_peak(one_tick, 4.0, 30.0, 15.0, 1.5) == pytest.approx(19.0)  # at most max_factor
    assert rules.undiluted_peak(one_tick, 4.0, 30.0, 15.0, 1.0) == 14.0  # 1: the window's reading
    # a burst the window holds whole (two ticks and more) is read as it is
    assert rules.undiluted_peak(rules.Burst(100.0, 115.0, 14.0), 4.0, 30.0, 15.0, 2.0) == 14.0
    assert rules.undiluted_peak(rules.Burst(100.0, 100.0, 3.0), 4.0, 30.0, 15.0, 2.0) == 3.0  # nothing above base


def test_recurring_bursts_shorter_than_the_window_are_held_undiluted() -> None:
    rates = ([4.0] * 3 + [14.0]) * 12  # a one-tick burst every minute
    misses = [t for t, r in hist(rates) if r == 14.0][:1]
    view = rules.bursts(hist(rates), misses=misses, miss_lag_s=90.0, window_s=30.0, max_dilution=2.0, **BURSTS)
    assert view.hold_rps == pytest.approx(24.0)
    assert rules.bursts(hist(rates), misses=misses, miss_lag_s=90.0, **BURSTS).hold_rps == 14.0  # no window given
    # 45 s bursts through the same windows are not diluted
    long = ([4.0] * 8 + [14.0] * 4) * 6
    misses = [t for t, r in hist(long) if r == 14.0][:1]
    assert rules.bursts(hist(long), misses=misses, miss_lag_s=90.0, window_s=30.0, max_dilution=2.0,
                        **BURSTS).hold_rps == 14.0


def test_one_burst_is_not_held_until_it_recurs() -> None:
    once = [10.0] * 40 + [30.0] * 3 + [10.0] * 40
    view = rules.bursts(hist(once), misses=[600.0], miss_lag_s=90.0, **BURSTS)
    assert len(view.short) == 1 and view.hold_rps is None


def test_a_long_plateau_is_followed_not_held() -> None:
    # a day-like rise to a 20-minute plateau and back down: one long episode
    rates = [10.0] * 60 + [10 + i for i in range(10)] + [20.0] * 80 + [20 - i for i in range(10)] + [10.0] * 40
    view = rules.bursts(hist(rates), **BURSTS)
    assert len(view.episodes) == 1 and view.episodes[0].length_s > 300
    assert view.short == () and view.hold_rps is None


def test_a_load_that_came_down_is_not_a_burst() -> None:
    # a ramp down from 3x: the early ticks are above the (now lower) median, but nothing rose from it
    rates = [30.0] * 20 + [30 - i * 0.4 for i in range(50)] + [10.0] * 50
    view = rules.bursts(hist(rates), **BURSTS)
    assert view.episodes == () and not view.holding


def test_chatter_around_the_threshold_is_one_episode() -> None:
    # a slow ramp crossing the line with noise: dips that stay above the lower line do not end it
    rates = [10.0] * 40 + [12.9, 13.2, 12.8, 13.4, 12.7, 13.5] + [14 + i * 0.1 for i in range(60)]
    view = rules.bursts(hist(rates), **BURSTS)
    assert len(view.episodes) == 1


def test_too_little_history_holds_nothing() -> None:
    view = rules.bursts(hist([10.0, 30.0, 10.0, 30.0]), **BURSTS)
    assert view.episodes == () and not view.holding


# ----- a step up read from two overlapping windows ---------------------------------------------
def test_a_step_up_is_read_at_its_new_level() -> None:
    # 10 rps, then 20 rps for the last 15 s of a 30 s window: the window says 15, the level is 20
    assert rules.jump_rps([(0.0, 10.0)], 15.0, 15.0, 30.0, 3.0) == pytest.approx(20.0)
    steady = [(-30.0, 10.0), (-15.0, 10.0), (0.0, 10.0)]
    assert rules.jump_rps(steady, 15.0, 15.0, 30.0, 3.0) == pytest.approx(20.0)
    # one tick later the window is full of the new level: still 20, not extrapolated further
    assert rules.jump_rps([*steady, (15.0, 15.0)], 30.0, 20.0, 30.0, 3.0) == pytest.approx(20.0)
    # Poisson noise of the window (10 rps over 30 s: sd ~0.8 for the 15 s that differ) is no step
    assert rules.jump_rps([(0.0, 10.0)], 15.0, 11.0, 30.0, 3.0) is None
    assert rules.jump_rps([(0.0, 10.0)], 15.0, 8.0, 30.0, 3.0) is None  # a drop is not a step up
    assert rules.jump_rps([], 15.0, 30.0, 30.0, 3.0) is None
    assert rules.jump_rps([(0.0, 10.0)], 45.0, 30.0, 30.0, 3.0) is None  # windows no longer overlap


# ----- mix shift (P:D ratio following the mix) ---------------------------------------------------
def test_shift_to_code_is_more_prefill_work_and_not_more_decode_work() -> None:
    assert rules.mix_shift(CAP, "prefill", CHAT, CODE, 300, 0.0, 4.0)
    assert not rules.mix_shift(CAP, "decode", CHAT, CODE, 300, 0.0, 4.0)
    # and the way back: code -> chat is more decode work, less prefill
    assert rules.mix_shift(CAP, "decode", CODE, CHAT, 300, 0.0, 4.0)
    assert not rules.mix_shift(CAP, "prefill", CODE, CHAT, 300, 0.0, 4.0)


def test_sampling_noise_in_the_recent_mix_never_counts_as_a_shift() -> None:
    rng = random.Random(7)
    for _ in range(200):
        counts = [0, 0, 0]
        for _ in range(300):
            counts[rng.choices(range(3), weights=[b.weight for b in CHAT])[0]] += 1
        sample = [b.model_copy(update={"weight": float(c)}) for b, c in zip(CHAT, counts, strict=True) if c]
        for role in ("prefill", "decode"):
            assert not rules.mix_shift(CAP, role, CHAT, sample, 300, 0.0, 4.0)


def test_a_small_sample_needs_a_bigger_shift() -> None:
    heavier = [b.model_copy(update={"weight": w}) for b, w in zip(CHAT, (0.5, 0.3, 0.2), strict=True)]
    assert rules.mix_shift(CAP, "prefill", CHAT, heavier, 5000, 0.0, 4.0)
    assert not rules.mix_shift(CAP, "prefill", CHAT, heavier, 30, 0.0, 4.0)
    assert not rules.mix_shift(CAP, "prefill", CHAT, None, 300, 0.0, 4.0)


# A chat mix a little heavier: 1.28x the prefill work per request of CHAT, 5.8 standard errors over 300 requests.
HEAVIER = [b.model_copy(update={"weight": w}) for b, w in zip(CHAT, (0.5, 0.3, 0.2), strict=True)]


def test_an_overloaded_pool_waives_the_margin_but_not_the_noise_test() -> None:
    assert not rules.mix_shift(CAP, "prefill", CHAT, HEAVIER, 300, 0.0, 4.0, 1.3)  # inside the 1.3x margin
    assert rules.mix_shift(CAP, "prefill", CHAT, HEAVIER, 300, 0.0, 4.0, 1.3, overloaded=True)
    # the same mean over 30 requests is within sampling noise: no shift however loaded the pool
    assert not rules.mix_shift(CAP, "prefill", CHAT, HEAVIER, 30, 0.0, 4.0, 1.3, overloaded=True)
    # nor does a lighter mix become a shift
    assert not rules.mix_shift(CAP, "prefill", HEAVIER, CHAT, 300, 0.0, 4.0, 1.3, overloaded=True)


# ----- scale-down step ---------------------------------------------------------------------------
@pytest.mark.parametrize(("current", "need", "floor", "expect"), [
    (12, 4, 0, 9),     # 25 % of 12 per step
    (3, 1, 0, 2),      # at least one
    (12, 11, 0, 11),   # the look-back need is reached first
    (12, 4, 10, 10),   # never below the burst floor
    (5, 7, 0, 5),      # the look-back still needs more: nothing goes
])
def test_scale_down_step(current: int, need: int, floor: int, expect: int) -> None:
    assert rules.scale_down_step(current, need, floor, 1, 0.25) == expect


# ----- the tick with these rules -------------------------------------------------------------------
def spec(**kw) -> AutoscalerSpec:
    base = dict(mode="disaggregated", slo=SLO_, startup_delay_s=60, scale_up_cooldown_s=15,
                scale_down_cooldown_s=300, scale_down_stabilization_s=300)
    base.update(kw)
    return AutoscalerSpec(**base)


def observe(t: float, rate: float, ready: dict, *, mix=CHAT, recent=None, recent_n=0, queue=None,
            att: float | None = 1.0, completed: int = 500, **_: object) -> Observations:
    queue = queue or {}
    return Observations(
        time_s=t, window_s=30, arrival_rate=rate, length_mix=mix, recent_length_mix=recent,
        recent_mix_requests=recent_n,
        roles={r: RoleObservation(ready=ready.get(r, 1), queue_depth=queue.get(r, 0.0)) for r in ("prefill", "decode")},
        ttft_attainment=att, tpot_attainment=att, prefill_attainment=att, completed=completed)


def run(sp: AutoscalerSpec, rates: list[float], tick_s: float = 15.0, attainment=None, **kw) -> list:
    """Feed the rates one tick each; the pool is what the last decision asked for (no start-up).
    ``attainment(i, rate)`` gives each window's attainment (default: always met)."""
    state, ready, out = None, {}, []
    for i, r in enumerate(rates):
        if attainment is not None:
            kw["att"] = attainment(i, r)
        d = tick(observe(i * tick_s, r, ready, **kw), PROFILE, sp, state)
        state, ready = d.state, {role: rd.target for role, rd in d.roles.items()}
        out.append(d)
    return out


def test_recurring_bursts_are_held_between_bursts() -> None:
    sp = spec()
    rates = []
    for _ in range(8):  # a 30 s burst at 3x every 4 minutes, as 30 s windows one tick apart see it
        rates += [8.0] * 13 + [16.0, 24.0, 16.0]
    # the first two bursts miss the SLO (the pool lagged them), later ones are held and met
    decisions = run(sp, rates, attainment=lambda i, r: 0.7 if r == 24.0 and i < 40 else 1.0)
    scale = decisions[-1].state.roles["prefill"].goodput_scale  # what the misses taught the model
    burst_need = CAP.pool_size("prefill", 24.0 / scale, CAP.workload(CHAT), 64)
    # once the bursts recur, the pool stays at the burst level between them: no up-down cycles
    for role in ("prefill", "decode"):
        late = [d.roles[role].target for d in decisions[-48:]]
        assert len(set(late)) == 1, (role, late)
    assert decisions[-1].roles["prefill"].target >= burst_need
    assert "recurring bursts" in decisions[-5].roles["prefill"].reason
    # and the bursts are not bought twice: the forecast's spread is dropped while they are held
    assert decisions[-1].roles["prefill"].target <= burst_need + 1


def test_the_burst_floor_is_kept_by_the_scale_down_look_back() -> None:
    sp = spec()
    rates = []
    for _ in range(8):
        rates += [8.0] * 13 + [16.0, 24.0, 16.0]
    decisions = run(sp, rates, attainment=lambda i, r: 0.7 if r == 24.0 and i < 40 else 1.0)
    last = decisions[-1]  # between bursts, at the base rate: the pool is the floor
    for role in ("prefill", "decode"):
        assert "recurring bursts" in last.roles[role].reason
        # the look-back keeps the floor, so a later dip of it cannot shrink the pool before the window passes
        assert last.state.roles[role].recent_needs[-1][1] >= last.roles[role].target


def test_bursts_the_pool_absorbs_are_not_held() -> None:
    sp = spec()
    rates = []
    for _ in range(8):
        rates += [8.0] * 13 + [16.0, 24.0, 16.0]
    decisions = run(sp, rates)  # every window met the SLO
    assert not any("recurring bursts" in d.roles["prefill"].reason for d in decisions)


def test_without_recurrence_a_burst_is_released_after_the_look_back() -> None:
    sp = spec()
    decisions = run(sp, [8.0] * 30 + [24.0] * 8 + [8.0] * 60)
    peak = max(d.roles["decode"].target for d in decisions)
    assert decisions[-1].roles["decode"].target < peak


def test_scale_down_is_stepped_rate_limited_and_looks_back() -> None:
    sp = spec()
    warm = 60
    decisions = run(sp, [40.0] * warm + [8.0] * 80)
    targets = [d.roles["decode"].target for d in decisions]
    drop_at = warm
    high = targets[drop_at - 1]
    downs = [(i, targets[i - 1], targets[i]) for i in range(drop_at, len(targets)) if targets[i] < targets[i - 1]]
    assert downs, targets
    assert max(targets[drop_at:]) == high  # the drop itself never scales up
    # nothing goes before the look-back (the need at 40 rps) has left the stabilization window
    assert downs[0][0] * 15.0 >= (drop_at * 15.0) + 300 - 15
    # each step removes at most a quarter of the pool, and steps are at least 60 s apart
    assert all(a - b <= max(1, a // 4) for _, a, b in downs)
    assert all((j - i) * 15.0 >= 60 for (i, _, _), (j, _, _) in itertools.pairwise(downs))
    assert targets[-1] < high / 2


def test_pools_follow_a_mix_shift_at_once_and_noise_never_moves_them() -> None:
    sp = spec()
    rates = [10.0] * 30
    before = run(sp, rates, recent=CHAT, recent_n=300)[-1]
    # the rate window turns code-like while the 300 s mix window still says chat
    state = before.state
    ready = {r: d.target for r, d in before.roles.items()}
    after = tick(observe(450.0, 10.0, ready, recent=CODE, recent_n=300), PROFILE, sp, state)
    assert after.roles["prefill"].target > before.roles["prefill"].target
    assert "mix shift" in after.roles["prefill"].reason
    assert after.roles["decode"].target <= before.roles["decode"].target  # decode follows only via the look-back
    assert "mix shift" not in after.roles["decode"].reason


def test_a_small_mix_move_is_followed_only_when_the_ready_pool_cannot_carry_it() -> None:
    sp = spec()
    state = run(sp, [10.0] * 30, recent=CHAT, recent_n=300)[-1].state
    moved = dict(recent=HEAVIER, recent_n=300)
    # 10 rps of the heavier mix needs more than one prefill instance: the 1.3x margin is waived
    short = tick(observe(450.0, 10.0, {"prefill": 1, "decode": 5}, **moved), PROFILE, sp, state)
    assert "mix shift" in short.roles["prefill"].reason
    # a pool that carries it is left to the mix window (the move is inside the margin)
    ample = tick(observe(450.0, 10.0, {"prefill": 10, "decode": 5}, **moved), PROFILE, sp, state)
    assert "mix shift" not in ample.roles["prefill"].reason
    # and the rule can be switched off
    off = tick(observe(450.0, 10.0, {"prefill": 1, "decode": 5}, **moved), PROFILE,
               spec(mix_shift_follow_overload=False), state)
    assert "mix shift" not in off.roles["prefill"].reason


def test_no_goodput_correction_for_misses_that_waited_out_a_backlog() -> None:
    sp = spec()
    base = run(sp, [10.0] * 40)[-1]
    ready = {r: d.target for r, d in base.roles.items()}
    # a backlog in the window (queue of 50 at the prefill pool), then its requests complete late
    d1 = tick(observe(600.0, 10.0, ready, queue={"prefill": 50.0}, att=0.6), PROFILE, sp, base.state)
    d2 = tick(observe(615.0, 10.0, ready, att=0.6), PROFILE, sp, d1.state)
    assert d2.state.roles["prefill"].goodput_scale == 1.0
    # the same miss with no backlog in the window is evidence against the model
    d3 = tick(observe(660.0, 10.0, ready, att=0.6), PROFILE, sp, d2.state)
    assert d3.state.roles["prefill"].goodput_scale < 1.0


def test_backlog_is_drained_by_the_scale_up() -> None:
    sp = spec()
    base = run(sp, [10.0] * 40)[-1]
    ready = {r: d.target for r, d in base.roles.items()}
    plain = tick(observe(600.0, 10.0, ready), PROFILE, sp, base.state)
    queued = tick(observe(600.0, 10.0, ready, queue={"prefill": 900.0}), PROFILE, sp, base.state)
    assert queued.roles["prefill"].target > plain.roles["prefill"].target
    assert "backlog" in queued.roles["prefill"].reason


def test_one_change_of_direction_per_flip_window() -> None:
    sp = spec(scale_down_cooldown_s=60, scale_down_stabilization_s=60)
    state = AutoscalerState(roles={r: RoleState(replicas=10, last_up_s=0.0, last_direction=1, last_flip_s=500.0,
                                                observed_since_s=0.0) for r in ("prefill", "decode")})
    # the need fell far below the pool, but the role reversed 100 s ago: no second reversal yet
    d = tick(observe(600.0, 2.0, {"prefill": 10, "decode": 10}), PROFILE, sp, state)
    assert d.roles["decode"].target == 10 and "flip window" in d.roles["decode"].reason
    later = state.model_copy(update={"roles": {r: s.model_copy(update={"last_flip_s": -1000.0})
                                               for r, s in state.roles.items()}})
    d = tick(observe(600.0, 2.0, {"prefill": 10, "decode": 10}), PROFILE, sp, later)
    assert d.roles["decode"].target < 10
