"""The endpoint picker: Tandem's routing as an Envoy ext_proc service (Gateway API Inference Extension).

A second front end on the same :class:`~tandem.router.gateway.Gateway`: the HTTP gateway proxies a
request itself, here the data plane (Envoy, or any GIE gateway) asks which endpoint should serve it
and proxies it. Everything between is shared, not copied: admission (``gate`` and ``authenticate``
as soon as the headers arrive, the body bounded in size and time as it comes, ``admit_body`` once it
has: the HTTP gateway's steps, ``tandem.router.admission``), routing and late binding
(``UnifiedRouter.bind``: the request waits here, its ext_proc answer held back, until its instance
has budget), the accounting that releases it (``UnifiedRouter.ended``), the observations the
autoscaler reads, the metrics, shared state and engine scraping.

One HTTP request is one ext_proc stream, handled by one :class:`Exchange`:

1. request headers: refuse at once what the headers alone refuse (draining, capacity, key, a
   declared length over the limit); from here the request counts toward the gateway's limit;
2. request body (held until complete, within ``body_timeout``): admit, route and wait; answer the
   ordered endpoint list
   (the bound instance, then the decision's other candidate, then the least loaded rest, at most
   ``max_attempts``) in the header and the ``envoy.lb`` metadata, or an immediate 503 / 429 / 4xx;
3. response headers: which endpoint served (a failover past the first marks it failed, as the
   HTTP path's retry does);
4. response body chunks: passed back at once (never buffered here); the first one is the first
   token, the usage or the events count the output;
5. the end of the stream, however it comes, releases the request's accounting exactly once.

Requests that are not completions (``/v1/models``, any other path) are not scheduled: they get the
least loaded routable instances. Prefill/decode pools need the gateway to make two upstream calls,
which a picker cannot: such a model is refused (501) here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from fastapi.responses import Response

from tandem.router import eppwire as wire
from tandem.router.admission import (
    admit_body,
    authenticate,
    body_too_large,
    body_too_slow,
    declared_too_large,
    error_response,
    gate,
)
from tandem.router.observations import RequestTrace, TokenCounter, usage_tokens
from tandem.router.requestview import PATHS, Kind
from tandem.router.unified import Bound, Left

if TYPE_CHECKING:
    from tandem.router.gateway import Gateway
    from tandem.router.pool import Pool

log = logging.getLogger("tandem.epp")

_KINDS: dict[str, Kind] = {path: kind for kind, path in PATHS.items()}
# Headers of a refusal that make sense in a local reply (Envoy sets content-length itself).
_REPLY_HEADERS = ("content-type", "retry-after", "www-authenticate")
_USAGE_BODY_CAP = 1 << 20  # a non-streamed answer's usage is read from at most its first MiB


class EndpointPicker(ep_grpc.ExternalProcessorServicer):
    """The ext_proc service of one gateway: one :class:`Exchange` per stream."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def Process(self, request_iterator: AsyncIterator[ep.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> None:
        exchange = Exchange(self.gw, context)
        try:
            await exchange.run(request_iterator)
        finally:
            exchange.close()


