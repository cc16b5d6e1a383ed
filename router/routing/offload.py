"""Selective cross-datacenter prefill offload: which prompts go to the remote prefill pool.

Prefill-as-a-Service sends a request to a remote prefill pool when its *uncached* prompt length
exceeds a threshold t; its KV comes back over a bandwidth-limited link to a local decode instance.
With p the fraction of requests above t, the system sustains

    Λ(t) = min(Θ_remote / p, Θ_local / (1 - p), Θ_decode, link / bytes-per-request)

requests/s. Θ_remote and Θ_local are request throughputs *of the requests each side gets*, so we
measure work rather than counts: a pool of N instances that spends w(L) seconds prefilling a prompt
of L uncached tokens sustains N / E[w(L)·1{L on its side}] requests/s of the whole stream. Long
prompts cost quadratically (attention), which is why offloading the tail relieves the local pool
much more than p suggests. The best t balances the two producers; the link term and the arrival
rate (when known) push t up as the link nears its high-water mark, so offload never saturates it.

The threshold is what maximises throughput; which side serves *one* request also depends on
what is queued now. :meth:`OffloadController.choose` starts from the threshold and departs from it
when the request's own first token would come sooner on the other side (queue-aware estimates of
the local pool, the remote pool *and* the link, whose backlog is the KV committed to it and not yet
delivered), or when only the other side meets its TTFT SLO. The link itself is measured, not taken
from the configuration: :class:`LinkMeter` divides the bytes transfers delivered by the time the
link was busy carrying them, so the threshold follows the bandwidth the link really has.

Everything here is pure: the gateway and the autoscaler feed samples and measurements in and get a
decision out (:class:`OffloadController` adds the sliding window and the re-solve period).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.perf.costmodel import CostModel
from tandem.perf.profile import Profile
from tandem.router.routing.types import ClusterView, InstanceState, RouteRequest

Bottleneck = Literal["local_prefill", "remote_prefill", "decode", "link", "none"]
Side = Literal["local", "remote"]


class PrefillPoolSpeed(BaseModel):
    """How fast a prefill pool works: N instances, each taking w(L) = a·L + b·L(L+1)/2 seconds.

    a and b are the cost model's ``per_token_s`` and ``attn_pair_s`` of the pool's GPU profile
    (chunked prefill batches away the per-iteration floor, so only the marginal terms count).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    instances: int = Field(ge=0, description="prefill instances in the pool")
    per_token_s: float = Field(gt=0, description="seconds per prompt token (linear layers)")
    attn_pair_s: float = Field(ge=0, description="seconds per causal attention pair")

    def work(self, tokens: int) -> float:
        """Seconds one instance spends prefilling ``tokens`` uncached tokens."""
        return self.per_token_s * tokens + self.attn_pair_s * tokens * (tokens + 1) / 2


