"""The gateway: an OpenAI-compatible FastAPI app, a thin asyncio shell around the routing core.

Request path: authenticate -> read a bounded body -> validate (pydantic) -> key the prompt
(block hashes) -> per-key rate limit -> submit to the pool's scheduler and await release (late
binding) -> proxy to the chosen engine; failures before the first byte are retried on another
instance with backoff; the stream is relayed chunk by chunk; a client that goes away cancels the
upstream request. Background tasks: discovery, engine /metrics scraping, the routing tick
(health transitions, hotspot migration, releases) and the shared-state sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import httpx
import xxhash
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from tandem.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_error,
    error_body,
)
from tandem.prefix import chain_hashes, text_block_hashes, token_block_hashes
from tandem.router.discovery import Endpoint, KubernetesDiscovery, static_endpoints
from tandem.router.metrics import GatewayMetrics
from tandem.router.observations import (
    Observer,
    RequestTrace,
    TokenCounter,
    max_attainable_prompt,
    still_busy,
    usage_tokens,
)
from tandem.router.pdgateway import PDRouter
from tandem.router.pool import Instance, Pool, QueueFull, new_instance_state
from tandem.router.proxy import Started, Upstream, UpstreamFailure, relay
from tandem.router.remote_status import RemotePoolReporter, RemoteView
from tandem.router.resilience import CircuitBreaker, backoff_delay
from tandem.router.routing.config import RoutingConfig
from tandem.router.routing.registry import make_policy, policy_names
from tandem.router.routing.scheduler import QueueFullError, Scheduler
from tandem.router.routing.types import ClusterView, NoInstanceError, PrefillCost, RouteRequest
from tandem.router.scrape import Scraper
from tandem.router.security import KeyRing, admin_mode, engine_ssl_context
from tandem.router.settings import GatewaySettings
from tandem.router.siblings import Siblings
from tandem.router.state import InstanceLoad, LocalReport, MemoryStateBackend, RedisStateBackend, StateBackend

if TYPE_CHECKING:
    from tandem.router.workers import WorkerContext

log = logging.getLogger("tandem.gateway")
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected while its request was queued or starting."""


class Tokenizer(Protocol):
    def __call__(self, text: str) -> list[str]: ...


