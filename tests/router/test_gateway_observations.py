"""The gateway side of the two autoscaler contracts (docs/autoscaler.md).

* ``GET /admin/observations``: the autoscaler's own ``GatewayObservationSource`` reads it from a real
  gateway (real HTTP, simulated engines) and the values are checked against what was sent.
* The drain contract: a pod annotated ``serving.tandem.dev/draining`` gets no new requests, its
  in-flight stream keeps flowing, and the gateway's in-flight map makes it *drained* (through the
  actuator's own ``count_pods``) once that stream ends. Kubernetes is the fake API server of
  ``test_gateway_k8s`` (no real one can run here) driven through the official client.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from gatewayutil import gateway_app as plain_gateway_app
from gatewayutil import sim_app, until
from test_gateway_k8s import FakeApiServer, kubeconfig, pod

from tandem.api.observations import InstanceLoad, Observations
from tandem.autoscaler.actuator import ANN_DRAINING, GatewayObservationSource, ObservationUnavailable, count_pods
from tandem.router.discovery import PodSet, endpoint_from_pod
from tandem.router.observations import Observer, TokenCounter, max_attainable_prompt
from tandem.serve import serving

MODEL = "Llama-3-8B"
# Output tokens of a stream that outlives the drain checks (~8 ms per token on the default profile)
# and is read to its end; a client that stops reading and leaves is a different path (client_gone).
LONG = 500


def gateway_app(instances: list[str], **kw: object):
    """The gateways here are sent prompts as simulator block ids (``x_tandem``): they must trust them; and
    the tests match the instance that served a request to its URL (--expose-topology)."""
    return plain_gateway_app(instances, trust_prompt_hints=True, expose_topology=True, **kw)


def ext_body(hash_ids: list[int], max_tokens: int = 8, **kw: object) -> dict:
    return {"model": MODEL, "prompt": "x", "max_tokens": max_tokens,
            "x_tandem": {"hash_ids": hash_ids, "prompt_tokens": 512 * len(hash_ids), "block_size": 512}, **kw}


# --- the pure window ---------------------------------------------------------------------------

def _load(pod_name: str, inflight: int, draining: bool = False, role: str = "unified") -> InstanceLoad:
    return InstanceLoad(service="svc", role=role, pod=pod_name, routable=not draining, draining=draining,
                        queued=2, inflight=inflight, engine_waiting=3, kv_usage=0.5)


def test_window_counts_exactly_and_forgets_old_traffic() -> None:
    obs = Observer(slo_ttft_s=1.0, slo_tpot_s=0.1, attainable_tokens=4096, horizon_s=60, bucket_s=1.0)
    # 10 s of traffic long ago (must not count), then 20 requests in the last 10 s
    for i in range(10):
        t = obs.arrived("svc", "unified", 1000, 100.0 + i)
        obs.routed(t, 0, 100.0 + i)
        obs.first_token(t, 100.5 + i)
        obs.finished(t, 10, 101.0 + i)
    for i in range(20):
        now = 190.0 + i * 0.5
        t = obs.arrived("svc", "unified", 2000 if i % 2 else 8000, now)
        obs.routed(t, 1000 if i % 2 else 0, now + 0.2)  # 0.2 s in the gateway's queue
        obs.first_token(t, now + (0.5 if i < 15 else 2.0))  # 5 of 20 miss the 1 s TTFT SLO
        obs.finished(t, 101, now + 0.5 + 100 * (0.05 if i % 4 else 0.2))  # every 4th misses TPOT
    report = obs.report("svc", 10.0, 200.0, [_load("a", 1), _load("b", 0, draining=True)], time_s=7.0)
    o = Observations.model_validate(report["observations"])
    assert o.time_s == 7.0 and o.window_s == 10.0
    assert o.arrival_rate == pytest.approx(20 / 10)
    assert o.prefix_hit_ratio == pytest.approx(10 * 1000 / (10 * 2000 + 10 * 8000))
    assert o.ttft_attainment == pytest.approx(15 / 20) and o.completed == 20
    assert o.tpot_attainment == pytest.approx(15 / 20)
    assert o.ttft_attainable == pytest.approx(10 / 20)  # 8000 uncached tokens exceed what fits in the SLO
    mix = {(b.input_tokens, b.output_tokens): b.weight for b in o.length_mix}
    assert mix == {(2000, 101): pytest.approx(0.5), (8000, 101): pytest.approx(0.5)}
    role = o.roles["unified"]
    assert role.queue_time_s == pytest.approx(0.2) and role.queue_depth == 5 and role.kv_usage == 0.5
    assert (role.ready, role.draining, role.drained) == (1, 0, 1)
    assert report["inflight"] == {"a": 1, "b": 0}
    # the ring holds at most the horizon, however long it runs
    for s in range(1000):
        obs.arrived("svc", "unified", 10, 300.0 + s)
    assert len(obs.rings["svc"].buckets) <= 61
    assert obs.report("svc", 60.0, 1300.0, [])["observations"]["arrival_rate"] == pytest.approx(1.0, rel=0.05)


def test_failures_count_as_misses_and_unstreamed_answers_by_their_end_to_end_time() -> None:
    obs = Observer(slo_ttft_s=1.0, slo_tpot_s=0.1, attainable_tokens=4096, horizon_s=60)
    ok = obs.arrived("svc", "unified", 100, 10.0)
    obs.first_token(ok, 10.2)
    obs.finished(ok, 11, 10.5)                                  # streamed, on time
    shed = obs.arrived("svc", "unified", 100, 10.0)
    obs.failed(shed, 10.1)                                      # 503/429 before any engine: a TTFT miss
    cut = obs.arrived("svc", "unified", 100, 10.0)
    obs.first_token(cut, 10.3)
    obs.failed(cut, 12.0)                                       # stream cut short: TTFT met, TPOT missed
    obs.failed(cut, 12.5)                                       # counted once
    slow_whole = obs.arrived("svc", "unified", 100, 10.0)
    obs.finished(slow_whole, 50, 11.5, streamed=False)          # whole answer after 1.5 s: its TTFT
    fast_whole = obs.arrived("svc", "unified", 100, 10.0)
    obs.finished(fast_whole, 50, 10.4, streamed=False)
    o = Observations.model_validate(obs.report("svc", 30.0, 20.0, [])["observations"])
    assert o.completed == 5
    assert o.ttft_attainment == pytest.approx(3 / 5)  # ok, cut, fast_whole
    assert o.tpot_attainment == pytest.approx(1 / 2)  # ok met it, cut did not; unstreamed have none
    assert sum(b.weight for b in o.length_mix) == pytest.approx(1.0)


def test_prefill_leg_is_judged_on_its_own() -> None:
    """Disaggregated: the prefill leg's end is recorded, so a TTFT miss can be told apart from a
    prefill leg that already missed (the autoscaler corrects the role that lost the time)."""
    obs = Observer(slo_ttft_s=1.0, slo_tpot_s=0.1, attainable_tokens=4096, horizon_s=60)
    for i in range(10):
        t = obs.arrived("svc", "prefill", 1000, 10.0 + i)
        obs.routed(t, 0, 10.0 + i)
        obs.prefill_done(t, 10.0 + i + (1.5 if i < 2 else 0.3))  # 2 prefill legs too slow
        obs.first_token(t, 10.0 + i + (2.0 if i < 5 else 0.4))  # 3 more lost after the leg
        obs.finished(t, 20, 12.0 + i + 2.0)
    unified = obs.arrived("svc", "unified", 1000, 15.0)
    obs.first_token(unified, 15.5)
    obs.finished(unified, 20, 16.0)
    o = Observations.model_validate(obs.report("svc", 30.0, 30.0, [])["observations"])
    assert o.ttft_attainment == pytest.approx(6 / 11) and o.prefill_attainment == pytest.approx(8 / 10)
    quiet = Observer(slo_ttft_s=1.0, slo_tpot_s=0.1, attainable_tokens=4096, horizon_s=60)
    t = quiet.arrived("svc", "unified", 1000, 1.0)
    quiet.first_token(t, 1.5)
    quiet.finished(t, 20, 2.0)
    assert quiet.report("svc", 30.0, 30.0, [])["observations"]["prefill_attainment"] is None


def test_idle_service_reports_zero_rate_with_a_valid_mix() -> None:
    obs = Observer(slo_ttft_s=1.0, slo_tpot_s=0.1, attainable_tokens=10, horizon_s=60)
    o = Observations.model_validate(obs.report("svc", 30.0, 50.0, [_load("a", 0)])["observations"])
    assert o.arrival_rate == 0 and o.ttft_attainment is None and len(o.length_mix) == 1


def test_token_counter_prefers_usage_and_skips_done() -> None:
    c = TokenCounter()
    for chunk in (b'data: {"choices":[{"text":"a"}]}\n\n', b'data: {"choices":[{"text":"b"}]}\n\n'
                  b'data: {"choices":[{"text":"c"}]}\n\n', b"data: [DONE]\n\n"):
        c.feed(chunk)
    assert c.tokens == 3
    c.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}\n\n')
    assert c.tokens == 7


def test_attainable_prompt_is_the_slo_boundary() -> None:
    n = max_attainable_prompt(lambda t: 0.001 * t, 2.0)
    assert n == 2000


# --- the real gateway, read by the autoscaler's own source -------------------------------------

async def test_autoscaler_source_reads_exact_values_from_a_live_gateway() -> None:
    async with serving(sim_app(port=0)) as a, serving(sim_app(port=0)) as b, \
            serving(gateway_app([a, b], slo_ttft=5.0, slo_tpot=1e-9)) as gw, httpx.AsyncClient(timeout=30) as c:
        t_start = time.monotonic()
        prefixes = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 9], [7, 8], [1, 2, 3, 4, 5, 6], [7, 8]]
        for i, ids in enumerate(prefixes * 2):
            body = ext_body(ids, stream=True, stream_options={"include_usage": True} if i % 2 else None)
            async with c.stream("POST", gw + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                await r.aread()
        r = await c.post(gw + "/v1/completions", json=ext_body([3, 3]))  # one non-streamed
        assert r.status_code == 200
        sent = len(prefixes) * 2 + 1
        window = time.monotonic() - t_start + 2.0  # covers every request (1 s buckets)
        decisions = (await c.get(gw + "/admin/decisions", params={"limit": 1000})).json()["decisions"]
        assert len(decisions) == sent

        source = GatewayObservationSource(gw)
        try:
            report = await source.report("default", MODEL, window, 123.0)
        finally:
            await source.close()
        o = report.observations
        assert o.time_s == 123.0
        assert o.arrival_rate == pytest.approx(sent / window)
        hits = sum(d["hit_tokens"] for d in decisions)
        assert hits > 0
        assert o.prefix_hit_ratio == pytest.approx(hits / sum(d["prompt_tokens"] for d in decisions))
        # every request generated its 8 tokens (the usage chunk, the SSE events, the JSON body agree)
        assert {b.output_tokens for b in o.length_mix} == {8}
        assert sum(b.weight for b in o.length_mix) == pytest.approx(1.0)
        # power-of-two classes, each at its exact mean: the mix's mean prompt is the mean sent
        prompts = [512 * len(ids) for ids in prefixes * 2] + [1024]
        mean = sum(b.weight * b.input_tokens for b in o.length_mix)
        assert mean == pytest.approx(sum(prompts) / len(prompts), abs=1.0) and len(o.length_mix) == 2
        assert o.completed == sent  # the non-streamed one: its end-to-end time is its client's TTFT
        assert o.ttft_attainment == 1.0 and o.tpot_attainment == 0.0  # 5 s TTFT met; a 1 ns TPOT never
        assert o.roles["unified"].ready == 2
        assert report.inflight == {a: 0, b: 0}

        # a stream in flight shows up on its instance
        async with c.stream("POST", gw + "/v1/completions", json=ext_body([5], max_tokens=5000, stream=True)) as r:
            chunks = r.aiter_raw()  # kept: a collected iterator closes the response
            await chunks.__anext__()
            inflight = (await c.get(gw + "/admin/observations", params={"service": MODEL, "window": 5}
                                    )).json()["inflight"]
            assert inflight[r.headers["x-tandem-instance"]] == 1 and sum(inflight.values()) == 1

        bad = await c.get(gw + "/admin/observations", params={"service": MODEL, "window": 0})
        assert bad.status_code == 422 and "window" in bad.text
        unknown = await c.get(gw + "/admin/observations", params={"service": "nope", "window": 5})
        assert unknown.status_code == 404 and "service" in unknown.text


@pytest.mark.parametrize("path", ["/admin/observations", "/admin/observation-counts"])
async def test_observations_need_the_admin_key(path: str) -> None:
    async with serving(sim_app(port=0)) as a, \
            serving(gateway_app([a], api_keys="client-key-1", admin_api_keys="admin-key-1")) as gw, \
            httpx.AsyncClient(timeout=10) as c:
        params = {"service": MODEL, "window": 5}
        assert (await c.get(gw + path, params=params)).status_code == 401
        client = await c.get(gw + path, params=params, headers={"Authorization": "Bearer client-key-1"})
        assert client.status_code == 401  # a client key never opens the admin API
        keyless = GatewayObservationSource(gw)
        keyed = GatewayObservationSource(gw, admin_key="admin-key-1")  # what the autoscaler sends
        try:
            with pytest.raises(ObservationUnavailable, match="401"):
                await keyless.report("default", MODEL, 5.0, 1.0)
            assert (await keyed.report("default", MODEL, 5.0, 1.0)).observations.arrival_rate == 0
        finally:
            await keyless.close()
            await keyed.close()


# --- the drain contract ------------------------------------------------------------------------

def draining(p: dict) -> dict:
    """The pod as the autoscaler's actuator leaves it: annotated with the time its drain began."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = p["metadata"]
    return {**p, "metadata": {**meta, "annotations": {**meta["annotations"], ANN_DRAINING: stamp}}}


