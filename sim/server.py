"""``tandem sim``: one simulated engine behind a vLLM/SGLang-compatible HTTP API.

The :class:`~tandem.sim.engine.Engine` runs in virtual time; :class:`EngineDriver` ties it to the
event loop's clock, waking exactly when the next iteration ends, and hands each request's tokens to
the HTTP handler that streams them. Faults (crash, hang, slow, 5xx) are injected here, at the API,
so a gateway sees them exactly as it would see a failing real engine.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import xxhash
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.responses import Response

from tandem.kvevents import KVEvent
from tandem.openai_api import ChatCompletionRequest, CompletionRequest
from tandem.perf.costmodel import CostModel
from tandem.perf.profile import Profile, load_profile
from tandem.prefix import block_id_tokens, chain_hashes, text_block_hashes, token_block_hashes, word_ids
from tandem.sim import wire
from tandem.sim.engine import Emission, Engine, EngineLimits, SimRequest
from tandem.sim.kvpublisher import KVEventPublisher
from tandem.sim.metrics import EngineMetrics
from tandem.sim.pd import HandshakeError, KVTransfers, PullRequest, TransferError, parse_handshake
from tandem.sim.settings import FaultMode, SimSettings
from tandem.sim.vocab import Vocabulary
from tandem.sim.wallclock import WallClockDriver

_WORDS = ("the", "model", "serves", "tokens", "from", "a", "simulated", "engine", "with", "cached", "prefix",
          "blocks", "and", "continuous", "batching", "on", "time")


def output_token(seed: int, i: int) -> str:
    """Deterministic output text: equal requests give equal completions (stream or not)."""
    return " " + _WORDS[(seed + i * 7) % len(_WORDS)]


@dataclass(slots=True)
class _Pending:
    req: SimRequest
    submitted: float
    tokens: asyncio.Queue[Emission] = field(default_factory=asyncio.Queue)
    last_time: float = 0.0


class EngineDriver(WallClockDriver):
    """Runs the engine against the event loop's clock and routes emissions to waiting handlers."""

    task_name = "engine-driver"

    def __init__(self, engine: Engine, metrics: EngineMetrics, time_scale: float = 1.0,
                 publish: Callable[[list[KVEvent]], None] | None = None) -> None:
        super().__init__(time_scale)
        self.engine = engine
        self.metrics = metrics
        self.publish = publish
        self.pending: dict[str, _Pending] = {}

    def flush_events(self) -> None:
        """Publish what the engine's cache did in the last step (a no-op without --kv-events)."""
        if self.publish is not None and (events := self.engine.cache.take_events()):
            self.publish(events)

    def submit(self, req: SimRequest) -> _Pending:
        now = self.now()
        pending = _Pending(req, now, last_time=now)
        self.pending[req.id] = pending
        self.engine.submit(req, now)
        self.flush_events()
        self.wake()
        return pending

    def kv_arrived(self, request_id: str) -> None:
        """A disaggregated request's prompt KV has landed (see :mod:`tandem.sim.pd`)."""
        if request_id in self.pending:
            self.engine.kv_arrived(request_id, self.now())
            self.flush_events()
            self.wake()

    def abort(self, request_id: str) -> None:
        if self.pending.pop(request_id, None) is not None:
            self.engine.abort(request_id, self.now())
            self.flush_events()

    def next_event_time(self) -> float | None:
        return self.engine.next_event_time()

    def advance(self, now: float) -> None:
        emissions = self.engine.advance(now)
        self.flush_events()  # before the tokens: vLLM publishes a step's events before its output arrives
        for emission in emissions:
            self._deliver(emission)

    def _deliver(self, e: Emission) -> None:
        pending = self.pending.get(e.request_id)
        if pending is None:
            return
        if e.first:
            queue_time = (pending.req.admitted_at or e.time) - pending.submitted
            self.metrics.observe_first_token(e.time - pending.submitted, queue_time)
        else:
            self.metrics.observe_tokens(e.time - pending.last_time, e.tokens)
        pending.last_time = e.time
        if e.finished:
            r = pending.req
            first, admitted = r.first_token_at, r.admitted_at
            self.metrics.observe_finished(e.time - pending.submitted,
                                          first - admitted if first is not None and admitted is not None else None,
                                          e.time - first if first is not None else None,
                                          r.prompt_tokens, r.prompt_tokens - r.cached_tokens)
            self.pending.pop(e.request_id, None)
        pending.tokens.put_nowait(e)


class FaultUpdate(BaseModel):
    mode: FaultMode
    slowdown: float = Field(1.0, ge=1.0)
    error_rate: float = Field(0.0, ge=0.0, le=1.0)


