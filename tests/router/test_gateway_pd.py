"""Disaggregated serving over real HTTP: gateway -> prefill sim -> decode sim, both KV handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from gatewayutil import completion_body, gateway_app, sim_app, sse_text

from tandem.serve import serving

MODEL = "Llama-3-8B"
PROMPT = "Disaggregated serving moves the prompt's KV cache from a prefill engine to a decode engine. " * 12


def hint_gateway(instances: list[str], **kw: object):
    """A gateway that believes the ``x_tandem`` prompts these tests send (simulator block ids) and names
    the engines that served a request by their URLs (--expose-topology)."""
    return gateway_app(instances, trust_prompt_hints=True, expose_topology=True, **kw)


def pd_gateway(prefill: list[str], decode: list[str], **kw: object):
    return hint_gateway([], prefill_instances=prefill, decode_instances=decode, **kw)


async def kv_log(client: httpx.AsyncClient, url: str) -> dict:
    return (await client.get(url + "/admin/kv")).json()


@contextlib.asynccontextmanager
async def serve_dying(app: DiesAfterHandshake) -> AsyncIterator[str]:
    """Like :func:`tandem.serve.serving`, but the wrapper gets the server so it can shut it down."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                           access_log=False, timeout_graceful_shutdown=1))
    app.server = server
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)


class DiesAfterHandshake:
    """ASGI wrapper: the first prefill handshake it answers (across all wrappers sharing ``budget``)
    is this engine's last act: from then on it answers 503 and its server shuts down, so the
    decode's KV pull finds nobody."""

    def __init__(self, app, budget: list[int]) -> None:
        self.app, self.budget, self.dead, self.server = app, budget, False, None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if self.dead:
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"engine is gone"})
            return None
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        handshake = scope["path"].startswith("/v1/") and b"kv_transfer_params" in body

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
        if handshake and self.budget[0] > 0:
            self.budget[0] -= 1
            self.dead = True
            self.server.should_exit = True
        return None


@pytest.fixture
async def vllm_pd():
    async with serving(sim_app(role="prefill", engine_id="p0")) as p0, \
            serving(sim_app(role="prefill", engine_id="p1")) as p1, \
            serving(sim_app(role="decode", kv_link_gbps=50.0)) as d0, \
            serving(sim_app(role="decode", kv_link_gbps=50.0)) as d1, \
            serving(pd_gateway([p0, p1], [d0, d1])) as gw:
        yield gw, {"p0": p0, "p1": p1}, [d0, d1]


async def test_vllm_pd_stream_through_gateway_carries_the_handshake(vllm_pd) -> None:
    gw, prefills, _ = vllm_pd
    body = completion_body(PROMPT, max_tokens=12, stream=True)
    async with serving(sim_app()) as unified, httpx.AsyncClient(timeout=20) as c:
        direct = (await c.post(unified + "/v1/completions", json=body)).text
        prompt_tokens = (await c.post(unified + "/v1/completions", json={**body, "stream": False})
                         ).json()["usage"]["prompt_tokens"]
        async with c.stream("POST", gw + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            raw = "".join([chunk async for chunk in resp.aiter_text()])
            p_url, d_url = resp.headers["x-tandem-prefill-instance"], resp.headers["x-tandem-decode-instance"]
        assert sse_text(raw) == sse_text(direct) != "" and raw.rstrip().endswith("data: [DONE]")
        assert sum(1 for line in raw.splitlines() if line.startswith("data: {")) == 12
        got = await kv_log(c, d_url)
        record = got["received"][-1]
        params = record["kv_transfer_params"]
        engine = (await kv_log(c, p_url))["engine_id"]
        assert record["protocol"] == "vllm" and record["result"] == "ok"
        assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
        assert params["remote_engine_id"] == engine and prefills[engine] == p_url
        assert f"{params['remote_host']}:{params['remote_port']}" == p_url.removeprefix("http://")
        assert len(params["remote_block_ids"]) == -(-prompt_tokens // 16) and params["tp_size"] == 1
        assert record["transferred_tokens"] == prompt_tokens
        prefill_metrics = (await c.get(p_url + "/metrics")).text
        assert "vllm:generation_tokens_total" in prefill_metrics
        # The prefill leg asked for one token and the decode leg pulled the KV it held.
        assert 'vllm:generation_tokens_total{engine="0",model_name="Llama-3-8B"} 1.0' in prefill_metrics
        assert (await kv_log(c, p_url))["counts"]["pulls_served"] == 1


async def test_vllm_pd_plain_chat_and_decode_spread(vllm_pd) -> None:
    gw, _, decodes = vllm_pd
    async with httpx.AsyncClient(timeout=20) as c:
        bodies = [{"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": f"q{i} " * 50}]}
                  for i in range(6)]
        answers = await asyncio.gather(*(c.post(gw + "/v1/chat/completions", json=b) for b in bodies))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert all(a.json()["usage"]["completion_tokens"] == 4 for a in answers)
        oks = [(await kv_log(c, d))["counts"]["ok"] for d in decodes]
    assert sum(oks) == 6 and min(oks) >= 1  # least-loaded decode choice spreads concurrent requests


