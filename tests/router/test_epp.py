"""The endpoint picker in process: its wire format, and its gRPC service driven message by message.

The real-Envoy tests (tests/e2e/test_epp_envoy.py) cover what Envoy sends; here a test client
plays the data plane over a real gRPC channel to reach what Envoy does not send on its own (the
GIE subset hint), to hold a request and cancel it at a chosen moment, and to compare the picker's
decisions with the HTTP gateway's on the same request sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from gatewayutil import gateway_app, sim_app

from tandem.router import eppwire as wire
from tandem.router.eppserver import EppServer, http_app
from tandem.router.eppsettings import EppSettings
from tandem.serve import serving

MODEL = "Llama-3-8B"
FD = wire.FULL_DUPLEX


# --- the wire format (pure) ----------------------------------------------------------------------

def test_endpoint_of_urls() -> None:
    assert wire.endpoint_of("http://10.0.0.5:8000") == "10.0.0.5:8000"
    assert wire.endpoint_of("http://[fd00::1]:8000") == "[fd00::1]:8000"
    assert wire.endpoint_of("http://10.0.0.5") == "10.0.0.5:80"
    assert wire.endpoint_of("https://10.0.0.5") == "10.0.0.5:443"


def _set_headers(resp: ep.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in resp.header_mutation.set_headers}


def test_pick_header_and_metadata_carry_the_same_ordered_list() -> None:
    [buffered] = wire.pick(["10.0.0.1:8000", "10.0.0.2:8000"], on_body=True)
    assert buffered.WhichOneof("response") == "request_body"
    assert _set_headers(buffered.request_body.response) == {wire.DESTINATION: "10.0.0.1:8000,10.0.0.2:8000"}
    md = buffered.dynamic_metadata.fields[wire.LB_NAMESPACE].struct_value.fields[wire.DESTINATION]
    assert md.string_value == "10.0.0.1:8000,10.0.0.2:8000"

    body = b"x" * (wire.CHUNK * 2 + 10)
    full = wire.pick(["10.0.0.1:8000"], on_body=True, echo=body)
    assert [r.WhichOneof("response") for r in full] == ["request_headers"] + ["request_body"] * 3
    echoed = [r.request_body.response.body_mutation.streamed_response for r in full[1:]]
    assert b"".join(e.body for e in echoed) == body
    assert [e.end_of_stream for e in echoed] == [False, False, True]

    [headers_only] = wire.pick(["10.0.0.1:8000"], on_body=False)
    assert headers_only.WhichOneof("response") == "request_headers"


def _metadata(namespace: str, fields: dict) -> base_pb2.Metadata:
    md = base_pb2.Metadata()
    md.filter_metadata[namespace].update(fields)
    return md


def test_subset_hint_and_served_endpoint() -> None:
    req = ep.ProcessingRequest(metadata_context=_metadata(wire.SUBSET_NAMESPACE,
                                                          {wire.SUBSET: ["10.0.0.1:8000", "10.0.0.2:8000"]}))
    assert wire.subset_hint(req) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert wire.subset_hint(ep.ProcessingRequest()) is None
    req = ep.ProcessingRequest()
    req.attributes["envoy.filters.http.ext_proc"].update({wire.UPSTREAM_ADDRESS: "10.0.0.2:8000"})
    assert wire.served(req) == "10.0.0.2:8000"
    req.metadata_context.CopyFrom(_metadata(wire.LB_NAMESPACE, {wire.SERVED: "10.0.0.3:8000"}))
    assert wire.served(req) == "10.0.0.3:8000"  # the protocol's key wins over Envoy's attribute
    assert wire.served(ep.ProcessingRequest()) is None


def test_immediate_response() -> None:
    resp = wire.immediate(429, b'{"error":{}}', {"retry-after": "1"}, "tandem 429").immediate_response
    assert resp.status.code == 429 and resp.body == b'{"error":{}}'
    assert {h.header.key for h in resp.headers.set_headers} == {"retry-after"}
    assert resp.details == "tandem_429"


def test_response_status_and_shared_answers() -> None:
    assert wire.status_of(_headers("/", **{":status": "503"})) == 503
    assert wire.status_of(_headers("/")) == 0  # none sent
    assert wire.status_of(_headers("/", **{":status": "oops"})) == 0
    served = {"x-tandem-instance": "i0", "x-tandem-decision": "affinity"}
    answer = wire.proceed("response_headers", served)
    assert _set_headers(answer.response_headers.response) == served
    assert wire.proceed("response_headers", dict(served)) is answer  # one shared message per combination
    assert wire.proceed("response_headers") is wire.PROCEED["response_headers"]
    end = wire.echo(b"", end_of_stream=True).response_body.response.body_mutation.streamed_response
    assert end.body == b"" and end.end_of_stream
    chunk = wire.echo(b"data: x\n\n").response_body.response.body_mutation.streamed_response
    assert chunk.body == b"data: x\n\n" and not chunk.end_of_stream


# --- the service, driven by a test data plane ----------------------------------------------------

def _headers(path: str, *, end_of_stream: bool = False, **extra: str) -> ep.HttpHeaders:
    values = {":path": path, ":method": "POST" if not end_of_stream else "GET", "content-type": "application/json",
              **extra}
    return ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]), end_of_stream=end_of_stream)


@dataclass
class Picked:
    status: int | None  # an immediate response's status, else None
    endpoints: list[str]
    body: bytes


class DataPlane:
    """One ext_proc stream as Envoy drives it in FULL_DUPLEX_STREAMED mode (both ways)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = ep_grpc.ExternalProcessorStub(channel).Process()

    async def request(self, path: str, body: dict | bytes | None, metadata: base_pb2.Metadata | None = None,
                      mode: int = FD, **headers: str) -> Picked:
        first = ep.ProcessingRequest(request_headers=_headers(path, end_of_stream=body is None, **headers),
                                     protocol_config=ep.ProtocolConfiguration(request_body_mode=mode,
                                                                              response_body_mode=mode))
        if metadata is not None:
            first.metadata_context.CopyFrom(metadata)
        await self.call.write(first)
        if body is not None:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            await self.call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True)))
        resp = await self.call.read()
        if resp.HasField("immediate_response"):
            return Picked(resp.immediate_response.status.code, [], resp.immediate_response.body)
        common = resp.request_headers.response if resp.HasField("request_headers") else resp.request_body.response
        endpoints = _set_headers(common)[wire.DESTINATION].split(",")
        md = resp.dynamic_metadata.fields[wire.LB_NAMESPACE].struct_value.fields[wire.DESTINATION].string_value
        assert md.split(",") == endpoints
        echo = b""
        if mode == FD and body is not None:
            while True:
                part = (await self.call.read()).request_body.response.body_mutation.streamed_response
                echo += part.body
                if part.end_of_stream:
                    break
        return Picked(None, endpoints, echo)

    async def respond(self, served: str, chunks: list[bytes], status: int = 200) -> ep.ProcessingResponse:
        """The engine's answer passing through: headers (with the served endpoint), then the body."""
        msg = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())])))
        msg.metadata_context.CopyFrom(_metadata(wire.LB_NAMESPACE, {wire.SERVED: served}))
        await self.call.write(msg)
        answer = await self.call.read()
        for i, chunk in enumerate(chunks):
            await self.call.write(ep.ProcessingRequest(response_body=ep.HttpBody(
                body=chunk, end_of_stream=i == len(chunks) - 1)))
            echoed = (await self.call.read()).response_body.response.body_mutation.streamed_response
            assert echoed.body == chunk
        await self.call.done_writing()
        return answer