class SimServer:
    """One simulated engine: profile, engine, driver, faults and the request handlers' logic."""

    def __init__(self, settings: SimSettings, profile: Profile) -> None:
        self.settings = settings
        self.profile = profile
        self.model_name = settings.served_model_name or profile.model.name
        limits = EngineLimits(
            kv_capacity_tokens=settings.kv_capacity_tokens or profile.kv_capacity_tokens,
            max_num_seqs=settings.max_num_seqs or profile.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens or profile.max_num_batched_tokens,
            max_model_len=settings.max_model_len or profile.model.max_model_len,
            host_cache_tokens=settings.host_cache_tokens,
            host_link_gbytes_s=settings.host_link_gbytes_s,
        )
        self.engine = Engine(CostModel.from_profile(profile), limits, coalesce_decode=False,
                             kv_events=settings.kv_events is not None)
        self.publisher = (KVEventPublisher(settings.kv_events, settings.kv_events_replay, settings.kv_events_topic,
                                           settings.kv_events_buffer) if settings.kv_events is not None else None)
        self.metrics = EngineMetrics(self.engine, flavor=settings.metrics, model_name=self.model_name,
                                     role=settings.role, block_size=profile.kv_block_size)
        self.kv = KVTransfers(settings, kv_bytes_per_token=profile.model.kv_bytes_per_token,
                              block_size=profile.kv_block_size, registry=self.metrics.registry)
        self.fault = FaultUpdate(mode=settings.fault, slowdown=settings.slowdown, error_rate=settings.error_rate)
        self.rng = random.Random(settings.seed)
        self.driver: EngineDriver | None = None
        self._ids = itertools.count()
        self._apply_slowdown()

    def set_fault(self, update: FaultUpdate) -> None:
        self.fault = update
        self._apply_slowdown()
        if update.mode == "crash":
            # Answer the admin call first, then die like a crashed engine (no graceful shutdown).
            asyncio.get_running_loop().call_later(0.05, os._exit, 1)

    def _apply_slowdown(self) -> None:
        factor = self.fault.slowdown if self.fault.mode == "slow" else 1.0
        self.engine.cost = CostModel.from_profile(self.profile, slowdown=factor)

    def injected_error(self) -> JSONResponse | None:
        if self.fault.mode == "error" and self.rng.random() < self.fault.error_rate:
            return wire.error(500, "injected fault")
        return None

    def build_request(self, body: CompletionRequest | ChatCompletionRequest) -> SimRequest:
        """The engine request of a valid body (raises ``wire.EngineRefusal`` as vLLM refuses one)."""
        max_model_len = self.engine.limits.max_model_len
        wire.check_parameters(body, max_model_len)
        # The prompt's token ids, which the KV-cache events carry (kept only when they are published):
        # the ids given, the vocabulary's ids of the word pieces, or stand-ins for the hints' block ids.
        # The gateway matches its exact cache view with the same ids (router/admission.py).
        events = self.publisher is not None
        token_ids: Sequence[int] = ()
        if body.x_tandem is not None:
            ext = body.x_tandem
            prompt_tokens, block_size, hashes = ext.prompt_tokens, ext.block_size, chain_hashes(ext.hash_ids)
            if events:
                token_ids = block_id_tokens(ext.hash_ids, block_size, prompt_tokens)
        else:
            block_size = self.profile.kv_block_size
            prompt = body.prompts() if isinstance(body, CompletionRequest) else [body.prompt_text()]
            if len(prompt) != 1:
                raise wire.EngineRefusal("the simulator serves one prompt per request (vLLM takes a batch)",
                                         "prompt", value=len(prompt))
            if isinstance(prompt[0], str):
                prompt_tokens, hashes = text_block_hashes(prompt[0], block_size)
                if events:
                    token_ids = word_ids(prompt[0])
            else:  # token ids, hashed as the gateway hashes a tokenizer's ids
                ids = [str(i) for i in prompt[0]]
                prompt_tokens, hashes = len(ids), token_block_hashes(ids, block_size)
                if events:
                    token_ids = prompt[0]
        max_tokens = wire.output_limit(body.max_completion_tokens or body.max_tokens,
                                       self.settings.default_max_tokens, prompt_tokens, max_model_len)
        reason = self.engine.validate(prompt_tokens, max_tokens)
        if reason:
            raise wire.EngineRefusal(reason)
        return SimRequest(id=f"sim-{next(self._ids)}-{uuid.uuid4().hex[:8]}", prompt_tokens=prompt_tokens,
                          max_tokens=max_tokens, block_hashes=tuple(hashes), block_size=block_size,
                          token_ids=tuple(token_ids))

    def usage(self, req: SimRequest, *, stream: bool = False) -> dict:
        make = wire.stream_usage if stream else wire.usage
        return make(req.prompt_tokens, req.generated, req.cached_tokens, self.settings.enable_prompt_tokens_details)


