"""Pure parts of the gateway: engine metric parsing, keys and limits, breaker, pod -> endpoint."""

from __future__ import annotations

import httpx
import pytest
from gatewayutil import sim_app
from kubernetes.client import (
    V1Container,
    V1ContainerPort,
    V1ObjectMeta,
    V1Pod,
    V1PodCondition,
    V1PodSpec,
    V1PodStatus,
)

from tandem.router.discovery import Endpoint, PodSet, endpoint_from_pod, endpoints_from_pods, static_endpoints
from tandem.router.enginemetrics import EngineMetricsError, parse_engine_metrics
from tandem.router.ratelimit import LocalLimiter
from tandem.router.resilience import CircuitBreaker, backoff_delay
from tandem.router.security import ApiKeyError, KeyRing


async def _metrics_text(flavor: str) -> str:
    app = sim_app(metrics=flavor, port=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as c:
        return (await c.get("/metrics")).text


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_parses_simulator_metrics_of_both_engines(flavor: str) -> None:
    snap = parse_engine_metrics(await _metrics_text(flavor))
    assert snap.flavor == flavor
    assert snap.waiting == 0 and snap.running == 0 and snap.kv_usage == 0.0
    assert snap.prompt_tokens == 0
    assert snap.model_names
    if flavor == "vllm":
        assert snap.block_size and snap.prefix_queries == 0
    else:
        assert snap.cache_hit_rate == 0.0 and snap.block_size is None


def test_parses_older_vllm_names_sums_ranks_and_ignores_created() -> None:
    text = """# HELP vllm:num_requests_waiting waiting
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 4.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.6
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 25.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="1.0",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 2.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.5
vllm:time_to_first_token_seconds_count{model_name="m"} 2.0
"""
    snap = parse_engine_metrics(text)
    assert snap.waiting == 7.0
    assert snap.kv_usage == pytest.approx(0.4)
    assert snap.prefix_queries == 100.0  # the _created timestamp is not added
    assert snap.prefix_hit_ratio() == 0.25
    assert (snap.ttft_sum, snap.ttft_count) == (0.5, 2.0)


@pytest.mark.parametrize("text", ["not a metric line {{{", "# TYPE foo gauge\nfoo 1\n"])
def test_rejects_text_without_engine_metrics(text: str) -> None:
    with pytest.raises(EngineMetricsError):
        parse_engine_metrics(text)


def test_api_keys_auth_and_limits(tmp_path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text("keys:\n  - {key: secret-key-aaaa, name: team-a, rpm: 2, tpm: 1000}\n")
    ring = KeyRing.load(f, "env-secret-bbbb")
    assert ring.authenticate(None).status == 401
    assert ring.authenticate("Bearer nope-nope-nope").status == 401
    ok = ring.authenticate("Bearer secret-key-aaaa")
    assert ok.ok and ok.principal == "team-a"
    assert ring.authenticate(None, x_api_key="env-secret-bbbb").principal == "env-1"
    limiter, team = LocalLimiter(), ring.principal("team-a")
    assert limiter.admit(team, 10, now=0.0).ok
    assert limiter.admit(team, 10, now=0.0).ok
    third = limiter.admit(team, 10, now=0.0)
    assert not third.ok and third.retry_after == pytest.approx(30.0)
    assert "secret-key-aaaa" not in third.message and "team-a" in third.message  # keys never in messages
    assert limiter.admit(team, 10, now=30.0).ok  # refilled: 2/min = one every 30 s
    big = limiter.admit(team, 5000, now=120.0)  # tokens: bucket full, oversize goes through once
    assert big.ok
    refused = limiter.admit(team, 10, now=121.0)
    assert not refused.ok and "tokens/minute" in refused.message
    # The oversize request left the token bucket at -4000: it refills to 10 tokens at t=360.6 s.
    assert not limiter.admit(team, 10, now=360.0).ok
    assert limiter.admit(team, 10, now=361.0).ok
    assert limiter.admit(ring.principal("env-1"), 10**9, now=0.0).ok  # no limits configured for this key
    # Redis down: each of 2 processes enforces half of each limit (1 request a minute here).
    fallback = LocalLimiter()
    assert fallback.admit(team, 10, now=0.0, share=2).ok
    assert not fallback.admit(team, 10, now=0.0, share=2).ok


def test_api_keys_file_errors_name_the_field(tmp_path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text("keys:\n  - {key: short}\n")
    with pytest.raises(ApiKeyError, match=r"keys\.0\.key") as err:
        KeyRing.load(f, None)
    assert "short" not in str(err.value)
    assert not KeyRing.load(None, None).enabled


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    b = CircuitBreaker(threshold=2, cooldown=5.0)
    b.on_failure(0.0)
    assert b.allows(0.1)
    b.on_failure(0.2)
    assert not b.allows(1.0) and b.state == "open"
    assert b.allows(5.3) and b.state == "half_open"
    b.on_dispatch()
    assert not b.allows(5.4)  # one trial at a time
    b.on_failure(5.5)
    assert b.state == "open" and not b.allows(6.0)
    assert b.allows(10.6)
    b.on_success()
    assert b.state == "closed" and b.failures == 0
    b.on_failure(11.0, fatal=True)
    assert b.state == "open"
    assert [backoff_delay(0.1, a) for a in (1, 2, 3)] == [0.1, 0.2, 0.4]


def _pod(name: str, ip: str | None = "10.0.0.5", ready: bool = True, phase: str = "Running",
         labels: dict | None = None, port: int | None = None) -> V1Pod:
    ports = [V1ContainerPort(name="http", container_port=port)] if port else None
    return V1Pod(metadata=V1ObjectMeta(name=name, labels=labels if labels is not None else {
        "serving.tandem.dev/role": "prefill", "serving.tandem.dev/model": "llama",
        "serving.tandem.dev/service": "svc"}),
        spec=V1PodSpec(containers=[V1Container(name="engine", ports=ports)]),
        status=V1PodStatus(phase=phase, pod_ip=ip,
                           conditions=[V1PodCondition(type="Ready", status="True" if ready else "False")]))


def test_pods_to_endpoints() -> None:
    eps = endpoints_from_pods([
        _pod("a", port=9000),
        _pod("b", ready=False),
        _pod("c", ip=None),
        _pod("d", phase="Pending"),
        _pod("e", ip="fd00::1", labels={}),
        _pod("f", labels={"serving.tandem.dev/role": "bogus"}),
    ], default_port=8000)
    assert eps == {
        Endpoint(url="http://10.0.0.5:9000", role="prefill", model="llama", service="svc", name="a"),
        Endpoint(url="http://[fd00::1]:8000", role="unified", name="e"),
    }
    # The same function reads the API's JSON shape (camelCase keys), e.g. from a watch's raw object.
    raw = {"metadata": {"name": "g", "labels": {"serving.tandem.dev/role": "decode"},
                        "annotations": {"serving.tandem.dev/port": "7000"}},
           "status": {"phase": "Running", "podIP": "10.1.1.1", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert endpoint_from_pod(raw, 8000) == Endpoint(url="http://10.1.1.1:7000", role="decode", name="g")


def test_pod_watch_events_track_the_pod_set() -> None:
    pods = PodSet()
    pods.reset([_pod("a"), _pod("b", ip="10.0.0.6")])
    assert len(pods.endpoints(8000)) == 2
    pods.apply("MODIFIED", _pod("b", ip="10.0.0.6", ready=False))
    pods.apply("ADDED", _pod("c", ip="10.0.0.7"))
    pods.apply("DELETED", _pod("a"))
    assert {e.url for e in pods.endpoints(8000)} == {"http://10.0.0.7:8000"}


def test_static_endpoints_roles() -> None:
    eps = static_endpoints(["http://a:1"], ["http://p:1"], ["http://d:1"])
    assert {(e.url, e.role) for e in eps} == {("http://a:1", "unified"), ("http://p:1", "prefill"),
                                              ("http://d:1", "decode")}


def test_gateway_settings_validation() -> None:
    from pydantic import ValidationError

    from tandem.router.settings import GatewaySettings

    s = GatewaySettings(instances="http://127.0.0.1:1/,http://127.0.0.1:2")
    assert s.instances == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    with pytest.raises(ValidationError, match="instances"):
        GatewaySettings()
    with pytest.raises(ValidationError, match="not an http"):
        GatewaySettings(instances="localhost:8000")


def test_engine_tokenizer_keys_text_prompts(tmp_path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from tandem.router.admission import route_request
    from tandem.router.requestview import read_view
    from tandem.router.tokenizer import load_tokenizer

    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello,world": 1, "again": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    view = read_view({"model": "m", "prompt": "hello,world again " * 4}, "completion")
    with_tok, _ = route_request(view, block_size=4, tokenizer=load_tokenizer(path))
    default, _ = route_request(view, block_size=4)
    assert with_tok.prompt_tokens == 8 and len(with_tok.block_hashes) == 2  # whitespace words only
    assert with_tok.tokens is not None and list(with_tok.tokens.ids) == [1, 2] * 4
    assert default.prompt_tokens == 16  # the chunker splits 'hello', ',', 'world'
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(tmp_path / "missing.json")


def test_tune_gc_freezes_the_startup_heap_and_raises_the_young_threshold() -> None:
    import gc

    from tandem.router.server import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(12_345)
        assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        tune_gc(0)  # 0 leaves the collector alone
        assert gc.get_threshold() == (12_345, *before[1:]) and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_gateway_routing_state_has_the_profile_estimate_scrapes_and_peers_pairs() -> None:
    """The live gateway fills every input of the TTFT estimate the DES uses: same coefficients,
    the running batch from /metrics, and the attention pairs of peers' pending requests."""
    from tandem.perf.costmodel import CostModel
    from tandem.perf.profile import load_profile
    from tandem.router.enginemetrics import EngineSnapshot
    from tandem.router.gateway import Gateway
    from tandem.router.routing.types import PrefillCost, RouteRequest, attention_pairs
    from tandem.router.scrape import apply_snapshot
    from tandem.router.settings import GatewaySettings
    from tandem.router.state import SharedLoad
    from tandem.sim.des.simulator import routing_state
    from tandem.sim.engine import EngineLimits

    gw = Gateway(GatewaySettings(instances="http://127.0.0.1:1"))
    await gw._join(Endpoint(url="http://a", model="m"))
    inst = gw.pools["m"].instances["http://a"]
    s = inst.state
    profile = load_profile(gw.settings.profile)
    cost = CostModel.from_profile(profile)
    des = routing_state("x", cost, EngineLimits(profile.kv_capacity_tokens, profile.max_num_seqs,
                                                profile.max_num_batched_tokens), gw.shadow_tokens)
    assert (s.prefill_s_per_token, s.cost) == (des.prefill_s_per_token, des.cost)
    assert s.cost.attn_pair_s > 0 and s.cost.decode_context_s > 0
    assert (s.prefill_s_per_token, s.cost) == PrefillCost.from_cost_model(
        cost, profile.max_num_batched_tokens, profile.kv_capacity_tokens)

    idle = s.s_per_token()
    apply_snapshot(inst, EngineSnapshot(running=40, waiting=0, kv_usage=0.8), now=1.0)
    assert s.s_per_token() > idle  # the scraped batch slows prefill in the estimate

    sched = gw.pools["m"].scheduler("dualmap")
    sched.submit(RouteRequest("r1", 20_000, (), 512, 0.0, fallback_key=1), 0.0)
    assert gw.local_report().load["http://a"].pending_attn_pairs == attention_pairs(20_000, 0)
    own, peers = attention_pairs(20_000, 0), attention_pairs(30_000, 0)
    gw.apply_remote({"http://a": SharedLoad(pending_miss_tokens=30_000, pending_attn_pairs=peers)})
    assert s.pending_attn_pairs == own + peers
    assert gw.local_report().load["http://a"].pending_attn_pairs == own  # only our own share is published
    gw.apply_remote({})  # peers gone (or Redis down): their share leaves the estimate
    assert s.pending_attn_pairs == own


async def test_scrapes_are_spread_over_the_interval_and_never_doubled() -> None:
    """Four instances, a 0.4 s interval: one start every ~0.1 s, not four at once; an instance whose
    scrape is still running (here: never ends) is not scraped again."""
    import asyncio
    import itertools
    import time
    from types import SimpleNamespace

    from tandem.router.metrics import GatewayMetrics
    from tandem.router.scrape import Scraper

    starts: list[tuple[str, float]] = []

    class Recording(Scraper):
        async def scrape(self, inst: object) -> None:
            starts.append((inst.id, time.monotonic()))  # type: ignore[attr-defined]
            if inst.id == "slow":  # type: ignore[attr-defined]
                await asyncio.sleep(3600)

    insts = [SimpleNamespace(id=name, removed=False) for name in ("a", "b", "c", "slow")]
    scraper = Recording(lambda: insts, GatewayMetrics(), interval=0.4, timeout=0.3, stale_after=1.0)
    scraper.start()
    await asyncio.sleep(1.15)
    await scraper.stop()
    names = [n for n, _ in starts]
    assert names[:4] == ["a", "b", "c", "slow"] and names.count("slow") == 1 and names.count("a") >= 2
    gaps = [t1 - t0 for (_, t0), (_, t1) in itertools.pairwise(starts)]
    assert min(gaps) > 0.05  # 0.1 s apart, with slack for a loaded machine