@dataclass
class Picker:
    server: EppServer
    channel: grpc.aio.Channel
    engines: list[str]

    def plane(self) -> DataPlane:
        return DataPlane(self.channel)


@contextlib.asynccontextmanager
async def picker(engines: list[str], **kwargs: object) -> AsyncIterator[Picker]:
    # expose_topology: instances named by their URLs in x-tandem-instance, as the tests compare them.
    settings = EppSettings(instances=engines, port=0, grpc_port=0, **{"scrape_interval": 0.2, "expose_topology": True,
                                                                     "rebalance_interval": 0.05, **kwargs})
    server = EppServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            yield Picker(server, channel, engines)
    finally:
        await server.stop()


@pytest.fixture
async def engines() -> AsyncIterator[list[str]]:
    async with serving(sim_app(port=0)) as a, serving(sim_app(port=0)) as b, serving(sim_app(port=0)) as c:
        yield [a, b, c]


def _completion(prompt: str, **kw: object) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, **kw}


async def test_same_decisions_as_the_embedded_gateway(engines: list[str]) -> None:
    """One request sequence through the HTTP gateway and through the picker (each on its own core
    over the same engines): the same instance and the same reason, request after request."""
    # Engine metrics must not differ between the two; instances named by URL in both.
    quiet = {"scrape_interval": 60.0, "stale_after": 120.0, "expose_topology": True}
    system = "You are a careful assistant. " * 220  # 2+ routing blocks: keyed by the shared prefix
    prompts = [f"{system} question {i % 5}" if i % 3 else f"unrelated prompt {i} " * (30 + i) for i in range(30)]
    chat = [i % 4 == 0 for i in range(30)]

    def body(i: int) -> dict:
        if chat[i]:
            return {"model": MODEL, "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 4}
        return _completion(prompts[i])

    via_gateway: list[tuple[str, str]] = []
    async with serving(gateway_app(engines, **quiet)) as gw, httpx.AsyncClient(timeout=20) as c:
        for i in range(len(prompts)):
            r = await c.post(gw + ("/v1/chat/completions" if chat[i] else "/v1/completions"), json=body(i))
            assert r.status_code == 200
            via_gateway.append((r.headers["x-tandem-instance"], r.headers["x-tandem-decision"]))
    via_picker: list[tuple[str, str]] = []
    async with picker(engines, **quiet) as p:
        by_endpoint = {wire.endpoint_of(u): u for u in engines}
        for i in range(len(prompts)):
            plane = p.plane()
            picked = await plane.request("/v1/chat/completions" if chat[i] else "/v1/completions", body(i))
            answer = await plane.respond(picked.endpoints[0], [b'{"usage": {"completion_tokens": 4}}'])
            headers = _set_headers(answer.response_headers.response)
            assert by_endpoint[picked.endpoints[0]] == headers["x-tandem-instance"]
            via_picker.append((headers["x-tandem-instance"], headers["x-tandem-decision"]))
    assert via_picker == via_gateway
    assert len({inst for inst, _ in via_gateway}) >= 2


async def test_accounting_of_a_streamed_request(engines: list[str]) -> None:
    async with picker(engines) as p:
        plane = p.plane()
        picked = await plane.request("/v1/completions", _completion("count me", stream=True))
        assert picked.status is None and picked.body == json.dumps(_completion("count me", stream=True)).encode()
        assert len(picked.endpoints) == 3 and len(set(picked.endpoints)) == 3  # the whole ordered list
        gw = p.server.gw
        assert gw.active == 1
        events = [b'data: {"choices":[{"text":"a"}]}\n\n', b'data: {"choices":[{"text":"b"}]}\n\n',
                  b'data: {"choices":[],"usage":{"completion_tokens":2}}\n\ndata: [DONE]\n\n']
        await plane.respond(picked.endpoints[0], events)
        await _until(lambda: gw.active == 0)
        text = gw.metrics.exposition().decode()
        assert 'tandem_requests_total{decision="affinity",outcome="ok",policy="dualmap"} 1.0' in text
        assert "tandem_time_to_first_token_seconds_count{policy=\"dualmap\"} 1.0" in text
        pool = gw.pools[MODEL]
        assert all(i.state.inflight_requests == 0 for i in pool.instances.values())


async def test_failover_marks_the_skipped_instance(engines: list[str]) -> None:
    async with picker(engines) as p:
        plane = p.plane()
        picked = await plane.request("/v1/completions", _completion("fail over"))
        answer = await plane.respond(picked.endpoints[1], [b'{"usage": {"completion_tokens": 4}}'])
        served = _set_headers(answer.response_headers.response)["x-tandem-instance"]
        assert wire.endpoint_of(served) == picked.endpoints[1]
        gw = p.server.gw
        await _until(lambda: gw.active == 0)
        first = next(u for u in engines if wire.endpoint_of(u) == picked.endpoints[0])
        assert gw.pools[MODEL].instances[first].breaker.state == "open"
        assert 'tandem_retries_total{reason="failover"} 1.0' in gw.metrics.exposition().decode()


async def test_refusals(engines: list[str]) -> None:
    async with picker(engines, max_body_bytes=64, api_keys="sekrit-key-1") as p:
        auth = {"authorization": "Bearer sekrit-key-1"}
        assert (await p.plane().request("/v1/completions", _completion("x"))).status == 401  # at the headers
        big = await p.plane().request("/v1/completions", _completion("y" * 100), **auth)
        assert big.status == 413 and b"exceeds 64 bytes" in big.body
        bad = await p.plane().request("/v1/completions", b"{nope", **auth)
        assert bad.status == 400
        admitted = p.plane()  # kept open: its request is bound and holds its slot
        ok = await admitted.request("/v1/completions", _completion("z"), **auth)
        assert ok.status is None and ok.endpoints
        # A declared length over the limit is refused at the headers, as the HTTP gateway does.
        declared = await p.plane().request("/v1/completions", _completion("z"), **auth, **{"content-length": "65"})
        assert declared.status == 413
        await _until(lambda: p.server.gw.active == 1)  # every refused request left the count


async def test_a_body_that_does_not_come_in_time_is_refused(engines: list[str]) -> None:
    """The body is held until complete and the request counts toward the limit meanwhile: bounded by
    ``body_timeout`` as on the HTTP gateway (408, ``body_timeout`` rejection), its slot released."""
    async with picker(engines, body_timeout=0.3) as p:
        gw = p.server.gw
        plane = p.plane()
        await plane.call.write(ep.ProcessingRequest(request_headers=_headers("/v1/completions"),
                                                    protocol_config=ep.ProtocolConfiguration(
                                                        request_body_mode=FD, response_body_mode=FD)))
        await plane.call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"model": ')))
        await _until(lambda: gw.active == 1)
        resp = await asyncio.wait_for(plane.call.read(), 5)
        assert resp.immediate_response.status.code == 408
        assert b"not received within 0.3 s" in resp.immediate_response.body
        assert gw.active == 0
        assert 'tandem_rejected_requests_total{reason="body_timeout"} 1.0' in gw.metrics.exposition().decode()
        # The next stream is served as usual.
        assert (await p.plane().request("/v1/completions", _completion("on time"))).endpoints


async def test_the_admin_api_is_guarded_as_on_the_gateway(engines: list[str]) -> None:
    """The picker's HTTP side serves the gateway's admin API behind the same check: off when there are
    client keys and no admin keys, else the admin key first."""
    for keys, admin_key, expected in ((("client-key-1", None), None, 404), (("client-key-1", "admin-key-1"), None, 401),
                                      (("client-key-1", "admin-key-1"), "admin-key-1", 200)):
        async with picker(engines, api_keys=keys[0], admin_api_keys=keys[1]) as p:
            transport = httpx.ASGITransport(app=http_app(p.server.gw))
            headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
            async with httpx.AsyncClient(transport=transport, base_url="http://picker") as c:
                assert (await c.get("/admin/instances", headers=headers)).status_code == expected
                assert (await c.get("/healthz")).status_code == 200


async def test_subset_hint_is_respected(engines: list[str]) -> None:
    async with picker(engines) as p:
        allowed = wire.endpoint_of(engines[2])
        for i in range(6):
            md = _metadata(wire.SUBSET_NAMESPACE, {wire.SUBSET: [allowed]})
            picked = await p.plane().request("/v1/completions", _completion(f"subset {i}"), md)
            assert picked.endpoints == [allowed]
        md = _metadata(wire.SUBSET_NAMESPACE, {wire.SUBSET: ["10.9.9.9:1"]})
        assert (await p.plane().request("/v1/completions", _completion("nowhere"), md)).status == 503


async def test_requests_without_a_body_or_not_completions(engines: list[str]) -> None:
    async with picker(engines) as p:
        models = await p.plane().request("/v1/models", None)
        assert models.status is None and set(models.endpoints) <= {wire.endpoint_of(u) for u in engines}
        other = await p.plane().request("/v1/embeddings", {"model": MODEL, "input": "x"})
        assert other.status is None and other.body == json.dumps({"model": MODEL, "input": "x"}).encode()


async def test_held_request_cancelled_releases_its_accounting(engines: list[str]) -> None:
    """Late binding: a request held in the picker for budget; the data plane gives up (the client
    left): nothing of it stays queued or counted."""
    routing = {"dispatch_max_unprefilled": 1, "dispatch_budget_s": 0.0}
    async with picker(engines[:1], routing=routing) as p:
        gw = p.server.gw
        first = p.plane()
        await first.request("/v1/completions", _completion("one"))  # bound, never answered: holds the budget
        second = p.plane()
        waiting = asyncio.create_task(second.request("/v1/completions", _completion("two")))
        pool = gw.pools[MODEL]
        await _until(lambda: sum(i.state.queued_requests for i in pool.instances.values()) == 1)
        second.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await waiting
        await _until(lambda: gw.active == 1)
        assert sum(i.state.queued_requests for i in pool.instances.values()) == 0
        first.call.cancel()
        await _until(lambda: gw.active == 0)
        assert all(i.state.inflight_requests == 0 for i in pool.instances.values())
        assert 'outcome="client_gone"' in gw.metrics.exposition().decode()


async def test_draining_refuses_at_the_headers(engines: list[str]) -> None:
    async with picker(engines) as p:
        await p.server.drain()
        refused = await p.plane().request("/v1/completions", _completion("late"))
        assert refused.status == 503 and b"shutting down" in refused.body


async def _until(predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
    end = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)
