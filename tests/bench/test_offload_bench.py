"""`tandem bench offload`'s named PrfaaS scenario, equal-cost budgets and the TPOT-bound decode."""

from __future__ import annotations

import statistics

import pytest

from tandem.bench.pd import PRFAAS, Budget, OffloadBench, lognormal_mix, plan_split, tpot_kv_cap
from tandem.perf.costmodel import CostModel
from tandem.perf.profile import load_profile


def test_prfaas_fills_what_was_not_given_and_explicit_flags_win() -> None:
    b = OffloadBench(scenario="prfaas", link_gbps=75.0)
    assert (b.mu, b.sigma, b.tail, b.output_tokens, b.slo_tpot) == (9.90, 1.0, "truncate", 1024, 0.025)
    assert (b.gpus, b.remote_gpu_cost, b.remote_share) == (32, 2.0, 0.5)
    assert b.link_gbps == 75.0 and PRFAAS["link_gbps"] != 75.0
    assert b.budget().splits() == [(8, 16)]  # 8 H200 (16 units) + 16 H20: the two pools cost the same
    assert OffloadBench().tail == "clip" and OffloadBench().remote_gpu_cost == 1.0  # custom keeps the defaults


def test_truncated_lognormal_is_prfaas_mix_and_clipping_is_not() -> None:
    kw = dict(mu=9.90, sigma=1.0, low=128, high=128_000, output_tokens=1024, seed=3)
    trunc = [r.input_tokens for r in lognormal_mix(4000, tail="truncate", **kw)]
    clip = [r.input_tokens for r in lognormal_mix(4000, tail="clip", **kw)]
    assert min(trunc) >= 128 and max(trunc) <= 128_000 and 128_000 not in trunc
    assert statistics.fmean(trunc) == pytest.approx(27_300, rel=0.05)  # e^10.4 x Phi(0.86) / Phi(1.86)
    assert statistics.fmean(clip) > statistics.fmean(trunc) * 1.05 and clip.count(128_000) > 50


def test_budget_prices_remote_gpus() -> None:
    assert Budget(10, 2.0).splits() == [(1, 8), (2, 6), (3, 4), (4, 2)]
    assert Budget(10, 1.0, remote_share=0.3).splits() == [(3, 7)]
    hom = plan_split("homogeneous", Budget(12, 2.0), [4000] * 50, "llama3-8b-h20", "llama3-8b-h200", 100.0, 256,
                     0.85)
    naive = plan_split("naive", Budget(12, 2.0), [4000] * 50, "llama3-8b-h20", "llama3-8b-h200", 100.0, 256, 0.85)
    assert hom[1] == 0 and hom[0] + hom[2] == 12
    assert naive[0] == 0 and naive[1] * 2 + naive[2] == 12
    with pytest.raises(SystemExit, match="gpus"):
        plan_split("selective", Budget(3, 2.0), [4000], "llama3-8b-h20", "llama3-8b-h200", 100.0, 256, 0.85)


def test_decode_kv_cap_keeps_a_full_step_within_the_tpot_slo() -> None:
    cost = CostModel.from_profile(load_profile("llama3-8b-h20"))
    cap = tpot_kv_cap("llama3-8b-h20", 0.025, 27_000, 1024)
    assert cost.decode_step_time(max(1, cap // 28_024), cap) <= 0.025
    assert cost.decode_step_time(max(1, (cap + 1024) // 28_024), cap + 1024) > 0.025
    assert tpot_kv_cap("llama3-8b-h20", 1.0, 27_000, 1024) == load_profile("llama3-8b-h20").kv_capacity_tokens


def test_unknown_scenario_names_are_refused() -> None:
    with pytest.raises(SystemExit, match="scenarios"):
        OffloadBench(scenarios="homogeneous,fast").scenario_list()
    assert OffloadBench(scenarios="selective_threshold, naive").scenario_list() == ["naive", "selective_threshold"]
