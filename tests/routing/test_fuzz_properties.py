"""Property tests (hypothesis): the engine-metric parser and the routing core never crash on any input.

Real /metrics captures can be truncated, mix vLLM and SGLang names, carry NaN/Inf, odd labels or plain
garbage; the parser must return a snapshot or raise EngineMetricsError, nothing else. The routing core
must keep its accounting exact under any sequence of submits, releases, completions, failures,
cancellations, health flips and rebalances. Example counts are bounded so the file runs in seconds.
"""

from __future__ import annotations

import contextlib
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.blockcache import BlockCache
from tandem.router.enginemetrics import EngineMetricsError, EngineSnapshot, parse_engine_metrics
from tandem.router.routing.config import RoutingConfig
from tandem.router.routing.registry import make_policy, policy_names
from tandem.router.routing.scheduler import QueueFullError, Scheduler
from tandem.router.routing.types import ClusterView, InstanceState, NoInstanceError, RouteRequest

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
         "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
         "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:cache_config_info",
         "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count",
         "vllm:time_to_first_token_seconds_bucket", "sglang:num_queue_reqs", "sglang:num_running_reqs",
         "sglang:token_usage", "sglang:cache_hit_rate", "sglang:prompt_tokens_total", "other_metric"]
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                   st.sampled_from(["NaN", "+Inf", "-Inf", "", "1e400", "0x10", "abc", "1 2 3"]))
LABEL = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@st.composite
def exposition(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.integers(0, 5))
        name = draw(st.sampled_from(NAMES))
        if kind == 0:
            kind_name = draw(st.sampled_from(["gauge", "counter", "histogram", "summary", "bogus"]))
            lines.append(f"# TYPE {name.removesuffix('_total')} {kind_name}")
        elif kind == 1:
            lines.append(f"# HELP {name} {draw(LABEL)}")
        elif kind == 2:
            labels = ",".join(f'{k}="{v}"' for k, v in draw(st.dictionaries(
                st.sampled_from(["model_name", "engine", "block_size", "le", "tp_rank"]), LABEL, max_size=3)).items())
            lines.append(f"{name}{{{labels}}} {draw(VALUES)}")
        elif kind == 3:
            lines.append(f"{name} {draw(VALUES)}")
        elif kind == 4:
            lines.append(draw(st.text(max_size=40)))  # garbage line
        else:
            full = f"{name} {draw(VALUES)}"
            lines.append(full[: draw(st.integers(0, len(full)))])  # truncated mid-line
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n# EOF\n"]))


@FAST
@given(exposition())
def test_metric_parser_returns_a_snapshot_or_its_own_error(text: str) -> None:
    try:
        snap = parse_engine_metrics(text)
    except EngineMetricsError:
        return
    assert isinstance(snap, EngineSnapshot)
    ratio = snap.prefix_hit_ratio()
    assert ratio is None or isinstance(ratio, float)


@FAST
@given(st.binary(max_size=400).map(lambda b: b.decode("utf-8", errors="replace")))
def test_metric_parser_on_arbitrary_text(text: str) -> None:
    with contextlib.suppress(EngineMetricsError):
        parse_engine_metrics(text)


@FAST
@given(waiting=st.floats(0, 1e6), running=st.floats(0, 1e6), usage=st.floats(0, 1))
def test_metric_parser_reads_valid_values_exactly(waiting: float, running: float, usage: float) -> None:
    text = (f"vllm:num_requests_waiting{{model_name=\"m\"}} {waiting!r}\n"
            f"vllm:num_requests_running{{model_name=\"m\"}} {running!r}\n"
            f"vllm:kv_cache_usage_perc{{model_name=\"m\"}} {usage!r}\n")
    snap = parse_engine_metrics(text)
    assert snap.flavor == "vllm" and snap.model_names == ["m"]
    assert math.isclose(snap.waiting, waiting) and math.isclose(snap.running, running)
    assert math.isclose(snap.kv_usage, usage)


# --- routing core ----------------------------------------------------------------------------------


def _cluster(n: int, healthy: list[bool]) -> ClusterView:
    return ClusterView({f"i{k}": InstanceState(id=f"i{k}", prefill_s_per_token=1e-4, shadow=BlockCache(100_000),
                                               healthy=healthy[k % len(healthy)]) for k in range(n)})


