"""Capacity search shared by the benchmarks: the highest rate at which a replay still meets its SLO."""

from __future__ import annotations

from collections.abc import Callable


def search_capacity(ok: Callable[[float], bool], start: float, tolerance: float) -> tuple[float, bool]:
    """Highest rate with ``ok(rate)``, assuming ok is monotone: a geometric ramp, then bisection.

    Returns the rate (0 when even the lowest tried fails) and whether a failing rate was found
    above it; without one the figure is only a lower bound (e.g. a trace slice too small to load
    the pool).
    """
    lo: float | None = None
    hi: float | None = None
    q = start
    if ok(q):
        lo = q
        while hi is None and q < 1e4:
            q *= 1.5
            if ok(q):
                lo = q
            else:
                hi = q
    else:
        hi = q
        while lo is None and q > 1e-3:
            q /= 1.5
            if ok(q):
                lo = q
            else:
                hi = q
    if lo is not None and hi is not None:
        while (hi - lo) / lo > tolerance:
            mid = (lo + hi) / 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
    return (lo or 0.0), hi is not None
