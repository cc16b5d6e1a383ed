"""Issue 16 (hardening), the defects an in-process gateway shows: each test fails on the code before
the fix. Real simulators and a real gateway on ephemeral 127.0.0.1 ports, real HTTP; the defects that
need separate processes (workers, slow clients, event-loop stalls, the hostile corpus) are in
``tests/e2e/test_hardening_processes.py``."""

from __future__ import annotations

import httpx
import pytest
from gatewayutil import completion_body, gateway_app, sim_app

from tandem.serve import serving

MODEL = "Llama-3-8B"


# --- 1: client-declared prompt hints -------------------------------------------------------------------


async def test_prompt_hints_are_refused_unless_the_gateway_trusts_them() -> None:
    """A 2,000-word prompt declaring ``prompt_tokens: 1`` passed a 100-token limit (200); now the hint is
    refused by default, and only a gateway started for simulator benchmarks believes it."""
    lying = {**completion_body("word " * 2000, max_tokens=2),
             "x_tandem": {"hash_ids": [7], "prompt_tokens": 1, "block_size": 1}}
    async with serving(sim_app(port=0)) as a, \
            serving(gateway_app([a], max_prompt_tokens=100)) as gw, \
            serving(gateway_app([a], max_prompt_tokens=100, trust_prompt_hints=True)) as bench_gw, \
            httpx.AsyncClient(timeout=20) as c:
        r = await c.post(gw + "/v1/completions", json=lying)
        assert r.status_code == 400 and r.json()["error"]["param"] == "x_tandem", r.text
        assert "--trust-prompt-hints" in r.json()["error"]["message"]
        # Without the hint, the real prompt is what the limit sees.
        r = await c.post(gw + "/v1/completions", json=completion_body("word " * 2000, max_tokens=2))
        assert r.status_code == 413 and r.json()["error"]["param"] == "prompt"
        # A simulator-benchmark gateway believes hints, both ways (here: a declared prompt over the limit).
        declared = {"model": MODEL, "max_tokens": 2, "x_tandem": {"hash_ids": [], "prompt_tokens": 8000}}
        r = await c.post(bench_gw + "/v1/completions", json=declared)
        assert r.status_code == 413 and "8000 tokens" in r.json()["error"]["message"]
        small = {"model": MODEL, "max_tokens": 2, "x_tandem": {"hash_ids": [1], "prompt_tokens": 50}}
        assert (await c.post(bench_gw + "/v1/completions", json=small)).status_code == 200


# --- 3: hostile JSON is a 400, not a 500 -----------------------------------------------------------------