class Exchange:
    """One HTTP request as the data plane reports it: its state from headers to the end of the response."""

    # Slots: one instance per request, its attributes read on every message of the stream.
    __slots__ = ("answer", "body", "body_due", "bound", "closed", "context", "entered", "first_chunk",
                 "gw", "headers", "kind", "outcome", "picked", "policy", "pool", "principal", "request_mode",
                 "response_mode", "status", "stream", "subset", "t0", "tokens", "trace")

    def __init__(self, gw: Gateway, context: grpc.aio.ServicerContext) -> None:
        self.gw, self.context = gw, context
        self.request_mode = wire.NONE
        self.response_mode = wire.NONE
        self.t0 = time.monotonic()
        self.headers: dict[str, str] = {}
        self.kind: Kind | None = None
        self.principal: str | None = None
        self.subset: set[str] | None = None
        self.body = bytearray()
        self.body_due: float | None = None  # while the body is awaited: when it must be complete
        self.picked = False  # the endpoints are answered (scheduled or not)
        # Counted toward the gateway's limit (Gateway.enter) from the headers on, until a refusal, the
        # pick of a request that is not scheduled, or the end of a scheduled one (ended / done).
        self.entered = False
        # A scheduled request: the gateway's accounting until ended().
        self.pool: Pool | None = None
        self.policy = gw.settings.policy
        self.trace: RequestTrace | None = None
        self.bound: Bound | None = None
        self.status = 0
        self.first_chunk = False
        self.stream = False
        self.tokens = TokenCounter()
        self.answer = bytearray()  # a non-streamed answer, for its usage
        self.outcome: str | None = None  # set once the response ended
        self.closed = False

    # --- the stream --------------------------------------------------------------------------

    async def run(self, requests: AsyncIterator[ep.ProcessingRequest]) -> None:
        first = True
        messages = aiter(requests)
        while True:
            try:
                req = await self._next(messages)
            except StopAsyncIteration:
                return
            except TimeoutError:  # the body did not come in time: as the HTTP gateway, a slow client is refused
                await self._refuse(body_too_slow(self.gw))
                return
            which = req.WhichOneof("request")
            if which == "response_body":  # the most frequent: every chunk of a streamed answer
                await self._response_body(req.response_body)
                continue
            if first:  # the protocol configuration comes with the first message only
                first = False
                self.request_mode = req.protocol_config.request_body_mode
                self.response_mode = req.protocol_config.response_body_mode
            if which == "request_headers":
                done = await self._request_headers(req)
            elif which == "request_body":
                done = await self._request_body(req)
            elif which == "request_trailers":
                done = await self._request_end(req, trailers=True)
            elif which == "response_headers":
                done = await self._response_headers(req)
            else:  # response_trailers
                await self._send(wire.proceed("response_trailers"))
                self._end(self._final_outcome())
                done = False
            if done:
                return

    async def _next(self, messages: AsyncIterator[ep.ProcessingRequest]) -> ep.ProcessingRequest:
        """The next message; while a request body is awaited, by its deadline (TimeoutError)."""
        if self.body_due is None:
            return await anext(messages)
        async with asyncio.timeout(self.body_due - time.monotonic()):
            return await anext(messages)

    async def _send(self, *responses: ep.ProcessingResponse) -> None:
        for r in responses:
            await self.context.write(r)

    async def _refuse(self, response: Response, *, counted: bool = False) -> bool:
        """Answer with ``response`` (an OpenAI-shaped error from admission or routing) instead of an
        endpoint; the request leaves the gateway's count (``counted``: Gateway.done already did)."""
        if self.entered:
            self.entered = False
            if not counted:
                self.gw.leave()
        headers = {k: v for k, v in response.headers.items() if k in _REPLY_HEADERS}
        await self._send(wire.immediate(response.status_code, bytes(response.body), headers,
                                        f"tandem_{response.status_code}"))
        return True

    # --- request -----------------------------------------------------------------------------

    async def _request_headers(self, req: ep.ProcessingRequest) -> bool:
        self.t0 = time.monotonic()
        self.headers = wire.headers_of(req.request_headers)
        self.subset = wire.subset_hint(req)
        if (refused := gate(self.gw)) is not None:
            return await self._refuse(refused)
        # As the HTTP gateway: from here on the request counts toward the limit, its body included.
        self.gw.enter()
        self.entered = True
        principal = authenticate(self.gw, self.headers)
        if isinstance(principal, Response):
            return await self._refuse(principal)
        self.principal = principal
        if declared_too_large(self.headers, self.gw.settings.max_body_bytes):
            return await self._refuse(body_too_large(self.gw))
        self.kind = _KINDS.get(self.headers.get(":path", "").split("?", 1)[0])
        if req.request_headers.end_of_stream or self.request_mode in (wire.NONE, wire.STREAMED):
            # No body, or one the data plane does not hold for us: pick on the headers alone.
            return await self._pick_unscheduled(None)
        # The body is held until complete: the request holds a slot meanwhile, so it is bounded in time.
        self.body_due = self.t0 + self.gw.settings.body_timeout
        if self.request_mode != wire.FULL_DUPLEX:  # BUFFERED: the body comes once this is answered
            await self._send(wire.proceed("request_headers"))
        return False

    async def _request_body(self, req: ep.ProcessingRequest) -> bool:
        if self.picked:  # STREAMED: picked on the headers, every chunk is answered
            await self._send(wire.proceed("request_body"))
            return False
        self.body += req.request_body.body
        if len(self.body) > self.gw.settings.max_body_bytes:
            return await self._refuse(body_too_large(self.gw))
        if req.request_body.end_of_stream or self.request_mode != wire.FULL_DUPLEX:
            return await self._request_end(req, trailers=False)
        return False

    async def _request_end(self, req: ep.ProcessingRequest, *, trailers: bool) -> bool:
        """The whole body is here: admit, route, wait for budget, answer the endpoints."""
        if self.picked:
            if trailers:
                await self._send(wire.proceed("request_trailers"))
            return False
        self.body_due = None  # all here: admission and the wait for budget have their own limits
        raw = bytes(self.body)
        if self.kind is None:
            return await self._pick_unscheduled(raw, trailers)
        if self.request_mode != wire.FULL_DUPLEX:
            # Outside FULL_DUPLEX_STREAMED the data plane times out each message (ext_proc
            # message_timeout, 200 ms by default) and admission, routing and the wait for budget all
            # answer this one: ask for their whole length first. (Asked only once the request was held,
            # a picker slowed by a busy machine passed 200 ms before asking: Envoy's 504s, seen in CI.)
            await self._send(wire.extend(self.gw.settings.queue_timeout + 1.0))
        return await self._pick_scheduled(raw, trailers)

    async def _answer(self, endpoints: list[str], raw: bytes | None, trailers: bool) -> None:
        """Send the pick in the shape the request body mode wants (see ``wire.pick``)."""
        self.picked = True
        if raw is None:
            out = wire.pick(endpoints, on_body=False)
        elif self.request_mode == wire.FULL_DUPLEX:
            out = wire.pick(endpoints, on_body=True, echo=raw, end_of_stream=not trailers)
        else:
            out = wire.pick(endpoints, on_body=True)
        if trailers:
            out.append(wire.proceed("request_trailers"))
        await self._send(*out)

    async def _pick_unscheduled(self, raw: bytes | None, trailers: bool = False) -> bool:
        """Not a completion: the least loaded routable instances, no queueing, no accounting."""
        routable = [i for p in self.gw.pools.values() for i in p.instances.values() if i.state.routable]
        ranked = sorted(routable, key=lambda i: (i.state.inflight_requests + i.state.queued_requests, i.id))
        endpoints = self._allowed([wire.endpoint_of(i.id) for i in ranked])
        if not endpoints:
            return await self._refuse(error_response(503, "no ready endpoint", type_="server_error", retry_after=2))
        if self.entered:  # not scheduled: nothing of it is accounted past the pick
            self.entered = False
            self.gw.leave()
        await self._answer(endpoints[:self.gw.settings.max_attempts], raw, trailers)
        return False

    def _allowed(self, endpoints: list[str]) -> list[str]:
        return endpoints if self.subset is None else [e for e in endpoints if e in self.subset]

    async def _pick_scheduled(self, raw: bytes, trailers: bool) -> bool:
        gw = self.gw
        assert self.kind is not None
        admitted = await admit_body(gw, self.headers, raw, self.kind, self.principal)
        if isinstance(admitted, Response):
            return await self._refuse(admitted)
        if admitted.pool is None:
            return await self._refuse(error_response(
                501, f"model '{admitted.body.model}' is served by prefill/decode pools, which the endpoint picker "
                "does not route (the embedded gateway does)", type_="server_error", param="model"))
        pool = self.pool = admitted.pool
        self.policy, self.stream = admitted.policy, admitted.body.stream
        excluded: list[str] = []
        if self.subset is not None:
            allowed = {iid for iid in pool.instances if wire.endpoint_of(iid) in self.subset}
            if not any(pool.instances[iid].state.routable for iid in allowed):
                gw.metrics.rejected.labels("subset").inc()
                return await self._refuse(error_response(
                    503, "no ready endpoint in the data plane's subset", type_="server_error", retry_after=2))
            excluded = [iid for iid in pool.instances if iid not in allowed]
        self.trace = gw.observer.arrived(pool.service, "unified", admitted.rreq.prompt_tokens, self.t0)
        base = gw.new_request_id()
        deadline = self.t0 + gw.settings.request_timeout
        for attempt in range(1, gw.settings.max_attempts + 1):
            bound = await gw.unified.bind(pool, admitted.rreq, self.policy, f"{base}-{attempt}", excluded, deadline,
                                          self.trace, admitted.engine_key)
            if not isinstance(bound, Left):
                break
        else:  # every instance it was released to left while it was queued
            bound = gw.done(self.policy, bound.decision.reason, "no_instance", error_response(
                503, "no available instance", type_="server_error", retry_after=2), trace=self.trace)
        if isinstance(bound, Response):  # bind's refusal, or the one above: counted by Gateway.done
            return await self._refuse(bound, counted=True)
        self.bound = bound
        await self._answer([wire.endpoint_of(iid) for iid in self._fallbacks(pool, bound)], raw, trailers)
        return False

    def _fallbacks(self, pool: Pool, bound: Bound) -> list[str]:
        """The ordered list: the bound instance, the decision's other candidates, then the least
        loaded routable rest (subset respected), ``max_attempts`` long at most."""
        first = bound.instance.id
        allowed = (lambda iid: True) if self.subset is None else (lambda iid: wire.endpoint_of(iid) in self.subset)
        out = [first]
        for iid in bound.decision.candidates:
            inst = pool.instances.get(iid)
            if iid not in out and inst is not None and inst.state.routable and allowed(iid):
                out.append(iid)
        rest = sorted((i for i in pool.instances.values() if i.id not in out and i.state.routable and allowed(i.id)),
                      key=lambda i: (i.state.pending_s, i.state.inflight_requests, i.id))
        out += [i.id for i in rest]
        return out[:self.gw.settings.max_attempts]

    # --- response ----------------------------------------------------------------------------

    async def _response_headers(self, req: ep.ProcessingRequest) -> bool:
        self.status = wire.status_of(req.response_headers)
        extra: dict[str, str] = {}
        if self.bound is not None:
            extra = self._served(wire.served(req))
        await self._send(wire.proceed("response_headers", extra))
        if self.bound is not None and self.response_mode == wire.NONE and self.status < 400:
            self._observe(b"")  # no body comes to us: the headers are the first sign of the answer
        if req.response_headers.end_of_stream:
            self._end(self._final_outcome())
        return False

    def _served(self, served: str | None) -> dict[str, str]:
        """Account for where the response came from: a failover marks the skipped instance failed."""
        assert self.bound is not None and self.pool is not None
        gw, bound, pool = self.gw, self.bound, self.pool
        now = time.monotonic()
        instance = bound.instance
        if served is not None and served != wire.endpoint_of(instance.id):
            # The data plane went down the list: the bound instance failed this request before its
            # first byte (connect refused, reset, 5xx), as a retry of the HTTP path records it.
            instance.breaker.on_failure(now, fatal=True)
            instance.refresh_health(now)
            gw.metrics.upstream_errors.labels(instance.label, "failover").inc()
            gw.metrics.retries.labels("failover").inc()
            pool.failed(bound.rid)
            instance = next((i for i in pool.instances.values() if wire.endpoint_of(i.id) == served), instance)
            if wire.endpoint_of(instance.id) != served:
                return {"x-tandem-decision": bound.decision.reason}
        if self.status >= 500:
            instance.breaker.on_failure(now)
            gw.metrics.upstream_errors.labels(instance.label, "status").inc()
        elif self.status:
            instance.breaker.on_success()
        return {"x-tandem-instance": instance.label, "x-tandem-decision": bound.decision.reason}

    async def _response_body(self, body: ep.HttpBody) -> None:
        chunk = body.body
        eos = body.end_of_stream
        accounted = self.bound is not None and self.outcome is None
        if eos and accounted:
            # The last bytes are accounted before they are passed on: with them the data plane answers
            # the client and may close this stream at once, cancelling the write, and what came after
            # it never ran (the request read as client_gone; seen in CI under load).
            self._observe(chunk)
            self._end(self._final_outcome())
        if self.response_mode == wire.FULL_DUPLEX:  # other chunks: passed on first, accounted after
            if len(chunk) <= wire.CHUNK:
                await self.context.write(wire.echo(chunk, end_of_stream=eos))
            else:
                await self._send(*wire.streamed(chunk, request=False, end_of_stream=eos))
        else:
            await self.context.write(wire.PROCEED["response_body"])
        if accounted and not eos:
            self._observe(chunk)

    def _observe(self, chunk: bytes) -> None:
        assert self.bound is not None and self.pool is not None and self.trace is not None
        if not self.first_chunk and self.status < 400:
            self.first_chunk = True
            now = time.monotonic()
            self.pool.first_token(self.bound.rid)
            if self.stream:
                self.gw.metrics.ttft.labels(self.policy).observe(now - self.t0)
                self.gw.observer.first_token(self.trace, now)
        if self.stream:
            if chunk:  # (the empty last chunk Envoy sends after the engine's last bytes counts nothing)
                self.tokens.feed(chunk)
        elif len(self.answer) < _USAGE_BODY_CAP:
            self.answer += chunk

    def _final_outcome(self) -> str:
        if self.status >= 500:
            return "upstream_error"
        if self.status >= 400:
            return "client_error"
        return "ok"

    # --- the end -----------------------------------------------------------------------------

    def _end(self, outcome: str) -> None:
        """Release a scheduled request's accounting, once, whatever ended it."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        gw = self.gw
        if self.bound is not None and self.pool is not None and self.trace is not None:
            reason = self.bound.decision.reason
            if outcome == "ok" and not self.stream:  # as the HTTP path: its TTFT is its end-to-end time
                tokens: int | None = usage_tokens(bytes(self.answer))
                gw.observer.finished(self.trace, tokens, time.monotonic(), streamed=False)
            else:
                tokens = self.tokens.tokens if self.stream else None
            if outcome == "client_error":
                self.pool.failed(self.bound.rid)
            gw.unified.ended(self.pool, self.bound.rid, self.policy, reason, self.t0, self.trace, outcome, tokens)
            self.entered = False
        elif self.entered:  # cancelled while its body came, or while it was routed or waited for budget
            self.entered = False
            if self.trace is None:
                gw.leave()
            else:
                gw.done(self.policy, "none", "client_gone", Response(status_code=499), trace=self.trace)

    def close(self) -> None:
        """The stream is over (the data plane closed it, or it broke): a request whose response did
        not end went away with its client (or its connection to the engine broke)."""
        if self.closed:
            return
        self.closed = True
        if self.outcome is None:
            if self.bound is not None and self.status and self.response_mode == wire.NONE:
                # No response body comes to us: the stream's end is the response's (a client that
                # left mid-answer cannot be told apart here).
                self._end(self._final_outcome())
            else:
                self._end("client_gone")
