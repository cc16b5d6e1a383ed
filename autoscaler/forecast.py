"""Short-term forecast of the arrival rate: Holt's linear trend plus an error variance.

New replicas take ``startup_delay`` to become ready, so pools are sized for the rate expected
one start-up delay ahead, at a high quantile (level + trend x horizon + z x sigma) rather than
for the rate just observed. sigma comes from an EWMA of squared one-step forecast errors, which
absorbs both burstiness and the sampling noise of a short window.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from tandem.autoscaler.models import ForecastState


def update(state: ForecastState, rate: float, time_s: float, alpha: float, beta: float) -> ForecastState:
    if state.time_s is None:
        return ForecastState(level=rate, trend=0.0, variance=rate, time_s=time_s)
    dt = time_s - state.time_s
    if dt <= 0:
        return state
    predicted = max(0.0, state.level + state.trend * dt)
    error = rate - predicted
    level = alpha * rate + (1 - alpha) * predicted
    trend = beta * (level - state.level) / dt + (1 - beta) * state.trend
    variance = (1 - alpha) * state.variance + alpha * error * error
    return ForecastState(level=level, trend=trend, variance=variance, time_s=time_s)


def quantile(state: ForecastState, horizon_s: float, q: float, window_s: float) -> float:
    """The ``q`` quantile of the mean rate ``horizon_s`` ahead; a falling trend is not extrapolated.

    Counting on a decline that has not happened yet would release capacity before the load
    actually drops; scale-down is left to the stabilization window instead. The one-step errors
    include the Poisson noise of counting arrivals in a ``window_s`` window (variance
    ``rate / window``); that part is removed, because the queueing model already prices Poisson
    burstiness - counting it twice would buy the same headroom twice.
    """
    mean = state.level + max(state.trend, 0.0) * horizon_s
    z = NormalDist().inv_cdf(q)
    shifts = max(0.0, state.variance - max(state.level, 0.0) / window_s)
    return max(0.0, mean + z * math.sqrt(shifts))
