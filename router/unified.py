"""The request path of a unified (aggregated) pool: route, wait, start upstream, answer or relay.

The pool's scheduler picks an instance (late binding: the request waits in the gateway's queue until
one has budget); the request is started on it, and a failure before the first byte is retried on
another instance with backoff, excluding the ones that failed; an engine's own 4xx goes back as it
is. A streamed answer is relayed chunk by chunk (``tandem.router.proxy``); every ending, however it
comes, releases the request's accounting once (``Gateway.done`` or :meth:`UnifiedRouter.ended`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from tandem.router.admission import error_response
from tandem.router.observations import EngineKey, RequestTrace, usage_tokens
from tandem.router.pool import Instance, Pool, QueueFull
from tandem.router.proxy import ClientGone, RelayedStream, RelayResponse, Started, UpstreamFailure, unless_disconnected
from tandem.router.resilience import backoff_delay
from tandem.router.routing.scheduler import QueueFullError
from tandem.router.routing.types import Decision, NoInstanceError, RouteRequest

if TYPE_CHECKING:
    from tandem.router.gateway import Gateway

log = logging.getLogger("tandem.gateway")


@dataclass(slots=True)
class Bound:
    """A request the pool's scheduler released to an instance; its accounting is held under ``rid``
    until ``pool.finished`` / ``pool.failed`` / ``pool.cancel``."""

    rid: str
    decision: Decision
    instance: Instance


@dataclass(frozen=True, slots=True)
class Left:
    """The instance a request was released to left while it was queued: the caller tries again (the
    decision's reason labels the request should no attempt succeed)."""

    decision: Decision


def unguarded(work: Awaitable[str]) -> Awaitable[str]:
    """No disconnect watch: a front end whose client leaving cancels the task itself (the endpoint picker)."""
    return work


class UnifiedRouter:
    """Serves the requests of unified pools for one gateway (the disaggregated twin: ``PDRouter``).

    :meth:`bind` (route, then wait for budget) and :meth:`ended` (release the accounting) are the
    steps the endpoint picker (``tandem.router.epp``) shares with the HTTP path: one routing path,
    two front ends."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def bind(self, pool: Pool, rreq: RouteRequest, policy: str, rid: str, excluded: list[str],
                   deadline: float, trace: RequestTrace, engine_key: EngineKey | None,
                   guard: Callable[[Awaitable[str]], Awaitable[str]] = unguarded) -> Bound | Left | Response:
        """Route ``rreq`` and wait until its instance has budget (late binding).

        The bound request; or the refusal, already counted (``Gateway.done``); or :class:`Left` when
        the instance left while the request was queued. ``guard`` wraps the wait (the HTTP path stops
        it when the client disconnects, :class:`ClientGone`); ``engine_key`` feeds the observations'
        estimate of the engine's own cache hits."""
        gw = self.gw
        try:
            decision, released = pool.submit(replace(rreq, request_id=rid, arrival=time.monotonic()), policy,
                                             excluded)
        except QueueFull as exc:  # the whole gateway's queue
            return gw.done(policy, "none", "queue_full", error_response(
                503, f"too many queued requests: {exc}", type_="rate_limit_error", retry_after=1), trace=trace)
        except QueueFullError as exc:
            # One instance's queue full: that key is hot, back off (429); the pool's: 503.
            full = pool.instances.get(exc.instance_id or "")
            what = f"the queue of instance {full.label} is full" if full else str(exc)
            return gw.done(policy, "none", "queue_full", error_response(
                429 if exc.scope == "instance" else 503, f"too many queued requests: {what}",
                type_="rate_limit_error", retry_after=1), trace=trace)
        except NoInstanceError as exc:
            return gw.done(policy, "none", "no_instance", error_response(
                503, f"no available instance for model '{pool.model}': {exc}", type_="server_error",
                retry_after=2), trace=trace)
        reason = decision.reason
        try:
            if released.done():  # released at once (not saturated): no need to watch the client
                instance_id = released.result()
            else:
                limit = min(gw.settings.queue_timeout, deadline - time.monotonic())
                instance_id = await guard(pool.wait(rid, released, limit))
        except NoInstanceError as exc:  # its instance went away and nothing else could take it
            return gw.done(policy, reason, "no_instance", error_response(
                503, str(exc), type_="server_error", retry_after=2), trace=trace)
        except TimeoutError:
            return gw.done(policy, reason, "queue_timeout", error_response(
                503, "timed out waiting for an instance", type_="server_error", retry_after=2), trace=trace)
        except ClientGone:
            return gw.done(policy, reason, "client_gone", Response(status_code=499), trace=trace)
        inst = pool.instances.get(instance_id)
        if inst is None:  # left while the request was queued
            pool.failed(rid)
            return Left(decision)
        gw.observer.routed(trace, inst.engine_hit(engine_key, rreq.prompt_tokens, decision.hit_tokens,
                                                  gw.shadow_tokens), time.monotonic())
        return Bound(rid, decision, inst)

    def ended(self, pool: Pool, rid: str, policy: str, reason: str, t0: float, trace: RequestTrace, outcome: str,
              output_tokens: int | None) -> None:
        """A request that reached its engine ended (however): release its accounting, once."""
        gw = self.gw
        now = time.monotonic()
        pool.finished(rid)
        gw.observer.ended(trace, outcome, output_tokens, now)
        gw.metrics.e2e.labels(policy).observe(now - t0)
        gw.metrics.requests.labels(policy, reason, outcome).inc()
        gw.leave()

    async def serve(self, request: Request, pool: Pool, rreq: RouteRequest, raw: bytes, path: str, stream: bool,
                    policy: str, engine_key: EngineKey | None = None) -> Response:
        """Route, wait, start upstream (retrying before the first byte), then answer or relay."""
        gw = self.gw
        s = gw.settings
        assert gw.upstream is not None
        t0 = time.monotonic()
        deadline = t0 + s.request_timeout
        base = gw.new_request_id()
        excluded: list[str] = []
        failure: UpstreamFailure | None = None
        failed_on = ""
        reason = "none"
        trace = gw.observer.arrived(pool.service, "unified", rreq.prompt_tokens, t0)
        guard = partial(unless_disconnected, request)
        for attempt in range(1, s.max_attempts + 1):
            rid = f"{base}-{attempt}"
            try:
                bound = await self.bind(pool, rreq, policy, rid, excluded, deadline, trace, engine_key, guard)
                if isinstance(bound, Response):
                    return bound
                reason = bound.decision.reason
                if isinstance(bound, Left):
                    continue
                inst, instance_id = bound.instance, bound.instance.id
                try:
                    started = await unless_disconnected(request, gw.upstream.start(
                        inst.endpoint.url + path, raw, stream=stream, budget_s=max(0.001, deadline - time.monotonic()),
                        first_byte_s=gw.first_byte_s(rreq.prompt_tokens)))
                except ClientGone:
                    pool.finished(rid)
                    return gw.done(policy, reason, "client_gone", Response(status_code=499), trace=trace)
                except UpstreamFailure as exc:
                    failure, failed_on = exc, inst.label
                    pool.failed(rid)
                    if exc.kind == "busy":  # the gateway's own connection limit: nothing wrong with the engine
                        return gw.done(policy, reason, "busy", error_response(
                            503, str(exc), type_="server_error", retry_after=1), trace=trace)
                    inst.breaker.on_failure(time.monotonic(), fatal=exc.fatal)
                    inst.refresh_health(time.monotonic())
                    gw.metrics.upstream_errors.labels(inst.label, exc.kind).inc()
                    excluded.append(instance_id)
                    log.warning("attempt %d of %s on %s failed: %s", attempt, base, instance_id, exc)
                    if attempt < s.max_attempts and deadline - time.monotonic() > 0:
                        gw.metrics.retries.labels(exc.kind).inc()
                        await asyncio.sleep(backoff_delay(s.retry_backoff, attempt))
                        continue
                    break
            except BaseException:
                pool.cancel(rid)  # cancelled mid-attempt (shutdown): leave no accounting behind
                raise
            inst.breaker.on_success()
            if started.status >= 400:  # the engine refused the request itself: not retryable
                pool.failed(rid)
                return gw.done(policy, reason, "client_error", Response(
                               started.first, status_code=started.status, headers=started.headers), trace=trace)
            pool.first_token(rid)
            headers = {**started.headers, "x-tandem-instance": inst.label, "x-tandem-decision": reason}
            if started.response is None:
                pool.finished(rid)
                gw.observer.finished(trace, usage_tokens(started.first), time.monotonic(), streamed=False)
                gw.metrics.e2e.labels(policy).observe(time.monotonic() - t0)
                return gw.done(policy, reason, "ok", Response(started.first, status_code=started.status,
                               headers=headers), trace=trace)
            gw.metrics.ttft.labels(policy).observe(time.monotonic() - t0)
            gw.observer.first_token(trace, time.monotonic())
            headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
            return RelayResponse(self._stream(pool, rid, started, policy, reason, t0, trace), started.status, headers)
        status, kind = (504, "timeout") if failure and failure.kind == "timeout" else (502, "upstream_error")
        message = f"no instance could serve the request after {s.max_attempts} attempts"
        if failure:  # the engine's address only where topology is exposed
            message += f"; last error on {failed_on}: {failure if s.expose_topology else failure.summary}"
        return gw.done(policy, reason, kind, error_response(status, message, type_="server_error"), trace=trace)

    def _stream(self, pool: Pool, rid: str, started: Started, policy: str, reason: str, t0: float,
                trace: RequestTrace) -> RelayedStream:
        return RelayedStream(started, partial(self.ended, pool, rid, policy, reason, t0, trace))