class OffloadProblem(BaseModel):
    """What the threshold is solved from; every field is a recent measurement or a profile fact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uncached_lengths: Sequence[int] = Field(min_length=1, description="recent uncached prompt lengths")
    local: PrefillPoolSpeed
    remote: PrefillPoolSpeed
    decode_rps: float = Field(gt=0, description="requests/s the local decode pool sustains")
    link_gbps: float = Field(gt=0, description="link capacity, Gbit/s")
    kv_bytes_per_token: int = Field(gt=0)
    high_water: float = Field(0.85, gt=0, le=1, description="share of the link offload may use")
    arrival_rps: float | None = Field(None, ge=0, description="measured arrival rate; enforces the link cap at it")
    link_other_gbps: float = Field(0.0, ge=0, description="measured link traffic that is not this offload")
    remote_queue_s: float = Field(0.0, ge=0, description="work queued at the remote pool, seconds per instance")
    horizon_s: float = Field(10.0, gt=0, description="how soon a remote backlog should drain")
    min_threshold: int = Field(0, ge=0, description="never offload prompts this short (RTT dominates)")
    max_threshold: int | None = Field(None, ge=0, description="never keep longer prompts local: the longest "
                                      "uncached length the local pool prefills within its TTFT SLO")


class OffloadDecision(BaseModel):
    threshold_tokens: int = Field(description="offload when the uncached length is greater than this")
    offload_fraction: float
    max_rps: float = Field(description="Λ at this threshold")
    bottleneck: Bottleneck
    link_gbps_at_max: float = Field(description="offload link traffic at Λ")
    link_gbps_at_arrival: float | None = Field(None, description="offload link traffic at the measured arrival rate")


def _div(a: float, b: float) -> float:
    return math.inf if b <= 0 else a / b


def solve_threshold(problem: OffloadProblem) -> OffloadDecision:
    """The threshold that maximises Λ subject to the link's high-water mark.

    Candidates are the sample lengths themselves (Λ only changes where a sample crosses t), plus
    "offload nothing" (t = the longest sample), which is always feasible unless ``max_threshold``
    (a latency bound: prompts the local pool cannot prefill within the TTFT SLO) rules it out; the
    link cap is then what may bind. Ties go to the larger t: the same throughput with less traffic
    on the link and less RTT added to TTFTs.
    """
    lengths = sorted(problem.uncached_lengths)
    n = len(lengths)
    if lengths[0] < 0:
        raise ValueError("uncached_lengths: lengths must be non-negative")
    local_w = [problem.local.work(x) for x in lengths]
    remote_w = [problem.remote.work(x) for x in lengths]
    prefix_local = [0.0]
    for w in local_w:
        prefix_local.append(prefix_local[-1] + w)
    suffix_remote = [0.0] * (n + 1)
    suffix_tokens = [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix_remote[i] = suffix_remote[i + 1] + remote_w[i]
        suffix_tokens[i] = suffix_tokens[i + 1] + lengths[i]

    link_bytes_s = max(0.0, problem.high_water * problem.link_gbps - problem.link_other_gbps) * 1e9 / 8
    remote_n = problem.remote.instances * max(0.0, 1.0 - problem.remote_queue_s / problem.horizon_s)
    kvb = problem.kv_bytes_per_token

    def scan(latency_cap: int | None) -> tuple[float, int, int, Bottleneck] | None:
        best: tuple[float, int, int, Bottleneck] | None = None  # (Λ, threshold, k, bottleneck)
        # k = how many sorted samples stay local; threshold = lengths[k-1] (or just below lengths[0]).
        for k in range(n, -1, -1):
            threshold = lengths[k - 1] if k > 0 else max(0, lengths[0] - 1)
            if k < n and lengths[k] <= threshold:
                continue  # equal lengths cannot be split by a threshold
            if threshold < problem.min_threshold and k < n:
                break
            if latency_cap is not None and threshold > latency_cap and k > 0:
                continue  # the local pool would get prompts it cannot prefill within the SLO
            bytes_per_req = suffix_tokens[k] * kvb / n
            if problem.arrival_rps is not None and problem.arrival_rps * bytes_per_req > link_bytes_s:
                continue  # would push the link past its high-water mark at today's load
            if k < n and remote_n <= 0:
                continue
            terms: dict[Bottleneck, float] = {
                "local_prefill": _div(problem.local.instances, prefix_local[k] / n),
                "remote_prefill": _div(remote_n, suffix_remote[k] / n),
                "decode": problem.decode_rps,
                "link": _div(link_bytes_s, bytes_per_req),
            }
            bottleneck = min(terms, key=terms.__getitem__)
            lam = terms[bottleneck]
            if best is None or lam > best[0] * (1 + 1e-9):
                best = (lam, threshold, k, bottleneck)
        return best

    # The link is physical, the latency cap is a preference: when both cannot hold, keep the link.
    best = scan(problem.max_threshold) or scan(None)
    assert best is not None  # without a latency cap, k = n (offload nothing) is always feasible
    lam, threshold, k, bottleneck = best
    bytes_per_req = suffix_tokens[k] * kvb / n
    return OffloadDecision(
        threshold_tokens=threshold,
        offload_fraction=(n - k) / n,
        max_rps=lam,
        bottleneck=bottleneck if math.isfinite(lam) else "none",
        link_gbps_at_max=(lam * bytes_per_req * 8 / 1e9) if math.isfinite(lam) else 0.0,
        link_gbps_at_arrival=(problem.arrival_rps * bytes_per_req * 8 / 1e9
                              if problem.arrival_rps is not None else None),
    )


class OffloadSettings(BaseModel):
    """The offload controller's knobs (a ``RemotePrefillPool`` plus ``offload.lengthThreshold``)."""

    model_config = ConfigDict(extra="forbid")

    window: int = Field(500, ge=10, le=100_000, description="uncached lengths kept for the distribution")
    resolve_every_s: float = Field(5.0, gt=0, description="re-solve period")
    initial_threshold: int = Field(16384, ge=0, description="threshold before enough samples exist")
    min_samples: int = Field(50, ge=1, description="samples needed before the first solve")
    high_water: float = Field(0.85, gt=0, le=1)
    min_threshold: int = Field(0, ge=0, description="never offload shorter uncached prompts")
    fixed_threshold: int | None = Field(None, ge=0, description="pin t (lengthThreshold) instead of 'auto'")
    max_threshold: int | None = Field(None, ge=0, description="longest uncached prompt kept local (SLO bound)")
    link_window_s: float = Field(30.0, gt=0, le=3600, description="window over which link egress and the "
                                 "link's capacity are measured")
    link_rtt_s: float = Field(0.0, ge=0, le=10, description="link round trip: taken off each transfer's "
                              "time before the capacity is measured, added to the remote side's estimate")
    side_choice: Literal["threshold", "queue_aware"] = Field(
        "queue_aware", description="threshold: the solved t alone decides; queue_aware: t is the default and a "
        "request moves to the other side when its first token comes sooner there (queues on both pools and "
        "the link) or when only that side meets its TTFT SLO")