def test_draining_pod_is_no_endpoint_but_its_service_is_known() -> None:
    live, marked = pod("engine-a", 8001), draining(pod("engine-b", 8002))
    assert endpoint_from_pod(live, 8000) is not None and endpoint_from_pod(marked, 8000) is None
    pods = PodSet()
    pods.reset([marked])
    assert pods.endpoints(8000) == set() and pods.services() == {"svc"}




async def test_draining_annotation_drains_and_reports_drained(tmp_path: Path) -> None:
    async with serving(sim_app(port=0)) as a, serving(sim_app(port=0)) as b:
        port_a, port_b = int(a.rsplit(":", 1)[1]), int(b.rsplit(":", 1)[1])
        api = FakeApiServer([pod("engine-a", port_a), pod("engine-b", port_b, ready=False)])
        async with serving(api.app) as api_url:
            app = gateway_app([], discovery="kubernetes", kubeconfig=kubeconfig(tmp_path, api_url),
                              k8s_namespace="llm", k8s_selector="serving.tandem.dev/service=svc", k8s_watch_timeout=2)
            async with serving(app) as gw, httpx.AsyncClient(timeout=30) as c:
                async def report() -> dict:
                    r = await c.get(gw + "/admin/observations", params={"namespace": "llm", "service": "svc",
                                                                        "window": 10})
                    assert r.status_code == 200, r.text
                    return r.json()

                def counted(rep: dict) -> tuple[int, int, int]:
                    o = count_pods(list(api.pods.values()), rep["inflight"], datetime.now(UTC), 300.0)
                    return o.ready, o.draining, o.drained

                other_ns = await c.get(gw + "/admin/observations", params={"namespace": "x", "service": "svc"})
                assert other_ns.status_code == 404 and "namespace" in other_ns.text
                # a stream of ~4 s lands on engine-a (the only ready pod) and keeps running
                async with c.stream("POST", gw + "/v1/completions",
                                    json=ext_body([1], max_tokens=LONG, stream=True)) as stream:
                    assert stream.headers["x-tandem-instance"] == a
                    chunks = stream.aiter_raw()
                    await chunks.__anext__()
                    api.emit("MODIFIED", pod("engine-b", port_b))
                    api.emit("MODIFIED", draining(pod("engine-a", port_a)))

                    async def a_draining() -> bool:
                        data = (await c.get(gw + "/admin/instances")).json()["instances"]
                        return {i["url"]: i["draining"] for i in data}.get(a) is True and \
                            any(i["url"] == b for i in data)
                    await until(a_draining)
                    rep = await report()
                    assert rep["inflight"]["engine-a"] == 1
                    assert counted(rep) == (1, 1, 0)  # b ready; a draining, not drained while it streams
                    for i in range(4):  # no new request goes to the draining pod
                        r = await c.post(gw + "/v1/completions", json=ext_body([1, i]))
                        assert r.status_code == 200 and r.headers["x-tandem-instance"] == b
                    for _ in range(3):  # the in-flight stream still flows
                        assert await chunks.__anext__()
                    assert (await report())["inflight"]["engine-a"] == 1
                    async for _ in chunks:  # to its end
                        pass
                # the stream ended: engine-a holds nothing, the actuator counts it drained

                async def a_idle() -> bool:
                    return (await report())["inflight"].get("engine-a", 0) == 0
                await until(a_idle)
                rep = await report()
                assert counted(rep) == (1, 0, 1)
                # un-drained (load came back): routable again
                api.emit("MODIFIED", pod("engine-a", port_a))

                async def a_back() -> bool:
                    data = (await c.get(gw + "/admin/instances")).json()["instances"]
                    return any(i["url"] == a and not i["draining"] for i in data)
                await until(a_back)


