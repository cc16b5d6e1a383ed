"""The gateway -> autoscaler observation contract: what a gateway reports and how reports merge.

Both halves live here, below both components: the gateway (``tandem.router.observations``) counts
requests into :class:`ObservationCounts`; the autoscaler (``tandem.autoscaler``) merges the counts
of every gateway replica and worker (:func:`merge_counts`) and reads the :class:`Observations`
that :func:`build_report` makes of them. The autoscaler's pure core (``tick``), its replay in the
discrete-event simulator and the tests drive the same models with plain values. Times are seconds
on whatever monotonic clock the caller uses (wall clock live, virtual time in the simulator).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tandem.api.models import Role


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthBucket(_Model):
    """One class of requests in the observed length mix.

    A mix of buckets rather than a mean, because prefill time is superlinear in the prompt and
    the queueing delay depends on the second moment of the service time: a few long prompts
    dominate TTFT even when the mean prompt is short.
    """

    input_tokens: int = Field(gt=0, description="prompt tokens")
    output_tokens: int = Field(gt=0, description="generated tokens")
    weight: float = Field(1.0, gt=0, description="share of requests in this bucket (normalised by the user)")


class RoleObservation(_Model):
    """What the gateway and the engines of one pool report for the last window."""

    ready: int = Field(ge=0, description="instances serving (not starting, not draining)")
    starting: int = Field(0, ge=0, description="instances scheduled but not ready yet")
    draining: int = Field(0, ge=0, description="instances marked draining that still hold requests")
    drained: int = Field(0, ge=0, description="instances marked draining that are now idle (safe to remove)")
    queue_depth: float = Field(0.0, ge=0, description="requests waiting (gateway queue + engine waiting), pool total")
    queue_time_s: float = Field(0.0, ge=0, description="mean time requests waited before running")
    in_flight: float = Field(0.0, ge=0, description="requests the pool holds now (queued in the gateway for it, "
                                                    "waiting in or running on its engines): its concurrency")
    kv_usage: float = Field(0.0, ge=0, le=1, description="mean KV-cache usage over the pool")

    @property
    def provisioned(self) -> int:
        """Instances the pool has or will have: ready plus starting (draining ones are leaving)."""
        return self.ready + self.starting


class Observations(_Model):
    time_s: float = Field(description="when the window ended (monotonic seconds)")
    window_s: float = Field(gt=0, description="length of the observation window")
    arrival_rate: float = Field(ge=0, description="requests per second arriving at the gateway")
    length_mix: list[LengthBucket] = Field(min_length=1, description="input/output length mix")
    recent_length_mix: list[LengthBucket] | None = Field(
        None, description="the length mix over the rate window alone (length_mix may cover a longer one): what "
                          "the autoscaler tests for a change of mix that the longer window has not caught up with")
    recent_mix_requests: int = Field(0, ge=0, description="requests behind recent_length_mix (its sample size)")
    prefix_hit_ratio: float = Field(0.0, ge=0, le=1, description="share of prompt tokens served from prefix caches")
    roles: dict[Role, RoleObservation] = Field(description="per-role pool observations")
    ttft_attainment: float | None = Field(None, ge=0, le=1, description="share of requests meeting the TTFT SLO")
    tpot_attainment: float | None = Field(None, ge=0, le=1, description="share of requests meeting the TPOT SLO")
    prefill_attainment: float | None = Field(
        None, ge=0, le=1, description="disaggregated: share of requests whose prefill leg (arrival to the prefill "
                                      "engine's answer) ended within the TTFT SLO; the rest of a TTFT miss is the "
                                      "decode side's (waiting to be admitted, KV transfer)")
    completed: int = Field(0, ge=0, description="requests that finished in the window (attainment sample size)")
    ttft_attainable: float = Field(1.0, gt=0, le=1,
                                   description="share of those whose prompt alone prefills within the TTFT SLO: "
                                               "the ceiling of TTFT attainment (no pool size lifts it)")
    offload_threshold: int | None = Field(None, ge=0, description="the offload threshold in force (uncached tokens)")
    link_other_gbps: float = Field(0.0, ge=0, description="traffic on the offload link that is not KV of offloads")
    remote_queue_s: float = Field(0.0, ge=0, description="work queued at the remote prefill pool, s per instance")


class InstanceLoad(BaseModel):
    """One engine instance as one gateway replica sees it at query time.

    ``queued`` is this replica's own queue for the instance; ``inflight`` its requests running there
    (``/admin/observation-counts``: its own, which add up over replicas; ``/admin/observations``: its
    view including what the other replicas said through shared state, the best one replica alone can
    tell). ``engine_waiting`` and ``kv_usage`` are the engine's own gauges as this replica last scraped
    them, ``scrape_age_s`` ago: every replica scrapes the same engine, so they never add up.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    service: str
    role: str
    pod: str
    routable: bool
    draining: bool
    queued: int
    inflight: int
    engine_waiting: int
    kv_usage: float
    scrape_age_s: float | None = None  # None: never scraped


