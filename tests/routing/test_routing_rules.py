"""DualMap's rules on hand-built states: key depth, rings, the SLO switch, late binding, migration."""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable

import pytest
from pydantic import ValidationError

from tandem.blockcache import BlockCache
from tandem.perf.costmodel import CostModel
from tandem.perf.costmodel import attention_pairs as chunk_pairs
from tandem.perf.profile import load_profile
from tandem.router.routing.capabilities import AdaptivelyKeyed, DualRinged, LateBinding, Migrating
from tandem.router.routing.config import (
    ConsistentHashParams,
    DualMapParams,
    KeyParams,
    NoParams,
    PrefixTreeParams,
    RoutingConfig,
    SchedulerParams,
)
from tandem.router.routing.dualmap import DualMapPolicy
from tandem.router.routing.keys import AdaptiveKeyer
from tandem.router.routing.registry import POLICIES, make_policy
from tandem.router.routing.rings import DualRing
from tandem.router.routing.scheduler import QueueFullError, Scheduler
from tandem.router.routing.types import (
    ClusterView,
    Decision,
    InstanceState,
    NoInstanceError,
    PrefillCost,
    RouteRequest,
    attention_pairs,
)

T = 2.0**-10  # seconds per token: a power of two, so estimates at the threshold are exact
BS = 512


def inst(iid: str, pending: int = 0, cache: int = 1_000_000) -> InstanceState:
    s = InstanceState(iid, T, BlockCache(cache))
    s.inflight_miss_tokens = pending
    return s


def req(rid: str, prompt: int, hashes: Iterable[int] = (), arrival: float = 0.0, fallback: int = 0) -> RouteRequest:
    return RouteRequest(rid, prompt, tuple(hashes), BS, arrival, fallback_key=fallback or hash(rid))


def cache_blocks(s: InstanceState, hashes: Iterable[int]) -> None:
    hs = list(hashes)
    s.shadow.insert(hs, [BS] * len(hs))


# ----- SLO-aware choice -------------------------------------------------------------------------
def test_slo_switch_flips_exactly_above_alpha_times_slo() -> None:
    pol = DualMapPolicy(DualMapParams(slo_ttft_s=5.0, alpha=0.5))  # threshold 2.5 s = 2560 tokens
    r = req("r", 2 * BS + 1, [11, 12])  # a caches both blocks: miss 1 token; b misses all 1025
    a, b = inst("a"), inst("b")
    cache_blocks(a, [11, 12])
    a.inflight_miss_tokens = 2559  # estimate (2559 + 1) x T = exactly 2.5 s: not above
    d = pol.decide(r, 1, a, b)
    assert (d.instance_id, d.reason) == ("a", "affinity")
    assert d.estimates["a"] == 2.5
    a.inflight_miss_tokens = 2560  # one token more: above alpha x SLO, b's estimate is lower
    d = pol.decide(r, 1, a, b)
    assert (d.instance_id, d.reason) == ("b", "slo_switch")
    assert d.hit_tokens == 0
    b.inflight_miss_tokens = 5000  # b is worse still: the switch keeps the lower estimate (a)
    d = pol.decide(r, 1, a, b)
    assert (d.instance_id, d.reason) == ("a", "affinity")


def test_slo_switch_uses_the_requests_own_slo_when_it_has_one() -> None:
    """SLOs that grow with the prompt (2 s + 1 ms per token, as in PrfaaS-style offload): a request
    is judged against its own, not the pool's one number."""
    from dataclasses import replace

    pol = DualMapPolicy(DualMapParams(slo_ttft_s=5.0, alpha=0.5))  # the pool's threshold: 2.5 s
    r = req("r", 2 * BS + 1, [11, 12])
    a, b = inst("a", pending=3071), inst("b")
    cache_blocks(a, [11, 12])  # a's estimate: 3072 T = 3 s, above 2.5 s
    assert pol.decide(r, 1, a, b).reason == "slo_switch"
    assert pol.decide(replace(r, slo_ttft_s=6.0), 1, a, b).reason == "affinity"  # 3 s = 0.5 x its 6 s
    assert pol.decide(replace(r, slo_ttft_s=5.998), 1, a, b).reason == "slo_switch"