async def test_undrained_pod_keeps_its_inflight_accounting(tmp_path: Path) -> None:
    async with serving(sim_app(port=0)) as a:
        port_a = int(a.rsplit(":", 1)[1])
        api = FakeApiServer([pod("engine-a", port_a)])
        async with serving(api.app) as api_url:
            app = gateway_app([], discovery="kubernetes", kubeconfig=kubeconfig(tmp_path, api_url),
                              k8s_namespace="llm", k8s_selector="serving.tandem.dev/service=svc", k8s_watch_timeout=2)
            async with serving(app) as gw, httpx.AsyncClient(timeout=30) as c:
                async def a_state() -> dict:
                    data = (await c.get(gw + "/admin/instances")).json()["instances"]
                    return next((i for i in data if i["url"] == a), {})

                async with c.stream("POST", gw + "/v1/completions",
                                    json=ext_body([1], max_tokens=LONG, stream=True)) as stream:
                    chunks = stream.aiter_raw()  # kept: a collected iterator closes the response
                    await chunks.__anext__()
                    api.emit("MODIFIED", draining(pod("engine-a", port_a)))

                    async def is_draining() -> bool:
                        return (await a_state()).get("draining") is True
                    await until(is_draining)
                    api.emit("MODIFIED", pod("engine-a", port_a))

                    async def is_back() -> bool:
                        return (await a_state()).get("draining") is False
                    await until(is_back)
                    assert (await a_state())["inflight_requests"] == 1  # the running stream is still counted
                    assert await chunks.__anext__()
                    async for _ in chunks:
                        pass

                async def released() -> bool:  # released exactly once, not below zero
                    return (await a_state())["inflight_requests"] == 0
                await until(released)
                await asyncio.sleep(0.3)
                assert (await a_state())["inflight_requests"] == 0
                r = await c.post(gw + "/v1/completions", json=ext_body([2]))
                assert r.status_code == 200 and r.headers["x-tandem-instance"] == a