HOSTILE_BODIES = {
    "5,000-digit integer": b'{"model": "Llama-3-8B", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
    "100k nested arrays": b'{"model": "Llama-3-8B", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "5k nested objects": b'{"model": "Llama-3-8B", "prompt": "hi", "x": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,
    "nesting the parser takes, deeper than the gateway re-serialises": (
        b'{"model": "Llama-3-8B", "prompt": "hi", "x": ' + b"[" * 900 + b"]" * 900 + b"}"),
    "lone surrogate in the prompt": b'{"model": "Llama-3-8B", "prompt": "hi \\ud800 there"}',
    "not UTF-8": b'{"model": "Llama-3-8B", "prompt": "\xff\xfe"}',
}


async def test_hostile_json_ends_in_400_in_the_openai_shape() -> None:
    async with serving(sim_app(port=0)) as a, serving(gateway_app([a])) as gw, httpx.AsyncClient(timeout=20) as c:
        for name, raw in HOSTILE_BODIES.items():
            for path in ("/v1/completions", "/v1/chat/completions"):
                r = await c.post(gw + path, content=raw, headers={"content-type": "application/json"})
                assert r.status_code == 400, (name, path, r.status_code, r.text[:200])
                error = r.json()["error"]
                # The gateway's refusal, or (a field the gateway does not read: a chat body's "prompt") the
                # engine's, passed through: either way a 400 in the OpenAI shape.
                assert isinstance(error["type"], str) and error["type"] and error["message"], (name, error)
        chat = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": [[["x"]]]}]}]}
        assert (await c.post(gw + "/v1/chat/completions", json=chat)).status_code == 200  # non-text part: no text
        assert (await c.get(gw + "/healthz")).status_code == 200


# --- 6: the routing policy is the operator's ------------------------------------------------------------


async def test_policy_header_is_off_by_default_and_admin_only_when_on() -> None:
    pin = {"x-tandem-policy": "nope"}  # an unknown policy: honoured means 400, ignored means 200
    async with serving(sim_app(port=0)) as a, serving(gateway_app([a])) as default_gw, \
            serving(gateway_app([a], policy_header=True, api_keys="client-key-1",
                              admin_api_keys="admin-key-1")) as keyed_gw, \
            serving(gateway_app([a], policy_header=True, api_keys="client-key-1")) as no_admin_gw, \
            httpx.AsyncClient(timeout=20) as c:
        assert (await c.post(default_gw + "/v1/completions", json=completion_body(), headers=pin)).status_code == 200
        client = {"authorization": "Bearer client-key-1"}
        for gw in (keyed_gw, no_admin_gw):
            r = await c.post(gw + "/v1/completions", json=completion_body(), headers={**client, **pin})
            assert r.status_code == 403 and r.json()["error"]["param"] == "x-tandem-policy", r.text
            wrong = {**client, **pin, "x-tandem-admin-key": "client-key-1"}  # a client key is not an admin key
            assert (await c.post(gw + "/v1/completions", json=completion_body(), headers=wrong)).status_code == 403
        admin = {**client, "x-tandem-admin-key": "admin-key-1"}
        r = await c.post(keyed_gw + "/v1/completions", json=completion_body(), headers={**admin, **pin})
        assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
        r = await c.post(keyed_gw + "/v1/completions", json=completion_body(),
                         headers={**admin, "x-tandem-policy": "round_robin"})
        assert r.status_code == 200


# --- 7: a hung engine cannot hold a request long by default ------------------------------------------------


def stalling_engine(chunks_before_stall: int, every_s: float = 0.0):
    """An engine that streams ``chunks_before_stall`` SSE chunks (one per ``every_s``), then goes silent
    without closing (a hung engine); ``every_s`` > 0 and a huge count: an engine trickling forever."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse, StreamingResponse

    engine = FastAPI()

    @engine.get("/v1/models")
    async def models() -> dict:
        return {"data": [{"id": MODEL}]}

    @engine.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse("vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n")

    @engine.post("/v1/completions")
    async def completions() -> StreamingResponse:
        async def body():
            for i in range(chunks_before_stall):
                yield f'data: {{"choices": [{{"index": 0, "text": "t{i}", "finish_reason": null}}]}}\n\n'
                await asyncio.sleep(every_s)
            await asyncio.Event().wait()

        return StreamingResponse(body(), media_type="text/event-stream")

    return engine


def test_production_timeout_defaults() -> None:
    """The defaults were 60 s per chunk, streams unbounded once started, and 600 s for a non-streamed answer."""
    from tandem.router.settings import GatewaySettings

    s = GatewaySettings(instances=["http://127.0.0.1:1"])
    assert s.first_byte_timeout <= 15 and s.stream_idle_timeout <= 30 and s.request_timeout <= 300
    assert s.max_stream_duration <= 3600 and s.connect_timeout <= 2


async def test_a_stalled_stream_is_ended_after_the_idle_timeout() -> None:
    import time

    async with serving(stalling_engine(2)) as e, \
            serving(gateway_app([e], stream_idle_timeout=0.5, first_byte_timeout=5)) as gw, \
            httpx.AsyncClient(timeout=30) as c:
        t0 = time.monotonic()
        r = await c.post(gw + "/v1/completions", json=completion_body(stream=True))
        took = time.monotonic() - t0
        assert r.status_code == 200 and '"t1"' in r.text
        assert "engine connection broke mid-stream" in r.text  # the error event ends the stream
        assert took < 5, took


async def test_a_trickling_stream_is_cut_at_the_longest_stream_duration() -> None:
    import time

    async with serving(stalling_engine(10**6, every_s=0.1)) as e, \
            serving(gateway_app([e], max_stream_duration=1.0)) as gw, httpx.AsyncClient(timeout=30) as c:
        t0 = time.monotonic()
        r = await c.post(gw + "/v1/completions", json=completion_body(stream=True))
        assert r.status_code == 200 and "engine connection broke mid-stream" in r.text
        assert time.monotonic() - t0 < 5


def test_first_byte_budget_grows_with_the_prompt() -> None:
    from tandem.router.gateway import Gateway
    from tandem.router.settings import GatewaySettings

    gw = Gateway(GatewaySettings(instances=["http://127.0.0.1:1"]))
    assert gw.first_byte_s(10) == pytest.approx(gw.settings.first_byte_timeout, abs=0.01)
    assert gw.first_byte_s(128_000) > gw.settings.first_byte_timeout + 10  # a long prefill is not a hang


# --- 8: admin routes check the key before their parameters ------------------------------------------------


async def test_admin_routes_authenticate_before_validating() -> None:
    calls = [("POST", "/admin/drain"), ("GET", "/admin/observations"), ("GET", "/admin/observation-counts")]
    async with serving(sim_app(port=0)) as a, \
            serving(gateway_app([a], api_keys="client-key-1", admin_api_keys="admin-key-1")) as keyed, \
            serving(gateway_app([a], api_keys="client-key-1")) as admin_off, httpx.AsyncClient(timeout=20) as c:
        for method, path in calls:
            for headers in ({}, {"authorization": "Bearer wrong-key-123"}, {"authorization": "Bearer client-key-1"}):
                r = await c.request(method, keyed + path, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
                r = await c.request(method, admin_off + path, headers=headers)
                assert r.status_code == 404 and "error" in r.json(), (path, r.text)
            r = await c.request(method, keyed + path, headers={"authorization": "Bearer admin-key-1"})
            assert r.status_code == 422, r.text  # with the key: the missing parameter, in the OpenAI shape
            error = r.json()["error"]
            assert error["param"] in ("instance", "service") and error["type"] == "invalid_request_error", error
        r = await c.get(keyed + "/admin/decisions", params={"limit": "many"},
                        headers={"authorization": "Bearer admin-key-1"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "limit"


# --- 9: no topology without a flag -------------------------------------------------------------------------


async def test_engine_addresses_stay_inside_by_default() -> None:
    """Engine URLs were in /metrics labels, the x-tandem-instance header and error messages, and
    /openapi.json listed the admin routes; by default engines are now named by an opaque stable id."""
    import contextlib

    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(serving(sim_app(port=0)))
        b_server = contextlib.AsyncExitStack()
        b = await b_server.enter_async_context(serving(sim_app(port=0)))
        gw = await stack.enter_async_context(serving(gateway_app([a, b], policy="round_robin", retry_backoff=0)))
        lone_gw = await stack.enter_async_context(serving(gateway_app([b], max_attempts=1)))
        debug_gw = await stack.enter_async_context(serving(gateway_app([a], expose_topology=True)))
        c = await stack.enter_async_context(httpx.AsyncClient(timeout=20))
        for g in (gw, lone_gw):  # both engines joined
            assert (await c.get(g + "/readyz")).json()["routable_instances"] >= 1
        await b_server.aclose()  # engine b dies: its tries fail and are retried on a
        labels = set()
        for i in range(4):
            r = await c.post(gw + "/v1/completions", json=completion_body(f"q{i}", stream=bool(i % 2)))
            assert r.status_code == 200, r.text
            labels.add(r.headers["x-tandem-instance"])
        assert len(labels) == 1 and labels.pop().startswith("i-")
        metrics = (await c.get(gw + "/metrics")).text
        assert "tandem_upstream_errors_total{" in metrics and "tandem_inflight_requests{" in metrics
        assert "127.0.0.1" not in metrics
        schema = (await c.get(gw + "/openapi.json")).json()
        assert "/v1/completions" in schema["paths"] and not any(p.startswith("/admin") for p in schema["paths"])
        r = await c.post(lone_gw + "/v1/completions", json=completion_body())  # every try fails: no address either
        assert r.status_code == 502 and "127.0.0.1" not in r.text and "cannot connect" in r.text, r.text
        # --expose-topology (debugging): URLs, and the admin routes in the schema.
        r = await c.post(debug_gw + "/v1/completions", json=completion_body())
        assert r.headers["x-tandem-instance"] == a
        assert any(p.startswith("/admin") for p in (await c.get(debug_gw + "/openapi.json")).json()["paths"])


# --- 10: n and the output tokens a request is charged ------------------------------------------------------


async def test_n_is_bounded_and_the_budget_charges_the_output_in_force() -> None:
    """n = -1 and 1000 were forwarded, and a request without max_tokens was charged 0 output tokens."""
    key = {"authorization": "Bearer client-key-1"}
    async with serving(sim_app(port=0)) as a, \
            serving(gateway_app([a], api_keys="client-key-1", rate_limit_tpm=200_000)) as gw, \
            httpx.AsyncClient(timeout=30) as c:
        for n, status in ((-1, 400), (0, 400), (1000, 400), (2, 200)):
            r = await c.post(gw + "/v1/completions", json=completion_body(n=n, max_tokens=2), headers=key)
            assert r.status_code == status, (n, r.text)
            if status == 400:
                assert r.json()["error"]["param"] == "n"
        # The simulated model's context is 131,072 tokens: a request with no max_tokens may produce
        # nearly all of it, and is charged so: one fits in 200k tokens/minute, the second does not.
        body = {"model": MODEL, "prompt": "hello"}
        assert (await c.post(gw + "/v1/completions", json=body, headers=key)).status_code == 200
        r = await c.post(gw + "/v1/completions", json=body, headers=key)
        assert r.status_code == 429 and "tokens/minute" in r.json()["error"]["message"]


async def test_n_choices_are_charged_each() -> None:
    key = {"authorization": "Bearer client-key-1"}
    async with serving(sim_app(port=0)) as a, \
            serving(gateway_app([a], api_keys="client-key-1", rate_limit_tpm=10_000)) as gw, \
            httpx.AsyncClient(timeout=30) as c:
        body = completion_body("hi", max_tokens=3000, n=3)  # 9,002 tokens of 10,000
        assert (await c.post(gw + "/v1/completions", json=body, headers=key)).status_code == 200
        assert (await c.post(gw + "/v1/completions", json=body, headers=key)).status_code == 429
