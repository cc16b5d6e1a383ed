"""The controller's rules that look at more than one tick: bursts, a change of mix, scale-down steps.

Pure functions of plain values (the tick's history and the spec), each tested with hand-built
inputs (``tests/autoscaler/test_autoscaler_rules.py``):

* :func:`bursts` finds the load's recurring short bursts in the tick history and the rate of their
  peaks. A burst shorter than a few start-up delays is over, or nearly, before an
  instance ordered at its start serves; following it buys capacity after it is needed and gives it
  back before the next one. When such bursts recur, holding the pool their peaks need is the cheaper
  way to meet the SLO (and never more than sizing for the peak): the tick keeps the pool that rate
  needs as a floor for as long as bursts keep coming. A burst shorter than the rate window is held
  at the rate inside it (:func:`undiluted_peak`), not at the window's diluted reading.
* :func:`jump_rps` reads a step up in the load from two overlapping windows one tick apart, so the
  new level's pool is ordered at once rather than over the ticks it takes the window to fill.
* :func:`mix_shift` tests whether the length mix of the last rate window differs from the slower
  mix window's by more than sampling noise and by a margin, in the work a role does per request;
  only a shift to more work counts (the longer window catches up with a shift to less within its
  length, and the scale-down look-back would hold the pool that long anyway). The prefill pool then
  follows a new mix at once instead of a mix window later, and noise in a short window never moves
  the P:D ratio. Decode follows the mix window alone: its work per request (output x context) is
  heavy-tailed, and on the Azure trace a test of it fired on one tick in six without a shift.
* :func:`scale_down_step` is where one scale-down may take a pool: to the largest need of the
  look-back, by at most a share of the pool per step (asymmetric: up at once, down in steps).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

from tandem.api.observations import LengthBucket
from tandem.autoscaler.capacity import CapacityModel
from tandem.autoscaler.models import Role


@dataclass(frozen=True, slots=True)
class Burst:
    """One episode of the load above its look-back median by the burst threshold."""

    start_s: float
    end_s: float  # the last tick inside it
    peak_rps: float
    missed: bool = False  # the SLO was missed during it or right after (following it did not work)

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, slots=True)
class BurstView:
    base_rps: float
    episodes: tuple[Burst, ...]
    short: tuple[Burst, ...]  # the episodes short enough that following them does not pay
    hold_rps: float | None  # the rate the pools are held for (the short bursts' peak), None: nothing held

    @property
    def holding(self) -> bool:
        return self.hold_rps is not None


def undiluted_peak(burst: Burst, base_rps: float, window_s: float, tick_s: float, max_factor: float) -> float:
    """The rate inside a burst shorter than the rate window, from the window rate that saw it.

    A window of ``window_s`` holding a burst of length L reads base + (rate - base) x L / window_s:
    the burst's excess is diluted by the quiet part of the window. The burst lasted about the span of
    the ticks that saw it above the line (its length plus one tick); shorter than the window, its
    excess is scaled back up by window / span, at most ``max_factor`` (1: the window's reading as is).
    A burst as long as the window or longer is read as it is."""
    span = burst.length_s + tick_s
    if span >= window_s or burst.peak_rps <= base_rps:
        return burst.peak_rps
    return base_rps + (burst.peak_rps - base_rps) * min(window_s / span, max(max_factor, 1.0))


def bursts(history: Sequence[tuple[float, float]], *, threshold: float, max_length_s: float, min_episodes: int,
           misses: Sequence[float] = (), miss_lag_s: float = 0.0, min_points: int = 8, window_s: float = 0.0,
           max_dilution: float = 1.0) -> BurstView:
    """Burst episodes in ``history`` ((time, observed rate), oldest first).

    A burst begins at a tick whose rate exceeds the history's median by ``threshold`` (a share) and
    ends at one below the median plus half of that (noise around one line on a slow ramp would
    otherwise look like many bursts). Episodes up to ``max_length_s`` long are short. An episode is
    missed when a time in ``misses`` (ticks whose window missed the SLO) falls inside it or up to
    ``miss_lag_s`` after it (its requests finish after it). When at least ``min_episodes`` short ones
    are in the history and one of them was missed, the pools are held for the highest rate any of
    them reached (the caller sizes each role for it with what it knows now: the mix, the learned
    correction); bursts that the pools absorbed as they were need no holding. A burst shorter than
    the rate window ``window_s`` is held at its rate inside, not at the window's reading of it
    (:func:`undiluted_peak`, scaled by at most ``max_dilution``). Fewer than ``min_points`` ticks of
    history: nothing is known yet, nothing is held.
    """
    if len(history) < min_points:
        return BurstView(0.0, (), (), None)
    base = median(r for _, r in history)
    high, low = base * (1 + threshold), base * (1 + threshold / 2)
    episodes: list[Burst] = []
    current: list[tuple[float, float]] = []
    # Two lines: a burst begins above the high one and ends below the low one, so a load that hovers
    # around the high line is one episode, not many. A burst rises from the base: ticks above the
    # line before any tick below the low one are an older, higher level (a load that has since come
    # down), not a burst.
    armed = False
    for t, r in history:
        if r > high and armed:
            current.append((t, r))
        elif r < low:
            armed = True
            if current:
                episodes.append(Burst(current[0][0], current[-1][0], max(x for _, x in current)))
                current = []
        elif current:  # between the lines inside a burst: still the burst
            current.append((t, r))
    if current:
        episodes.append(Burst(current[0][0], current[-1][0], max(x for _, x in current)))
    episodes = [Burst(e.start_s, e.end_s, e.peak_rps, any(e.start_s <= m <= e.end_s + miss_lag_s for m in misses))
                for e in episodes]
    short = tuple(e for e in episodes if e.length_s <= max_length_s)
    hold = None
    if len(short) >= min_episodes and any(e.missed for e in short):
        tick_s = median(b[0] - a[0] for a, b in itertools.pairwise(history))
        hold = max(undiluted_peak(e, base, window_s, tick_s, max_dilution) for e in short)
    return BurstView(base, tuple(episodes), short, hold)


def jump_rps(history: Sequence[tuple[float, float]], now: float, rate: float, window_s: float, z: float
             ) -> float | None:
    """The rate of the last tick's interval when the window's rate rose beyond Poisson noise since then.

    Windows of ``window_s`` observed every tick overlap: since the last tick, the window gained the
    newest interval and lost the oldest, so new = left + rise x window / tick, ``left`` being the
    rate of the interval that left (the window that ended one window ago, when it is in the history,
    else the last tick's). A scaler sizing on the window rate would order the new level's pool over
    the ticks it takes the window to fill, each order one start-up delay away. None when there is no
    previous tick, the windows do not overlap, or the rise is noise.
    """
    if not history:
        return None
    t0, r0 = history[-1]
    dt = now - t0
    if dt <= 0 or dt >= window_s:
        return None
    rise = rate - r0
    sd = math.sqrt(max(rate + r0, 1e-9) * dt) / window_s  # the two windows differ by dt's arrivals at each end
    if rise <= z * sd:
        return None
    before = [r for t, r in history if t <= now - window_s + 1e-9]
    left = before[-1] if before else r0
    return left + rise * window_s / dt


def _per_request_work(cap: CapacityModel, role: Role, mix: Sequence[LengthBucket], hit_ratio: float
                      ) -> tuple[float, float]:
    """Mean and variance over requests of the work one request brings to ``role``: prefill seconds for
    prefill (and unified), KV-token-steps held while decoding (output x context) for decode."""
    total = sum(b.weight for b in mix)
    values: list[tuple[float, float]] = []
    for b in mix:
        if role == "decode":
            x = b.output_tokens * (b.input_tokens + b.output_tokens / 2)
        else:
            x = cap.prefill_seconds(b.input_tokens, hit_ratio)[0]
        values.append((b.weight / total, x))
    mean = sum(w * x for w, x in values)
    return mean, sum(w * (x - mean) ** 2 for w, x in values)


def mix_shift(cap: CapacityModel, role: Role, long_mix: Sequence[LengthBucket],
              recent_mix: Sequence[LengthBucket] | None, recent_requests: int, hit_ratio: float, z: float,
              min_ratio: float = 1.0, *, overloaded: bool = False) -> bool:
    """Whether the recent mix brings ``role`` more work per request than the long mix: by more than
    ``z`` standard errors of a mean over ``recent_requests`` requests drawn from the long mix, and by
    at least ``min_ratio`` (a real mix moves within minutes too: Azure's conversation trace has its
    30 s prefill work up to 1.3x its 5-minute mean, which a static pool absorbs).

    ``overloaded`` (the caller found that the pool serving now cannot carry the recent window's own
    work, its rate times its work per request) waives the margin: the margin is there so that a pool
    which absorbs a small move is not resized for it, and one that does not absorb it is overloaded
    already. A mix that is turning shows up here a tick or more before it clears the margin, and each
    tick of a pool short of work is a tick of backlog that outlives the shift by a start-up delay."""
    if not recent_mix or recent_requests < 2:
        return False
    mean, var = _per_request_work(cap, role, long_mix, hit_ratio)
    recent, _ = _per_request_work(cap, role, recent_mix, hit_ratio)
    se = math.sqrt(var / recent_requests) if var > 0 else 0.0
    margin = 1.0 if overloaded else max(min_ratio, 1.0)
    return recent > mean + z * se and recent > mean * max(margin, 1 + 1e-9)


def scale_down_step(current: int, lookback_need: int, floor: int, minimum: int, max_step: float) -> int:
    """Where one scale-down takes a pool of ``current``: to the largest need of the look-back (and
    never below the burst floor or the minimum), removing at most ``max_step`` of the pool (at least
    one instance). ``current`` when nothing may go."""
    goal = max(lookback_need, floor, minimum)
    if goal >= current:
        return current
    most = max(1, math.floor(current * max_step))
    return max(goal, current - most)
