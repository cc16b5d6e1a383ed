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

Everything here is pure: the gateway and the autoscaler feed samples and measurements in and get a
decision out (:class:`OffloadController` adds the sliding window and the re-solve period).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.perf.costmodel import CostModel
from tandem.perf.profile import Profile

Bottleneck = Literal["local_prefill", "remote_prefill", "decode", "link", "none"]


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
    min_threshold: int = Field(1024, ge=0, description="never offload shorter uncached prompts")
    fixed_threshold: int | None = Field(None, ge=0, description="pin t (lengthThreshold) instead of 'auto'")
    max_threshold: int | None = Field(None, ge=0, description="longest uncached prompt kept local (SLO bound)")
    link_window_s: float = Field(30.0, gt=0, le=3600, description="window over which link egress is measured")


class OffloadStatus(BaseModel):
    """What the controller knows and decided, for the admin API and the gateway's metrics."""

    threshold_tokens: int = Field(description="offload when the uncached length is greater than this")
    pinned: bool = Field(description="t is fixed (lengthThreshold) rather than re-solved")
    samples: int = Field(description="uncached lengths in the window")
    arrival_rps: float | None = Field(description="arrival rate measured over the sample window")
    link_gbps: float = Field(description="link capacity, Gbit/s")
    link_egress_gbps: float = Field(description="KV traffic this controller assigned to the link, Gbit/s, "
                                                "over the last link_window_s")
    link_utilization: float = Field(description="link_egress_gbps / link_gbps")
    local_instances: int
    remote_instances: int
    last_decision: OffloadDecision | None = Field(description="the last solve (None while pinned or warming up)")


class OffloadController:
    """Keeps the recent uncached-length window and re-solves t every ``resolve_every_s``.

    Pure: the caller passes the time and the measurements; nothing here reads a clock or a socket.
    The link term uses the measured arrival rate, so when traffic grows the threshold rises
    before the link saturates, and measured link traffic that is not ours shrinks the budget.
    """

    def __init__(self, settings: OffloadSettings, *, local: PrefillPoolSpeed, remote: PrefillPoolSpeed,
                 decode_rps: float, link_gbps: float, kv_bytes_per_token: int) -> None:
        self.settings = settings
        self.local, self.remote = local, remote
        self.decode_rps, self.link_gbps, self.kv_bytes_per_token = decode_rps, link_gbps, kv_bytes_per_token
        self.samples: deque[int] = deque(maxlen=settings.window)
        self._arrivals: deque[float] = deque(maxlen=settings.window)
        self.threshold = settings.fixed_threshold if settings.fixed_threshold is not None \
            else settings.initial_threshold
        self.last: OffloadDecision | None = None
        self._next_solve = 0.0
        # (time, bytes) of KV sent to the link; trimmed to link_window_s, bounded in count too.
        self._egress: deque[tuple[float, int]] = deque(maxlen=100_000)
        self._egress_bytes = 0

    def record_egress(self, nbytes: int, now: float) -> None:
        """KV bytes this controller's offloads put on the link (counted once the decode accepted the KV handshake)."""
        if len(self._egress) == self._egress.maxlen:
            self._egress_bytes -= self._egress[0][1]
        self._egress.append((now, nbytes))
        self._egress_bytes += nbytes
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._egress and self._egress[0][0] <= now - self.settings.link_window_s:
            self._egress_bytes -= self._egress.popleft()[1]

    def egress_gbps(self, now: float) -> float:
        """Mean egress over the last ``link_window_s`` (a just-started gateway reads low, never high)."""
        self._trim(now)
        return self._egress_bytes * 8 / 1e9 / self.settings.link_window_s

    def link_utilization(self, now: float) -> float:
        return self.egress_gbps(now) / self.link_gbps

    def status(self, now: float) -> OffloadStatus:
        egress = self.egress_gbps(now)
        return OffloadStatus(
            threshold_tokens=self.threshold, pinned=self.settings.fixed_threshold is not None,
            samples=len(self.samples), arrival_rps=self.arrival_rate(now), link_gbps=self.link_gbps,
            link_egress_gbps=egress, link_utilization=egress / self.link_gbps,
            local_instances=self.local.instances, remote_instances=self.remote.instances, last_decision=self.last)

    def observe(self, uncached_tokens: int, now: float) -> None:
        self.samples.append(uncached_tokens)
        self._arrivals.append(now)

    def arrival_rate(self, now: float) -> float | None:
        if len(self._arrivals) < 2:
            return None
        span = now - self._arrivals[0]
        return (len(self._arrivals) - 1) / span if span > 0 else None

    def should_offload(self, uncached_tokens: int) -> bool:
        return uncached_tokens > self.threshold and self.remote.instances > 0

    def maybe_resolve(self, now: float, *, link_other_gbps: float = 0.0, remote_queue_s: float = 0.0,
                      ) -> OffloadDecision | None:
        """Re-solve when the period has passed and enough samples exist; returns the new decision."""
        if self.settings.fixed_threshold is not None or now < self._next_solve:
            return None
        if len(self.samples) < self.settings.min_samples:
            return None
        self._next_solve = now + self.settings.resolve_every_s
        decision = solve_threshold(OffloadProblem(
            uncached_lengths=list(self.samples), local=self.local, remote=self.remote,
            decode_rps=self.decode_rps, link_gbps=self.link_gbps, kv_bytes_per_token=self.kv_bytes_per_token,
            high_water=self.settings.high_water, arrival_rps=self.arrival_rate(now),
            link_other_gbps=link_other_gbps, remote_queue_s=remote_queue_s,
            min_threshold=self.settings.min_threshold, max_threshold=self.settings.max_threshold))
        self.threshold = max(decision.threshold_tokens, self.settings.min_threshold)
        self.last = decision
        return decision


def pool_speed(profile: Profile, instances: int) -> PrefillPoolSpeed:
    return PrefillPoolSpeed(instances=instances, per_token_s=profile.params.per_token_s,
                            attn_pair_s=profile.params.attn_pair_s)


def decode_rps_estimate(profile: Profile, instances: int, mean_prompt: float, mean_output: float) -> float:
    """Requests/s a decode pool sustains: as many sequences as KV (or max_num_seqs) allows, each
    emitting one token per decode step of that batch at its mean context."""
    per_request = mean_prompt + mean_output
    batch = max(1, min(profile.max_num_seqs, int(profile.kv_capacity_tokens // per_request)))
    cost = CostModel.from_profile(profile)
    step = cost.decode_step_time(batch, int(batch * (mean_prompt + mean_output / 2)))
    return instances * batch / (step * mean_output)
