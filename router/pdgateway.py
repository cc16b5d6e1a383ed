"""The gateway's disaggregated request path: prefill on one engine, decode (and stream) on another.

For a model served by prefill and decode instances (``--prefill-instances/--decode-instances`` or
pods labelled with those roles), each request runs the engines' KV-transfer handshake
(:mod:`tandem.router.pd_bodies` builds the bodies): the prefill instance is chosen by the routing policy
over the prefill pool, with the same late-binding scheduler as the aggregated path; the decode
instance by :func:`~tandem.router.pd_bodies.pick_decode`. Everything before the decode's first byte is
retried with the failed instances excluded, so a prefill that dies after the handshake (its KV
gone, the decode's pull fails) costs one retry, and a bounded number of attempts ends in a clear
error, never a hang. A prefill instance that refuses for a full queue (503/429) is not counted as
broken: the request is forwarded to the next candidate, at most ``pd_max_hops`` times (P/D-Serve's
reject-and-forward).

With a remote prefill pool (``--remote-prefill-instances``, a RemotePrefillPool in another
datacenter), a request whose uncached prompt is longer than the offload threshold is prefilled
there and its KV crosses the link to a local decode instance; the threshold comes from the
:class:`~tandem.router.routing.offload.OffloadController` (re-solved from the live length distribution,
arrival rate and remote backlog) unless pinned with ``--offload-threshold``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tandem.api.observations import OffloadCounts
from tandem.router.admission import error_response
from tandem.router.observations import EngineKey, RequestTrace, usage_tokens
from tandem.router.pd_bodies import (
    new_bootstrap_room,
    prefill_blind_spots,
    sglang_bodies,
    vllm_decode_body,
    vllm_decode_params,
    vllm_prefill_body,
)
from tandem.router.pool import Instance, Pool, QueueFull
from tandem.router.proxy import (
    ClientGone,
    RelayedStream,
    RelayResponse,
    Started,
    UpstreamFailure,
    unless_disconnected,
)
from tandem.router.requestview import RequestView
from tandem.router.routing.decode import DecodeLoad, pick_decode
from tandem.router.routing.offload import (
    OffloadController,
    OffloadStatus,
    SideChoice,
    best_estimate,
    decode_rps_estimate,
    mean_prefill_scale,
    pool_speed,
)
from tandem.router.routing.scheduler import QueueFullError
from tandem.router.routing.types import NoInstanceError, RouteRequest

if TYPE_CHECKING:
    from tandem.router.gateway import Gateway
    from tandem.router.state import SharedLoad


class _Retry(Exception):
    """This attempt failed before the client saw a byte; exclude these instances and try again."""

    def __init__(self, message: str, *, prefill: str | None = None, decode: str | None = None,
                 refused: bool = False) -> None:
        super().__init__(message)
        self.prefill, self.decode, self.refused = prefill, decode, refused


class _Final(Exception):
    def __init__(self, outcome: str, response: Response) -> None:
        super().__init__(outcome)
        self.outcome, self.response = outcome, response


def _error(status: int, message: str, type_: str = "server_error", retry_after: float | None = None) -> JSONResponse:
    """The disaggregated path's errors: the OpenAI shape of ``error_response``, the server's by default."""
    return error_response(status, message, type_=type_, retry_after=retry_after)


class PDRouter:
    """Prefill pools (one per model, over the gateway's prefill instances) and the two-phase path."""

    def __init__(self, gateway: Gateway) -> None:
        from tandem.perf.profile import load_profile

        self.gw = gateway
        s = gateway.settings
        self.pools: dict[tuple[str, str], Pool] = {}
        self.controllers: dict[str, OffloadController] = {}
        self.rng = random.Random()
        self.local_profile = load_profile(s.profile)
        self.remote_profile = load_profile(s.remote_profile) if s.remote_profile else self.local_profile

    # --- membership -----------------------------------------------------------------------------
    def _members(self, role: str, model: str) -> dict[str, Instance]:
        return {i.id: i for i in self.gw.pd[role].values() if i.model == model}

    def serves(self, model: str) -> bool:
        return bool(self._members("prefill", model) or self._members("remote-prefill", model)) and \
            bool(self._members("decode", model))

    def prefill_pool(self, model: str, role: str = "prefill") -> Pool:
        """The model's (local or remote) prefill pool, kept in step with discovery."""
        gw = self.gw
        pool = self.pools.get((role, model))
        if pool is None:
            pool = self.pools[(role, model)] = Pool(model, gw.settings.policy, gw.make_scheduler, gw.metrics,
                                                    gw.settings.max_queue)
            pool.scheduler(gw.settings.policy)
        current = self._members(role, model)
        for iid, inst in current.items():
            if iid not in pool.instances:
                pool.add(inst)
        for iid in [i for i in pool.instances if i not in current and not pool.instances[i].removed]:
            pool.drain(iid)
        return pool

    def decode_choice(self, model: str, exclude: list[str]) -> Instance:
        now = time.monotonic()
        insts = {i.id: i for i in self.gw.pd["decode"].values() if i.model == model}
        for inst in insts.values():
            inst.refresh_health(now)
        loads = [DecodeLoad(i.id, i.state.kv_usage, i.state.engine_running + i.state.engine_waiting,
                            i.state.inflight_requests, i.state.routable) for i in insts.values()]
        try:
            return insts[pick_decode(loads, exclude)]
        except NoInstanceError:
            return insts[pick_decode(loads)]  # every one failed this request: any is better than none

    # --- the request path -----------------------------------------------------------------------
    async def serve(self, request: Request, data: dict[str, Any], rreq: RouteRequest, path: str, view: RequestView,
                    policy: str, engine_key: EngineKey | None = None) -> Response:
        """Run the handshake, retrying before the first byte; the gateway's ``_done``/``_leave`` close it."""
        gw, s = self.gw, self.gw.settings
        stream = view.stream
        if s.pd_engine == "vllm" and (blind := prefill_blind_spots(data, gw.context_len.get(rreq.model))):
            message, field = blind  # what only the decode leg would see: refused before a prefill is spent
            return gw.done(policy, "pd", "client_error", error_response(400, message, param=field))
        base = gw.new_request_id()
        choice = self.route(rreq, base)
        route = "remote" if choice is not None and choice.side == "remote" else "local"
        gw.metrics.prefill_routes.labels(rreq.model, route).inc()
        pool = self.prefill_pool(rreq.model, "remote-prefill" if route == "remote" else "prefill")
        t0 = time.monotonic()
        deadline = t0 + s.request_timeout
        excluded_p: list[str] = []
        excluded_d: list[str] = []
        attempts = hops = 0
        trace = gw.observer.arrived(pool.service, "prefill", rreq.prompt_tokens, t0)
        last = "no attempt was made"
        try:
            while attempts < s.max_attempts and time.monotonic() < deadline:
                try:
                    return await self._attempt(request, pool, data,
                                               replace(rreq, request_id=f"{base}-{attempts + hops}"), path, stream,
                                               policy, excluded_p, excluded_d, t0, deadline, trace, engine_key,
                                               (base, choice))
                except _Final as final:
                    response = final.response
                    if final.outcome == "no_instance" and attempts:  # the failures took the last instances
                        response = _error(503, f"no prefill-decode pair left to try after {attempts} failed "
                                               f"attempts; last error: {last}", retry_after=2)
                    return gw.done(policy, "pd", final.outcome, response, trace)
                except _Retry as retry:
                    last = str(retry)
                    if retry.prefill:
                        excluded_p.append(retry.prefill)
                    if retry.decode:
                        excluded_d.append(retry.decode)
                    if retry.refused:
                        hops += 1
                        if hops > s.pd_max_hops:
                            return gw.done(policy, "pd", "refused", _error(
                                503, f"prefill instances refused the request {hops} times (queues full): {last}",
                                retry_after=1), trace)
                        continue  # forward to the next candidate at once: a refusal is not a failure
                    attempts += 1
                    gw.metrics.retries.labels("pd").inc()
                    if attempts < s.max_attempts:
                        await asyncio.sleep(s.retry_backoff * 2 ** (attempts - 1))
            return gw.done(policy, "pd", "upstream_error", _error(
                502, f"disaggregated request failed after {attempts} attempts; last error: {last}"), trace)
        finally:
            if route == "remote":  # delivered (already released) or not: nothing of it is committed any more
                self.controller(rreq.model).link.release(base)

    def route(self, rreq: RouteRequest, key: str) -> SideChoice | None:
        """Local or remote prefill (None: the model has no remote pool, so local).

        Uncached = prompt - the best hit among the local prefill instances' shadow caches (the
        tokens offloading would make someone compute). The controller starts from the threshold on
        that length and moves the request when the other side's estimate (its best instance's
        queued work and this request's miss there, plus the link's committed traffic for the
        remote side) is sooner and the link has room, or keeps a long one local when only the local
        side meets its TTFT SLO. A remote choice commits the prompt's KV to the link under ``key``.
        Without a local pool everything goes remote.
        """
        model = rreq.model
        remote = self._members("remote-prefill", model)
        local = self.prefill_pool(model, "prefill")
        if not remote:
            return None
        ctl = self.controller(model)
        remote_pool = self.prefill_pool(model, "remote-prefill")
        now = time.monotonic()
        nbytes = rreq.prompt_tokens * ctl.kv_bytes_per_token
        uncached = rreq.prompt_tokens
        # Other models' offloads share the link: their measured egress shrinks this model's budget.
        others = self.link_egress_gbps(now, besides=model)
        routable = [i.state for i in remote.values() if i.state.routable]
        ctl.remote = pool_speed(self.remote_profile, len(routable), mean_prefill_scale(routable))
        if local.instances:  # the threshold splits the load between two pools: without a local one, moot
            uncached -= max((st.hit_tokens(rreq) for st in local.cluster.instances.values()), default=0)
            routable = local.cluster.routable()
            ctl.local = pool_speed(self.local_profile, len(routable), mean_prefill_scale(routable))
            ctl.observe(uncached, now)
            ctl.maybe_resolve(now, link_other_gbps=others)
            self.gw.metrics.offload_threshold.labels(model).set(ctl.threshold)
        choice = ctl.choose(uncached, local_s=best_estimate(local.cluster, rreq),
                            remote_prefill_s=best_estimate(remote_pool.cluster, rreq), kv_bytes=nbytes, now=now,
                            slo_s=rreq.slo_ttft_s or self.gw.settings.slo_ttft, link_other_gbps=others)
        if choice.side == "remote":
            ctl.link.commit(key, nbytes)
        return choice

    def offload_counts(self, model: str, peers: Mapping[str, SharedLoad] | None = None) -> OffloadCounts | None:
        """The model's offload as this gateway sees it (None: no remote prefill pool, or no
        offload decision made yet). ``peers``: the other replicas' load that shared state folded into
        the remote instances; given, it is taken out of the backlog, leaving this gateway's own."""
        ctl = self.controllers.get(model)
        remote = self._members("remote-prefill", model)
        if ctl is None or not remote:
            return None
        others = peers or {}
        own = sum(max(0, i.state.pending_miss_tokens - (others[iid].pending_miss_tokens if iid in others else 0))
                  for iid, i in remote.items())
        now = time.monotonic()
        return OffloadCounts(threshold_tokens=ctl.threshold, remote_instances=len(remote), remote_queue_tokens=own,
                             remote_per_token_s=self.remote_profile.params.per_token_s,
                             link_other_gbps=self.link_egress_gbps(now, besides=model))

    def link_egress_gbps(self, now: float, besides: str | None = None) -> float:
        """KV traffic this gateway's offloads put on the remote link, all models' but ``besides``."""
        return sum(c.egress_gbps(now) for m, c in self.controllers.items() if m != besides)

    def controller(self, model: str) -> OffloadController:
        ctl = self.controllers.get(model)
        if ctl is None:
            s = self.gw.settings
            n_decode = len(self._members("decode", model))
            decode_rps = s.offload_decode_rps or decode_rps_estimate(self.local_profile, max(1, n_decode),
                                                                     8192, 256)
            ctl = self.controllers[model] = OffloadController(
                s.offload_settings(), local=pool_speed(self.local_profile, 1),
                remote=pool_speed(self.remote_profile, 1), decode_rps=decode_rps, link_gbps=s.remote_link_gbps,
                kv_bytes_per_token=self.local_profile.model.kv_bytes_per_token)
        return ctl

    async def _prefill_instance(self, request: Request, pool: Pool, rreq: RouteRequest, policy: str,
                                excluded: list[str], deadline: float) -> tuple[Instance, int]:
        """The prefill instance the request was released to, and the prefix hit routing counted."""

        s = self.gw.settings
        try:
            decision, released = pool.submit(replace(rreq, arrival=time.monotonic()), policy, excluded)
        except (QueueFull, QueueFullError) as exc:
            raise _Final("queue_full", _error(503, f"too many queued requests: {exc}", "rate_limit_error", 1)) from None
        except NoInstanceError as exc:
            raise _Final("no_instance", _error(503, f"no prefill instance for '{pool.model}': {exc}",
                                               retry_after=2)) from None
        try:
            instance_id = await unless_disconnected(request, pool.wait(
                rreq.request_id, released, min(s.queue_timeout, max(0.001, deadline - time.monotonic()))))
        except NoInstanceError as exc:
            raise _Final("no_instance", _error(503, str(exc), retry_after=2)) from None
        except TimeoutError:
            raise _Final("queue_timeout", _error(503, "timed out waiting for a prefill instance", retry_after=2)) \
                from None
        except ClientGone:
            raise _Final("client_gone", Response(status_code=499)) from None
        inst = pool.instances.get(instance_id)
        if inst is None:
            pool.failed(rreq.request_id)
            raise _Retry("the prefill instance left")
        return inst, decision.hit_tokens

    async def _start(self, request: Request, inst: Instance, path: str, body: dict[str, Any], stream: bool,
                     deadline: float, role: str, first_byte_s: float | None = None) -> Started:
        """Send one leg; an UpstreamFailure becomes a retry that excludes this instance."""

        gw = self.gw
        assert gw.upstream is not None
        try:
            started = await unless_disconnected(request, gw.upstream.start(
                inst.endpoint.url + path, json.dumps(body).encode(), stream=stream,
                budget_s=max(0.001, deadline - time.monotonic()), headers=gw.engine_headers(inst.endpoint),
                first_byte_s=first_byte_s))
        except ClientGone:
            raise _Final("client_gone", Response(status_code=499)) from None
        except UpstreamFailure as exc:
            refused = exc.status in (429, 503) and role == "prefill"
            if not refused and exc.kind != "busy":  # "busy": the gateway's own connection limit, not the engine
                inst.breaker.on_failure(time.monotonic(), fatal=exc.fatal)
                inst.refresh_health(time.monotonic())
            gw.metrics.upstream_errors.labels(inst.label, exc.kind).inc()
            said = exc if gw.settings.expose_topology else exc.summary  # the engine's address stays inside
            raise _Retry(f"{role} {inst.label}: {said}", **{role: inst.id}, refused=refused) from None
        inst.breaker.on_success()
        return started

    async def _attempt(self, request: Request, pool: Pool, data: dict[str, Any], rreq: RouteRequest, path: str,
                       stream: bool, policy: str, excluded_p: list[str], excluded_d: list[str], t0: float,
                       deadline: float, trace: RequestTrace, engine_key: EngineKey | None,
                       offload: tuple[str, SideChoice | None]) -> Response:
        observer = self.gw.observer
        p_inst, hit = await self._prefill_instance(request, pool, rreq, policy, excluded_p, deadline)
        observer.routed(trace, p_inst.engine_hit(engine_key, rreq.prompt_tokens, hit, self.gw.shadow_tokens),
                        time.monotonic())
        rid = rreq.request_id
        d_inst = self.decode_choice(rreq.model, excluded_d)
        d_inst.state.inflight_requests += 1
        handed_off = False
        key, choice = offload
        remote = p_inst.endpoint.role == "remote-prefill"
        ctl = self.controller(rreq.model) if remote else None

        def handoff_at(t: float) -> None:
            if choice is not None:
                self.controller(rreq.model).learn(choice, t - t0)
            if ctl is not None and stream:  # the decode's first byte will end the transfer: time it
                ctl.transfer_started(key, t)

        try:
            if self.gw.settings.pd_engine == "vllm":
                started = await self._vllm(request, pool, p_inst, d_inst, rid, data, path, stream, deadline, trace,
                                           handoff_at)
            else:
                started = await self._sglang(request, pool, p_inst, d_inst, rid, data, path, stream, deadline,
                                             trace, handoff_at)
            if started.status >= 400:  # the decode engine refused the request itself: its answer, as in unified mode
                raise _Final("client_error", Response(started.first, status_code=started.status,
                                                      headers=started.headers))
            if ctl is not None:
                self._count_link(rreq, key)
        except BaseException:
            if ctl is not None:
                ctl.link.abort(key)  # a retry starts its own transfer
            d_inst.state.inflight_requests -= 1
            raise
        try:
            headers = {**started.headers, "x-tandem-prefill-instance": p_inst.label,
                       "x-tandem-prefill-route": "remote" if remote else "local",
                       "x-tandem-decode-instance": d_inst.label, "x-tandem-decision": "pd"}
            if started.response is None:
                observer.finished(trace, usage_tokens(started.first), time.monotonic(), streamed=False)
                self.gw.metrics.e2e.labels(policy).observe(time.monotonic() - t0)
                raise _Final("ok", Response(started.first, status_code=started.status, headers=headers))
            self.gw.metrics.ttft.labels(policy).observe(time.monotonic() - t0)
            observer.first_token(trace, time.monotonic())
            headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
            handed_off = True
            stream = RelayedStream(started, self._finisher(d_inst, policy, t0, trace))
            return RelayResponse(stream, started.status, headers)
        finally:
            if not handed_off:
                d_inst.state.inflight_requests -= 1

    async def _vllm(self, request: Request, pool: Pool, p_inst: Instance, d_inst: Instance, rid: str,
                    data: dict[str, Any], path: str, stream: bool, deadline: float, trace: RequestTrace,
                    handoff_at: Callable[[float], None]) -> Started:
        """The two legs in turn; ``handoff_at`` hears when the prefill answered (the KV hand-off)."""
        try:
            pre = await self._start(request, p_inst, path, vllm_prefill_body(data), False, deadline, "prefill")
        except BaseException:
            pool.failed(rid)
            raise
        if pre.status >= 400:  # the prompt itself is bad: the engine's answer is the client's answer
            pool.failed(rid)
            raise _Final("client_error", Response(pre.first, status_code=pre.status, headers=pre.headers))
        pool.first_token(rid)
        pool.finished(rid)
        handoff = time.monotonic()
        self.gw.observer.prefill_done(trace, handoff)
        handoff_at(handoff)
        try:
            kv = vllm_decode_params(json.loads(pre.first))
        except ValueError as exc:
            raise _Retry(f"prefill {p_inst.label}: {exc}", prefill=p_inst.id) from None
        try:
            return await self._start(request, d_inst, path, vllm_decode_body(data, kv), stream, deadline, "decode")
        except _Retry as retry:
            # The decode could not start: if its KV pull failed the prefill's KV is gone too.
            retry.prefill = p_inst.id
            raise

    async def _sglang(self, request: Request, pool: Pool, p_inst: Instance, d_inst: Instance, rid: str,
                      data: dict[str, Any], path: str, stream: bool, deadline: float, trace: RequestTrace,
                      handoff_at: Callable[[float], None]) -> Started:
        """Both legs at once (the decode waits for the room); ``handoff_at`` hears when the prefill
        answered (the KV hand-off)."""
        url = urlsplit(p_inst.endpoint.url)
        port = self.gw.settings.pd_bootstrap_port or url.port or (443 if url.scheme == "https" else 80)
        prefill_body, decode_body = sglang_bodies(data, url.hostname or "", port, new_bootstrap_room(self.rng))
        p_task = asyncio.ensure_future(self._start(request, p_inst, path, prefill_body, False, deadline, "prefill"))
        # The decode stream starts with the prefill (its first byte follows the whole prefill): the prompt's budget.
        d_task = asyncio.ensure_future(self._start(request, d_inst, path, decode_body, stream, deadline, "decode",
                                                   self.gw.first_byte_s(trace.prompt_tokens)))
        try:
            pre = await p_task
        except BaseException:
            pool.failed(rid)
            await _cancel(d_task)
            raise
        if pre.status >= 400:
            pool.failed(rid)
            await _cancel(d_task)
            raise _Final("client_error", Response(pre.first, status_code=pre.status, headers=pre.headers))
        pool.first_token(rid)
        pool.finished(rid)
        handoff = time.monotonic()
        self.gw.observer.prefill_done(trace, handoff)
        handoff_at(handoff)
        try:
            return await d_task
        except _Retry as retry:
            retry.prefill = p_inst.id
            raise

    def _finisher(self, d_inst: Instance, policy: str, t0: float, trace: RequestTrace) -> Callable[[str, int], None]:
        """The accounting run exactly once when the relayed decode stream ends, however it ends."""
        def finish(outcome: str, output_tokens: int) -> None:
            d_inst.state.inflight_requests -= 1
            self.gw.observer.ended(trace, outcome, output_tokens, time.monotonic())
            self.gw.metrics.e2e.labels(policy).observe(time.monotonic() - t0)
            self.gw.metrics.requests.labels(policy, "pd", outcome).inc()
            self.gw.leave()

        return finish

    def _count_link(self, rreq: RouteRequest, key: str) -> None:
        """The decode accepted a remote prefill's KV: the whole prompt's KV crossed the link (timed
        from the hand-off when the decode's first byte was the first token, not a whole answer)."""
        ctl = self.controller(rreq.model)
        nbytes = rreq.prompt_tokens * ctl.kv_bytes_per_token
        now = time.monotonic()
        ctl.record_transfer(nbytes, now, key=key)
        self.gw.metrics.link_bytes.labels(rreq.model).inc(nbytes)
        self.gw.metrics.link_utilization.labels(rreq.model).set(ctl.link_utilization(now))

    def offload_status(self) -> dict[str, OffloadStatus]:
        now = time.monotonic()
        return {model: ctl.status(now) for model, ctl in sorted(self.controllers.items())}

    def tick(self) -> None:
        for pool in self.pools.values():
            pool.tick()
        now = time.monotonic()
        for model, ctl in self.controllers.items():  # decays to 0 when offloads stop
            self.gw.metrics.link_utilization.labels(model).set(ctl.link_utilization(now))
            self.gw.metrics.offload_threshold.labels(model).set(ctl.threshold)


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    try:
        started = await task
    except BaseException:  # the leg is abandoned: its failure is not the request's
        return
    await started.close()  # it had started: drop the upstream stream
