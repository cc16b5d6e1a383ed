"""The gateway over real HTTP: simulators and gateway on ephemeral 127.0.0.1 ports."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from gatewayutil import completion_body, gateway_app, sim_app, sse_text, until

from tandem.serve import serving

MODEL = "Llama-3-8B"


@pytest.fixture
async def cluster():
    """Two simulated engines behind one gateway (DualMap), naming them by URL (--expose-topology)."""
    async with serving(sim_app(port=0)) as a, serving(sim_app(port=0, metrics="sglang")) as b, \
            serving(gateway_app([a, b], expose_topology=True)) as gw:
        yield gw, [a, b]


async def test_streaming_and_plain_content_equal_direct(cluster) -> None:
    gw, sims = cluster
    async with httpx.AsyncClient(timeout=20) as c:
        for path, body in (("/v1/completions", completion_body("the quick brown fox")),
                           ("/v1/chat/completions", {"model": MODEL, "max_tokens": 8,
                                                     "messages": [{"role": "user", "content": "hi there"}]})):
            direct = (await c.post(sims[0] + path, json=body)).json()
            via = await c.post(gw + path, json=body)
            assert via.status_code == 200, via.text
            assert via.headers["x-tandem-instance"] in sims
            got, want = via.json()["choices"][0], direct["choices"][0]
            assert got.get("text", got.get("message")) == want.get("text", want.get("message"))
            stream_body = {**body, "stream": True}
            direct_stream = (await c.post(sims[1] + path, json=stream_body)).text
            async with c.stream("POST", gw + path, json=stream_body) as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                chunks = [chunk async for chunk in resp.aiter_text()]
            assert sse_text("".join(chunks)) == sse_text(direct_stream) != ""
            assert "".join(chunks).rstrip().endswith("data: [DONE]")


async def test_streaming_is_not_buffered(cluster) -> None:
    """The first event reaches the client long before the last one is produced."""
    gw, _ = cluster
    body = completion_body("stream me", max_tokens=200, stream=True)
    async with httpx.AsyncClient(timeout=20) as c, c.stream("POST", gw + "/v1/completions", json=body) as resp:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        times = []
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                times.append(loop.time() - t0)
    assert len(times) >= 200
    assert times[0] < times[-1] - 0.2  # 200 decode steps take > 0.2 s; the first came well before the end


async def test_openai_client_against_gateway(cluster) -> None:
    from openai import AsyncOpenAI

    gw, _ = cluster
    client = AsyncOpenAI(base_url=gw + "/v1", api_key="unused", max_retries=0)
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    comp = await client.completions.create(model=MODEL, prompt="hello", max_tokens=5)
    assert comp.choices[0].text and comp.usage.prompt_tokens > 0
    chat = await client.chat.completions.create(model=MODEL, max_tokens=5,
                                                messages=[{"role": "user", "content": "hello"}])
    assert chat.choices[0].message.content
    parts = [c.choices[0].delta.content async for c in await client.chat.completions.create(
        model=MODEL, max_tokens=5, stream=True, messages=[{"role": "user", "content": "hello"}]) if c.choices]
    assert "".join(p or "" for p in parts) == chat.choices[0].message.content
    text = [c.choices[0].text async for c in await client.completions.create(
        model=MODEL, prompt="hello", max_tokens=5, stream=True)]
    assert "".join(text) == comp.choices[0].text
    await client.close()


async def test_bad_requests_get_clear_4xx(cluster) -> None:
    """The gateway refuses what it cannot route (not JSON, no model) itself; what it can route, the
    engine judges, and the engine's answer reaches the client byte for byte."""
    gw, sims = cluster
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(gw + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = await c.post(gw + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        for path, body in (("/v1/completions", {"model": MODEL}),  # no prompt: the engine's 400
                           ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}),
                           ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "bogus", "content": 1}]})):
            direct = await c.post(sims[0] + path, json=body)
            r = await c.post(gw + path, json=body)
            assert direct.status_code == 400 and (r.status_code, r.content) == (400, direct.content), r.text
        # Any role the engine takes passes (the simulator, as vLLM, takes any).
        r = await c.post(gw + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "function", "name": "f", "content": "42"}, {"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        r = await c.post(gw + "/v1/completions", json=completion_body(model="nope"))
        assert r.status_code == 404 and MODEL in r.json()["error"]["message"]
        r = await c.post(gw + "/v1/completions", json=completion_body("x" * (9 * 1024 * 1024)))
        assert r.status_code == 413


async def test_health_metrics_admin(cluster) -> None:
    gw, sims = cluster
    async with httpx.AsyncClient(timeout=10) as c:
        assert (await c.get(gw + "/healthz")).status_code == 200
        ready = await c.get(gw + "/readyz")
        assert ready.status_code == 200 and ready.json()["routable_instances"] == 2
        for i in range(4):
            assert (await c.post(gw + "/v1/completions", json=completion_body(f"q{i}"))).status_code == 200
        await asyncio.sleep(0.5)  # a scrape or two
        inst = (await c.get(gw + "/admin/instances")).json()["instances"]
        assert {i["url"] for i in inst} == set(sims)
        assert {i["engine"]["flavor"] for i in inst} == {"vllm", "sglang"}
        assert all(i["inflight_requests"] == 0 and i["queued_requests"] == 0 for i in inst)
        rings = (await c.get(gw + "/admin/rings")).json()[MODEL]["dualmap"]
        assert rings["rings"]["a"]["members"] == sorted(sims)
        decisions = (await c.get(gw + "/admin/decisions")).json()["decisions"]
        assert len(decisions) == 4 and all(d["reason"] and len(d["candidates"]) == 2 for d in decisions)
        assert (await c.get(gw + "/admin/queues")).json()[MODEL]["waiting"] == 0
        text = (await c.get(gw + "/metrics")).text
        assert 'tandem_requests_total{decision="affinity",outcome="ok",policy="dualmap"} 4.0' in text
        assert "tandem_state_backend_up" in text and "tandem_routing_choices_total" in text


async def test_client_disconnect_cancels_upstream() -> None:
    sim = sim_app(port=0)
    async with serving(sim) as a, serving(gateway_app([a])) as gw:
        body = completion_body("long one", max_tokens=5000, stream=True)
        async with httpx.AsyncClient(timeout=10) as c, c.stream("POST", gw + "/v1/completions", json=body) as resp:
            async for _ in resp.aiter_lines():
                break
            assert len(sim.state.sim.driver.pending) == 1
        for _ in range(100):
            if not sim.state.sim.driver.pending:
                break
            await asyncio.sleep(0.02)
        assert sim.state.sim.driver.pending == {}


async def test_client_that_leaves_before_the_first_byte_is_let_go() -> None:
    """The engine never answers; the client gives up: the gateway stops waiting for the engine at
    once (not at its first-byte timeout), counts the request as client_gone and holds nothing."""
    async with serving(sim_app(port=0, fault="hang")) as a, \
            serving(gateway_app([a], first_byte_timeout=60)) as gw, httpx.AsyncClient() as admin:
        async with httpx.AsyncClient(timeout=0.5) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post(gw + "/v1/completions", json=completion_body(stream=True))

        async def let_go() -> bool:
            text = (await admin.get(gw + "/metrics")).text
            gone = 'outcome="client_gone"' in text and "tandem_requests_total" in text
            inflight = (await admin.get(gw + "/admin/instances")).json()["instances"][0]
            return gone and inflight["inflight_requests"] == 0 and inflight["unprefilled_requests"] == 0

        await until(let_go, limit=5.0)


async def test_api_keys_and_rate_limit(tmp_path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {key: sk-test-123456, name: alice, rpm: 2}\n")
    async with serving(sim_app(port=0)) as a, serving(gateway_app([a], api_keys_file=keys)) as gw, \
            httpx.AsyncClient(timeout=10) as c:
        assert (await c.post(gw + "/v1/completions", json=completion_body())).status_code == 401
        auth = {"authorization": "Bearer sk-test-123456"}
        for _ in range(2):
            assert (await c.post(gw + "/v1/completions", json=completion_body(), headers=auth)).status_code == 200
        r = await c.post(gw + "/v1/completions", json=completion_body(), headers=auth)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "alice" in r.json()["error"]["message"] and "sk-test" not in r.text
        # A client key never opens the admin API; with only client keys configured it is off.
        assert (await c.get(gw + "/admin/instances")).status_code == 404
        assert (await c.get(gw + "/admin/instances", headers=auth)).status_code == 404


async def test_full_queue_answers_429_with_retry_after() -> None:
    async with serving(sim_app(port=0)) as a:
        app = gateway_app([a], max_queue_per_instance=1, routing={"dispatch_budget_s": 0.0}, trust_prompt_hints=True)
        async with serving(app) as gw, httpx.AsyncClient(timeout=30) as c:
            body = {"model": MODEL, "max_tokens": 2, "x_tandem": {"hash_ids": [], "prompt_tokens": 8000}}
            results = await asyncio.gather(*(c.post(gw + "/v1/completions", json=body) for _ in range(5)))
    codes = sorted(r.status_code for r in results)
    assert 429 in codes and 200 in codes
    assert all("retry-after" in r.headers for r in results if r.status_code == 429)


def test_gateway_settings_reject_unknown_policy_and_routing_keys() -> None:
    with pytest.raises(ValueError, match="policy"):
        gateway_app(["http://127.0.0.1:9"], policy="bogus")
    with pytest.raises(ValueError, match=r"routing\.bogus"):
        gateway_app(["http://127.0.0.1:9"], routing={"bogus": 1})


async def test_client_leaving_while_queued_is_forgotten() -> None:
    """Late binding holds the second request in the gateway; its client leaves; nothing of it remains."""
    sim = sim_app(port=0)
    async with serving(sim) as a, \
            serving(gateway_app([a], routing={"dispatch_budget_s": 0.0}, trust_prompt_hints=True)) as gw, \
            httpx.AsyncClient(timeout=30) as c:
        big = {"model": MODEL, "max_tokens": 2, "x_tandem": {"hash_ids": [], "prompt_tokens": 30000}}
        first = asyncio.create_task(c.post(gw + "/v1/completions", json=big))
        await asyncio.sleep(0.2)
        second = asyncio.create_task(c.post(gw + "/v1/completions", json=big))
        for _ in range(100):
            if (await c.get(gw + "/admin/queues")).json()[MODEL]["waiting"] == 1:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the second request was never queued")
        second.cancel()
        for _ in range(100):
            queues = (await c.get(gw + "/admin/queues")).json()[MODEL]
            if queues["waiting"] == 0:
                break
            await asyncio.sleep(0.02)
        assert queues["waiting"] == 0 and all(not q for q in queues["queued"]["dualmap"].values())
        assert (await first).status_code == 200
        await asyncio.sleep(0.3)
        assert sim.state.sim.engine.counters.prompt_tokens == 30000  # the engine never saw the second one
        inst = (await c.get(gw + "/admin/instances")).json()["instances"][0]
        assert inst["queued_requests"] == 0 and inst["inflight_requests"] == 0


async def test_pd_pools_are_listed_and_routed() -> None:
    async with serving(sim_app(port=0, role="prefill")) as p, serving(sim_app(port=0, role="decode")) as d, \
            serving(gateway_app([], prefill_instances=[p], decode_instances=[d])) as gw, \
            httpx.AsyncClient(timeout=10) as c:
        models = (await c.get(gw + "/v1/models")).json()["data"]
        assert models == [{"id": MODEL, "object": "model", "created": 0, "owned_by": "tandem", "instances": 2}]
        r = await c.post(gw + "/v1/completions", json=completion_body())
        assert r.status_code == 200 and r.headers["x-tandem-decision"] == "pd"  # tests/router/test_gateway_pd.py
        roles = {i["role"] for i in (await c.get(gw + "/admin/instances")).json()["instances"]}
        assert roles == {"prefill", "decode"}


async def test_event_loop_lag_is_measured_and_shows_a_blocked_loop() -> None:
    """The gateway samples its own loop every 50 ms: a loop held for 150 ms (here by the test, which
    shares the loop with the in-process gateway) shows up as one late sample above 50 ms."""
    import time as wall

    def lag(text: str) -> tuple[float, float]:
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith("tandem_event_loop_lag_seconds_")}
        return values["tandem_event_loop_lag_seconds_count"], values['tandem_event_loop_lag_seconds_bucket{le="0.05"}']

    async with serving(sim_app()) as sim, serving(gateway_app([sim])) as gw, httpx.AsyncClient(timeout=10) as c:
        await asyncio.sleep(0.3)
        count, fast = lag((await c.get(gw + "/metrics")).text)
        assert count >= 3
        wall.sleep(0.15)  # noqa: ASYNC251 - blocking the loop on purpose
        await asyncio.sleep(0.12)
        after, fast_after = lag((await c.get(gw + "/metrics")).text)
        assert (after - fast_after) - (count - fast) >= 1