def test_larger_hit_wins_and_ties_go_to_less_load() -> None:
    pol = DualMapPolicy()
    a, b = inst("a", pending=100), inst("b", pending=50)
    r = req("r", 3 * BS, [1, 2, 3])
    assert pol.decide(r, 1, a, b).instance_id == "b"  # same (zero) hit: less load
    cache_blocks(a, [1])
    d = pol.decide(r, 1, a, b)
    assert (d.instance_id, d.hit_tokens) == ("a", BS)
    cache_blocks(b, [1, 2])
    assert pol.decide(r, 1, a, b).instance_id == "b"


# ----- the TTFT estimate's cost-model terms ----------------------------------------------------
A = 2.0**-20  # seconds per attention pair (a power of two: the sums below are exact)


def test_estimate_matches_the_engine_cost_model_for_a_prompt_prefilled_alone() -> None:
    cost = CostModel.from_profile(load_profile("llama3-8b-h100"))
    chunk = 8192
    per_token, extra = PrefillCost.from_cost_model(cost, chunk, 450_000)
    s = InstanceState("a", per_token, BlockCache(1_000_000), extra)
    for hit, miss in ((0, 3 * chunk), (5 * BS, 2 * chunk)):
        # the engine: full chunks, each after the tokens computed so far (cached ones included)
        engine = sum(cost.step_time(chunk, chunk_pairs(chunk, hit + k * chunk), 0, 0) for k in range(miss // chunk))
        cache_blocks(s, range(1, hit // BS + 1))
        est = s.ttft_estimate(req("r", hit + miss, range(1, (hit + miss) // BS + 1)))
        assert est == pytest.approx(engine, rel=1e-9)
        assert attention_pairs(miss, hit) == sum(chunk_pairs(chunk, hit + k * chunk) for k in range(miss // chunk))


def test_one_long_prompt_pending_weighs_more_than_the_same_tokens_in_short_ones() -> None:
    """Attention is quadratic: 8 x 8k tokens queued is not the same wait as one 64k prompt."""
    cfg = SchedulerParams(slo_ttft_s=5.0, alpha=0.5)
    long_, short = inst("long"), inst("short")
    long_.cost = short.cost = PrefillCost(attn_pair_s=A)
    sched = Scheduler(TablePolicy({"l": ("long", "long"), "s": ("short", "short")}),
                      ClusterView({"long": long_, "short": short}), cfg)
    sched.submit(req("l0", 64 * 1024), 0.0)
    for k in range(8):
        sched.submit(req(f"s{k}", 8 * 1024), 0.0)
    assert long_.pending_miss_tokens == short.pending_miss_tokens == 64 * 1024
    assert long_.pending_attn_pairs == attention_pairs(64 * 1024, 0)
    assert short.pending_attn_pairs == 8 * attention_pairs(8 * 1024, 0)
    assert long_.pending_s == 64 * 1024 * T + attention_pairs(64 * 1024, 0) * A  # 64 + 2048 s
    assert short.pending_s == 64 * 1024 * T + 8 * attention_pairs(8 * 1024, 0) * A  # 64 + 256 s
    # With the published linear estimate (no attention term) the two look the same.
    assert inst("x", pending=64 * 1024).pending_s == 64 * 1024 * T


def test_slo_switch_sees_the_running_batch_that_shares_every_chunk() -> None:
    """Each chunk also carries a token of every running sequence and reads their KV."""
    pol = DualMapPolicy(DualMapParams(slo_ttft_s=5.0, alpha=0.5))  # threshold 2.5 s
    cost = PrefillCost(chunk_tokens=1024, decode_seq_s=2.0**-12, decode_context_s=2.0**-22, kv_capacity_tokens=2**14)
    r = req("r", 2 * BS + 1, [11, 12])
    a, b = inst("a", pending=2559), inst("b", pending=1000)
    a.cost = b.cost = cost
    cache_blocks(a, [11, 12])
    assert pol.decide(r, 1, a, b).reason == "affinity"  # idle engine: 2560 T = exactly 2.5 s
    a.engine_running = 4  # 4 sequences x 2^-12 s per 1024-token chunk: + 2^-20 s per prefill token
    assert a.s_per_token() == T + 2.0**-20
    d = pol.decide(r, 1, a, b)
    assert (d.instance_id, d.reason) == ("b", "slo_switch") and d.estimates["a"] == 2560 * (T + 2.0**-20)
    a.engine_running, a.kv_usage = 0, 0.25  # 2^12 context tokens x 2^-22 s per chunk: the same 2^-20 s per token
    assert pol.decide(r, 1, a, b).estimates["a"] == 2560 * (T + 2.0**-20)
    assert pol.decide(r, 1, a, b).estimates["b"] == 1000 * T + (2 * BS + 1) * T  # idle b: the linear estimate


def test_attention_pairs_follow_requests_through_queue_flight_and_migration() -> None:
    sched, a, b = _hot_pair(b_pending=0)
    a.cost = b.cost = PrefillCost(attn_pair_s=A)
    cache_blocks(b, [77])
    sched.submit(req("s1", 1000, [77]), 0.0)
    assert a.queued_attn_pairs == attention_pairs(1000, 0)
    assert [m.target for m in sched.rebalance(3.0)] == ["b"]  # the queue is 3 s old: a is hot
    assert (a.queued_attn_pairs, b.queued_attn_pairs) == (0, attention_pairs(1000 - BS, BS))
    b.unprefilled_requests = 0
    assert [r.request_id for r, _ in sched.release(3.0)] == ["s1"]
    assert (b.queued_attn_pairs, b.inflight_attn_pairs) == (0, attention_pairs(1000 - BS, BS))
    sched.on_first_token("s1")
    assert b.inflight_attn_pairs == 0


def test_dispatch_budget_counts_attention() -> None:
    a = inst("a")
    a.cost = PrefillCost(attn_pair_s=A)
    sched = Scheduler(TablePolicy({"r": ("a", "a")}), ClusterView({"a": a}),
                      SchedulerParams(dispatch_budget_s=2000 * T + 2 * attention_pairs(800, 0) * A))
    for k in range(4):
        sched.submit(req(f"r{k}", 800, arrival=k), k)
    assert len(sched.release(5.0)) == 2  # 1600 tokens and their pairs fit; a third would not
    a.cost = PrefillCost(attn_pair_s=2 * A)
    assert len(sched.release(5.0)) == 0


def test_prefill_queue_order_releases_the_shortest_estimated_prefill_first() -> None:
    a = inst("a")
    cache_blocks(a, [1, 2, 3])
    table = TablePolicy({"r": ("a", "a")})
    reqs = [req("r0", 6 * BS, [1, 2, 3, 4, 5, 6], arrival=0.0),  # hit 3 blocks, miss 3
            req("r1", 2 * BS, [8, 9], arrival=1.0),  # no hit, miss 2: shortest prefill
            req("r2", 4 * BS, [1, 2, 3, 7], arrival=2.0),  # hit 3 blocks, miss 1 block: shortest
            req("r3", 2 * BS, [10, 11], arrival=3.0)]  # ties r1 on cost: arrival breaks it
    orders = {}
    for name, order, weight in (("hit", "hit", 10.0), ("prefill", "prefill", 10.0), ("aged", "prefill", 1.0)):
        cfg = SchedulerParams(queue_order=order, prefill_order_weight=weight, dispatch_budget_s=0.0)
        s = inst("a")
        cache_blocks(s, [1, 2, 3])
        sched = Scheduler(table, ClusterView({"a": s}), cfg)
        for r in reqs:
            sched.submit(r, r.arrival)
        orders[name] = [r.request_id for r in sched.queued("a")]
        assert [r.request_id for r, _ in sched.release(4.0)] == orders[name][:1]
    assert orders["hit"] == ["r0", "r2", "r1", "r3"]  # the paper's order: longest hit, then arrival
    # rank = arrival + 10 x prefill seconds (1536, 1024, 512, 1024 tokens x T): 15.0, 11.0, 7.0, 13.0
    assert orders["prefill"] == ["r2", "r1", "r3", "r0"]
    # weight 1: 1.5, 2.0, 2.5, 4.0. r0's 1.5 s prefill is overtaken only by requests arriving < 1.5 s x 1
    # after it with no prefill at all: none here, so nothing overtakes anything (no starvation)
    assert orders["aged"] == ["r0", "r1", "r2", "r3"]


# ----- adaptive key -----------------------------------------------------------------------------
def test_adaptive_depth_expands_then_shrinks() -> None:
    keyer = AdaptiveKeyer(KeyParams(key_window=50, key_expand_share=0.06, key_shrink_share=0.02))  # > 3, < 1
    hot = [lambda i: req(f"h{i}", 4 * BS, [100, 200, 1000 + i, 5000 + i])]
    keys = [keyer.observe(hot[0](i)) for i in range(6)]
    assert keys[:4] == [200] * 4  # depth 2 until the prefix exceeds 6% of the window (3 requests)
    assert keys[4] == 1004 and keys[5] == 1005  # then one block deeper: the prefix splits
    assert keyer.key(hot[0](99)) == (1099, 3)
    assert 200 in keyer.expanded
    # Other traffic pushes the hot prefix out of the window: under 2% the expansion is undone.
    for i in range(50):
        keyer.observe(req(f"o{i}", 3 * BS, [100, 300 + i, 9000 + i]))
    assert 200 not in keyer.expanded
    assert keyer.key(hot[0](7)) == (200, 2)


def test_key_depth_is_at_least_two_and_short_prompts_use_the_fallback() -> None:
    keyer = AdaptiveKeyer(KeyParams())
    assert keyer.key(req("a", 3 * BS, [1, 2, 3])) == (2, 2)
    assert keyer.key(req("b", BS + 10, [1], fallback=777)) == (777, 0)
    assert keyer.key(req("c", 10, [], fallback=778)) == (778, 0)
    # A prefix that cannot go deeper stays at its full depth even when hot.
    for i in range(50):
        keyer.observe(req(f"d{i}", 2 * BS, [1, 2]))
    assert keyer.key(req("e", 2 * BS, [1, 2])) == (2, 2)


def test_key_thresholds_validated() -> None:
    # The check lives with the key's parameters: the keyed policies' models and the flat one all run it.
    for model in (RoutingConfig, DualMapParams, ConsistentHashParams, KeyParams):
        with pytest.raises(ValidationError, match="key_shrink_share"):
            model(key_expand_share=0.02, key_shrink_share=0.05)
    with pytest.raises(ValidationError, match="vnodes"):
        RoutingConfig(vnodes=20)


def test_each_policy_gets_only_its_own_parameters_from_the_flat_config() -> None:
    flat = RoutingConfig(alpha=0.3, vnodes=150, ring_seed=9, key_window=50, cache_threshold=0.2, hotspot_wait_s=1.0)
    dm = make_policy("dualmap", flat)
    assert type(dm.params) is DualMapParams
    assert dm.params == DualMapParams(alpha=0.3, vnodes=150, ring_seed=9, key_window=50)
    assert dm.rings.a.vnodes == 150 and dm.params.slo_budget_s == pytest.approx(1.5)
    ch = make_policy("consistent_hash", flat)
    assert ch.params == ConsistentHashParams(vnodes=150, ring_seed=9, key_window=50) and ch.ring.vnodes == 150
    assert make_policy("prefix_tree", flat).params == PrefixTreeParams(cache_threshold=0.2)
    assert all(make_policy(n, flat).params == NoParams() for n in ("round_robin", "least_request", "min_ttft"))
    # Every flat setting belongs to some part, and a part's model refuses the others' settings.
    parts = (SchedulerParams, DualMapParams, ConsistentHashParams, PrefixTreeParams)
    assert set(RoutingConfig.model_fields) == set().union(*(p.model_fields for p in parts))
    assert "hotspot_wait_s" not in DualMapParams.model_fields and "alpha" not in ConsistentHashParams.model_fields
    with pytest.raises(ValidationError, match="cache_threshold"):
        DualMapParams(cache_threshold=0.2)
    with pytest.raises(ValidationError, match="alpha"):
        NoParams(alpha=0.3)


# ----- rings ------------------------------------------------------------------------------------
def test_candidates_are_distinct_and_collisions_take_ring_b_next_distinct() -> None:
    ring = DualRing(vnodes=128)
    ids = [f"i{k}" for k in range(5)]
    ring.sync(ids)
    collisions = 0
    for key in range(3000):
        a, b = ring.candidates(key, lambda _: True)
        assert a != b
        assert a == ring.a.owner(key)
        if ring.b.owner(key) == a:
            collisions += 1
            assert b == next(o for o in ring.b.walk(key) if o != a)
        else:
            assert b == ring.b.owner(key)
    assert 200 < collisions < 1000  # about 1/N of keys collide with N=5


def test_candidates_skip_unusable_instances() -> None:
    ring = DualRing(vnodes=100)
    ring.sync(["x", "y", "z"])
    assert ring.candidates(7, lambda o: o == "y") == ("y", "y")
    assert ring.candidates(7, lambda o: False) is None
    a, b = ring.candidates(7, lambda o: o != "x")
    assert {a, b} == {"y", "z"}


@pytest.mark.parametrize("n", [4, 16])
def test_adding_one_instance_moves_about_two_over_n_plus_one_of_keys(n: int) -> None:
    ring = DualRing(vnodes=160, seed=3)
    ring.sync(f"i{k}" for k in range(n))
    keys = [random.Random(k).getrandbits(64) for k in range(20000)]
    before = [ring.candidates(k, lambda _: True) for k in keys]
    ring.add("new")
    after = [ring.candidates(k, lambda _: True) for k in keys]
    moved = sum(1 for x, y in zip(before, after, strict=True) if set(x) != set(y)) / len(keys)
    expected = 2 / (n + 1)
    assert 0.6 * expected < moved < 1.4 * expected
    ring.remove("new")  # incremental: removal restores the previous mapping exactly
    assert [ring.candidates(k, lambda _: True) for k in keys] == before


# ----- DualMap end to end on a view -------------------------------------------------------------
def test_dualmap_same_prefix_same_candidates_and_no_instance_error() -> None:
    cluster = ClusterView({f"i{k}": inst(f"i{k}") for k in range(8)})
    pol = DualMapPolicy()
    d1 = pol.choose(req("a", 4 * BS, [1, 2, 3, 4]), cluster)
    d2 = pol.choose(req("b", 4 * BS, [1, 2, 30, 40]), cluster)
    assert d1.candidates == d2.candidates and len(set(d1.candidates)) == 2
    # A retry view without the first choice neither rebuilds the rings nor picks the excluded one.
    first = d1.instance_id
    subset = ClusterView({k: v for k, v in cluster.instances.items() if k != first})
    assert pol.choose(req("c", 4 * BS, [1, 2, 3, 4]), subset).instance_id != first
    assert len(pol.rings) == 8
    for s in cluster.instances.values():
        s.healthy = False
    with pytest.raises(NoInstanceError):
        pol.choose(req("c", 4 * BS, [1, 2, 3, 4]), cluster)


# ----- scheduler: accounting, late binding, bounds ----------------------------------------------
class TablePolicy:
    """A real (deterministic) policy for hand-built scheduler states: request id prefix -> instance."""

    name = "table"
    reasons = ("table",)
    late_binding = True

    def __init__(self, table: dict[str, tuple[str, str]]) -> None:
        self.table = table

    def on_membership(self, instance_ids: Iterable[str]) -> None:
        pass

    def choose(self, r: RouteRequest, cluster: ClusterView) -> Decision:
        a, b = self.table[r.request_id[0]]
        if a not in cluster.instances:
            a = b
        return Decision(a, "table", (a, b), hit_tokens=cluster[a].hit_tokens(r))

    def alternatives(self, decision: Decision, cluster: ClusterView, exclude: Collection[str]) -> list[str]:
        return [c for c in decision.candidates if c not in exclude]


def test_accounting_returns_to_zero_and_release_order_is_longest_hit_then_arrival() -> None:
    a = inst("a")
    cluster = ClusterView({"a": a})
    cache_blocks(a, [1, 2])
    sched = Scheduler(TablePolicy({"r": ("a", "a")}), cluster,
                      SchedulerParams(dispatch_budget_s=0.0, queue_order="hit"))
    sched.submit(req("r0", 1000, [], arrival=0.0), 0.0)
    sched.submit(req("r1", 3 * BS, [1, 9, 10], arrival=1.0), 1.0)
    sched.submit(req("r2", 3 * BS, [1, 2, 11], arrival=2.0), 2.0)
    assert a.queued_requests == 3 and a.queued_miss_tokens == 1000 + 2 * BS + BS
    out = sched.release(2.0)  # budget: one un-prefilled request at a time
    assert [r.request_id for r, _ in out] == ["r2"]
    assert sched.release(2.0) == []
    sched.on_first_token("r2")
    assert [r.request_id for r, _ in sched.release(2.1)] == ["r1"]
    assert a.inflight_miss_tokens == 2 * BS and a.unprefilled_requests == 1
    assert sched.cancel("r0") and not sched.cancel("r0")
    sched.on_failed("r1")
    sched.on_finished("r2")
    assert (a.queued_miss_tokens, a.inflight_miss_tokens, a.queued_requests, a.inflight_requests,
            a.unprefilled_requests, sched.queued_total, len(sched)) == (0, 0, 0, 0, 0, 0, 0)


def test_token_budget_releases_more_than_one() -> None:
    a = inst("a")
    sched = Scheduler(TablePolicy({"r": ("a", "a")}), ClusterView({"a": a}),
                      SchedulerParams(dispatch_budget_s=2000 * T))
    for k in range(4):
        sched.submit(req(f"r{k}", 800, arrival=k), k)
    # first always; then while in-flight uncached tokens stay within 2000: 800 + 800 fits, 2400 does not
    assert len(sched.release(5.0)) == 2


def test_baselines_release_immediately_and_queues_are_bounded() -> None:
    a = inst("a")
    sched = Scheduler(TablePolicy({"r": ("a", "a")}), ClusterView({"a": a}),
                      SchedulerParams(late_binding=False, max_queued_per_instance=2, max_queued_total=3))
    sched.submit(req("r0", 100), 0)
    sched.submit(req("r1", 100), 0)
    with pytest.raises(QueueFullError) as exc:
        sched.submit(req("r2", 100), 0)
    assert exc.value.scope == "instance"
    assert len(sched.release(0)) == 2
    with pytest.raises(ValueError, match="already scheduled"):
        sched.submit(req("r0", 100), 0)


def test_resubmit_with_exclusion_avoids_the_failed_instance() -> None:
    cluster = ClusterView({"a": inst("a"), "b": inst("b")})
    sched = Scheduler(TablePolicy({"r": ("a", "b")}), cluster, SchedulerParams(late_binding=False))
    assert sched.submit(req("r0", 100), 0).instance_id == "a"
    sched.release(0)
    sched.on_failed("r0")
    assert sched.submit(req("r0", 100), 1, exclude=("a",)).instance_id == "b"


# ----- hotspot migration ------------------------------------------------------------------------
def _hot_pair(b_pending: int) -> tuple[Scheduler, InstanceState, InstanceState]:
    a, b = inst("a", pending=3000), inst("b", pending=b_pending)
    a.unprefilled_requests = b.unprefilled_requests = 1  # nothing gets released: all stays queued
    cluster = ClusterView({"a": a, "b": b})
    cfg = SchedulerParams(slo_ttft_s=5.0, alpha=0.75, dispatch_budget_s=0.0)  # hot above 3840 pending tokens
    return Scheduler(TablePolicy({"r": ("a", "b"), "s": ("a", "b")}), cluster, cfg), a, b


def test_migration_moves_the_best_gain_first_and_stops_when_gain_is_not_positive() -> None:
    sched, a, b = _hot_pair(b_pending=3200)
    cache_blocks(b, [77])
    sched.submit(req("r1", 1000), 0.0)
    sched.submit(req("s2", 1000, [77]), 0.0)  # b has its first block: 488 uncached tokens there
    assert sched.is_hot(a, 0.0)
    # gains: stay = (3000 + 2000) T; r1 -> b: 5000 - 4200 = 800 T; s2 -> b: 5000 - 3688 = 1312 T
    moves = sched.rebalance(0.0)
    assert [(m.request_id, m.source, m.target) for m in moves] == [("s2", "a", "b")]
    assert moves[0].gain_s == pytest.approx(1312 * T)
    # after the move r1 would gain 4000 - (3688 + 1000) < 0 (and push b over the threshold): it stays
    assert sched.instance_of("r1") == "a" and sched.instance_of("s2") == "b"
    assert (a.queued_miss_tokens, b.queued_miss_tokens) == (1000, 488)
    assert sched.rebalance(0.5) == []


def test_no_migration_onto_an_instance_that_is_or_would_become_hot() -> None:
    sched, a, b = _hot_pair(b_pending=3500)
    cache_blocks(b, [77])
    sched.submit(req("s2", 1000, [77]), 0.0)  # gain 4000 - 3988 > 0, but b would hold 3988 > 3840
    assert sched.is_hot(a, 0.0) and not sched.is_hot(b, 0.0)
    assert sched.rebalance(0.0) == []
    for b_pending, moved in ((3841, False), (2000, True)):  # b hot by tokens / cold; a hot by wait
        sched, a, b = _hot_pair(b_pending=b_pending)
        sched.submit(req("r1", 10), 0.0)
        assert sched.is_hot(a, 3.0) and sched.is_hot(b, 3.0) != moved
        assert [m.target for m in sched.rebalance(3.0)] == (["b"] if moved else [])


def test_no_migration_at_zero_gain_or_when_not_hot() -> None:
    sched, _a, _ = _hot_pair(b_pending=3000)
    sched.submit(req("r1", 1000), 0.0)  # stay 4000 T, at b (3000 + 1000) T: gain exactly 0
    assert sched.rebalance(0.0) == []
    sched2, a2, _ = _hot_pair(b_pending=0)
    a2.inflight_miss_tokens = 500
    sched2.submit(req("r1", 1000), 0.0)  # 1500 pending tokens: not hot, young queue
    assert not sched2.is_hot(a2, 1.0)
    assert sched2.rebalance(1.0) == []
    assert sched2.is_hot(a2, 3.0)  # the oldest queued request has waited hotspot_wait_s
    assert [m.target for m in sched2.rebalance(3.0)] == ["b"]


# ----- optional capabilities ----------------------------------------------------------------------
class PlainTablePolicy:
    """TablePolicy without the optional capabilities: no late-binding default, no alternatives."""

    name = "plain_table"

    def __init__(self, table: dict[str, tuple[str, str]]) -> None:
        self.inner = TablePolicy(table)

    def on_membership(self, instance_ids: Iterable[str]) -> None:
        pass

    def choose(self, r: RouteRequest, cluster: ClusterView) -> Decision:
        return self.inner.choose(r, cluster)


def test_capabilities_are_declared_and_decide_late_binding_and_migration() -> None:
    policies = {n: make_policy(n) for n in POLICIES}
    assert {n for n, p in policies.items() if isinstance(p, LateBinding)} == {"dualmap"}
    assert {n for n, p in policies.items() if isinstance(p, Migrating)} == {"dualmap"}
    assert {n for n, p in policies.items() if isinstance(p, DualRinged)} == {"dualmap"}
    assert {n for n, p in policies.items() if isinstance(p, AdaptivelyKeyed)} == {"dualmap", "consistent_hash"}
    table = TablePolicy({})  # declares them structurally, by carrying the members
    assert isinstance(table, LateBinding) and isinstance(table, Migrating) and not isinstance(table, DualRinged)
    # A policy without LateBinding dispatches at once by default; the configuration can still turn it on.
    a = inst("a")
    plain = Scheduler(PlainTablePolicy({"r": ("a", "a")}), ClusterView({"a": a}), SchedulerParams())
    assert not plain.late_binding
    forced = Scheduler(PlainTablePolicy({}), ClusterView({"a": inst("a")}), SchedulerParams(late_binding=True))
    assert forced.late_binding
    for k in range(3):
        plain.submit(req(f"r{k}", 1000), 0.0)
    assert len(plain.release(0.0)) == 3
    # Without Migrating a hot instance keeps its queue: the same state that moves s2 with TablePolicy.
    a, b = inst("a", pending=3000), inst("b", pending=3200)
    a.unprefilled_requests = b.unprefilled_requests = 1
    cache_blocks(b, [77])
    sched = Scheduler(PlainTablePolicy({"s": ("a", "b")}), ClusterView({"a": a, "b": b}),
                      SchedulerParams(slo_ttft_s=5.0, alpha=0.75, dispatch_budget_s=0.0, late_binding=True))
    sched.submit(req("s2", 1000, [77]), 0.0)
    assert sched.is_hot(a, 0.0) and sched.rebalance(0.0) == []