class OffloadStatus(BaseModel):
    """What the controller knows and decided, for the admin API and the gateway's metrics."""

    threshold_tokens: int = Field(description="offload when the uncached length is greater than this")
    pinned: bool = Field(description="t is fixed (lengthThreshold) rather than re-solved")
    samples: int = Field(description="uncached lengths in the window")
    arrival_rps: float | None = Field(description="arrival rate measured over the sample window")
    link_gbps: float = Field(description="link capacity in use: measured when transfers were seen, else nominal")
    link_nominal_gbps: float = Field(description="configured link capacity")
    link_measured_gbps: float | None = Field(description="bytes delivered / time the link was busy, over the "
                                             "last link_window_s (None: too few transfers yet)")
    link_egress_gbps: float = Field(description="KV traffic this controller's offloads delivered over the link, "
                                                "Gbit/s, over the last link_window_s")
    link_utilization: float = Field(description="link_egress_gbps / link_gbps")
    link_committed_bytes: int = Field(description="KV bytes of requests routed remote whose KV has not arrived")
    link_transfers: list[dict[str, float | int | None]] = Field(
        default_factory=list, description="the last transfers: bytes, seconds on the wire, fair-share seconds, "
        "transfers in flight when each began, and the capacity each one reads")
    local_instances: int
    remote_instances: int
    side_choices: dict[str, int] = Field(description="requests routed per side and reason since start")
    last_decision: OffloadDecision | None = Field(description="the last solve (None while pinned or warming up)")


@dataclass(frozen=True, slots=True)
class SideChoice:
    """Where one request's prefill runs, why, and the estimates behind it (seconds to the KV at
    decode, calibrated); ``prefill_s``: the routing estimate of the chosen side's prefill leg as
    given (uncalibrated), to be reported back with the measured leg (:meth:`OffloadController.learn`)."""

    side: Side
    reason: str  # threshold | faster | slo (above t, kept local) | no_remote | no_local
    local_s: float | None
    remote_s: float | None
    prefill_s: float | None = None


class Calibration:
    """How far a pool's routing estimate is from the prefill legs measured: a running mean of
    log(measured / estimated), so a pool whose requests take 1.3x what routing estimated (the
    instance the policy picked is not the best one; the late-binding queue) is compared at 1.3x."""

    def __init__(self, weight: float = 0.05, low: float = 0.25, high: float = 4.0) -> None:
        self.weight, self.low, self.high = weight, math.log(low), math.log(high)
        self._log = 0.0
        self.samples = 0

    def learn(self, estimated_s: float, measured_s: float) -> None:
        if estimated_s <= 0 or measured_s <= 0:
            return
        x = min(self.high, max(self.low, math.log(measured_s / estimated_s)))
        self.samples += 1
        w = max(self.weight, 1 / self.samples)  # a plain mean until there are 1/weight samples
        self._log += w * (x - self._log)

    @property
    def factor(self) -> float:
        return math.exp(self._log)


