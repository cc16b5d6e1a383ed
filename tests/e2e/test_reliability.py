"""Issue 10: bounded everything, admin and API keys, logs without secrets, TLS to engines and Redis
with a password; the chaos bench's bookkeeping and a short real run of it."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import ssl
import subprocess
import sys

import httpx
import pytest
from gatewayutil import ROOT, RedisServer, completion_body, gateway_app, sim_app

from tandem.bench.chaos import Tally, classify, parse_stream, phase_at, phase_labels, phase_plan
from tandem.router.http1 import HTTP1Client, HTTPPoolBusy
from tandem.router.security import KeyRing, admin_mode
from tandem.serve import serving

MODEL = "Llama-3-8B"
SECRET = "sk-very-secret-123456"
PROMPT = "my confidential medical question about aspirin"


# --- limits: 413 / 429 / 503 + Retry-After -----------------------------------------------------------


async def test_limits_answer_413_and_503_with_retry_after() -> None:
    async with serving(sim_app(port=0)) as a, \
            serving(gateway_app([a], max_body_bytes=2000, max_prompt_tokens=50, max_output_tokens=10_000,
                              max_active_requests=1)) as gw, httpx.AsyncClient(timeout=20) as c:
        r = await c.post(gw + "/v1/completions", content=json.dumps(completion_body("x " * 2000)))
        assert r.status_code == 413  # body bytes
        r = await c.post(gw + "/v1/completions", json=completion_body("word " * 200))
        assert r.status_code == 413 and r.json()["error"]["param"] == "prompt"
        r = await c.post(gw + "/v1/completions", json=completion_body("hi", max_tokens=10_001))
        assert r.status_code == 413 and r.json()["error"]["param"] == "max_tokens"
        r = await c.post(gw + "/v1/chat/completions", json={"model": MODEL, "max_completion_tokens": 20_000,
                                                            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 413 and r.json()["error"]["param"] == "max_tokens"
        # One request streaming holds the only slot: the next is refused, not queued without bound.
        async with c.stream("POST", gw + "/v1/completions", json=completion_body("long", max_tokens=5000,
                                                                                 stream=True)) as first:
            lines = first.aiter_lines()  # kept referenced: a collected iterator closes the connection
            await anext(lines)
            second = await c.post(gw + "/v1/completions", json=completion_body("other"))
            assert second.status_code == 503 and int(second.headers["retry-after"]) >= 1
            assert "capacity" in second.json()["error"]["message"]
        for _ in range(100):  # the closed stream's slot comes back once the gateway has seen the disconnect
            if (await c.post(gw + "/v1/completions", json=completion_body("again"))).status_code == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the slot never came back")


async def test_upstream_connection_limit_is_503_and_not_held_against_the_engine() -> None:
    """All pooled upstream connections busy: the client gets 503 + Retry-After, the engine's circuit
    stays closed (before, the pool's own limit counted as a refused connection and ejected it)."""
    async with serving(sim_app(port=0)) as a, \
            serving(gateway_app([a], max_connections=1, connect_timeout=0.2, policy_header=True)) as gw, \
            httpx.AsyncClient(timeout=20) as c:
        async with c.stream("POST", gw + "/v1/completions", json=completion_body("long", max_tokens=5000,
                                                                                 stream=True)) as first:
            lines = first.aiter_lines()  # kept referenced: a collected iterator closes the connection
            await anext(lines)
            second = await c.post(gw + "/v1/completions", json=completion_body("other"),
                                  headers={"x-tandem-policy": "round_robin"})
            assert second.status_code == 503 and second.headers["retry-after"] == "1"
        inst = (await c.get(gw + "/admin/instances")).json()["instances"][0]
        assert inst["breaker"] == "closed" and inst["healthy"]


async def test_http1_pool_busy_is_its_own_error() -> None:
    client = HTTP1Client(max_connections=1)
    await client._slots.acquire()
    with pytest.raises(HTTPPoolBusy):
        await client.post("http://127.0.0.1:9/", b"{}", {}, connect_timeout=0.05, read_timeout=1)
    await client.close()


async def test_oversized_or_trickling_metrics_fail_the_scrape_not_the_gateway() -> None:
    """A /metrics bigger than max_scrape_bytes is a failed scrape (bounded memory); the engine turns suspect."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    engine = FastAPI()

    @engine.get("/v1/models")
    async def models() -> dict:
        return {"data": [{"id": MODEL}]}

    @engine.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse("vllm:num_requests_waiting 0\n" + "# padding\n" * 100_000)

    async with serving(engine) as e, serving(gateway_app([e], max_scrape_bytes=10_000, stale_after=0.5,
                                                     scrape_timeout=0.3)) as gw, httpx.AsyncClient() as c:
        for _ in range(100):
            inst = (await c.get(gw + "/admin/instances")).json()["instances"]
            if inst and inst[0]["suspect"]:
                break
            await asyncio.sleep(0.05)
        assert inst[0]["suspect"] and inst[0]["engine"] is None
        assert (await c.get(gw + "/healthz")).status_code == 200


# --- API keys, admin API, logs ----------------------------------------------------------------------


def test_admin_mode_matrix() -> None:
    none, client, admin = KeyRing([]), KeyRing.load(None, "client-key-1"), KeyRing.load(None, "admin-key-1")
    assert admin_mode("auto", none, none) == "open"  # no keys anywhere: a local gateway
    assert admin_mode("auto", client, none) == "disabled"  # client keys never open /admin
    assert admin_mode("auto", client, admin) == "keys"
    assert admin_mode("disabled", none, admin) == "disabled"


def test_keys_compared_in_constant_time_on_digests(monkeypatch) -> None:
    """Every known key's digest is compared with hmac.compare_digest (no early-exit string compare)."""
    import hmac

    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    ring = KeyRing.load(None, "key-one-1234,key-two-1234")
    assert not ring.authenticate("Bearer wrong-key-1234").ok
    assert len(calls) == 2 and all(len(a) == len(b) == 64 for a, b in calls)
    assert ring.authenticate(None, "key-two-1234").ok


async def test_admin_behind_its_own_key(tmp_path) -> None:
    async with serving(sim_app(port=0)) as a, \
            serving(gateway_app([a], api_keys="client-key-12345", admin_api_keys="admin-key-12345")) as gw, \
            httpx.AsyncClient(timeout=10) as c:
        assert (await c.get(gw + "/admin/instances")).status_code == 401
        client = {"authorization": "Bearer client-key-12345"}
        assert (await c.get(gw + "/admin/instances", headers=client)).status_code == 401
        ok = await c.get(gw + "/admin/instances", headers={"authorization": "Bearer admin-key-12345"})
        assert ok.status_code == 200 and ok.json()["instances"]
        # and the admin key is not a client key
        r = await c.post(gw + "/v1/completions", json=completion_body(),
                         headers={"authorization": "Bearer admin-key-12345"})
        assert r.status_code == 401
    async with serving(sim_app(port=0)) as a, serving(gateway_app([a], admin="disabled")) as gw, \
            httpx.AsyncClient(timeout=10) as c:
        assert (await c.get(gw + "/admin/queues")).status_code == 404


async def test_no_secrets_or_prompts_in_logs(caplog) -> None:
    """At debug level, through failures and retries: no API key, no prompt, no Redis password logged."""
    redis = RedisServer()
    try:
        caplog.set_level(logging.DEBUG)
        async with serving(sim_app(port=0, fault="error", error_rate=1.0)) as bad, serving(sim_app(port=0)) as good, \
                serving(gateway_app([bad, good], api_keys=SECRET, policy="round_robin", retry_backoff=0.0,
                                  redis_url=f"redis://:hunter2-pass@127.0.0.1:{redis.port}/0",
                                  log_level="debug")) as gw, httpx.AsyncClient(timeout=20) as c:
            auth = {"authorization": f"Bearer {SECRET}"}
            for stream in (False, True):
                r = await c.post(gw + "/v1/completions", json=completion_body(PROMPT, stream=stream), headers=auth)
                assert r.status_code == 200
            r = await c.post(gw + "/v1/completions", json=completion_body(PROMPT),
                             headers={"x-api-key": "wrong-key-987"})
            assert r.status_code == 401 and SECRET not in r.text
            r = await c.post(gw + "/v1/completions", content=b'{"model": "' + PROMPT.encode() + b'"', headers=auth)
            assert r.status_code == 400
            await asyncio.sleep(0.3)  # a few state syncs and scrapes
    finally:
        redis.kill()
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "failed: engine answered 500" in text  # the retry was logged: the capture works
    for secret in (SECRET, "aspirin", "hunter2-pass", "wrong-key-987"):
        assert secret not in text, secret


# --- TLS to engines, Redis with a password ----------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


async def _tls_sim(cert, key):
    """A simulator behind uvicorn's TLS on an ephemeral port."""
    import uvicorn
    from gatewayutil import free_port

    port = free_port()
    config = uvicorn.Config(sim_app(port=0), host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            ssl_certfile=str(cert), ssl_keyfile=str(key), timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(1000):
        if server.started:
            break
        await asyncio.sleep(0.01)
    return f"https://127.0.0.1:{port}", server, task


async def test_tls_to_engines_verified_against_the_ca(tls_cert) -> None:
    cert, key = tls_cert
    url, server, task = await _tls_sim(cert, key)
    try:
        async with serving(gateway_app([url], engine_tls_ca_file=cert, expose_topology=True)) as gw, \
                httpx.AsyncClient(timeout=20) as c:
            for stream in (False, True):
                r = await c.post(gw + "/v1/completions", json=completion_body("hello tls", stream=stream))
                assert r.status_code == 200 and r.headers["x-tandem-instance"] == url
            inst = (await c.get(gw + "/admin/instances")).json()["instances"][0]
            assert inst["engine"] is not None  # scrapes go over TLS too
        # Without the CA the certificate is refused: the engine never joins (no model learnt), nothing is sent.
        async with serving(gateway_app([url])) as gw, httpx.AsyncClient(timeout=20) as c:
            r = await c.post(gw + "/v1/completions", json=completion_body("hello tls"))
            assert r.status_code == 404 and "<none yet>" in r.json()["error"]["message"]
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)


def test_engine_tls_bad_ca_names_the_field(tmp_path) -> None:
    from tandem.router.security import engine_ssl_context

    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match="engine_tls_ca_file"):
        engine_ssl_context(bad, True, None, None)
    ctx = engine_ssl_context(None, False, None, None)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