def load_tokenizer(path: Path) -> Tokenizer:
    """The engine's own tokenizer (``tokenizer.json``), so routing blocks align with its KV blocks."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise ValueError("tokenizer: needs the 'tokenizers' package (pip install 'tandem-serving[tokenizer]')") \
            from None
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exception for unreadable or malformed files
        raise ValueError(f"tokenizer: cannot load {path}: {exc}") from None

    def encode(text: str) -> list[str]:
        return [str(i) for i in tok.encode(text, add_special_tokens=False).ids]

    return encode


def route_request(body: CompletionRequest | ChatCompletionRequest, block_size: int,
                  tokenizer: Tokenizer | None = None) -> RouteRequest:
    """The routing key of a request: the simulator's block hashes when given, else the engine's
    tokenizer when configured, else a cheap text chunking."""
    if body.x_tandem is not None:
        ext = body.x_tandem
        return RouteRequest(request_id="", prompt_tokens=ext.prompt_tokens, block_size=ext.block_size,
                            block_hashes=tuple(chain_hashes(ext.hash_ids)), arrival=0.0,
                            fallback_key=ext.prompt_tokens, model=body.model)
    text = body.prompt_text()
    if tokenizer is not None:
        ids = tokenizer(text)
        tokens, hashes = len(ids), token_block_hashes(ids, block_size)
    else:
        tokens, hashes = text_block_hashes(text, block_size)
    return RouteRequest(request_id="", prompt_tokens=max(tokens, 1), block_size=block_size,
                        block_hashes=tuple(hashes), arrival=0.0, fallback_key=xxhash.xxh64_intdigest(text.encode()),
                        model=body.model)


def _error(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
           retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse(status_code=status, content=error_body(message, type_=type_, param=param), headers=headers)


class Gateway:
    """Everything one gateway process holds. One per app: no module-level state."""

    def __init__(self, settings: GatewaySettings, worker: WorkerContext | None = None) -> None:
        from tandem.sim.costmodel import CostModel
        from tandem.sim.profile import load_profile

        self.settings = settings
        # Request ids: one random prefix per process and a counter (a uuid4 per request cost a
        # getrandom syscall on the hot path); unique across replicas through the prefix.
        self._id_prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        if not self.known_policy(settings.policy):
            raise ValueError(f"policy: unknown routing policy '{settings.policy}'; available: "
                             f"{', '.join(policy_names())}")
        try:
            self.routing = RoutingConfig(**{"slo_ttft_s": settings.slo_ttft,
                                            "max_queued_per_instance": settings.max_queue_per_instance,
                                            "max_queued_total": settings.max_queue, **settings.routing})
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"routing.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        self.tokenizer = load_tokenizer(settings.tokenizer) if settings.tokenizer else None
        self.worker = worker
        self.worker_header = str(worker.index).encode() if worker else None  # x-tandem-worker
        self.siblings = Siblings(worker.sibling_sockets) if worker else None
        self.metrics = GatewayMetrics(worker.metrics_dir if worker else None)
        self.keys = KeyRing.load(settings.api_keys_file, settings.api_keys, settings.rate_limit_rpm,
                                 settings.rate_limit_tpm)
        self.admin_keys = KeyRing.load(settings.admin_api_keys_file, settings.admin_api_keys)
        self.admin_mode = admin_mode(settings.admin, self.keys, self.admin_keys)
        self.engine_tls = engine_ssl_context(settings.engine_tls_ca_file, settings.engine_tls_verify,
                                             settings.engine_tls_cert_file, settings.engine_tls_key_file)
        profile = load_profile(settings.profile)
        cost = CostModel.from_profile(profile)
        # The TTFT estimate's coefficients (per prefill token, per attention pair, per running
        # sequence and context token of a chunk) from the profile, as the DES takes them.
        self.prefill_s_per_token, self.prefill_cost = PrefillCost.from_cost_model(
            cost, profile.max_num_batched_tokens, profile.kv_capacity_tokens)
        self.shadow_tokens = settings.shadow_capacity_tokens or profile.kv_capacity_tokens
        self.observer = Observer(slo_ttft_s=settings.slo_ttft, slo_tpot_s=settings.slo_tpot,
                                 attainable_tokens=max_attainable_prompt(cost.prefill_time, settings.slo_ttft),
                                 horizon_s=settings.observation_horizon,
                                 clock_offset_s=time.time() - time.monotonic())  # wall-clock buckets: mergeable
        self.leaving: list[Instance] = []  # PD instances discovery dropped that may still hold requests
        self.pools: dict[str, Pool] = {}
        self.pd: dict[str, dict[str, Instance]] = {"prefill": {}, "decode": {}, "remote-prefill": {}}
        self.pd_router = PDRouter(self)
        self.endpoints: set[Endpoint] = set()
        self._joining: dict[str, asyncio.Task[None]] = {}
        self.upstream: Upstream | None = None
        self.scraper: Scraper | None = None
        self.backend: StateBackend = (RedisStateBackend(settings.redis_url, settings.redis_prefix,
                                                        ttl=max(2.0, 5 * settings.state_sync_interval))
                                      if settings.redis_url else MemoryStateBackend())
        self.metrics.state_backend_up.labels(self.backend.name).set(1)
        self.metrics.backend_known(self.backend.name)
        self._remote: dict[str, InstanceLoad] = {}  # peers' load folded into our InstanceStates
        self.shared_members: dict[str, list[str]] = {}
        self.peers: list[str] = []
        self.discovery: KubernetesDiscovery | None = None
        self.remote_reporter: RemotePoolReporter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self._instance_series: set[tuple[str, str, str]] = set()
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # --- routing core ----------------------------------------------------------------------

    def make_scheduler(self, policy: str, cluster: ClusterView) -> Scheduler:
        return Scheduler(make_policy(policy, self.routing), cluster, self.routing)

    @staticmethod
    def known_policy(name: str) -> bool:
        return name in policy_names()

    def all_instances(self) -> list[Instance]:
        out = [i for p in self.pools.values() for i in p.instances.values()]
        return out + [i for role in self.pd.values() for i in role.values()]

    # --- discovery -------------------------------------------------------------------------

    async def set_endpoints(self, endpoints: set[Endpoint]) -> None:
        """Reconcile served instances with discovery's full set: new ones join, missing ones drain."""
        added, removed = endpoints - self.endpoints, self.endpoints - endpoints
        self.endpoints = set(endpoints)
        self.leaving = still_busy(self.leaving)
        for ep in removed:
            task = self._joining.pop(ep.url, None)
            if task:
                task.cancel()
            for pool in [*self.pools.values(), *self.pd_router.pools.values()]:
                if ep.url in pool.instances:
                    log.warning("instance %s left: draining", ep.url)
                    pool.drain(ep.url)
            for role in self.pd.values():
                if (gone := role.pop(ep.url, None)) is not None:
                    gone.state.draining = gone.removed = True
                    self.leaving.append(gone)
        for ep in added:
            self._joining[ep.url] = asyncio.create_task(self._join(ep), name=f"join {ep.url}")

    def engine_headers(self, ep: Endpoint) -> dict[str, str]:
        """Credentials an engine needs: the remote prefill pool's token, sent to its engines only (it
        authenticates this gateway to another cluster; local engines never see it)."""
        token = self.settings.remote_prefill_token
        if ep.role == "remote-prefill" and token is not None:
            return {"Authorization": f"Bearer {token.get_secret_value()}"}
        return {}

    async def _join(self, ep: Endpoint) -> None:
        """Learn the instance's model (label, or its /v1/models) and add it; retried until it answers."""
        delay = 0.2
        model = ep.model
        while model is None:
            try:
                async with httpx.AsyncClient(timeout=2.0, trust_env=False, verify=self.engine_tls) as client:
                    resp = await client.get(ep.url + "/v1/models", headers=self.engine_headers(ep))
                    resp.raise_for_status()
                    model = resp.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                log.info("instance %s not answering /v1/models yet (%s)", ep.url, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        state = new_instance_state(ep.url, self.prefill_s_per_token, self.prefill_cost, self.shadow_tokens)
        breaker = CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_cooldown)
        inst = Instance(ep, model, state, breaker, last_scrape_ok=time.monotonic())
        self.metrics.instance_known(ep.url)
        if ep.role == "unified":
            pool = self.pools.get(model)
            if pool is None:
                pool = self.pools[model] = Pool(model, self.settings.policy, self.make_scheduler, self.metrics,
                                                self.settings.max_queue)
                pool.decisions = type(pool.decisions)(maxlen=self.settings.decisions_kept)
                pool.scheduler(self.settings.policy)
            pool.add(inst)
        else:
            self.pd[ep.role][ep.url] = inst
            self.metrics.pd_model_known(model, remote=ep.role == "remote-prefill")
            if ep.role != "decode":  # its prefill pool now, not at the first request: its series exist
                self.pd_router.prefill_pool(model, ep.role)
        self._joining.pop(ep.url, None)
        log.info("instance %s joined (%s, %s)", ep.url, model, ep.role)

    # --- background loops ------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rebalance_interval)
            self.pd_router.tick()
            for pool in self.pools.values():
                pool.tick()
                for iid, inst in pool.instances.items():
                    self.metrics.queue_length.labels(iid).set(inst.state.queued_requests)
                    self.metrics.inflight.labels(iid).set(inst.state.inflight_requests)
                    self.metrics.breaker_open.labels(iid).set(1 if inst.breaker.state == "open" else 0)
            counts: dict[tuple[str, str, str], int] = dict.fromkeys(self._instance_series, 0)
            for inst in self.all_instances():
                st = "draining" if inst.state.draining else "healthy" if inst.state.healthy else "unhealthy"
                key = (inst.model, inst.endpoint.role, st)
                counts[key] = counts.get(key, 0) + 1
            # Set, never cleared and re-counted: a worker's series live in files (--workers) and a
            # cleared child would come back with its old value.
            for key, n in counts.items():
                self.metrics.instances.labels(*key).set(n)
            self._instance_series = set(counts)

    def local_report(self) -> LocalReport:
        report = LocalReport()
        for name, pool in self.pools.items():
            report.members[name] = sorted(i.id for i in pool.instances.values() if not i.removed)
            report.observed[name], pool.observed = pool.observed, []
            for iid, inst in pool.instances.items():
                remote = self._remote.get(iid, InstanceLoad())
                s = inst.state
                report.load[iid] = InstanceLoad(
                    pending_miss_tokens=max(0, s.pending_miss_tokens - remote.pending_miss_tokens),
                    pending_attn_pairs=max(0, s.pending_attn_pairs - remote.pending_attn_pairs),
                    queued_requests=s.queued_requests,
                    inflight_requests=max(0, s.inflight_requests - remote.inflight_requests))
        return report

    def apply_remote(self, load: dict[str, InstanceLoad]) -> None:
        """Fold the peers' load into our instance states as a delta on top of our own accounting."""
        for pool in self.pools.values():
            for iid, inst in pool.instances.items():
                new = load.get(iid, InstanceLoad())
                old = self._remote.get(iid, InstanceLoad())
                inst.state.inflight_miss_tokens += new.pending_miss_tokens - old.pending_miss_tokens
                inst.state.inflight_attn_pairs += new.pending_attn_pairs - old.pending_attn_pairs
                inst.state.inflight_requests += new.inflight_requests - old.inflight_requests
                self._remote[iid] = new

    async def sync_state(self) -> bool:
        view = await self.backend.sync(self.local_report())
        up = view is not None
        self.metrics.state_backend_up.labels(self.backend.name).set(1 if up else 0)
        if view is None:
            self.metrics.state_backend_errors.labels(self.backend.name).inc()
            self.apply_remote({})  # degrade to local state: forget what the peers said
            return False
        self.apply_remote(view.load)
        self.shared_members, self.peers = view.members, view.peers
        for name, paths in view.peer_observed.items():
            if (pool := self.pools.get(name)) is not None and paths:
                pool.observe_peers(paths)
        return True

    async def _lag_loop(self, period: float = 0.05) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - due))

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.state_sync_interval)
            await self.sync_state()

    async def start(self) -> None:
        s = self.settings
        self.upstream = Upstream(max_connections=s.max_connections, connect_timeout=s.connect_timeout,
                                 first_byte_timeout=s.first_byte_timeout, ssl_context=self.engine_tls)
        self.scraper = Scraper(self.all_instances, self.metrics, interval=s.scrape_interval,
                               timeout=s.scrape_timeout, stale_after=s.stale_after, max_bytes=s.max_scrape_bytes,
                               ssl_context=self.engine_tls, headers=self.engine_headers)
        if s.discovery == "kubernetes":
            self.discovery = KubernetesDiscovery(s.k8s_namespace, s.k8s_selector, s.k8s_port, self.set_endpoints,
                                                 s.kubeconfig, s.k8s_watch_timeout)
            await self.discovery.start()
        else:
            await self.set_endpoints(static_endpoints(s.instances, s.prefill_instances, s.decode_instances,
                                                      s.remote_prefill_instances))
        if self._joining:  # give static instances a moment to answer before serving
            await asyncio.wait(list(self._joining.values()), timeout=5.0)
        self.scraper.start()
        if s.remote_prefill_pool and (self.worker is None or self.worker.index == 0):  # one writer per pod
            await self._start_remote_reporter(s.remote_prefill_pool)
        self.tasks = [asyncio.create_task(self._tick_loop(), name="routing-tick"),
                      asyncio.create_task(self._sync_loop(), name="state-sync"),
                      asyncio.create_task(self._lag_loop(), name="loop-lag")]

    async def stop(self) -> None:
        """Graceful drain: refuse new work, let in-flight requests finish (bounded), then close."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
        for task in [*self.tasks, *self._joining.values()]:
            task.cancel()
        await asyncio.gather(*self.tasks, *self._joining.values(), return_exceptions=True)
        if self.discovery:
            await self.discovery.stop()
        if self.scraper:
            await self.scraper.stop()
        if self.remote_reporter:
            await self.remote_reporter.stop()
        if self.upstream:
            await self.upstream.close()
        await self.backend.close()
        if self.siblings:
            await self.siblings.close()

    async def _start_remote_reporter(self, pool: str) -> None:
        """Write the RemotePrefillPool's status; without API credentials, serve and say why."""
        from tandem.operator.kube import KubeClient, load_credentials

        s = self.settings
        try:
            creds = await asyncio.to_thread(load_credentials, s.kubeconfig)
            ssl_context = await asyncio.to_thread(creds.ssl_context)
        except Exception as exc:  # whatever is wrong with the credentials, serving goes on
            log.warning("RemotePrefillPool %s: no Kubernetes API credentials, its status is not written (%s)",
                        pool, exc)
            return
        client = KubeClient(creds, ssl_context, user_agent="tandem-gateway", field_manager="tandem-gateway")
        self.remote_reporter = RemotePoolReporter(client, s.k8s_namespace, pool, self.remote_view,
                                                  s.remote_status_interval)
        self.remote_reporter.start()

    def remote_view(self) -> RemoteView:
        """The remote prefill pool as this gateway sees it (for its RemotePrefillPool status)."""
        now = time.monotonic()
        remote = list(self.pd["remote-prefill"].values())
        return RemoteView(instances=len(remote), healthy=sum(1 for i in remote if i.state.routable),
                          egress_gbps=self.pd_router.link_egress_gbps(now),
                          queue_tokens=sum(i.state.pending_miss_tokens for i in remote))

    # --- the request path ------------------------------------------------------------------

    def _enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def handle(self, request: Request, kind: str) -> Response:
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            resp = _error(503, "gateway is shutting down", type_="server_error", retry_after=1)
            resp.headers["connection"] = "close"  # the client's next request opens a connection elsewhere
            return resp
        if self.active >= self.settings.max_active_requests:
            self.metrics.rejected.labels("overloaded").inc()
            return _error(503, f"gateway at capacity ({self.settings.max_active_requests} requests in progress)",
                          type_="server_error", retry_after=1)
        auth = self.keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if not auth.ok:
            self.metrics.rejected.labels("auth").inc()
            return _error(auth.status, auth.message, type_="authentication_error")
        raw = await _read_body(request, self.settings.max_body_bytes)
        if raw is None:
            self.metrics.rejected.labels("too_large").inc()
            return _error(413, f"request body exceeds {self.settings.max_body_bytes} bytes")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.metrics.rejected.labels("invalid").inc()
            return _error(400, f"body is not valid JSON: {exc}")
        cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
        try:
            body = cls.model_validate(data)
        except ValidationError as exc:
            self.metrics.rejected.labels("invalid").inc()
            message, field = describe_validation_error(RequestValidationError(exc.errors()))
            return _error(400, message, param=field)
        pool = self.pools.get(body.model)
        disaggregated = pool is None and self.pd_router.serves(body.model)
        if pool is None and not disaggregated and any(
                i.model == body.model for role in self.pd.values() for i in role.values()):
            self.metrics.rejected.labels("pd_incomplete").inc()
            return _error(503, f"model '{body.model}' is served by prefill/decode pools, but one of the two roles "
                          "has no instance yet", type_="server_error", param="model", retry_after=2)
        if pool is None and not disaggregated:
            self.metrics.rejected.labels("unknown_model").inc()
            known = sorted(self.pools) or ["<none yet>"]
            return _error(404, f"model '{body.model}' is not served here; available: {', '.join(known)}",
                          type_="NotFoundError", param="model")
        policy = self.settings.policy
        if self.settings.policy_header and (asked := request.headers.get("x-tandem-policy")):
            if not self.known_policy(asked):
                return _error(400, f"x-tandem-policy: unknown policy '{asked}'", param="x-tandem-policy")
            policy = asked
        if self.tokenizer is not None and len(raw) > 32_768:  # long prompts: tokenize off the event loop
            rreq = await asyncio.to_thread(route_request, body, self.settings.block_size, self.tokenizer)
        else:
            rreq = route_request(body, self.settings.block_size, self.tokenizer)
        if (too_big := self._too_big(rreq.prompt_tokens, body.output_limit(0))) is not None:
            return too_big
        limit = self.keys.admit(auth.principal, rreq.prompt_tokens + body.output_limit(0), time.monotonic())
        if not limit.ok:
            self.metrics.rejected.labels("rate_limit").inc()
            return _error(429, limit.message, type_="rate_limit_error", retry_after=limit.retry_after)
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        self._enter()
        try:
            if pool is None:
                return await self.pd_router.serve(request, data, replace(rreq, model=body.model), path, body.stream,
                                                  policy)
            return await self.serve(request, pool, rreq, raw, path, body.stream, policy)
        except BaseException:
            self._leave()
            raise

    def _too_big(self, prompt_tokens: int, max_tokens: int) -> JSONResponse | None:
        s = self.settings
        if prompt_tokens > s.max_prompt_tokens:
            self.metrics.rejected.labels("too_large").inc()
            return _error(413, f"prompt: {prompt_tokens} tokens exceeds the limit of {s.max_prompt_tokens}",
                          param="prompt")
        if max_tokens > s.max_output_tokens:
            self.metrics.rejected.labels("too_large").inc()
            return _error(413, f"max_tokens: {max_tokens} exceeds the limit of {s.max_output_tokens}",
                          param="max_tokens")
        return None

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):08x}"

    async def serve(self, request: Request, pool: Pool, rreq: RouteRequest, raw: bytes, path: str, stream: bool,
                    policy: str) -> Response:
        """Route, wait, start upstream (retrying before the first byte), then answer or relay."""
        s = self.settings
        assert self.upstream is not None
        t0 = time.monotonic()
        deadline = t0 + s.request_timeout
        base = self.new_request_id()
        excluded: list[str] = []
        failure: UpstreamFailure | None = None
        reason = "none"
        trace = self.observer.arrived(pool.service, "unified", rreq.prompt_tokens, t0)
        for attempt in range(1, s.max_attempts + 1):
            rid = f"{base}-{attempt}"
            try:
                decision, released = pool.submit(replace(rreq, request_id=rid, arrival=time.monotonic()), policy,
                                                 excluded)
            except (QueueFull, QueueFullError) as exc:
                # One instance's queue full: that key is hot, back off (429); the whole gateway: 503.
                status = 429 if getattr(exc, "scope", "instance") == "instance" else 503
                return self._done(policy, "none", "queue_full", _error(
                    status, f"too many queued requests: {exc}", type_="rate_limit_error", retry_after=1), trace=trace)
            except NoInstanceError as exc:
                return self._done(policy, "none", "no_instance", _error(
                    503, f"no available instance for model '{pool.model}': {exc}", type_="server_error",
                    retry_after=2), trace=trace)
            try:
                reason = decision.reason
                remaining = deadline - time.monotonic()
                try:
                    if released.done():  # released at once (not saturated): no need to watch the client
                        instance_id = released.result()
                    else:
                        waiting = pool.wait(rid, released, min(s.queue_timeout, remaining))
                        instance_id = await _unless_disconnected(request, waiting)
                except NoInstanceError as exc:  # its instance went away and nothing else could take it
                    return self._done(policy, reason, "no_instance", _error(
                        503, str(exc), type_="server_error", retry_after=2), trace=trace)
                except TimeoutError:
                    return self._done(policy, reason, "queue_timeout", _error(
                        503, "timed out waiting for an instance", type_="server_error", retry_after=2), trace=trace)
                except ClientGone:
                    return self._done(policy, reason, "client_gone", Response(status_code=499), trace=trace)
                inst = pool.instances.get(instance_id)
                if inst is None:  # left while the request was queued
                    pool.failed(rid)
                    continue
                self.observer.routed(trace, decision.hit_tokens, time.monotonic())
                try:
                    started = await _unless_disconnected(request, self.upstream.start(
                        inst.endpoint.url + path, raw, stream=stream, budget_s=max(0.001, deadline - time.monotonic())))
                except ClientGone:
                    pool.finished(rid)
                    return self._done(policy, reason, "client_gone", Response(status_code=499), trace=trace)
                except UpstreamFailure as exc:
                    failure = exc
                    pool.failed(rid)
                    if exc.kind == "busy":  # the gateway's own connection limit: nothing wrong with the engine
                        return self._done(policy, reason, "busy", _error(
                            503, str(exc), type_="server_error", retry_after=1), trace=trace)
                    inst.breaker.on_failure(time.monotonic(), fatal=exc.fatal)
                    inst.refresh_health(time.monotonic())
                    self.metrics.upstream_errors.labels(instance_id, exc.kind).inc()
                    excluded.append(instance_id)
                    log.warning("attempt %d of %s on %s failed: %s", attempt, base, instance_id, exc)
                    if attempt < s.max_attempts and deadline - time.monotonic() > 0:
                        self.metrics.retries.labels(exc.kind).inc()
                        await asyncio.sleep(backoff_delay(s.retry_backoff, attempt))
                        continue
                    break
            except BaseException:
                pool.cancel(rid)  # cancelled mid-attempt (shutdown): leave no accounting behind
                raise
            inst.breaker.on_success()
            if started.status >= 400:  # the engine refused the request itself: not retryable
                pool.failed(rid)
                return self._done(policy, reason, "client_error", Response(
                    started.first, status_code=started.status, headers=started.headers), trace=trace)
            pool.first_token(rid)
            headers = {**started.headers, "x-tandem-instance": instance_id, "x-tandem-decision": reason}
            if started.response is None:
                pool.finished(rid)
                self.observer.finished(trace, usage_tokens(started.first), time.monotonic(), streamed=False)
                self.metrics.e2e.labels(policy).observe(time.monotonic() - t0)
                return self._done(policy, reason, "ok", Response(started.first, status_code=started.status,
                                                                  headers=headers), trace=trace)
            self.metrics.ttft.labels(policy).observe(time.monotonic() - t0)
            self.observer.first_token(trace, time.monotonic())
            headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
            return RelayResponse(self._stream(pool, rid, started, policy, reason, t0, trace), started.status, headers)
        status, kind = (504, "timeout") if failure and failure.kind == "timeout" else (502, "upstream_error")
        message = f"no instance could serve the request after {s.max_attempts} attempts"
        if failure:
            message += f"; last error: {failure}"
        return self._done(policy, reason, kind, _error(status, message, type_="server_error"), trace=trace)

    def _done(self, policy: str, decision: str, outcome: str, response: Response,
              trace: RequestTrace | None = None) -> Response:
        self.metrics.requests.labels(policy, decision, outcome).inc()
        if trace is not None:  # an ok answer was counted when it finished
            self.observer.ended(trace, outcome, None, time.monotonic())
        self._leave()
        return response

    def _stream(self, pool: Pool, rid: str, started: Started, policy: str, reason: str, t0: float,
                trace: RequestTrace) -> _Stream:
        def finish(outcome: str, output_tokens: int) -> None:
            pool.finished(rid)
            self.observer.ended(trace, outcome, output_tokens, time.monotonic())
            self.metrics.e2e.labels(policy).observe(time.monotonic() - t0)
            self.metrics.requests.labels(policy, reason, outcome).inc()
            self._leave()

        return _Stream(started, finish)