async def test_disaggregated_roles_are_observed() -> None:
    async with serving(sim_app(port=0, role="prefill")) as p, serving(sim_app(port=0, role="decode")) as d, \
            serving(gateway_app([], prefill_instances=[p], decode_instances=[d])) as gw, \
            httpx.AsyncClient(timeout=30) as c:
        t_start = time.monotonic()
        for i in range(4):
            async with c.stream("POST", gw + "/v1/completions", json=ext_body([1, 2, i], stream=True)) as r:
                assert r.status_code == 200 and r.headers["x-tandem-decision"] == "pd"
                await r.aread()
        window = time.monotonic() - t_start + 2.0
        async with c.stream("POST", gw + "/v1/completions",
                            json=ext_body([4], max_tokens=LONG, stream=True)) as stream:
            chunks = stream.aiter_raw()  # kept: a collected iterator closes the response
            await chunks.__anext__()
            rep = (await c.get(gw + "/admin/observations", params={"service": MODEL, "window": window})).json()
            assert rep["inflight"] == {p: 0, d: 1}  # prefilled and handed over; decoding on d
            async for _ in chunks:
                pass
        o = Observations.model_validate(rep["observations"])
        assert set(o.roles) == {"prefill", "decode"}
        assert o.roles["prefill"].ready == 1 and o.roles["decode"].ready == 1
        assert o.arrival_rate == pytest.approx(5 / window)  # the in-flight one arrived too
        assert o.completed == 4 and o.ttft_attainment == 1.0 and o.prefill_attainment == 1.0
        assert [(b.input_tokens, b.output_tokens) for b in o.length_mix] == [(1536, 8)]
        # 3 hits of the shared 2-block prefix over every routed prompt (the in-flight one included)
        assert o.prefix_hit_ratio == pytest.approx(3 * 1024 / (4 * 1536 + 512))