async def test_sglang_pd_through_gateway() -> None:
    async with serving(sim_app(role="prefill", metrics="sglang")) as p0, \
            serving(sim_app(role="decode", metrics="sglang")) as d0, \
            serving(pd_gateway([p0], [d0], pd_engine="sglang")) as gw, httpx.AsyncClient(timeout=20) as c:
        async with c.stream("POST", gw + "/v1/completions", json=completion_body(PROMPT, stream=True)) as resp:
            assert resp.status_code == 200
            raw = "".join([chunk async for chunk in resp.aiter_text()])
        assert sum(1 for line in raw.splitlines() if line.startswith("data: {")) == 8
        record = (await kv_log(c, d0))["received"][-1]
        assert record["protocol"] == "sglang" and record["result"] == "ok"
        boot = record["bootstrap"]
        assert f"{boot['bootstrap_host']}:{boot['bootstrap_port']}" == p0.removeprefix("http://")
        assert 0 <= boot["bootstrap_room"] < 2**63
        assert (await kv_log(c, p0))["counts"]["rooms_served"] == 1


async def test_prefill_dying_after_the_handshake_is_retried_elsewhere() -> None:
    budget = [1]
    wrapped = [DiesAfterHandshake(sim_app(role="prefill", engine_id=f"p{i}"), budget) for i in range(2)]
    async with serve_dying(wrapped[0]) as p0, serve_dying(wrapped[1]) as p1, \
            serving(sim_app(role="decode")) as d0, \
            serving(pd_gateway([p0, p1], [d0])) as gw, httpx.AsyncClient(timeout=20) as c:
        t0 = time.monotonic()
        async with c.stream("POST", gw + "/v1/completions", json=completion_body(PROMPT, stream=True)) as resp:
            assert resp.status_code == 200
            raw = "".join([chunk async for chunk in resp.aiter_text()])
            survivor = resp.headers["x-tandem-prefill-instance"]
        assert time.monotonic() - t0 < 10
        assert sum(1 for line in raw.splitlines() if line.startswith("data: {")) == 8
        dead = [w for w in wrapped if w.dead]
        assert len(dead) == 1 and survivor == (p1 if dead[0] is wrapped[0] else p0)
        got = await kv_log(c, d0)
        assert got["counts"]["failed"] == 1 and got["counts"]["ok"] == 1
        assert "unreachable" in got["received"][0]["error"] or "answered 503" in got["received"][0]["error"]


async def test_only_prefill_dying_is_a_clear_error_not_a_hang() -> None:
    wrapped = DiesAfterHandshake(sim_app(role="prefill"), [1])
    async with serve_dying(wrapped) as p0, serving(sim_app(role="decode")) as d0, \
            serving(pd_gateway([p0], [d0], retry_backoff=0.01)) as gw, httpx.AsyncClient(timeout=20) as c:
        t0 = time.monotonic()
        resp = await c.post(gw + "/v1/completions", json=completion_body(PROMPT, stream=True))
        assert time.monotonic() - t0 < 10
        # Depending on how far its shutdown got: the dead prefill's circuit is open and no prefill is left
        # (503), its last 503 answers read as refusals beyond pd_max_hops (503), or the retries run out
        # (502). Each is fast and says why.
        message = resp.json()["error"]["message"]
        expected = {503: ("no prefill-decode pair left to try after", "refused the request"),
                    502: ("failed after 3 attempts",)}
        assert any(p in message for p in expected.get(resp.status_code, ())), (resp.status_code, message)
        assert p0 in message  # the error names the instance that failed


async def test_full_prefill_refuses_and_the_request_is_forwarded() -> None:
    async with serving(sim_app(role="prefill", max_pending=1, engine_id="busy")) as busy, \
            serving(sim_app(role="prefill", engine_id="free")) as free, \
            serving(sim_app(role="decode")) as d0, \
            serving(pd_gateway([busy, free], [d0])) as gw, httpx.AsyncClient(timeout=30) as c:
        # Occupy the busy engine's only slot with a long direct generation.
        hog = asyncio.create_task(c.post(busy + "/v1/completions", json=completion_body("hog", max_tokens=20000)))
        await asyncio.sleep(0.2)
        answers = [await c.post(gw + "/v1/completions", json=completion_body(f"{i} {PROMPT}")) for i in range(6)]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert {a.headers["x-tandem-prefill-instance"] for a in answers} == {free}
        admin = (await c.get(gw + "/admin/instances")).json()
        hog.cancel()
    states = {i["url"]: i for i in admin["instances"]}
    assert states[busy]["breaker"] == "closed"  # a refusal is not ill health: its circuit stays closed