class _Stream:
    """One relayed stream and its accounting, closed exactly once however it ends."""

    def __init__(self, started: Started, finish: Callable[[str, int], None]) -> None:
        self.started, self.finish = started, finish
        self.outcome = "ok"
        self.closed = False
        self.tokens = TokenCounter()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in relay(self.started):
                self.tokens.feed(chunk)
                yield chunk
        except (ConnectionError, TimeoutError) as exc:
            self.outcome = "upstream_error"
            err = error_body(f"engine connection broke mid-stream: {type(exc).__name__}", type_="server_error")
            yield f"data: {json.dumps(err)}\n\n".encode()

    async def close(self, outcome: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        await self.started.close()  # before the first token reached the end: aborts the engine's work
        self.finish(outcome or self.outcome, self.tokens.tokens)


class RelayResponse(Response):
    """A streamed answer written straight to the ASGI ``send``, chunk by chunk as it comes.

    Starlette's StreamingResponse does the same through an anyio task group per response; this
    keeps one watcher task that cancels the relay when the client disconnects, after which the
    stream is closed (the upstream connection too, which aborts the request on the engine).
    """

    def __init__(self, stream: _Stream, status_code: int, headers: dict[str, str]) -> None:
        self.stream = stream
        self.status_code = status_code
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if task is not None:
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        outcome = None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.stream.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            outcome = "client_gone"
            if not gone.is_set() or task is None:
                raise
            task.uncancel()  # our own cancellation: the client left, nothing more to do
        except OSError:  # the client's socket broke while we were writing
            outcome = "client_gone"
        finally:
            watcher.cancel()
            with anyio.CancelScope(shield=True):
                await self.stream.close(outcome)


class GatewayApp(FastAPI):
    """FastAPI for everything, except the two generation endpoints, which skip the middleware
    stack and routing (they are the hot path; ``tandem bench gateway`` measures the difference)."""

    gateway: Gateway

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        header = self.gateway.worker_header
        if header is not None and scope["type"] == "http":  # which worker answered (admin reads are per worker)
            send = _with_header(send, b"x-tandem-worker", header)
        if scope["type"] == "http" and scope["method"] == "POST":
            kind = _FAST_PATHS.get(scope["path"])
            if kind is not None:
                response = await self.gateway.handle(Request(scope, receive), kind)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _with_header(send: Any, name: bytes, value: bytes) -> Any:
    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return sending


_FAST_PATHS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds ``limit`` bytes (checked before and while reading)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise :class:`ClientGone`.

    ``work`` runs in the caller's task and a watcher cancels that task on disconnect (the watcher's
    cancel is told apart from any other by ``gone``): one task per call, not two plus an
    ``asyncio.wait``, on a path every request takes."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()


