"""One gateway process's state: membership, engine scraping, the routing tick and shared state.

:class:`Gateway` holds everything a gateway process owns (no module-level state): the pools and
their schedulers, the instances discovery reports (joined once they answer), the background loops
(routing tick, shared-state sync through Redis, the event-loop lag probe), start and the graceful
stop, and the accounting of requests in progress that the drain waits on. A generation request
goes through :meth:`Gateway.handle`: admission (``tandem.router.admission``), then the unified
path (``tandem.router.unified``) or the disaggregated one (``tandem.router.pdgateway``), both
ending in :meth:`Gateway.done` or a relayed stream's own finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import httpx
import zmq.asyncio
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from tandem.kvindex import EventCacheView
from tandem.router.admission import admit, gate
from tandem.router.cachereset import CacheReset, exact_view_stale
from tandem.router.calibration import CalibrationSettings, PrefillCalibrator
from tandem.router.cpuwork import CpuWork
from tandem.router.discovery import Endpoint, KubernetesDiscovery, static_endpoints
from tandem.router.kvsubscriber import KVEventSubscriber
from tandem.router.metrics import GatewayMetrics
from tandem.router.observations import Observer, RequestTrace, max_attainable_prompt, still_busy
from tandem.router.pdgateway import PDRouter
from tandem.router.pool import Instance, Pool, new_instance_state
from tandem.router.proxy import Upstream
from tandem.router.ratelimit import RateLimiter, RedisLimiter
from tandem.router.remote_status import RemotePoolReporter, RemoteView
from tandem.router.requestview import PATHS, Kind
from tandem.router.resilience import CircuitBreaker
from tandem.router.routing.config import RoutingConfig
from tandem.router.routing.registry import make_policy, policy_names
from tandem.router.routing.scheduler import Scheduler
from tandem.router.routing.types import ClusterView, PrefillCost
from tandem.router.scrape import Scraper
from tandem.router.security import KeyRing, admin_mode, engine_ssl_context
from tandem.router.settings import GatewaySettings
from tandem.router.siblings import Siblings
from tandem.router.state import LocalReport, MemoryStateBackend, RedisStateBackend, SharedLoad, StateBackend
from tandem.router.tokenizer import load_tokenizer
from tandem.router.unified import UnifiedRouter

if TYPE_CHECKING:
    from tandem.router.workers import WorkerContext

log = logging.getLogger("tandem.gateway")


class Gateway:
    """Everything one gateway process holds. One per app: no module-level state."""

    def __init__(self, settings: GatewaySettings, worker: WorkerContext | None = None) -> None:
        from tandem.perf.costmodel import CostModel
        from tandem.perf.profile import load_profile

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
        # model -> its engines' KV block size (vLLM cache_config_info), kept by the tick from the scrapes:
        # admission hashes prompts in these blocks too, for the observations' hit estimate.
        self.engine_blocks: dict[str, int] = {}
        self.cpu = CpuWork(settings.admission_threads, settings.admission_queue)
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
        # Remote prefill engines run on other GPUs: their estimates use their own profile.
        remote = load_profile(settings.remote_profile) if settings.remote_profile else profile
        remote_cost = CostModel.from_profile(remote)
        self.remote_prefill_cost = PrefillCost.from_cost_model(
            remote_cost, remote.max_num_batched_tokens, remote.kv_capacity_tokens)
        # What each engine's measured prefill time is compared with (tandem.router.calibration).
        self.calibration = CalibrationSettings(**settings.calibration) if settings.prefill_calibration else None
        self.cost, self.remote_cost = cost, remote_cost
        self.shadow_tokens = settings.shadow_capacity_tokens or profile.kv_capacity_tokens
        self.observer = Observer(slo_ttft_s=settings.slo_ttft, slo_tpot_s=settings.slo_tpot,
                                 attainable_tokens=max_attainable_prompt(cost.prefill_time, settings.slo_ttft),
                                 horizon_s=settings.observation_horizon,
                                 clock_offset_s=time.time() - time.monotonic())  # wall-clock buckets: mergeable
        self.leaving: list[Instance] = []  # PD instances discovery dropped that may still hold requests
        self.pools: dict[str, Pool] = {}
        self.pd: dict[str, dict[str, Instance]] = {"prefill": {}, "decode": {}, "remote-prefill": {}}
        self.pd_router = PDRouter(self)
        self.unified = UnifiedRouter(self)
        self.context_len: dict[str, int] = {}  # model -> max_model_len its engines reported (/v1/models)
        self.endpoints: set[Endpoint] = set()
        self._joining: dict[str, asyncio.Task[None]] = {}
        self.upstream: Upstream | None = None
        self.scraper: Scraper | None = None
        self.backend: StateBackend = (RedisStateBackend(settings.redis_url, settings.redis_prefix,
                                                        ttl=max(2.0, 5 * settings.state_sync_interval))
                                      if settings.redis_url else MemoryStateBackend())
        self.metrics.state_backend_up.labels(self.backend.name).set(1)
        self.metrics.backend_known(self.backend.name)
        # Per-key limits: one budget across workers and replicas through Redis (local 1/N when it is down).
        self.limiter = RateLimiter(RedisLimiter(settings.redis_url, settings.redis_prefix, timeout=0.25)
                                   if settings.redis_url else None, processes=lambda: 1 + len(self.peers))
        self._remote: dict[str, SharedLoad] = {}  # peers' load folded into our InstanceStates
        self.shared_members: dict[str, list[str]] = {}
        self.peers: list[str] = []
        self.discovery: KubernetesDiscovery | None = None
        self.remote_reporter: RemotePoolReporter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self._instance_series: set[tuple[str, str, str]] = set()
        # The exact cache view: one KV-event subscriber per instance that publishes events, and the
        # cache resets seen (instance -> token of the last one applied; new ones to publish).
        self.subscribers: dict[str, KVEventSubscriber] = {}
        self._zmq: zmq.asyncio.Context | None = None
        self._reset_tokens: dict[str, str] = {}
        self._resets_out: list[CacheReset] = []
        self._resets_adopted = False
        self._sync_now = asyncio.Event()
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
            if (sub := self.subscribers.pop(ep.url, None)) is not None:
                await sub.stop()
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

    def instance_label(self, ep: Endpoint) -> str:
        """What clients and /metrics call an engine: its URL only with --expose-topology; otherwise an
        opaque id, stable across gateway replicas and restarts (the pod name, else a hash of the URL)."""
        if self.settings.expose_topology:
            return ep.url
        return ep.name or "i-" + hashlib.sha256(ep.url.encode()).hexdigest()[:12]

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
                    card = resp.json()["data"][0]
                    model = card["id"]
                    if isinstance(limit := card.get("max_model_len"), int) and limit > 0:  # vLLM, sglang
                        self.context_len[model] = limit
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                log.info("instance %s not answering /v1/models yet (%s)", ep.url, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        label = self.instance_label(ep)
        per_token, extra = self.remote_prefill_cost if ep.role == "remote-prefill" \
            else (self.prefill_s_per_token, self.prefill_cost)
        state = new_instance_state(ep.url, per_token, extra, self.shadow_tokens)
        cost = self.remote_cost if ep.role == "remote-prefill" else self.cost
        calibration = None if self.calibration is None else PrefillCalibrator(self.calibration, cost.prefill_time)
        if ep.kv_events is not None:
            state.exact = self._subscribe(ep, label)
        breaker = CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_cooldown)
        inst = Instance(ep, model, state, breaker, last_scrape_ok=time.monotonic(), label=label,
                        calibration=calibration)
        self.metrics.instance_known(inst.label)
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

    # --- the exact cache view and cache resets ----------------------------------------------

    def _subscribe(self, ep: Endpoint, label: str) -> EventCacheView:
        """Start following the engine's KV-cache events; its view answers once in sync. ``label``: what
        /metrics calls the instance (:meth:`instance_label`)."""
        assert ep.kv_events is not None
        if self._zmq is None:
            self._zmq = zmq.asyncio.Context()
        view = EventCacheView(self.settings.kv_index_blocks)
        sub = KVEventSubscriber(ep.url, ep.kv_events, view, self._zmq, self.cache_reset, self.metrics,
                                label=label, queue_size=self.settings.kv_events_queue,
                                replay_timeout=self.settings.kv_replay_timeout)
        self.subscribers[ep.url] = sub
        self.metrics.kv_events_known(label)
        sub.start()
        log.info("instance %s: following its KV-cache events at %s", ep.url, ep.kv_events.endpoint)
        return view

    def cache_reset(self, reset: CacheReset, local: bool = True) -> None:
        """An engine's cache is gone: clear this process's views of it at once (the shadow always,
        the exact view when the reset makes it stale) and, when this process saw it first, publish
        it so every other replica and worker clears theirs (shared state)."""
        iid = reset.instance
        if self._reset_tokens.get(iid) == reset.token:
            return
        self._reset_tokens[iid] = reset.token
        sub = self.subscribers.get(iid)
        stale = sub is not None and exact_view_stale(reset, sub.view.live, sub.oldest_ts)
        known = [inst for inst in self.all_instances() if inst.id == iid]
        for inst in known:
            inst.state.shadow.clear()
        if stale and sub is not None:
            sub.clear()
        if known:  # a peer's reset of an engine this process does not serve has no series here
            self.metrics.cache_resets.labels(known[0].label, reset.reason).inc()
        log.warning("instance %s: engine cache %s (%s%s): cache views cleared", iid, reset.reason, reset.source,
                    "" if local else ", seen by a peer")
        if local:
            self._resets_out.append(reset)
            self._sync_now.set()

    def apply_resets(self, resets: dict[str, CacheReset]) -> None:
        """The peers' resets from the shared state; the first sync only learns which are old news."""
        if not self._resets_adopted:
            self._resets_adopted = True
            for iid, reset in resets.items():
                self._reset_tokens.setdefault(iid, reset.token)
            return
        for reset in resets.values():
            self.cache_reset(reset, local=False)

    # --- background loops ------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rebalance_interval)
            self.pd_router.tick()
            for pool in self.pools.values():
                pool.tick()
                for inst in pool.instances.values():
                    self.metrics.queue_length.labels(inst.label).set(inst.state.queued_requests)
                    self.metrics.inflight.labels(inst.label).set(inst.state.inflight_requests)
                    self.metrics.breaker_open.labels(inst.label).set(1 if inst.breaker.state == "open" else 0)
            counts: dict[tuple[str, str, str], int] = dict.fromkeys(self._instance_series, 0)
            for inst in self.all_instances():
                if inst.snapshot is not None and inst.snapshot.block_size:
                    self.engine_blocks[inst.model] = inst.snapshot.block_size
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
        report.resets, self._resets_out = self._resets_out, []
        for name, pool in self.pools.items():
            report.members[name] = sorted(i.id for i in pool.instances.values() if not i.removed)
            report.observed[name], pool.observed = pool.observed, []
            for iid, inst in pool.instances.items():
                remote = self._remote.get(iid, SharedLoad())
                s = inst.state
                report.load[iid] = SharedLoad(
                    pending_miss_tokens=max(0, s.pending_miss_tokens - remote.pending_miss_tokens),
                    pending_attn_pairs=max(0, s.pending_attn_pairs - remote.pending_attn_pairs),
                    queued_requests=s.queued_requests,
                    inflight_requests=max(0, s.inflight_requests - remote.inflight_requests))
        return report

    def apply_remote(self, load: dict[str, SharedLoad]) -> None:
        """Fold the peers' load into our instance states as a delta on top of our own accounting."""
        for pool in self.pools.values():
            for iid, inst in pool.instances.items():
                new = load.get(iid, SharedLoad())
                old = self._remote.get(iid, SharedLoad())
                inst.state.inflight_miss_tokens += new.pending_miss_tokens - old.pending_miss_tokens
                inst.state.inflight_attn_pairs += new.pending_attn_pairs - old.pending_attn_pairs
                inst.state.inflight_requests += new.inflight_requests - old.inflight_requests
                self._remote[iid] = new

    async def sync_state(self) -> bool:
        report = self.local_report()
        view = await self.backend.sync(report)
        up = view is not None
        self.metrics.state_backend_up.labels(self.backend.name).set(1 if up else 0)
        if view is None:
            self._resets_out[:0] = report.resets  # published once the backend answers again
            self.metrics.state_backend_errors.labels(self.backend.name).inc()
            self.apply_remote({})  # degrade to local state: forget what the peers said
            return False
        self.apply_remote(view.load)
        self.apply_resets(view.resets)
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
            # A cache reset seen here is published at once, not at the next interval. (asyncio.timeout,
            # not wait_for: Python 3.11's wait_for can swallow a cancel() that races its timeout, and
            # this loop then outlived stop() — seen with a 0.05 s interval on a busy machine.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.state_sync_interval):
                    await self._sync_now.wait()
            self._sync_now.clear()
            await self.sync_state()

    async def start(self) -> None:
        s = self.settings
        self.upstream = Upstream(max_connections=s.max_connections, connect_timeout=s.connect_timeout,
                                 first_byte_timeout=s.first_byte_timeout, stream_idle_timeout=s.stream_idle_timeout,
                                 max_stream_s=s.max_stream_duration, ssl_context=self.engine_tls)
        self.scraper = Scraper(self.all_instances, self.metrics, interval=s.scrape_interval,
                               timeout=s.scrape_timeout, stale_after=s.stale_after, max_bytes=s.max_scrape_bytes,
                               ssl_context=self.engine_tls, headers=self.engine_headers, on_restart=self.cache_reset)
        if s.discovery == "kubernetes":
            self.discovery = KubernetesDiscovery(s.k8s_namespace, s.k8s_selector, s.k8s_port, self.set_endpoints,
                                                 s.kubeconfig, s.k8s_watch_timeout)
            await self.discovery.start()
        else:
            await self.set_endpoints(static_endpoints(s.instances, s.prefill_instances, s.decode_instances,
                                                      s.remote_prefill_instances, s.kv_event_sources()))
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
            async with asyncio.timeout(self.settings.drain_timeout):
                await self._idle.wait()
        tasks = [*self.tasks, *self._joining.values()]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a task that ignores its cancel() must not hold the shutdown for ever
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            for task in stuck:
                log.error("gateway stop: task %s did not stop within 5 s of its cancel()", task.get_name())
        if self.discovery:
            await self.discovery.stop()
        if self.scraper:
            await self.scraper.stop()
        await asyncio.gather(*(sub.stop() for sub in self.subscribers.values()))
        if self._zmq is not None:
            self._zmq.destroy(linger=0)
        if self.remote_reporter:
            await self.remote_reporter.stop()
        if self.upstream:
            await self.upstream.close()
        await self.backend.close()
        await self.limiter.close()
        self.cpu.close()
        if self.siblings:
            await self.siblings.close()

    async def _start_remote_reporter(self, pool: str) -> None:
        """Write the RemotePrefillPool's status; without API credentials, serve and say why."""
        from tandem.kube import KubeClient, load_credentials

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

    # --- requests in progress -------------------------------------------------------------

    def enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    def served_models(self) -> list[str]:
        """Every model an instance of this gateway serves, unified or disaggregated."""
        return sorted({i.model for i in self.all_instances() if not i.removed})

    async def handle(self, request: Request, kind: Kind) -> Response:
        """One generation request, from admission to the unified or the disaggregated path."""
        if (refused := gate(self)) is not None:
            return refused
        self.enter()  # from here on, body reading included: a slow client holds a slot, not a free pass
        try:
            a = await admit(self, request, kind)
            if isinstance(a, Response):
                self.leave()
                return a
            path = PATHS[kind]
            if a.pool is None:
                return await self.pd_router.serve(request, a.data, replace(a.rreq, model=a.body.model), path,
                                                  a.body, a.policy, a.engine_key)
            return await self.unified.serve(request, a.pool, a.rreq, a.raw, path, a.body.stream, a.policy,
                                            a.engine_key)
        except BaseException:
            self.leave()
            raise

    def output_in_force(self, model: str, asked: int, prompt_tokens: int) -> int:
        """The output tokens a request may produce: what it asked for, or, when it set no limit, the
        configured default, the model's context length less the prompt, or the gateway's output limit
        (``asked`` 0: no limit set)."""
        if asked:
            return asked
        if self.settings.default_output_tokens:
            return self.settings.default_output_tokens
        if (context := self.context_len.get(model)) is not None:
            return max(1, context - prompt_tokens)
        return self.settings.max_output_tokens

    def first_byte_s(self, prompt_tokens: int) -> float:
        """How long an engine has to start a stream of ``prompt_tokens``: the first-byte timeout plus a
        multiple of the profile's prefill estimate (linear and attention terms), so that a hung engine is
        left after seconds while a long prompt still gets its prefill."""
        estimate = prompt_tokens * self.prefill_s_per_token + prompt_tokens ** 2 / 2 * self.prefill_cost.attn_pair_s
        return self.settings.first_byte_timeout + self.settings.first_byte_prefill_factor * estimate

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):08x}"

    def done(self, policy: str, decision: str, outcome: str, response: Response,
              trace: RequestTrace | None = None) -> Response:
        self.metrics.requests.labels(policy, decision, outcome).inc()
        if trace is not None:  # an ok answer was counted when it finished
            self.observer.ended(trace, outcome, None, time.monotonic())
        self.leave()
        return response
