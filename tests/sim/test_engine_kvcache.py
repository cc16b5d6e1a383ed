"""The engine's prefix cache: running requests' blocks counted once, and the host-memory KV tier."""

from __future__ import annotations

import pytest

from tandem.perf.costmodel import CostModel
from tandem.perf.profile import load_profile
from tandem.router.routing.config import RoutingConfig
from tandem.sim.des import DESConfig, Simulation, prepare, simulate
from tandem.sim.engine import Engine, EngineLimits, SimRequest
from tandem.sim.kvcache import EngineKVCache
from tandem.traces import TRACE_DIR, load_trace, rescale_to_qps, select

PROFILE = load_profile("llama3-8b-h100")
COST = CostModel.from_profile(PROFILE)
BS = 512


def engine(capacity: int, host: int = 0, link: float = 25.0, coalesce: bool = True) -> Engine:
    return Engine(COST, EngineLimits(kv_capacity_tokens=capacity, host_cache_tokens=host, host_link_gbytes_s=link),
                  coalesce_decode=coalesce)


def req(rid: str, blocks: range | tuple[int, ...], out: int = 1) -> SimRequest:
    blocks = tuple(blocks)
    return SimRequest(rid, len(blocks) * BS, out, block_hashes=blocks, block_size=BS)


def drain(e: Engine, check=None) -> dict[str, float]:
    """Run to idle; request id -> first-token time. ``check(e)`` must hold after every iteration."""
    first = {}
    while (t := e.next_event_time()) is not None:
        for em in e.advance(t):
            if em.first:
                first[em.request_id] = em.time
        if check:
            assert check(e) is not False
    return first


def physical_tokens(e: Engine) -> int:
    """GPU KV in use: every cache block once, plus running reservations that are not cache blocks."""
    return e.cache.gpu_tokens + e.reserved_tokens - e.shared_tokens


def test_running_requests_blocks_are_not_counted_twice() -> None:
    # W leaves prefix P (2048 tokens) in the cache. Y (another 2048-token prompt, 100 out) then runs on
    # a 5000-token GPU: counting Y's own cached prompt blocks both as reserved and as cache would leave
    # P only 5000 - 2148 - 2048 = 804 tokens (one 512 block); counted once, P fits whole.
    e = engine(5000)
    e.submit(req("w", range(4)), 0.0)
    drain(e)
    e.submit(req("y", range(10, 14), out=100), 10.0)
    drain(e, check=lambda e: physical_tokens(e) <= 5000)
    e.submit(req("z", range(4)), 20.0)
    drain(e)
    hits = e.counters.prefix_hit_tokens
    assert hits == 2047  # z found all of P (capped at prompt - 1)
    assert e.shared_tokens == 0 and e.cache.pinned_tokens == 0 and e.reserved_tokens == 0


def test_memory_never_exceeds_capacity_and_pins_are_released() -> None:
    e = engine(12_000, host=20_000)
    t = 0.0
    for i in range(60):  # overlapping prefixes: families of 6, each extending a shared head
        fam, depth = i % 5, 2 + i % 6
        e.submit(req(f"r{i}", tuple(fam * 100 + b for b in range(depth)), out=30 + i % 7), t)
        t += 0.02
        e.advance(t)
        assert physical_tokens(e) <= 12_000
        assert e.cache.pinned_tokens <= e.shared_tokens <= e.reserved_tokens

    def check(e: Engine) -> bool:
        return physical_tokens(e) <= 12_000 and e.cache.pinned_tokens <= e.shared_tokens

    drain(e, check)
    assert e.counters.finished_requests == 60
    assert e.shared_tokens == e.cache.pinned_tokens == e.reserved_tokens == 0
    assert e.cache.free_tokens <= 12_000
    assert e.counters.prefix_hit_tokens > 0


def _evict_then_return(host: int, link: float = 25.0) -> tuple[Engine, float]:
    """P (8 blocks) runs, four other prompts push it out of a 6000-token GPU, then P comes back."""
    e = engine(6000, host=host, link=link)
    e.submit(req("p", range(8)), 0.0)
    drain(e)
    for k in range(4):
        e.submit(req(f"o{k}", range(100 * (k + 1), 100 * (k + 1) + 8)), 10.0 + k)
        drain(e)
    assert 0 not in e.cache  # P left the GPU
    e.submit(req("p2", range(8)), 100.0)
    return e, drain(e)["p2"] - 100.0