def create_app(settings: GatewaySettings, worker: WorkerContext | None = None) -> FastAPI:
    gw = Gateway(settings, worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = GatewayApp(title="tandem gateway", lifespan=lifespan)
    app.gateway = gw
    app.state.gateway = gw

    # Also routed through FastAPI so they appear in the OpenAPI schema (with their body models, which
    # the schema fuzz test generates requests from); GatewayApp serves them directly and validates itself.
    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await gw.handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await gw.handle(request, "chat")

    @app.get("/v1/models")
    async def models() -> dict:
        counts: dict[str, int] = {}
        for inst in gw.all_instances():
            if not inst.removed:
                counts[inst.model] = counts.get(inst.model, 0) + 1
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "tandem",
                                            "instances": n} for m, n in sorted(counts.items())]}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        routable = sum(len(p.cluster.routable()) for p in gw.pools.values())
        if any(i.state.routable for i in gw.pd["decode"].values()):  # disaggregated: prefill + decode
            routable += sum(1 for i in gw.pd["prefill"].values() if i.state.routable)
        if gw.draining or routable == 0:
            why = "draining" if gw.draining else "no routable instance"
            return JSONResponse(status_code=503, content={"status": why, "routable_instances": routable})
        return JSONResponse({"status": "ready", "routable_instances": routable})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gw.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    from tandem.router.admin import admin_router

    app.include_router(admin_router(gw))
    return app