async def test_redis_with_password() -> None:
    """requirepass on the server: the right password syncs, a wrong one degrades to local state."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed")
    from gatewayutil import free_port

    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",  # noqa: ASYNC220
                             "--requirepass", "s3cret-pw"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tandem.router.state import LocalReport, RedisStateBackend

        for _ in range(100):
            good = RedisStateBackend(f"redis://:s3cret-pw@127.0.0.1:{port}/0")
            view = await good.sync(LocalReport())
            await good.close()
            if view is not None:
                break
            await asyncio.sleep(0.05)
        assert view is not None
        bad = RedisStateBackend(f"redis://:wrong@127.0.0.1:{port}/0")
        assert await bad.sync(LocalReport()) is None
        await bad.close()
    finally:
        proc.kill()
        proc.wait()


# --- the chaos bench: bookkeeping (pure) and a short real run ---------------------------------------


def test_parse_stream_and_classify() -> None:
    ok = (b'data: {"choices": [{"text": "a", "finish_reason": null}]}\n\n'
          b'data: {"choices": [{"text": "b", "finish_reason": "length"}]}\n\ndata: [DONE]\n\n')
    assert classify(200, parse_stream(ok)) == "completed"
    assert classify(200, parse_stream(ok + ok)) == "duplicated"
    assert classify(200, parse_stream(ok.replace(b"data: [DONE]\n\n", b""))) == "truncated"
    broken = ok[:60] + b'\n\ndata: {"error": {"message": "engine connection broke"}}\n\n'
    assert classify(200, parse_stream(broken)) == "stream_error"
    assert classify(503, None) == "503" and classify(None, None) == "disconnected"


def test_tally_report_keys_and_phases() -> None:
    plan = phase_plan(80.0)
    assert plan[0] == (0.0, "baseline") and len(plan) == 8
    assert phase_at(plan, 10.0) == "engine_killed:during" and phase_at(plan, 16.0) == "engine_killed:after"
    assert phase_at(plan, 79.0) == "recovery" and phase_labels()[-1] == "recovery"
    t = Tally()
    t.sent = 4
    for outcome in ("completed", "completed", "503", "lost"):
        t.record("baseline", outcome, 0.05)
    rep = t.report()
    assert {"sent", "completed", "failed_by_status", "lost", "duplicated", "ttft_p99_by_phase"} <= rep.keys()
    assert rep["completed"] == 2 and rep["failed_by_status"] == {"503": 1} and rep["lost"] == 1
    assert rep["ttft_p99_by_phase"] == {"baseline": 50.0}  # only completed requests' TTFT
    assert rep["ttft_p99_vs_baseline"] == {"baseline": 1.0}


@pytest.mark.slow
def test_chaos_bench_runs_every_fault_and_loses_nothing(tmp_path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "bench", "chaos", "--duration", "24", "--clients",
                           "24", "--out", str(tmp_path / "logs"), "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["lost"] == 0 and rep["duplicated"] == 0
    assert rep["sent"] == rep["completed"] + sum(rep["failed_by_status"].values())
    assert rep["completed"] > 0 and rep["rss_mb_start"] > 0 and rep["rss_mb_end"] > 0
    assert {t["fault"] for t in rep["eject_readmit"]} == {"crash", "hang", "slow", "error"}
    crash = next(t for t in rep["eject_readmit"] if t["fault"] == "crash")
    assert crash["eject_s"] is not None and crash["readmit_s"] is not None  # refused connections eject at once
    assert rep["failovers"] > 0  # the restarted gateway's clients moved to the other one
