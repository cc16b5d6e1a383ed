"""The one definition of the latency statistics every bench and the demo report.

A quantile is the **nearest rank**: for ``q`` in [0, 1] over ``n`` samples, the sample of rank
``ceil(q * n)`` (1-based; rank 1 for q = 0) in ascending order. So p90 is the smallest sample that
at least 90 % of the samples do not exceed. Chosen over interpolation (numpy's default,
``np.percentile``, which two benches used while two others used an order statistic, so their p90s
differed) because:

* it is always a latency that was measured, never a value between two requests;
* an unserved request counts as ``inf`` and still ranks (it is the tail), where interpolating
  towards ``inf`` gives ``inf`` or NaN;
* it agrees with :func:`attainment` exactly: for q in (0, 1], ``quantile(xs, q) <= slo`` holds if
  and only if ``attainment(xs, slo) >= q``, so "p90 TTFT within the SLO" and "90 % attainment"
  never disagree.

An empty sample has no quantile (NaN). NaN is not a latency: it is refused, so a caller decides
what an unmeasured value means (drop it, or count it as ``inf``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction


def quantiles(values: Iterable[float], qs: Sequence[float]) -> list[float]:
    """The nearest-rank quantile of ``values`` for each of ``qs`` (one sort for all of them)."""
    ordered = sorted(values)
    if any(math.isnan(v) for v in ordered):
        raise ValueError("quantiles: NaN among the values (not a latency; drop it or count it as inf)")
    return [_nearest_rank(ordered, q) for q in qs]


def quantile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (see the module's docstring)."""
    return quantiles(values, (q,))[0]


def _nearest_rank(ordered: list[float], q: float) -> float:
    if not 0 <= q <= 1:
        raise ValueError(f"quantile: q must be in [0, 1], got {q}")
    if not ordered:
        return math.nan
    # q read to six decimals (0.7, not the binary 0.69999...; 99.9 / 100 as 0.999), so ceil(q * n) is exact:
    # 0.7 of 10 samples is rank 7, not 8.
    rank = math.ceil(Fraction(q).limit_denominator(1_000_000) * len(ordered))
    return ordered[max(1, rank) - 1]


def attainment(values: Iterable[float], limit: float, total: int | None = None) -> float:
    """The share of requests whose value is within ``limit`` (an SLO); 0 for no requests.

    ``total`` counts requests that have no value (failed, unserved) as misses: the share is of
    ``total``, not of the values given.
    """
    vals = list(values)
    n = len(vals) if total is None else total
    if n < len(vals):
        raise ValueError(f"attainment: total {n} is smaller than the {len(vals)} values")
    return sum(1 for v in vals if v <= limit) / n if n else 0.0