class LinkMeter:
    """The cross-datacenter link as the transfers over it show it.

    * **Capacity**: the link is shared fairly among the transfers in flight (processor sharing;
      TCP flows through one bottleneck roughly are), so while n transfers are in flight each gets
      1/n of it. A transfer of b bytes that took the fair-share time S = the integral of 1/n(t)
      over its life says the link moves b / S bytes per second; the reading is the sum of bytes
      over the sum of S of the transfers that ended in the window. One transfer alone reads
      bytes / duration; ten at once read the same link, not a tenth of it. The caller marks when
      each transfer starts (:meth:`started`: the gateway at the KV hand-off, the RTT later it is on
      the wire) and ends (the decode's first byte). Sharing is only roughly fair: under a deep
      backlog TCP flows in retransmission back-off starve while new ones pass (measured on a tbf
      link: 0.15 MB taking 3 s beside 1.7 MB in 1.5 s), so single readings scatter widely and
      the sum would read high while starved transfers are still in flight: a transfer in flight
      past its fair-share time counts its overdue time as link time that moved nothing. And
      :meth:`OffloadController.choose` never lets requests the threshold did not send build a
      backlog longer than the window. Time in an interval that is not transfer (the decode's
      first step) reads low.
    * **Committed bytes**: KV of requests routed to the remote pool whose transfer has not ended;
      the link must carry them before (or, sharing, beside) a request routed now.
    * **Egress**: bytes delivered over the last ``window_s`` (what the link carried for us).
    """

    def __init__(self, nominal_gbps: float, window_s: float, rtt_s: float = 0.0, *, min_busy_s: float = 0.2,
                 max_entries: int = 20_000) -> None:
        self.nominal_gbps, self.window_s, self.rtt_s = nominal_gbps, window_s, rtt_s
        self.min_busy_s = min_busy_s
        self._max = max_entries
        # (end, bytes, fair-share seconds, seconds on the wire, transfers in flight at its start); None: untimed
        self._done: deque[tuple[float, int, float | None, float | None, int]] = deque(maxlen=max_entries)
        self._done_bytes = 0
        self._committed: OrderedDict[str, int] = OrderedDict()
        self.committed_bytes = 0
        self._pending: deque[tuple[float, str, int]] = deque()  # (on the wire from, key, start number)
        self._starts: dict[str, int] = {}  # key -> its live start (an abandoned one stays out of flight)
        self._seq = 0
        self._inflight: dict[str, list[float]] = {}  # key -> [fair-share seconds so far, on the wire since, peers]
        self._clock = -math.inf
        self._measured: float | None = None
        self._measured_at = -math.inf

    def commit(self, key: str, nbytes: int) -> None:
        """A request was routed remote: its KV will cross the link."""
        self.release(key)
        if len(self._committed) >= self._max:  # bounded: the oldest (surely lost) goes
            self.committed_bytes -= self._committed.popitem(last=False)[1]
        self._committed[key] = nbytes
        self.committed_bytes += nbytes

    def release(self, key: str) -> None:
        """The request will not transfer (failed, cancelled): nothing of it is committed or in flight."""
        self.committed_bytes -= self._committed.pop(key, 0)
        self.abort(key)

    def started(self, key: str, now: float) -> None:
        """The transfer of ``key`` begins: the KV hand-off; it is on the wire one RTT later."""
        self._advance(now)
        if len(self._pending) + len(self._inflight) < self._max:
            self._seq += 1
            self._starts[key] = self._seq
            self._pending.append((now + self.rtt_s, key, self._seq))

    def abort(self, key: str) -> None:
        """The transfer of ``key`` broke off (the request may be retried: it stays committed)."""
        self._starts.pop(key, None)
        self._inflight.pop(key, None)

    def transferred(self, nbytes: int, now: float, key: str | None = None) -> None:
        """``nbytes`` of a transfer arrived at ``now``; timed if :meth:`started` marked its start."""
        self._advance(now)
        fair = self._inflight.get(key) if key is not None else None
        if key is not None:
            self.release(key)
        if len(self._done) == self._done.maxlen:
            self._done_bytes -= self._done[0][1]
        if fair is not None and fair[0] > 0:
            self._done.append((now, nbytes, fair[0], now - fair[1], int(fair[2])))
        else:
            self._done.append((now, nbytes, None, None, 0))
        self._done_bytes += nbytes
        self._measured_at = -math.inf  # re-measure at the next read
        self._trim(now)

    def _advance(self, now: float) -> None:
        """Credit every transfer in flight with its fair share of the time up to ``now``."""
        while self._pending and self._pending[0][0] <= now:
            at, key, seq = self._pending.popleft()
            self._credit(at)
            if self._starts.get(key) == seq:  # not ended, aborted or restarted meanwhile
                self._inflight[key] = [0.0, at, len(self._inflight)]
        self._credit(now)

    def _credit(self, t: float) -> None:
        if t > self._clock and self._inflight:
            share = (t - self._clock) / len(self._inflight)
            for f in self._inflight.values():
                f[0] += share
        self._clock = max(self._clock, t)

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][0] <= now - self.window_s:
            self._done_bytes -= self._done.popleft()[1]

    def egress_gbps(self, now: float) -> float:
        """Mean egress over the last ``window_s`` (a just-started gateway reads low, never high)."""
        self._trim(now)
        return self._done_bytes * 8 / 1e9 / self.window_s

    def measured_gbps(self, now: float) -> float | None:
        """Bytes / fair-share seconds of the timed transfers that ended in the window; None until
        they add up to ``min_busy_s``. Re-measured at most every 0.5 s of ``now`` (routing asks on
        every request); with no transfer in the window the last reading stands (an idle link has
        not changed speed)."""
        if now - self._measured_at < 0.5:
            return self._measured
        self._measured_at = now
        self._trim(now)
        self._advance(now)
        fair = sum(f for _, _, f, _, _ in self._done if f is not None)
        nbytes = sum(b for _, b, f, _, _ in self._done if f is not None)
        if fair >= self.min_busy_s and nbytes > 0:
            rate = nbytes / fair
            # Transfers still in flight past their fair-share time (b / rate) are starving: the time
            # they were owed went to the transfers that ended, whose readings it inflated. Count it
            # as link time that moved nothing (a few rounds settle the fixed point).
            inflight = [(f[0], self._committed.get(k, 0)) for k, f in self._inflight.items()]
            for _ in range(3):
                owed = sum(max(0.0, f - b / rate) for f, b in inflight)
                rate = nbytes / (fair + owed)
            self._measured = rate * 8 / 1e9
        return self._measured

    def recent(self, count: int = 10) -> list[dict[str, float | int | None]]:
        """The last ``count`` transfers: bytes, seconds on the wire, fair-share seconds, what each says."""
        return [{"bytes": b, "seconds": None if d is None else round(d, 4), "fair_seconds": None if f is None
                 else round(f, 4), "peers": peers, "gbps": None if f is None else round(b * 8 / 1e9 / f, 6)}
                for _, b, f, d, peers in list(self._done)[-count:]]

    def capacity_gbps(self, now: float) -> float:
        measured = self.measured_gbps(now)
        return measured if measured is not None else self.nominal_gbps

    def ahead_s(self, nbytes: int, now: float) -> float:
        """Seconds of link time the committed transfers take from a transfer of ``nbytes``.

        The link is shared fairly (processor sharing; TCP flows through one bottleneck roughly are),
        so a transfer waits for each other transfer only up to its own size: a short KV slips past
        a long one, a long one waits for everything committed. Committed transfers still being
        prefilled are counted as if on the link (conservative)."""
        ahead = sum(min(b, nbytes) for b in self._committed.values())
        return ahead * 8 / 1e9 / self.capacity_gbps(now)

    def headroom(self, nbytes: int, now: float, other_gbps: float = 0.0) -> bool:
        """Would ``nbytes`` more keep the link's delivered traffic over the window (plus ``other_gbps``
        that is not ours) under its capacity, and its backlog (everything committed) within what it
        carries in one window?
        A long-run budget and a bound on the queue: requests the threshold did not send use only
        capacity the threshold's own traffic leaves free, and never pile up behind a link that is
        slower than it was."""
        capacity = self.capacity_gbps(now)
        projected = self.egress_gbps(now) + other_gbps + nbytes * 8 / 1e9 / self.window_s
        backlog_s = (self.committed_bytes + nbytes) * 8 / 1e9 / capacity
        return projected <= capacity and backlog_s <= self.window_s


