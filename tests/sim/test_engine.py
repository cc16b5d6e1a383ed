"""The engine core in virtual time: batching, prefix caching, admission, abort, coalescing."""

import math

import pytest

from tandem.perf.costmodel import CostModel
from tandem.perf.profile import load_profile
from tandem.sim.engine import Engine, EngineLimits, SimRequest

PROFILE = load_profile("llama3-8b-h100")


def make_engine(capacity: int = 400_000, coalesce: bool = True, **kw) -> Engine:
    return Engine(CostModel.from_profile(PROFILE), EngineLimits(kv_capacity_tokens=capacity, **kw),
                  coalesce_decode=coalesce)


def run(engine: Engine, emissions: list | None = None) -> dict[str, tuple[float, float]]:
    """Run to idle; request id -> (first token time, finish time), including ``emissions`` seen before."""
    emissions = list(emissions or [])
    while (t := engine.next_event_time()) is not None:
        emissions.extend(engine.advance(t))
    first, done = {}, {}
    for e in emissions:
        if e.first:
            first[e.request_id] = e.time
        if e.finished:
            done[e.request_id] = e.time
    return {k: (first[k], done[k]) for k in done}


def req(rid: str, prompt: int = 1000, out: int = 50, blocks: tuple[int, ...] = (), bs: int = 512) -> SimRequest:
    return SimRequest(rid, prompt, out, block_hashes=blocks, block_size=bs)


def test_two_concurrent_requests_take_less_than_twice_one() -> None:
    alone = make_engine()
    alone.submit(req("a"), 0.0)
    t_one = run(alone)["a"][1]
    both = make_engine()
    both.submit(req("a"), 0.0)
    both.submit(req("b"), 0.0)
    t_two = max(f for _, f in run(both).values())
    assert t_one < t_two < 1.5 * t_one


def test_prefix_hit_skips_prefill_work() -> None:
    e = make_engine()
    e.submit(req("a", prompt=4096, out=1, blocks=tuple(range(8))), 0.0)
    ttft_cold = run(e)["a"][0]
    e.submit(req("b", prompt=4096, out=1, blocks=tuple(range(8))), 10.0)
    ttft_warm = run(e)["b"][0] - 10.0
    assert e.counters.prefix_hit_tokens == 4095  # capped at prompt - 1, like vLLM
    assert ttft_warm < ttft_cold / 5


def test_admission_respects_kv_reservation_and_max_seqs() -> None:
    e = make_engine(capacity=3000, max_num_seqs=8)
    for i in range(3):
        e.submit(req(f"r{i}", prompt=1000, out=400), 0.0)
    seen = e.advance(e.next_event_time())  # the first iteration ran r0 alone; the next admits more
    assert len(e.running) == 2 and len(e.waiting) == 1  # 2 x 1400 fits in 3000, a third does not
    assert len(run(e, seen)) == 3
    e2 = make_engine(max_num_seqs=2)
    for i in range(3):
        e2.submit(req(f"r{i}", prompt=100, out=10), 0.0)
    e2.advance(e2.next_event_time())
    assert len(e2.running) == 2 and len(e2.waiting) == 1


def test_chunked_prefill_respects_token_budget() -> None:
    e = make_engine(max_num_batched_tokens=1024)
    e.submit(req("long", prompt=5000, out=2), 0.0)
    result = run(e)
    assert e.counters.iterations >= 5 + 1  # five prefill chunks, then one decode step
    assert result["long"][0] > CostModel.from_profile(PROFILE).prefill_time(5000)


def test_coalesced_and_stepwise_runs_agree_with_arrivals_mid_decode() -> None:
    results = []
    for coalesce in (True, False):
        e = make_engine(coalesce=coalesce)
        e.submit(req("a", prompt=2000, out=200), 0.0)
        seen = e.advance(e.next_event_time())
        seen += e.advance(0.5)  # time passes mid-decode, then a new arrival cuts a coalesced plan
        e.submit(req("b", prompt=3000, out=20), 0.5)
        results.append(run(e, seen))
    assert results[0].keys() == results[1].keys() == {"a", "b"}
    for k in results[0]:
        assert results[0][k] == pytest.approx(results[1][k], rel=1e-9)


def test_validation_and_abort() -> None:
    e = make_engine(capacity=5000, max_model_len=4096)
    assert "maximum context length 4096" in e.validate(4000, 200)
    assert "KV cache capacity" in make_engine(capacity=1000).validate(900, 200)
    assert e.validate(0, 1) == "prompt is empty"
    with pytest.raises(ValueError):
        e.submit(req("x", prompt=5000), 0.0)
    e.submit(req("a", prompt=500, out=1000), 0.0)
    e.submit(req("b", prompt=500, out=10), 0.0)
    e.advance(e.next_event_time())
    assert e.abort("a", 0.1) and not e.abort("zzz", 0.1)
    assert set(run(e)) == {"b"} and e.reserved_tokens == 0


def remote(rid: str, prompt: int, out: int, ready: float) -> SimRequest:
    r = req(rid, prompt=prompt, out=out, blocks=tuple(range(prompt // 512)))
    r.kv_ready_at = ready
    return r


def test_pulled_kv_skips_prefill_and_waits_for_the_transfer() -> None:
    cost = CostModel.from_profile(PROFILE)
    e = make_engine()
    e.submit(remote("d", prompt=8192, out=4, ready=2.0), 0.0)
    assert e.reserved_tokens == 8196  # blocks are allocated as the pull's destination, before it lands
    assert e.next_event_time() == 2.0  # idle until the KV lands
    first, done = run(e)["d"]
    one_token = cost.step_time(1, 8192, 0, 0)  # only the last prompt token is recomputed
    assert first == pytest.approx(2.0 + one_token)
    assert first - 2.0 < cost.prefill_time(8192) / 20
    assert done > first and e.reserved_tokens == 0
    assert e.cache.peek(tuple(range(16))).tokens == 8192  # the pulled prompt is cached locally


def test_kv_arrival_announced_later_and_coalescing_agrees() -> None:
    results = []
    for coalesce in (True, False):
        e = make_engine(coalesce=coalesce)
        e.submit(req("a", prompt=2000, out=300), 0.0)
        e.submit(remote("d", prompt=4096, out=20, ready=math.inf), 0.0)
        seen = e.advance(e.next_event_time())
        seen += e.advance(0.7)
        assert e.kv_arrived("d", 0.7) and not e.kv_arrived("nope", 0.7)
        results.append(run(e, seen))
    assert results[0].keys() == results[1].keys() == {"a", "d"}
    for k in results[0]:
        assert results[0][k] == pytest.approx(results[1][k], rel=1e-9)
    assert 0.7 < results[0]["d"][0] < 0.8


def test_known_arrival_cuts_a_coalesced_decode_plan() -> None:
    results = []
    for coalesce in (True, False):
        e = make_engine(coalesce=coalesce)
        e.submit(req("a", prompt=1000, out=500), 0.0)
        e.submit(remote("d", prompt=2048, out=10, ready=1.234), 0.0)
        results.append(run(e))
    for k in ("a", "d"):
        assert results[0][k] == pytest.approx(results[1][k], rel=1e-9)
    assert 1.234 < results[0]["d"][0] < 1.3