def test_host_tier_turns_a_gpu_eviction_into_a_pcie_load() -> None:
    off, ttft_off = _evict_then_return(host=0)
    on, ttft_on = _evict_then_return(host=100_000)
    assert off.counters.host_hit_tokens == 0
    assert on.counters.host_hit_tokens == 8 * BS - 1
    load = COST.kv_transfer_time(8 * BS - 1, 25.0 * 8)
    assert ttft_on >= load
    assert ttft_on < ttft_off / 3  # 4k tokens over PCIe vs recomputing them
    # The load is charged: over a very slow link, the host hit costs more than recomputing.
    _, ttft_slow = _evict_then_return(host=100_000, link=0.05)
    assert ttft_slow > ttft_off
    assert ttft_slow == pytest.approx(ttft_on - load + COST.kv_transfer_time(8 * BS - 1, 0.05 * 8), rel=1e-9)


def test_host_tier_is_an_lru_of_its_own_capacity() -> None:
    c = EngineKVCache(host_capacity_tokens=1024)
    c.add_pinned((1, 2, 3), (512, 512, 512))
    c.release((1, 2, 3))
    assert c.free_tokens == 1536 and c.pinned_tokens == 0
    c.fit(0)  # evicts the tail first (3, 2, then 1): the host keeps the two most recent arrivals
    assert c.free_tokens == 0
    assert c.host is not None and 1 in c.host and 2 in c.host and 3 not in c.host
    hit = c.acquire((1, 2, 3))
    assert (hit.blocks, hit.tokens, hit.host_tokens) == (2, 1024, 1024)
    assert c.pinned_tokens == 1024 and 1 in c.host  # loaded back; the host keeps its copy


def test_coalesced_and_stepwise_agree_with_a_host_tier() -> None:
    results = []
    for coalesce in (True, False):
        e = engine(6000, host=50_000, coalesce=coalesce)
        firsts = {}
        for k, (t, blocks) in enumerate([(0.0, range(8)), (0.3, range(100, 108)), (0.6, range(200, 208)),
                                         (5.0, range(8)), (5.01, range(100, 106))]):
            for em in e.advance(t):
                if em.first:
                    firsts[em.request_id] = em.time
            e.submit(req(f"r{k}", blocks, out=40), t)
        firsts.update(drain(e))
        results.append((firsts, e.counters.host_hit_tokens, e.counters.prefix_hit_tokens))
    assert results[0][1:] == results[1][1:] and results[0][1] > 0
    assert results[0][0].keys() == results[1][0].keys()
    for k in results[0][0]:
        assert results[0][0][k] == pytest.approx(results[1][0][k], rel=1e-9)


def test_des_shadow_follows_gpu_plus_host_and_the_tier_adds_hits() -> None:
    sim = Simulation([], "dualmap", RoutingConfig(), DESConfig(instances=2, kv_capacity_tokens=300_000,
                                                                  host_cache_tokens=700_000))
    assert all(s.shadow.capacity_tokens == 1_000_000 for s in sim.cluster.instances.values())
    reqs = prepare(rescale_to_qps(select(load_trace(TRACE_DIR / "conversation_trace.jsonl"), count=400), 3.0))
    runs = {h: simulate(reqs, "dualmap", RoutingConfig(), DESConfig(instances=4, kv_capacity_tokens=60_000,
                                                                    host_cache_tokens=h)) for h in (0, 2_000_000)}
    hits = {h: sum(r.hit_tokens for r in res.requests) for h, res in runs.items()}
    assert sum(r.host_hit_tokens for r in runs[0].requests) == 0
    assert sum(r.host_hit_tokens for r in runs[2_000_000].requests) > 0
    assert hits[2_000_000] > hits[0]
    for res in runs.values():  # prompts longer than this small GPU are rejected, the rest all ran
        assert all(bool(r.rejected) != (r.first_token_at is not None) for r in res.requests)