async def _token_stream(driver: EngineDriver, pending: _Pending) -> AsyncIterator[tuple[int, bool]]:
    """(token index, is_last) for every output token, as the engine produces them."""
    index = 0
    while True:
        emission = await pending.tokens.get()
        for k in range(emission.tokens):
            yield index, emission.finished and k == emission.tokens - 1
            index += 1
        if emission.finished:
            return


def require_api_key(app: FastAPI, key: str) -> None:
    """Answer 401 to /v1/* requests without ``Authorization: Bearer <key>``, as vLLM's --api-key does
    (health and metrics stay open, as there)."""
    expected = f"Bearer {key}".encode()

    @app.middleware("http")
    async def _check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.headers.get("authorization", "").encode()
        if request.url.path.startswith("/v1") and not hmac.compare_digest(given, expected):
            return JSONResponse(status_code=401, content={"error": "Unauthorized"})
        return await call_next(request)


def create_app(settings: SimSettings, profile: Profile | None = None) -> FastAPI:
    server = SimServer(settings, profile or load_profile(settings.profile))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = server.publisher
        if publisher is not None:
            publisher.start()
        server.driver = EngineDriver(server.engine, server.metrics, settings.time_scale,
                                     publisher.publish if publisher is not None else None)
        server.driver.start()
        await server.kv.start()
        yield
        await server.kv.stop()
        await server.driver.stop()
        if publisher is not None:
            await publisher.stop()

    app = FastAPI(title="tandem engine simulator", lifespan=lifespan)
    app.state.sim = server
    if settings.api_key is not None:
        require_api_key(app, settings.api_key.get_secret_value())
    app.add_exception_handler(RequestValidationError, wire.validation_error_handler)
    vocab = Vocabulary()

    async def generate(request: Request, body: CompletionRequest | ChatCompletionRequest, kind: str):
        assert server.driver is not None
        if server.fault.mode == "hang":
            await asyncio.Event().wait()  # accepted, never answered: the caller's timeout must fire
        if (err := server.injected_error()) is not None:
            return err
        if isinstance(body, ChatCompletionRequest) and not body.messages and body.x_tandem is None:
            return wire.missing_field("messages")
        if body.model != server.model_name:
            return wire.unknown_model(body.model, server.model_name)
        if len(server.driver.pending) >= settings.max_pending:
            return JSONResponse(status_code=503, headers={"Retry-After": "1"},
                                content={"error": {"message": "engine queue is full", "type": "ServiceUnavailableError",
                                                   "param": None, "code": 503}})
        text = body.prompt_text()
        try:
            sim_req = server.build_request(body)
        except wire.EngineRefusal as exc:
            return wire.refused(exc)
        try:
            handshake = parse_handshake(body.model_extra or {}, settings.role, stream=body.stream)
        except HandshakeError as exc:
            return wire.error(400, str(exc), exc.param)
        if handshake is not None:
            handshake.prepare(sim_req)
        seed = xxhash.xxh32_intdigest(text.encode()) if text else len(sim_req.block_hashes)
        pending = server.driver.submit(sim_req)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + sim_req.id
        if handshake is not None and handshake.side == "decode":
            try:
                await server.kv.receive(handshake, sim_req, server.driver.kv_arrived)
            except TransferError as exc:
                server.driver.abort(sim_req.id)
                return wire.error(exc.status, str(exc), exc.param)
            except BaseException:
                server.driver.abort(sim_req.id)
                raise
        room = handshake.sglang.bootstrap_room if handshake and handshake.sglang and handshake.side == "prefill" \
            else None
        if body.stream and room is None:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(server, pending, kind, rid, seed, include_usage),
                                     media_type="text/event-stream")
        try:
            parts = [output_token(seed, i) async for i, _ in _token_stream(server.driver, pending)]
        except BaseException:
            if room is not None:
                server.kv.room_finished(room, None, failure="the prefill request was aborted")
            raise
        finally:
            server.driver.abort(sim_req.id)
        if room is not None:
            server.kv.room_finished(room, sim_req)
        text_out = "".join(parts)
        make = wire.chat_body if kind == "chat" else wire.completion_body
        response = make(rid, server.model_name, text_out, "length", server.usage(sim_req))
        if handshake is not None and handshake.protocol == "vllm" and handshake.side == "prefill":
            # Advertise the address the caller reached us on (the bound one may be 0.0.0.0).
            _, port = request.scope.get("server") or (settings.host, settings.port)
            response["kv_transfer_params"] = server.kv.hold(sim_req, request.url.hostname or settings.host, port)
        return response

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await generate(request, body, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await generate(request, body, "chat")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": 0, "owned_by": "tandem-sim",
            "max_model_len": server.engine.limits.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        if server.fault.mode == "hang":
            await asyncio.Event().wait()
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": wire.VLLM_VERSION}

    @app.get("/load")
    async def load() -> dict:
        assert server.driver is not None
        return {"server_load": len(server.driver.pending)}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        """vLLM's /tokenize: a ``prompt`` or chat ``messages`` to token ids (the simulator's word pieces)."""
        try:
            data = await request.json()
        except ValueError:
            return wire.error(400, "body is not valid JSON", type_="Bad Request")
        if not isinstance(data, dict) or ("prompt" not in data and "messages" not in data):
            return wire.error(400, "a prompt or messages is required", "prompt", "Bad Request")
        if (model := data.get("model")) not in (None, server.model_name):
            return wire.unknown_model(str(model), server.model_name)
        if "messages" in data:
            try:
                text = ChatCompletionRequest(model=server.model_name, messages=data["messages"]).prompt_text()
            except ValueError as exc:
                return wire.error(400, str(exc), "messages", "Bad Request")
        else:
            text = data["prompt"] if isinstance(data["prompt"], str) else ""
        ids = vocab.encode(text)
        return JSONResponse({"count": len(ids), "max_model_len": server.engine.limits.max_model_len, "tokens": ids,
                             "token_strs": None})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        try:
            data = await request.json()
        except ValueError:
            return wire.error(400, "body is not valid JSON", type_="Bad Request")
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return wire.error(400, "tokens: a list of token ids is required", "tokens", "Bad Request")
        return JSONResponse({"prompt": vocab.decode(tokens)})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def kv_answer(status: int, content: dict, payload: bool) -> Response:
        if status != 200 or not payload:
            return JSONResponse(status_code=status, content=content)
        headers, body = server.kv.payload(int(content["prompt_tokens"]))
        return StreamingResponse(body, media_type="application/octet-stream", headers=headers)

    @app.post("/kv/pull")
    async def kv_pull(pull: PullRequest) -> Response:
        """The prefill side of a vLLM-style KV read (stands in for the NIXL side channel); with
        ``payload`` the answer is the KV bytes themselves."""
        status, content = server.kv.serve_pull(pull.engine_id, pull.block_ids)
        return kv_answer(status, content, pull.payload)

    @app.get("/bootstrap/{room}")
    async def bootstrap(room: int, wait_s: float = 30.0, payload: bool = False) -> Response:
        """SGLang-style bootstrap: a decode server waits here for the prefill of its room."""
        if not 0 <= room <= 2**63 - 1 or not 0 < wait_s <= 600:
            return wire.error(400, "room or wait_s out of range", "room")
        status, content = await server.kv.serve_bootstrap(room, wait_s)
        return kv_answer(status, content, payload)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict:
        """vLLM's (dev-mode) route: drop the prefix cache. Its answer is vLLM 0.32's: 200 and whether the
        cache was dropped (not while requests are in the engine: their blocks are in use)."""
        assert server.driver is not None
        success = server.engine.reset_prefix_cache()
        if success:
            server.driver.flush_events()
        return {"success": success}

    @app.get("/admin/kv")
    async def admin_kv() -> dict:
        """What KV transfers this engine held, served and received (tests assert handshakes here)."""
        return server.kv.snapshot()

    @app.get("/admin/fault")
    async def get_fault() -> FaultUpdate:
        return server.fault

    @app.post("/admin/fault")
    async def set_fault(update: FaultUpdate) -> FaultUpdate:
        server.set_fault(update)
        return server.fault

    return app


async def _sse(server: SimServer, pending: _Pending, kind: str, rid: str, seed: int,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI SSE framing as vLLM sends it (a chat stream opens with a role-only chunk, sent with the
    first token); the engine request is aborted if the client goes away mid-stream."""
    assert server.driver is not None
    model = server.model_name
    try:
        async for i, last in _token_stream(server.driver, pending):
            if i == 0 and kind == "chat":
                yield f"data: {json.dumps(wire.role_chunk(rid, model))}\n\n"
            chunk = wire.token_chunk(kind, rid, model, output_token(seed, i), "length" if last else None,
                                     closing=last and not include_usage)
            yield f"data: {json.dumps(chunk)}\n\n"
        if include_usage:
            usage_chunk = wire.usage_chunk(kind, rid, model, server.usage(pending.req, stream=True))
            yield f"data: {json.dumps(usage_chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        server.driver.abort(pending.req.id)