async def test_refusals_are_bounded_by_max_hops() -> None:
    async with serving(sim_app(role="prefill", max_pending=1)) as busy, serving(sim_app(role="decode")) as d0, \
            serving(pd_gateway([busy], [d0], pd_max_hops=1)) as gw, httpx.AsyncClient(timeout=30) as c:
        hog = asyncio.create_task(c.post(busy + "/v1/completions", json=completion_body("hog", max_tokens=20000)))
        await asyncio.sleep(0.2)
        resp = await c.post(gw + "/v1/completions", json=completion_body(PROMPT))
        hog.cancel()
    assert resp.status_code == 503 and "refused" in resp.json()["error"]["message"]
    assert json.loads(resp.text)["error"]["type"] == "server_error"


async def test_long_uncached_prompts_are_offloaded_to_the_remote_prefill_pool() -> None:
    async with serving(sim_app(role="prefill", engine_id="local")) as p0, \
            serving(sim_app(role="prefill", engine_id="remote")) as r0, \
            serving(sim_app(role="decode", kv_rtt_ms=10.0, kv_link_gbps=100.0)) as d0, \
            serving(hint_gateway([], prefill_instances=[p0], remote_prefill_instances=[r0], decode_instances=[d0],
                              offload_threshold=2048)) as gw, httpx.AsyncClient(timeout=20) as c:
        routes = {}
        for tokens in (1000, 6000, 2048, 2049):
            body = {"model": MODEL, "max_tokens": 3, "stream": True,
                    "x_tandem": {"hash_ids": [tokens], "prompt_tokens": tokens, "block_size": 512}}
            async with c.stream("POST", gw + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                raw = "".join([chunk async for chunk in resp.aiter_text()])
                routes[tokens] = (resp.headers["x-tandem-prefill-route"], resp.headers["x-tandem-prefill-instance"])
            assert sum(1 for line in raw.splitlines() if line.startswith("data: {")) == 3
        assert routes == {1000: ("local", p0), 6000: ("remote", r0), 2048: ("local", p0), 2049: ("remote", r0)}
        engines = [(r["kv_transfer_params"]["remote_engine_id"], r["transferred_tokens"])
                   for r in (await kv_log(c, d0))["received"]]
        assert engines == [("local", 1000), ("remote", 6000), ("local", 2048), ("remote", 2049)]


async def test_remote_prefill_pool_behind_a_token_gets_it_and_local_engines_do_not() -> None:
    """The remote pool's engines require a bearer token (vLLM --api-key); the gateway sends its
    RemotePrefillPool token there (requests, model probe, scrapes) and to no local engine."""
    token = "remote-s3cret"
    seen: dict[str, set[str]] = {"local": set(), "remote": set()}

    def recording(app: FastAPI, name: str) -> FastAPI:
        @app.middleware("http")
        async def record(request, call_next):
            seen[name].add(request.headers.get("authorization", ""))
            return await call_next(request)
        return app

    async with serving(recording(sim_app(role="prefill", engine_id="local"), "local")) as p0, \
            serving(recording(sim_app(role="prefill", engine_id="remote", api_key=token), "remote")) as r0, \
            serving(sim_app(role="decode")) as d0, \
            serving(hint_gateway([], prefill_instances=[p0], remote_prefill_instances=[r0], decode_instances=[d0],
                              offload_threshold=2048, remote_prefill_token=token)) as gw, \
            httpx.AsyncClient(timeout=20) as c:
        assert (await c.post(r0 + "/v1/completions", json=completion_body())).status_code == 401  # it is guarded
        for tokens, route in ((6000, "remote"), (1000, "local")):
            body = {"model": MODEL, "max_tokens": 3, "x_tandem": {"hash_ids": [tokens], "prompt_tokens": tokens,
                                                                   "block_size": 512}}
            resp = await c.post(gw + "/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-tandem-prefill-route"] == route
        admin = (await c.get(gw + "/admin/instances")).text
    assert f"Bearer {token}" in seen["remote"]
    assert all(token not in h for h in seen["local"])
    assert token not in admin


def series(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics text, keyed by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(exposition) for s in f.samples}


def offload_view(exposition: str) -> dict[str, float]:
    got = series(exposition)
    m = (("model", MODEL),)
    return {"local": got.get(("tandem_prefill_route_total", (*m, ("route", "local"))), 0.0),
            "remote": got.get(("tandem_prefill_route_total", (*m, ("route", "remote"))), 0.0),
            "bytes": got.get(("tandem_offload_link_bytes_total", m), 0.0),
            "util": got.get(("tandem_offload_link_utilization", m), 0.0),
            "threshold": got.get(("tandem_offload_threshold_tokens", m), -1.0)}


async def test_offload_metrics_and_admin_move_only_when_requests_go_remote() -> None:
    link_gbps = 2.0
    async with serving(sim_app(role="prefill", engine_id="local")) as p0, \
            serving(sim_app(role="prefill", engine_id="remote")) as r0, \
            serving(sim_app(role="decode", kv_link_gbps=20.0)) as d0, \
            serving(hint_gateway([], prefill_instances=[p0], remote_prefill_instances=[r0], decode_instances=[d0],
                              offload_threshold=2048, remote_link_gbps=link_gbps)) as gw, \
            httpx.AsyncClient(timeout=20) as c:

        async def send(tokens: int) -> str:
            body = {"model": MODEL, "max_tokens": 2, "stream": True,
                    "x_tandem": {"hash_ids": [tokens, 1], "prompt_tokens": tokens, "block_size": 512}}
            async with c.stream("POST", gw + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                await resp.aread()
                return resp.headers["x-tandem-prefill-route"]

        async def decode_bytes() -> float:
            return series((await c.get(d0 + "/metrics")).text)[("tandem_sim_kv_transfer_bytes_total", ())]

        assert [await send(t) for t in (1000, 2048)] == ["local", "local"]
        kept = offload_view((await c.get(gw + "/metrics")).text)
        assert kept == {"local": 2.0, "remote": 0.0, "bytes": 0.0, "util": 0.0, "threshold": 2048.0}
        before = await decode_bytes()

        assert [await send(t) for t in (6000, 3000)] == ["remote", "remote"]
        moved = offload_view((await c.get(gw + "/metrics")).text)
        # The gateway's count of link bytes is what the decode engine really received over the link.
        assert moved["bytes"] == await decode_bytes() - before > 0
        assert (moved["local"], moved["remote"], moved["threshold"]) == (2.0, 2.0, 2048.0)
        window = 30.0  # OffloadSettings.link_window_s
        admin = (await c.get(gw + "/admin/offload")).json()
        st = admin["models"][MODEL]
        # Utilisation is against the capacity the gateway measured from the two transfers (bytes /
        # busy time, ~0.47 s of it): the decode's simulated 20 Gbit/s link, not the configured 2 Gbit/s;
        # the decode's first step is in each interval, so the reading is low, never high (on two busy
        # cores as low as 7 Gbit/s: the simulated transfer's sleep stretches), and far above the 2 configured.
        assert st["link_nominal_gbps"] == link_gbps and st["link_measured_gbps"] == st["link_gbps"]
        assert 2 * link_gbps < st["link_measured_gbps"] <= 20.0
        assert moved["util"] == pytest.approx(moved["bytes"] * 8 / 1e9 / window / st["link_gbps"], rel=1e-6)
        assert 0 < moved["util"] < 1
        assert st["link_committed_bytes"] == 0  # both transfers ended
        assert admin["remote_link_gbps"] == link_gbps
        assert st["threshold_tokens"] == 2048 and st["pinned"] is True and st["samples"] == 4
        assert st["local_instances"] == 1 and st["remote_instances"] == 1
        assert st["link_utilization"] == pytest.approx(moved["util"], rel=1e-3)
        assert st["link_egress_gbps"] == pytest.approx(moved["bytes"] * 8 / 1e9 / window, rel=1e-3)

        # The autoscaler sees the threshold in force (it sizes the local prefill pool for what stays
        # local), an idle remote pool and no other model on the link.
        obs = (await c.get(gw + "/admin/observations", params={"service": MODEL})).json()["observations"]
        assert (obs["offload_threshold"], obs["remote_queue_s"], obs["link_other_gbps"]) == (2048, 0.0, 0.0)


async def test_a_remote_prefill_pool_alone_makes_the_gateway_ready_and_serves_everything() -> None:
    """Naive offload (no local prefill pool): ready, and every prompt prefilled remote."""
    async with serving(sim_app(role="prefill", engine_id="remote")) as r0, \
            serving(sim_app(role="decode", kv_link_gbps=100.0)) as d0, \
            serving(gateway_app([], remote_prefill_instances=[r0], decode_instances=[d0])) as gw, \
            httpx.AsyncClient(timeout=20) as c:
        ready = await c.get(gw + "/readyz")
        assert ready.status_code == 200 and ready.json()["routable_instances"] == 1
        resp = await c.post(gw + "/v1/completions", json=completion_body(PROMPT, max_tokens=3))
        assert resp.status_code == 200 and resp.headers["x-tandem-prefill-route"] == "remote"
        st = (await c.get(gw + "/admin/offload")).json()["models"][MODEL]
        assert st["side_choices"] == {"remote:no_local": 1}
