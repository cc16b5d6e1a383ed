"""``tandem.bench.stats``: the one quantile definition (nearest rank) and attainment, on hand-made data."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem.bench.stats import attainment, quantile, quantiles

TEN = [7.0, 3.0, 10.0, 1.0, 5.0, 9.0, 2.0, 8.0, 4.0, 6.0]  # 1..10, shuffled


def test_nearest_rank_on_ten_samples() -> None:
    assert quantiles(TEN, (0.0, 0.1, 0.5, 0.7, 0.9, 0.91, 0.99, 1.0)) == [1, 1, 5, 7, 9, 10, 10, 10]


def test_not_interpolated() -> None:
    # np.percentile([1, 2, 3, 4], 50) is 2.5, a latency nobody saw; nearest rank answers a sample.
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0], 0.9) == 2.0


def test_tail_quantiles_of_a_thousand() -> None:
    values = [float(i) for i in range(1, 1001)]
    random.Random(1).shuffle(values)
    # 0.999 and 99.9 / 100 (0.9990000000000001 as a float) are both rank 999, not 1000.
    assert quantiles(values, (0.5, 0.99, 0.999, 99.9 / 100)) == [500.0, 990.0, 999.0, 999.0]


def test_unserved_requests_rank_last_as_inf() -> None:
    values = [0.2, math.inf, 0.1, 0.3]
    assert quantiles(values, (0.5, 0.75, 0.9)) == [0.2, 0.3, math.inf]


def test_empty_has_no_quantile_and_nan_or_bad_q_are_refused() -> None:
    assert math.isnan(quantile([], 0.5))
    with pytest.raises(ValueError, match="NaN"):
        quantile([1.0, math.nan], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantile([1.0], 99)


def test_attainment_counts_the_limit_as_met_and_missing_values_as_missed() -> None:
    values = [0.1, 0.5, 1.0, math.inf]
    assert attainment(values, 0.5) == 0.5
    assert attainment(values, 0.5, total=8) == 0.25  # four more requests failed: they miss the SLO
    assert attainment([], 1.0) == 0.0 and attainment([], 1.0, total=3) == 0.0
    with pytest.raises(ValueError, match="total"):
        attainment(values, 0.5, total=2)


@given(st.lists(st.integers(0, 20), min_size=1, max_size=60), st.integers(1, 100), st.integers(0, 20))
def test_quantile_within_slo_iff_attainment_reaches_it(ints: list[int], percent: int, slo: int) -> None:
    values = [float(v) for v in ints]
    q = percent / 100
    assert (quantile(values, q) <= slo) == (attainment(values, slo) >= q)
