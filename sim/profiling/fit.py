"""Least-squares fit of the cost model's coefficients to measured step times, and its error.

The step-time model (:mod:`tandem.perf.costmodel`) is linear in its coefficients except for the
roofline ``max(weight_read, per_token * n)``. Writing ``per_token = weight_read / n*`` with ``n*``
the batch size where the two meet, the model becomes linear for any fixed ``n*``:

    t = overhead + weight_read * max(1, n / n*) + attn_pair * A + kv_read * C

so the fit scans ``n*`` on a log grid, solves a non-negative least-squares problem for each, and
refines the best ``n*`` with a bounded scalar search. Residuals are relative (divided by the
measured time): step times span three decades, and the simulator cares about percentage error at
8 ms as much as at 5 s. The result is the global optimum up to the grid's resolution, without a
starting guess that could leave a local optimiser in the wrong regime.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar, nnls

from tandem.perf.costmodel import CostModel, attention_pairs
from tandem.perf.profile import CostParams, FitReport, Profile, ProfilePoint, RooflineEfficiency

# Crossover batch sizes scanned: from weight-bound everywhere to compute-bound everywhere.
_GRID = np.geomspace(1.0, 1e6, 241)


class FitError(ValueError):
    """Too few or degenerate points to determine the coefficients."""


def _features(points: Sequence[ProfilePoint]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per point: tokens through the linear layers, attention pairs, decode context tokens, seconds."""
    n = np.array([p.new_tokens if p.kind == "prefill" else p.batch for p in points], dtype=float)
    pairs = np.array([attention_pairs(p.new_tokens, p.cached_tokens) if p.kind == "prefill" else 0.0
                      for p in points], dtype=float)
    ctx = np.array([p.context_tokens if p.kind == "decode" else 0 for p in points], dtype=float)
    t = np.array([p.seconds for p in points], dtype=float)
    return n, pairs, ctx, t


def _solve(n_star: float, n: np.ndarray, pairs: np.ndarray, ctx: np.ndarray,
           t: np.ndarray) -> tuple[float, np.ndarray]:
    """Relative-residual NNLS for a fixed crossover; returns (sum of squared rel. errors, coefs)."""
    a = np.column_stack([np.ones_like(n), np.maximum(1.0, n / n_star), pairs, ctx]) / t[:, None]
    # Columns differ by many orders of magnitude (1 vs 1e9 pairs): scale them for conditioning.
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    coef, rnorm = nnls(a / scale, np.ones_like(t))
    return float(rnorm**2), coef / scale


def fit_params(points: Sequence[ProfilePoint]) -> CostParams:
    """Coefficients minimising the squared relative error over prefill and decode points together."""
    kinds = {p.kind for p in points}
    if kinds != {"prefill", "decode"} or len(points) < 6:
        raise FitError("need at least 6 points, with both prefill and decode measurements")
    n, pairs, ctx, t = _features(points)
    if not (pairs > 0).any() or not (ctx > 0).any():
        raise FitError("need prefill points with attention pairs and decode points with context")
    losses = [_solve(s, n, pairs, ctx, t)[0] for s in _GRID]
    i = int(np.argmin(losses))
    lo, hi = np.log(_GRID[max(i - 1, 0)]), np.log(_GRID[min(i + 1, len(_GRID) - 1)])
    best = minimize_scalar(lambda x: _solve(float(np.exp(x)), n, pairs, ctx, t)[0],
                           bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    n_star = float(np.exp(best.x)) if best.fun <= losses[i] else float(_GRID[i])
    _, (overhead, weight_read, attn_pair, kv_read) = _solve(n_star, n, pairs, ctx, t)
    return CostParams(
        step_overhead_s=float(overhead),
        weight_read_s=float(weight_read),
        per_token_s=float(weight_read / n_star),
        attn_pair_s=float(attn_pair),
        kv_read_s_per_token=float(kv_read),
    )


def predict(params: CostParams, point: ProfilePoint) -> float:
    """The cost model's time for one measured point (kv_bytes_per_token plays no part here)."""
    model = CostModel(params, kv_bytes_per_token=0)
    if point.kind == "prefill":
        return model.prefill_time(point.new_tokens, point.cached_tokens)
    return model.decode_step_time(point.batch, point.context_tokens)


def mape(params: CostParams, points: Sequence[ProfilePoint]) -> float:
    """Mean absolute percentage error (in percent) of ``params`` over ``points``; 0 for no points."""
    if not points:
        return 0.0
    errors = [abs(predict(params, p) - p.seconds) / p.seconds for p in points]
    return 100.0 * sum(errors) / len(errors)


def split_mape(params: CostParams, points: Sequence[ProfilePoint]) -> tuple[float, float]:
    prefill = [p for p in points if p.kind == "prefill"]
    decode = [p for p in points if p.kind == "decode"]
    return mape(params, prefill), mape(params, decode)


def fit_report(params: CostParams, roofline: CostParams | None, points: Sequence[ProfilePoint]) -> FitReport:
    """Fit error of ``params`` and, for comparison, of a roofline estimate on the same points."""
    prefill, decode = split_mape(params, points)
    roof_prefill = roof_decode = None
    if roofline is not None:
        roof_prefill, roof_decode = split_mape(roofline, points)
    return FitReport(prefill_mape=prefill, decode_mape=decode,
                     roofline_prefill_mape=roof_prefill, roofline_decode_mape=roof_decode)




def calibrate_roofline(profiles: Sequence[Profile]) -> RooflineEfficiency:
    """Efficiencies that make the roofline closest (mean MAPE) to the measured points of ``profiles``.

    Each profile's GPUSpec holds its measured ceilings, so the efficiencies are relative to what
    the GPU achieves, not to its datasheet. Searched in log space (positive by construction) by
    Nelder-Mead from a neutral start; the objective is cheap, vectorised over the points.
    """
    if not profiles or any(not p.points for p in profiles):
        raise FitError("calibration needs profiles with measured points")
    cases = []
    for prof in profiles:
        n, pairs, ctx, t = _features(prof.points)
        flops, bw, m = prof.gpu.bf16_tflops * 1e12, prof.gpu.hbm_gbps * 1e9, prof.model
        cases.append((n, pairs, ctx, t, flops, bw, m.weight_bytes, m.flops_per_token,
                      m.attention_flops_per_pair, m.kv_bytes_per_token))

    def loss(x: np.ndarray) -> float:
        compute, attention, bandwidth, overhead = np.exp(x)
        total = 0.0
        for n, pairs, ctx, t, flops, bw, weights, fpt, fpp, kvb in cases:
            pred = (overhead + np.maximum(weights / (bw * bandwidth), n * fpt / (flops * compute))
                    + pairs * fpp / (flops * attention) + ctx * kvb / (bw * bandwidth))
            total += float(np.mean(np.abs(pred - t) / t))
        return total / len(cases)

    start = np.log([0.5, 0.5, 0.5, 1e-3])
    best = minimize(loss, start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 5000})
    compute, attention, bandwidth, overhead = np.exp(best.x)
    return RooflineEfficiency(compute=min(1.0, compute), attention=min(1.0, attention),
                              bandwidth=min(1.0, bandwidth), step_overhead_s=overhead)