class MixCount(BaseModel):
    """One power-of-two (prompt, output) length class: how many requests finished in it, their token sums."""

    model_config = ConfigDict(extra="forbid")

    prompt_class: int
    output_class: int
    count: int
    prompt_tokens: int
    output_tokens: int


class QueueWait(BaseModel):
    """Time the requests of one role waited in the gateway's queue before an engine took them."""

    model_config = ConfigDict(extra="forbid")

    wait_s: float = 0.0
    count: int = 0


# The counters of ObservationCounts that are plain sums over buckets and over replicas.
ADDITIVE_COUNTS = ("arrivals", "prompt_tokens", "hit_tokens", "ttft_n", "ttft_ok", "prefill_n", "prefill_ok",
             "attainable", "tpot_n", "tpot_ok")


class OffloadCounts(BaseModel):
    """What one gateway knows of a service's cross-datacenter prefill offload, for the autoscaler's
    sizing of the local prefill pool (which prompts stay local) and its re-solve of the threshold.

    Each gateway solves its own threshold from its own share of the same traffic, so replicas agree
    up to noise; merged, the largest is kept (the most prefill work left local: the safe side for
    sizing it). The backlog and the other models' link traffic are each gateway's own and add up."""

    model_config = ConfigDict(extra="forbid")

    threshold_tokens: int = Field(ge=0, description="offload threshold in force (uncached prompt tokens)")
    remote_instances: int = Field(ge=0, description="remote prefill engines known")
    remote_queue_tokens: int = Field(ge=0, description="uncached prompt tokens this gateway has queued or in "
                                                       "flight at the remote pool")
    remote_per_token_s: float = Field(gt=0, description="remote prefill seconds per token (its profile)")
    link_other_gbps: float = Field(ge=0, description="this gateway's traffic of other models' offloads on the "
                                                     "link, measured")


class ObservationCounts(BaseModel):
    """The sums behind one service's ``LoadReport`` over one window, as one replica or several saw it.

    Everything but ``instances`` is a sum of per-request counters over the window's buckets, so the
    counts of several replicas add up (:func:`merge_counts`) and :func:`build_report` turns any of
    them into observations.
    """

    model_config = ConfigDict(extra="forbid")

    service: str
    window_s: float = Field(gt=0, description="the window the sums cover (the one asked, clamped)")
    bucket_s: float = Field(gt=0, description="width of the buckets the window is made of")
    arrivals: int = 0
    prompt_tokens: int = Field(0, description="prompt tokens of the requests routed in the window")
    hit_tokens: int = Field(0, description="of those, tokens routing expected in an engine's prefix cache")
    ttft_n: int = Field(0, description="requests judged against the TTFT SLO (finished or failed)")
    ttft_ok: int = 0
    prefill_n: int = Field(0, description="disaggregated requests whose prefill leg was judged")
    prefill_ok: int = 0
    attainable: int = Field(0, description="judged requests whose uncached prompt alone fits the TTFT SLO")
    tpot_n: int = 0
    tpot_ok: int = 0
    queue: dict[str, QueueWait] = Field(default_factory=dict, description="per role: gateway queue wait")
    mix: list[MixCount] = Field(default_factory=list, description="length classes of requests finished")
    horizon_mix: list[MixCount] = Field(
        default_factory=list, description="the same over the whole horizon, only when the window finished "
                                          "nothing (the report falls back to it)")
    instances: list[InstanceLoad] = Field(default_factory=list, description="one per (pod, role)")
    missing: list[str] = Field(default_factory=list, description="gateway processes asked for their share that "
                                                                 "did not answer: the sums lack it")
    offload: OffloadCounts | None = Field(None, description="the service's remote prefill pool, when it has one")


