"""What the autoscaler observes through the gateway: a sliding window over the gateway's own accounting.

The autoscaler (``tandem.autoscaler.actuator.GatewayObservationSource``) asks
``GET /admin/observations?namespace=&service=&window=&now=`` for a ``LoadReport``: an
:class:`~tandem.autoscaler.models.Observations` of the last ``window`` seconds plus the in-flight
requests per pod (a draining pod with none is *drained*). The gateway sees every request of a
service, so arrivals, prompt lengths, routing hits, queue waits, first tokens and output lengths
are exact here; only KV usage and the engines' own waiting queues come from the scraped metrics.

Memory is bounded and each request costs O(1): per service a ring of fixed time buckets (``bucket_s``
wide, ``horizon_s`` deep) of counters; the length mix is a histogram over power-of-two classes of
(prompt, output) tokens, each class keeping its count and token sums, so a window's mix reports
each class at its exact mean. A query merges the buckets its window covers.

TTFT and TPOT are judged against the gateway's SLOs when a request finishes (streamed requests
only: a non-streamed answer arrives in one piece, so the gateway sees neither its first token nor
its pace). A disaggregated request's prefill leg is judged against the TTFT SLO too: a TTFT miss
whose prefill leg was in time was lost on the decode side, and the autoscaler corrects that role.
The TTFT ceiling (``ttft_attainable``) is the share of those requests whose uncached prompt alone
prefills within the SLO on the profile's cost model.

Several gateway replicas (pods, or worker processes of one pod) each see only the requests that
reached them, so a replica's window is also served raw, as :class:`ObservationCounts` (the sums
behind the report), :func:`merge_counts` adds up the counts of every replica, and
:func:`build_report` turns counts, one replica's or merged, into the ``LoadReport``. The
single-replica ``/admin/observations`` is built by the same :func:`build_report`: there is one way
to build observations.

Clock: the request path passes ``time.monotonic()`` (a TTFT must not jump with the wall clock), but
merging adds bucket ``i`` of one replica to bucket ``i`` of another, so ``i`` must mean the same
second everywhere: buckets are indexed by ``floor((t + clock_offset_s) / bucket_s)`` and the gateway
sets ``clock_offset_s = time.time() - time.monotonic()`` at start, which makes the index wall-clock
seconds (NTP-synchronised across nodes). Linux slews both clocks together, so that offset only moves
when the wall clock is stepped; a replica that saw a step keeps its start-up alignment.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tandem.api.models import Role
from tandem.api.observations import (
    ADDITIVE_COUNTS,
    InstanceLoad,
    ObservationCounts,
    QueueWait,
    build_report,
    fold_instances,
    mix_table,
)
from tandem.blockcache import BlockCache

if TYPE_CHECKING:
    from tandem.router.pool import Instance

_USAGE = re.compile(rb'"(?:completion|output)_tokens"\s*:\s*(\d+)')


# Request outcomes that say nothing about whether the service kept its SLO: the client left, or the
# request itself was invalid. Every other non-ok outcome is a miss (see Observer.ended).
_NOT_SLO_MISSES = frozenset({"client_gone", "client_error"})


@dataclass(slots=True)
class RequestTrace:
    """One request as the window sees it; created on arrival, updated O(1) along its path."""

    service: str
    role: Role
    arrival: float
    prompt_tokens: int
    hit_tokens: int = 0
    routed: bool = False
    attainable: bool = True
    first_token: float | None = None
    prefill_done: float | None = None  # disaggregated: the prefill leg's answer arrived
    done: bool = False


@dataclass(slots=True)
class _Bucket:
    """Counters of one time slice of one service."""

    arrivals: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    ttft_n: int = 0
    ttft_ok: int = 0
    prefill_n: int = 0
    prefill_ok: int = 0
    attainable: int = 0
    tpot_n: int = 0
    tpot_ok: int = 0
    queue: dict[str, list[float]] = field(default_factory=dict)  # role -> [wait sum, count]
    mix: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # class -> [count, in sum, out sum]


class _Ring:
    """The last ``size`` buckets of one service, indexed by ``floor((t + offset_s) / bucket_s)``."""

    __slots__ = ("bucket_s", "buckets", "offset_s")

    def __init__(self, size: int, bucket_s: float, offset_s: float) -> None:
        self.buckets: deque[tuple[int, _Bucket]] = deque(maxlen=size)
        self.bucket_s, self.offset_s = bucket_s, offset_s

    def at(self, now: float) -> _Bucket:
        idx = math.floor((now + self.offset_s) / self.bucket_s)
        if not self.buckets or self.buckets[-1][0] < idx:
            self.buckets.append((idx, _Bucket()))
        return self.buckets[-1][1]  # a late event (clock read earlier) lands in the newest bucket

    def since(self, start: float) -> list[_Bucket]:
        first = math.floor((start + self.offset_s) / self.bucket_s)
        return [b for idx, b in self.buckets if idx >= first]


class TokenCounter:
    """Output tokens of a relayed SSE stream: the engine's usage when it sends one, else one per event.

    vLLM and SGLang send one ``data:`` event per generated token by default. Not tokens: comment lines
    (vLLM's ``: keep-alive``), ``[DONE]``, the usage chunk (``stream_options.include_usage``) and the
    role-only chunk a chat stream starts with (``{"role": "assistant", "content": ""}``, one per choice).
    Events are read line by line across chunk boundaries (an event may arrive in two pieces).
    """

    __slots__ = ("_tail", "events", "usage")

    def __init__(self) -> None:
        self.events = 0
        self.usage: int | None = None
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()  # an unfinished line waits for the rest
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # comments, event names, blank separators
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            if (m := _USAGE.search(payload)) is not None:
                self.usage = int(m.group(1))
                continue
            if b'"role"' in payload and _role_only(payload):
                continue
            self.events += 1

    @property
    def tokens(self) -> int:
        return self.usage if self.usage is not None else self.events


def _role_only(payload: bytes) -> bool:
    """A chat chunk whose every choice announces the role and carries no content yet (parsed: one per
    stream and choice, so the cost stays off the per-token path)."""
    try:
        choices = json.loads(payload).get("choices")
    except (ValueError, AttributeError):
        return False
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict) or "role" not in delta:
            return False
        if any(value for key, value in delta.items() if key != "role"):
            return False
    return True


def usage_tokens(body: bytes) -> int | None:
    """``usage.completion_tokens`` (``output_tokens`` of the Responses API) of a non-streamed answer
    (None when the engine sent none)."""
    m = _USAGE.search(body)
    return int(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class EngineKey:
    """A prompt's chained hashes in the engine's own KV blocks (``block`` tokens each, scraped from
    vLLM's ``cache_config_info``): what the engine's prefix cache matches, unlike the routing blocks."""

    block: int
    hashes: tuple[int, ...]


def engine_hit_tokens(cache: BlockCache, key: EngineKey, prompt_tokens: int) -> int:
    """The prompt tokens the engine will serve from its prefix cache, by the gateway's replica of that
    cache (an LRU of the engine's blocks fed with what the gateway sent it), then the prompt's blocks go in.

    As vLLM counts them: whole cached blocks, at most those before the prompt's last token (the engine
    computes at least that one), so it agrees with the engine's ``prefix_cache_hits/queries``."""
    blocks, _ = cache.match_prefix(key.hashes)
    hit = min(blocks * key.block, (max(prompt_tokens - 1, 0) // key.block) * key.block)
    cache.insert(key.hashes, [key.block] * len(key.hashes))
    return hit


def max_attainable_prompt(prefill_time: Callable[[int], float], slo_ttft_s: float, limit: int = 1 << 22) -> int:
    """Longest uncached prompt that prefills alone within the TTFT SLO (prefill time grows with length)."""
    if prefill_time(1) > slo_ttft_s:
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prefill_time(mid) <= slo_ttft_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Observer:
    """Sliding-window accounting per service, fed by the request path, read by the admin API."""

    def __init__(self, *, slo_ttft_s: float, slo_tpot_s: float, attainable_tokens: int, horizon_s: float = 900.0,
                 bucket_s: float = 1.0, clock_offset_s: float = 0.0) -> None:
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self.attainable_tokens = attainable_tokens
        self.horizon_s, self.bucket_s = horizon_s, bucket_s
        self.clock_offset_s = clock_offset_s  # the callers' clock + this = the buckets' clock (module docstring)
        self._size = math.ceil(horizon_s / bucket_s) + 1
        self.rings: dict[str, _Ring] = {}

    def _ring(self, service: str) -> _Ring:
        ring = self.rings.get(service)
        if ring is None:
            ring = self.rings[service] = _Ring(self._size, self.bucket_s, self.clock_offset_s)
        return ring

    # --- the request path (each O(1)) ---------------------------------------------------------

    def arrived(self, service: str, role: Role, prompt_tokens: int, now: float) -> RequestTrace:
        self._ring(service).at(now).arrivals += 1
        return RequestTrace(service, role, now, max(1, prompt_tokens))

    def routed(self, trace: RequestTrace, hit_tokens: int, now: float) -> None:
        """The request left the gateway's queue for an engine; only its first routing counts."""
        if trace.routed:
            return
        trace.routed = True
        trace.hit_tokens = max(0, min(hit_tokens, trace.prompt_tokens))
        trace.attainable = trace.prompt_tokens - trace.hit_tokens <= self.attainable_tokens
        b = self._ring(trace.service).at(now)
        b.prompt_tokens += trace.prompt_tokens
        b.hit_tokens += trace.hit_tokens
        q = b.queue.setdefault(trace.role, [0.0, 0])
        q[0] += max(0.0, now - trace.arrival)
        q[1] += 1

    def prefill_done(self, trace: RequestTrace, now: float) -> None:
        """Disaggregated: the prefill engine answered; what the TTFT takes after this is the decode side's."""
        if trace.prefill_done is None:
            trace.prefill_done = now

    def first_token(self, trace: RequestTrace, now: float) -> None:
        if trace.first_token is None:
            trace.first_token = now

    def finished(self, trace: RequestTrace, output_tokens: int | None, now: float, *, streamed: bool = True) -> None:
        """A request answered in full: its length class, and its TTFT/TPOT when it was streamed.

        A non-streamed answer reaches its client whole, so its client's TTFT is its end-to-end time
        (counted as such) and it has no TPOT to speak of."""
        if trace.done:
            return
        if not streamed:
            trace.first_token = now
        trace.done = True
        b = self._ring(trace.service).at(now)
        out = max(1, output_tokens or 1)
        key = (trace.prompt_tokens.bit_length(), out.bit_length())
        cell = b.mix.get(key)
        if cell is None:
            cell = b.mix[key] = [0, 0, 0]
        cell[0] += 1
        cell[1] += trace.prompt_tokens
        cell[2] += out
        if trace.first_token is None:
            return
        self._judge(b, trace, prefill_leg=trace.prefill_done is not None)
        if out > 1 and streamed:
            b.tpot_n += 1
            b.tpot_ok += (now - trace.first_token) / (out - 1) <= self.slo_tpot_s

    def failed(self, trace: RequestTrace, now: float) -> None:
        """A request the service failed (overloaded, no instance, engine errors, a stream cut short):
        a TTFT miss unless its first token had come in time, a TPOT miss when it had started
        streaming, and (disaggregated) a prefill-leg miss unless that leg had ended in time. Left
        out of the length mix (its output is unknown). Not for a client that left or a request the
        engine rejected as invalid: neither says anything about capacity."""
        if trace.done:
            return
        trace.done = True
        b = self._ring(trace.service).at(now)
        self._judge(b, trace, prefill_leg=trace.role == "prefill")
        if trace.first_token is not None:
            b.tpot_n += 1

    def ended(self, trace: RequestTrace, outcome: str, output_tokens: int | None, now: float) -> None:
        """How a request ended, classified in one place: ``ok`` finished it, a client that left or an
        invalid request says nothing, any other outcome failed it (a no-op once it was counted)."""
        if outcome == "ok":
            self.finished(trace, output_tokens, now)
        elif outcome not in _NOT_SLO_MISSES:
            self.failed(trace, now)

    def _judge(self, b: _Bucket, trace: RequestTrace, *, prefill_leg: bool) -> None:
        """One request's TTFT sample (a miss without a first token) and, for a disaggregated one,
        its prefill leg's (a miss when the leg never ended)."""
        slo = self.slo_ttft_s
        b.ttft_n += 1
        b.ttft_ok += trace.first_token is not None and trace.first_token - trace.arrival <= slo
        b.attainable += trace.attainable
        if prefill_leg:
            b.prefill_n += 1
            b.prefill_ok += trace.prefill_done is not None and trace.prefill_done - trace.arrival <= slo

    # --- the query ------------------------------------------------------------------------------

    def knows(self, service: str) -> bool:
        return service in self.rings

    def counts(self, service: str, window_s: float, now: float, instances: Iterable[InstanceLoad]
               ) -> ObservationCounts:
        """The sums behind the report of ``[now - window_s, now]`` (``now`` on the callers' clock), with
        the service's instances; the window is clamped to [one bucket, the horizon] and the counts say
        which it used."""
        window_s = min(max(window_s, self.bucket_s), self.horizon_s)  # whole buckets, within what is kept
        ring = self.rings.get(service)
        buckets = ring.since(now - window_s) if ring else []
        sums = {name: sum(getattr(b, name) for b in buckets) for name in ADDITIVE_COUNTS}
        waits: dict[str, list[float]] = {}
        for b in buckets:
            for role, (total, n) in b.queue.items():
                acc = waits.setdefault(role, [0.0, 0])
                acc[0] += total
                acc[1] += n
        mix = mix_table((key, cell) for b in buckets for key, cell in b.mix.items())
        horizon = [] if mix or ring is None else mix_table(
            (key, cell) for b in ring.since(now - self.horizon_s) for key, cell in b.mix.items())
        return ObservationCounts(
            service=service, window_s=window_s, bucket_s=self.bucket_s, **sums,
            queue={role: QueueWait(wait_s=total, count=int(n)) for role, (total, n) in waits.items()},
            mix=mix, horizon_mix=horizon, instances=fold_instances(i for i in instances if i.service == service))

    def report(self, service: str, window_s: float, now: float, instances: Iterable[InstanceLoad],
               time_s: float | None = None) -> dict[str, Any]:
        """The ``LoadReport`` JSON for one service over ``[now - window_s, now]`` (see :meth:`counts`)."""
        return build_report(self.counts(service, window_s, now, instances), now if time_s is None else time_s)


def still_busy(instances: Iterable[Instance]) -> list[Instance]:
    """The instances that still hold requests (queued or in flight): what a leaving list must keep."""
    return [i for i in instances if i.state.inflight_requests > 0 or i.state.queued_requests > 0]


def instance_loads(instances: Iterable[Instance], now: float,
                   peer_inflight: Mapping[str, int] | None = None) -> list[InstanceLoad]:
    """The live state of each instance object once (pools and PD roles share objects); ``now`` (the
    monotonic clock) dates the scraped gauges. ``peer_inflight``: per instance id, the other replicas'
    requests that shared state folded into this replica's count; given, they are taken out, leaving
    this replica's own (what adds up over replicas)."""
    peers = peer_inflight or {}
    seen: set[int] = set()
    out: list[InstanceLoad] = []
    for inst in instances:
        if id(inst) in seen:
            continue
        seen.add(id(inst))
        s = inst.state
        out.append(InstanceLoad(service=inst.endpoint.service or inst.model, role=inst.endpoint.role,
                                pod=inst.endpoint.name or inst.id, routable=s.routable, draining=s.draining,
                                queued=s.queued_requests,
                                inflight=max(0, s.inflight_requests - peers.get(inst.id, 0)),
                                engine_waiting=s.engine_waiting, kv_usage=s.kv_usage,
                                scrape_age_s=max(0.0, now - inst.last_scrape_ok) if inst.last_scrape_ok else None))
    return out