def best_estimate(cluster: ClusterView, req: RouteRequest) -> float | None:
    """The lowest TTFT estimate over the pool's routable instances (queued work + this prompt's miss)."""
    return min((st.ttft_estimate(req) for st in cluster.routable()), default=None)


class OffloadController:
    """Keeps the recent uncached-length window, re-solves t every ``resolve_every_s``, and picks
    each request's side.

    Pure: the caller passes the time and the measurements; nothing here reads a clock or a socket.
    The link term uses the measured arrival rate and the *measured* link capacity, so when traffic
    grows or the link slows the threshold rises before the link saturates, and measured link
    traffic that is not ours shrinks the budget.
    """

    def __init__(self, settings: OffloadSettings, *, local: PrefillPoolSpeed, remote: PrefillPoolSpeed,
                 decode_rps: float, link_gbps: float, kv_bytes_per_token: int) -> None:
        self.settings = settings
        self.local, self.remote = local, remote
        self.decode_rps, self.kv_bytes_per_token = decode_rps, kv_bytes_per_token
        self.link = LinkMeter(link_gbps, settings.link_window_s, settings.link_rtt_s)
        self.samples: deque[int] = deque(maxlen=settings.window)
        self._arrivals: deque[float] = deque(maxlen=settings.window)
        self.threshold = settings.fixed_threshold if settings.fixed_threshold is not None \
            else settings.initial_threshold
        self.last: OffloadDecision | None = None
        self._next_solve = 0.0
        self.choices: dict[str, int] = {}
        self.calibration: dict[Side, Calibration] = {"local": Calibration(), "remote": Calibration()}

    @property
    def link_gbps(self) -> float:
        """The configured (nominal) link capacity."""
        return self.link.nominal_gbps

    def transfer_started(self, key: str, now: float) -> None:
        """The KV of the request routed remote under ``key`` starts across the link (its hand-off)."""
        self.link.started(key, now)

    def record_transfer(self, nbytes: int, now: float, key: str | None = None) -> None:
        """KV bytes of one offload have crossed the link (the decode's first byte came)."""
        self.link.transferred(nbytes, now, key)

    def egress_gbps(self, now: float) -> float:
        return self.link.egress_gbps(now)

    def link_utilization(self, now: float) -> float:
        return self.egress_gbps(now) / self.link.capacity_gbps(now)

    def status(self, now: float) -> OffloadStatus:
        egress = self.egress_gbps(now)
        capacity = self.link.capacity_gbps(now)
        return OffloadStatus(
            threshold_tokens=self.threshold, pinned=self.settings.fixed_threshold is not None,
            samples=len(self.samples), arrival_rps=self.arrival_rate(now), link_gbps=capacity,
            link_nominal_gbps=self.link.nominal_gbps, link_measured_gbps=self.link.measured_gbps(now),
            link_egress_gbps=egress, link_utilization=egress / capacity,
            link_committed_bytes=self.link.committed_bytes, link_transfers=self.link.recent(),
            local_instances=self.local.instances,
            remote_instances=self.remote.instances, side_choices=dict(self.choices), last_decision=self.last)

    def observe(self, uncached_tokens: int, now: float) -> None:
        self.samples.append(uncached_tokens)
        self._arrivals.append(now)

    def arrival_rate(self, now: float) -> float | None:
        if len(self._arrivals) < 2:
            return None
        span = now - self._arrivals[0]
        return (len(self._arrivals) - 1) / span if span > 0 else None

    def choose(self, uncached_tokens: int, *, local_s: float | None, remote_prefill_s: float | None,
               kv_bytes: int, now: float, slo_s: float | None = None, link_other_gbps: float = 0.0) -> SideChoice:
        """The side one request's prefill runs on.

        ``local_s``/``remote_prefill_s``: the best instance's TTFT estimate in each pool, this
        request included (queued work and its own miss; None: the pool has no routable instance).
        The remote side's estimate adds the link: the KV cannot arrive before the prefill ends
        (plus the RTT), nor before the link has given the committed transfers their fair share
        (:meth:`LinkMeter.ahead_s`), and then needs its own bytes' time. With
        ``side_choice="threshold"`` or a pinned threshold (``fixed_threshold``) t alone decides.

        Starting from the threshold (which sizes the split for throughput and plans the link up to
        its high-water mark), a request moves:
        * above t to local, only if the remote side would miss its SLO and the local one would not;
        * at or below t to remote, when its KV would reach decode sooner from there and the link
          has room for it (:meth:`LinkMeter.headroom`: the delivered traffic under capacity, the
          committed backlog within one window).
        """
        raw = {"local": local_s, "remote": remote_prefill_s}
        if remote_prefill_s is None or self.remote.instances <= 0:
            return self._chose("local", "no_remote", local_s, None, raw)
        link = self.link
        remote_prefill_s *= self.calibration["remote"].factor
        remote_s = max(remote_prefill_s + link.rtt_s, link.ahead_s(kv_bytes, now)) \
            + kv_bytes * 8 / 1e9 / link.capacity_gbps(now)
        if local_s is None:
            return self._chose("remote", "no_local", None, remote_s, raw)
        local_s *= self.calibration["local"].factor
        above = uncached_tokens > self.threshold and uncached_tokens > self.settings.min_threshold
        if self.settings.side_choice == "threshold" or self.settings.fixed_threshold is not None:
            return self._chose("remote" if above else "local", "threshold", local_s, remote_s, raw)
        if above:
            if slo_s is not None and remote_s > slo_s >= local_s:
                return self._chose("local", "slo", local_s, remote_s, raw)
            return self._chose("remote", "threshold", local_s, remote_s, raw)
        if uncached_tokens > self.settings.min_threshold and remote_s < local_s \
                and self.link.headroom(kv_bytes, now, link_other_gbps):
            return self._chose("remote", "faster", local_s, remote_s, raw)
        return self._chose("local", "threshold", local_s, remote_s, raw)

    def _chose(self, side: Side, reason: str, local_s: float | None, remote_s: float | None,
               raw: dict[str, float | None]) -> SideChoice:
        key = f"{side}:{reason}"
        self.choices[key] = self.choices.get(key, 0) + 1
        return SideChoice(side, reason, local_s, remote_s, raw[side])

    def learn(self, choice: SideChoice, measured_prefill_s: float) -> None:
        """The chosen side's prefill leg (routing to the prefill's answer) took ``measured_prefill_s``."""
        if choice.prefill_s is not None:
            self.calibration[choice.side].learn(choice.prefill_s, measured_prefill_s)

    def maybe_resolve(self, now: float, *, link_other_gbps: float = 0.0) -> OffloadDecision | None:
        """Re-solve when the period has passed and enough samples exist; returns the new decision.

        The solve plans the steady state: the measured link, arrival rate and length mix. What is
        queued now (at the remote pool, on the link) is left to :meth:`choose`, request by request:
        a remote backlog of long prompts is the normal state of a busy remote pool, and counting it
        against the pool's capacity would keep raising t until the local pool is swamped."""
        if self.settings.fixed_threshold is not None or now < self._next_solve:
            return None
        if len(self.samples) < self.settings.min_samples:
            return None
        self._next_solve = now + self.settings.resolve_every_s
        decision = solve_threshold(OffloadProblem(
            uncached_lengths=list(self.samples), local=self.local, remote=self.remote,
            decode_rps=self.decode_rps, link_gbps=self.link.capacity_gbps(now),
            kv_bytes_per_token=self.kv_bytes_per_token, high_water=self.settings.high_water,
            arrival_rps=self.arrival_rate(now), link_other_gbps=link_other_gbps,
            min_threshold=self.settings.min_threshold, max_threshold=self.settings.max_threshold))
        self.threshold = max(decision.threshold_tokens, self.settings.min_threshold)
        self.last = decision
        return decision