def mix_table(cells: Iterable[tuple[tuple[int, int], Sequence[int]]]) -> list[MixCount]:
    """Length classes summed over buckets or replicas: ``((prompt class, output class), [n, in, out])``."""
    acc: dict[tuple[int, int], list[int]] = {}
    for key, (n, ins, outs) in cells:
        a = acc.setdefault(key, [0, 0, 0])
        a[0] += n
        a[1] += ins
        a[2] += outs
    return [MixCount(prompt_class=pc, output_class=oc, count=n, prompt_tokens=ins, output_tokens=outs)
            for (pc, oc), (n, ins, outs) in sorted(acc.items())]


def _length_mix(table: list[MixCount]) -> list[LengthBucket]:
    """Each length class at its exact mean, weighted by its share of the requests."""
    total = sum(m.count for m in table)
    return [LengthBucket(input_tokens=max(1, round(m.prompt_tokens / m.count)),
                         output_tokens=max(1, round(m.output_tokens / m.count)), weight=m.count / total)
            for m in table if m.count]


def _scrape_age(inst: InstanceLoad) -> float:
    return math.inf if inst.scrape_age_s is None else inst.scrape_age_s


def fold_instances(instances: Iterable[InstanceLoad]) -> list[InstanceLoad]:
    """One record per (pod, role) out of several views of it (replicas, or an instance object that
    left while busy and came back): queues and in-flight requests are each view's own and add up;
    the engine's gauges are one engine's, taken from the freshest scrape (a sum would count the
    engine once per view, a mean would mix readings of different ages); draining once any view has
    seen the annotation (a view that has not is behind), routable when any view can route to it."""
    out: dict[tuple[str, str], InstanceLoad] = {}
    for inst in instances:
        key = (inst.pod, inst.role)
        prev = out.get(key)
        if prev is None:
            out[key] = inst
            continue
        fresher = inst if _scrape_age(inst) < _scrape_age(prev) else prev
        out[key] = fresher.model_copy(update={
            "queued": prev.queued + inst.queued, "inflight": prev.inflight + inst.inflight,
            "draining": prev.draining or inst.draining, "routable": prev.routable or inst.routable})
    return list(out.values())


def merge_counts(parts: Sequence[ObservationCounts]) -> ObservationCounts:
    """The counts one gateway would have had if it had seen every request the ``parts`` saw (pure).

    Each request reached exactly one replica, so the request counters, queue waits and length
    classes are sums, and so are the gateway-side parts of the instances (each replica's own queue
    and in-flight requests per engine: a pod is idle only when no replica has a request on it). The
    engine-side parts are not: every replica scrapes the same engines, so adding their waiting
    queues or KV usage would count each engine once per replica; per (pod, role) the freshest
    scrape is kept (:func:`fold_instances`). Parts must cover the same window in buckets of the same width
    (the autoscaler asks every replica for the same ``window`` and wall-clock ``now``); replicas
    configured differently are refused (``ValueError``) rather than added up wrongly.
    """
    if not parts:
        raise ValueError("merge_counts: nothing to merge")
    first = parts[0]
    for p in parts[1:]:
        if (p.service, p.window_s, p.bucket_s) != (first.service, first.window_s, first.bucket_s):
            raise ValueError(f"merge_counts: replicas disagree on the window: service {p.service!r}, "
                             f"{p.window_s} s in {p.bucket_s} s buckets vs {first.service!r}, "
                             f"{first.window_s} s in {first.bucket_s} s buckets")
    queue: dict[str, QueueWait] = {}
    for p in parts:
        for role, w in p.queue.items():
            acc = queue.get(role, QueueWait())
            queue[role] = QueueWait(wait_s=acc.wait_s + w.wait_s, count=acc.count + w.count)
    mix = mix_table(((m.prompt_class, m.output_class), (m.count, m.prompt_tokens, m.output_tokens))
                     for p in parts for m in p.mix)
    horizon = [] if mix else mix_table(((m.prompt_class, m.output_class),
                                         (m.count, m.prompt_tokens, m.output_tokens))
                                        for p in parts for m in p.horizon_mix)
    return ObservationCounts(
        service=first.service, window_s=first.window_s, bucket_s=first.bucket_s,
        **{name: sum(getattr(p, name) for p in parts) for name in ADDITIVE_COUNTS},
        queue=queue, mix=mix, horizon_mix=horizon, instances=fold_instances(i for p in parts for i in p.instances),
        missing=[m for p in parts for m in p.missing],
        offload=_merge_offload([p.offload for p in parts if p.offload is not None]))