REQUESTS = st.builds(
    lambda rid, tokens, blocks, key: RouteRequest(request_id=rid, prompt_tokens=tokens, block_size=16,
                                                  block_hashes=tuple(blocks), arrival=0.0, fallback_key=key),
    st.uuids().map(str), st.integers(1, 100_000), st.lists(st.integers(0, 2**63), max_size=8),
    st.integers(0, 2**63))


@FAST
@given(policy=st.sampled_from(policy_names()), n=st.integers(1, 8), healthy=st.lists(st.booleans(), min_size=1,
       max_size=8), reqs=st.lists(REQUESTS, min_size=1, max_size=10))
def test_every_policy_picks_a_routable_instance_or_says_none(policy: str, n: int, healthy: list[bool],
                                                              reqs: list[RouteRequest]) -> None:
    cluster = _cluster(n, healthy)
    pol = make_policy(policy, RoutingConfig())
    for req in reqs:
        try:
            decision = pol.choose(req, cluster)
        except NoInstanceError:
            assert not cluster.routable()
            continue
        assert decision.instance_id in {i.id for i in cluster.routable()}


OPS = st.lists(st.tuples(st.sampled_from(["submit", "release", "first", "finish", "fail", "cancel", "flip",
                                          "rebalance"]), st.integers(0, 1000)), max_size=60)


@FAST
@given(policy=st.sampled_from(["dualmap", "round_robin", "least_loaded", "prefix_tree"]), n=st.integers(1, 5),
       ops=OPS, reqs=st.lists(REQUESTS, min_size=1, max_size=20))
def test_scheduler_accounting_survives_any_sequence(policy: str, n: int, ops: list[tuple[str, int]],
                                                    reqs: list[RouteRequest]) -> None:
    config = RoutingConfig(max_queued_per_instance=4, max_queued_total=8)
    cluster = _cluster(n, [True])
    sched = Scheduler(make_policy(policy, config), cluster, config)
    live: list[str] = []  # submitted, not finished/failed/cancelled
    sent: list[str] = []  # released to an instance
    now = 0.0
    seq = 0
    for op, x in ops:
        now += 0.5
        if op == "submit":
            req = reqs[x % len(reqs)]
            seq += 1
            rid = f"r{seq}"
            req = RouteRequest(request_id=rid, prompt_tokens=req.prompt_tokens, block_size=req.block_size,
                               block_hashes=req.block_hashes, arrival=now, fallback_key=req.fallback_key)
            try:
                sched.submit(req, now)
                live.append(rid)
            except (QueueFullError, NoInstanceError):
                pass
        elif op == "release":
            sent.extend(r.request_id for r, _ in sched.release(now))
        elif op in ("first", "finish", "fail", "cancel") and live:
            rid = live[x % len(live)]
            if op == "first":
                if rid in sent:
                    sched.on_first_token(rid)
                continue
            if op == "cancel":
                sched.cancel(rid)
            elif rid in sent:
                (sched.on_finished if op == "finish" else sched.on_failed)(rid)
            else:
                continue
            live.remove(rid)
            if rid in sent:
                sent.remove(rid)
        elif op == "flip":
            inst = list(cluster.instances.values())[x % n]
            inst.healthy = not inst.healthy
            sched.on_membership()
        elif op == "rebalance":
            sched.rebalance(now)
        for inst in cluster.instances.values():
            assert inst.queued_requests >= 0 and inst.inflight_requests >= 0 and inst.queued_miss_tokens >= 0
            assert inst.inflight_miss_tokens >= 0 and inst.unprefilled_requests >= 0
            assert inst.queued_attn_pairs >= 0 and inst.inflight_attn_pairs >= 0
        assert sched.queued_total <= config.max_queued_total
    for rid in list(live):  # everything ends: the books return to zero
        if rid in sent:
            sched.on_finished(rid)
        else:
            sched.cancel(rid)
    for inst in cluster.instances.values():
        assert (inst.queued_requests, inst.inflight_requests, inst.queued_miss_tokens, inst.inflight_miss_tokens,
                inst.unprefilled_requests, inst.queued_attn_pairs, inst.inflight_attn_pairs) == (0, 0, 0, 0, 0, 0, 0)