def pool_speed(profile: Profile, instances: int, scale: float = 1.0) -> PrefillPoolSpeed:
    """The profile's speed, ``scale`` times slower (the pool's measured prefill factor, see
    :func:`mean_prefill_scale`)."""
    return PrefillPoolSpeed(instances=instances, per_token_s=profile.params.per_token_s * scale,
                            attn_pair_s=profile.params.attn_pair_s * scale)


def mean_prefill_scale(states: Sequence[InstanceState]) -> float:
    """The mean calibration factor of a pool's routable instances (1.0: none, or all as profiled)."""
    return sum(s.prefill_scale for s in states) / len(states) if states else 1.0


def decode_rps_estimate(profile: Profile, instances: int, mean_prompt: float, mean_output: float,
                        kv_capacity_tokens: int | None = None) -> float:
    """Requests/s a decode pool sustains: as many sequences as KV (or max_num_seqs) allows, each
    emitting one token per decode step of that batch at its mean context. ``kv_capacity_tokens``:
    the KV a decode instance admits, when less than the profile's (a TPOT bound)."""
    per_request = mean_prompt + mean_output
    kv = min(kv_capacity_tokens or profile.kv_capacity_tokens, profile.kv_capacity_tokens)
    batch = max(1, min(profile.max_num_seqs, int(kv // per_request)))
    cost = CostModel.from_profile(profile)
    step = cost.decode_step_time(batch, int(batch * (mean_prompt + mean_output / 2)))
    return instances * batch / (step * mean_output)