def _merge_offload(parts: Sequence[OffloadCounts]) -> OffloadCounts | None:
    """See :class:`OffloadCounts` for why each field merges as it does."""
    if not parts:
        return None
    return OffloadCounts(threshold_tokens=max(p.threshold_tokens for p in parts),
                         remote_instances=max(p.remote_instances for p in parts),
                         remote_queue_tokens=sum(p.remote_queue_tokens for p in parts),
                         remote_per_token_s=parts[0].remote_per_token_s,
                         link_other_gbps=sum(p.link_other_gbps for p in parts))


def build_report(counts: ObservationCounts, time_s: float) -> dict[str, Any]:
    """The ``LoadReport`` JSON of some counts, one replica's or merged (pure): rates over the window,
    ratios of the sums, and per role the pool's instances, queue and KV usage; ``time_s`` is echoed."""
    c = counts
    mix = _length_mix(c.mix) or _length_mix(c.horizon_mix)
    if not mix:  # nothing finished yet: the prompts seen so far, output unknown (1 token)
        mix = [LengthBucket(input_tokens=max(1, round(c.prompt_tokens / c.arrivals)) if c.arrivals else 1,
                            output_tokens=1)]
    inflight: dict[str, int] = {}
    per_role: dict[str, list[InstanceLoad]] = {}
    for inst in c.instances:
        inflight[inst.pod] = inflight.get(inst.pod, 0) + max(0, inst.inflight)
        if inst.role in ("unified", "prefill", "decode"):
            per_role.setdefault(inst.role, []).append(inst)
    roles: dict[str, RoleObservation] = {}
    for role in set(per_role) | set(c.queue):
        insts = per_role.get(role, [])
        live = [i for i in insts if not i.draining]
        wait = c.queue.get(role, QueueWait())
        roles[role] = RoleObservation(
            ready=sum(1 for i in live if i.routable),
            draining=sum(1 for i in insts if i.draining and i.inflight > 0),
            drained=sum(1 for i in insts if i.draining and i.inflight <= 0),
            queue_depth=float(sum(i.queued + i.engine_waiting for i in live)),
            in_flight=float(sum(i.queued + max(0, i.inflight) for i in live)),
            queue_time_s=wait.wait_s / wait.count if wait.count else 0.0,
            kv_usage=min(1.0, sum(i.kv_usage for i in live) / len(live)) if live else 0.0)
    obs = Observations(
        time_s=time_s, window_s=c.window_s, arrival_rate=c.arrivals / c.window_s,
        length_mix=mix, prefix_hit_ratio=c.hit_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
        roles=roles,  # type: ignore[arg-type]
        ttft_attainment=c.ttft_ok / c.ttft_n if c.ttft_n else None,
        tpot_attainment=c.tpot_ok / c.tpot_n if c.tpot_n else None,
        prefill_attainment=c.prefill_ok / c.prefill_n if c.prefill_n else None,
        completed=c.ttft_n,
        ttft_attainable=max(c.attainable / c.ttft_n, 1e-3) if c.ttft_n else 1.0,
        **_offload_fields(c.offload))
    return {"observations": obs.model_dump(mode="json"), "inflight": inflight}


def _offload_fields(offload: OffloadCounts | None) -> dict[str, Any]:
    """The threshold in force, the remote backlog in seconds per remote instance, the link's other use."""
    if offload is None:
        return {}
    backlog_s = offload.remote_queue_tokens * offload.remote_per_token_s / max(1, offload.remote_instances)
    return {"offload_threshold": offload.threshold_tokens, "remote_queue_s": backlog_s,
            "link_other_gbps": offload.link_other_gbps}