async def test_a_decode_instance_that_leaves_stays_counted_until_its_stream_ends() -> None:
    from tandem.router.discovery import Endpoint

    async with serving(sim_app(port=0, role="prefill")) as p, serving(sim_app(port=0, role="decode")) as d:
        app = gateway_app([], prefill_instances=[p], decode_instances=[d])
        async with serving(app) as gw, httpx.AsyncClient(timeout=30) as c:
            async def inflight() -> dict:
                return (await c.get(gw + "/admin/observations", params={"service": MODEL, "window": 5})
                        ).json()["inflight"]

            async with c.stream("POST", gw + "/v1/completions",
                                json=ext_body([4], max_tokens=LONG, stream=True)) as stream:
                chunks = stream.aiter_raw()  # kept: a collected iterator closes the response
                await chunks.__anext__()
                await app.gateway.set_endpoints({Endpoint(url=p, role="prefill")})  # the decode pod left
                assert app.gateway.pd["decode"] == {}  # nothing new goes there
                assert (await inflight())[d] == 1  # but its stream is still counted
                async for _ in chunks:
                    pass

            async def done() -> bool:
                return (await inflight()).get(d, 0) == 0
            await until(done)
            assert app.gateway.leaving == []


async def test_requests_the_gateway_fails_are_observed_as_misses() -> None:
    """An engine answering 500 to everything: the clients get clear 5xx answers (502 after the
    retries, then 503 once its circuit is open) and the autoscaler sees a TTFT miss per request, not
    an empty window that reads as "no load"."""
    async with serving(sim_app(port=0, fault="error", error_rate=1.0)) as a, \
            serving(gateway_app([a], slo_ttft=5.0, max_attempts=2, retry_backoff=0.01)) as gw, \
            httpx.AsyncClient(timeout=30) as c:
        for stream in (True, False):
            r = await c.post(gw + "/v1/completions", json=ext_body([1, 2], stream=stream))
            assert r.status_code in (502, 503) and r.json()["error"]["type"] == "server_error"
        o = Observations.model_validate((await c.get(gw + "/admin/observations", params={
            "service": MODEL, "window": 60})).json()["observations"])
    assert o.completed == 2 and o.ttft_attainment == 0.0
