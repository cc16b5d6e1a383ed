"""Per-instance goodput of each role under the SLOs, from the engine's performance profile.

Goodput is the highest arrival rate one instance sustains while the target share of requests
still meets the objective (DistServe); a pool then needs ``ceil(R / goodput)`` instances.

Prefill is a single-server queue, and sizing it from throughput alone (``1 / mean prefill
time``) is the classic mistake: at 90 % utilisation the *waiting* time, not the prefill itself,
blows the TTFT budget. The model here is M/G/1 with Pollaczek-Khinchine's mean wait
``E[W] = lambda E[S^2] / (2 (1 - rho))`` and the usual exponential tail for the conditional wait
(``P(W > t) = rho exp(-rho t / E[W])``), evaluated against every bucket of the length mix, so a
few long prompts (large ``E[S^2]``) lower the goodput as they do in reality.

Decode is limited by the largest batch whose iteration keeps the time per output token within
the SLO (and whose KV reservations fit). Those batch slots form an M/M/c queue: a request that
finds them full waits, and its TPOT is the step time plus the wait spread over its output
tokens, so the goodput is the rate at which that stays within the SLO often enough.

An aggregated (unified) instance does both in one engine: prefill chunks lengthen the
iterations that decodes ride on, and decodes add to every prefill chunk, so both conditions are
checked together under the mixed cost model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tandem.autoscaler.models import SLO, LengthBucket
from tandem.sim.costmodel import CostModel
from tandem.sim.profile import Profile

# The model's mean TPOT must stay this far inside the SLO: individual requests see batches above
# the mean, so the mean at the objective would fail about half of them.
TPOT_MARGIN = 0.85


def phase_target(attainment: float) -> float:
    """Each phase gets half of the allowed misses, so that both together still meet ``attainment``."""
    return 1.0 - (1.0 - attainment) / 2.0


def poisson_cdf(k: int, mean: float) -> float:
    if k < 0:
        return 0.0
    if mean <= 0:
        return 1.0
    term = math.exp(-mean) if mean < 700 else 0.0
    if term == 0.0:  # far in the normal regime: use the normal approximation with continuity correction
        return 0.5 * math.erfc(-(k + 0.5 - mean) / math.sqrt(2 * mean))
    total = term
    for i in range(1, k + 1):
        term *= mean / i
        total += term
    return min(1.0, total)


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in M/M/c with ``offered`` = lambda / mu (Erlang C)."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):  # Erlang B by the stable recursion
        b = offered * b / (k + offered * b)
    return servers * b / (servers - offered * (1 - b))


def _bisect_max(ok: Callable[[float], bool], hi: float, iterations: int = 50) -> float:
    """Largest x in [0, hi) with ok(x) true, assuming ok is monotone (true then false)."""
    lo = 0.0
    if not ok(lo):
        return 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True, slots=True)
class _Bucket:
    weight: float
    input_tokens: int
    output_tokens: int
    prefill_s: float  # this prompt's uncached part prefilled alone, chunk by chunk
    chunks: int


class CapacityModel:
    """Goodput per instance for a profile and SLO; pure and cheap (a few bisections)."""

    def __init__(self, profile: Profile, slo: SLO, *, kv_capacity_tokens: int | None = None) -> None:
        self.profile = profile
        self.slo = slo
        self.cost = CostModel.from_profile(profile)
        self.kv_capacity = kv_capacity_tokens or profile.kv_capacity_tokens
        self.chunk = profile.max_num_batched_tokens
        self.max_seqs = profile.max_num_seqs

    # ----- per-request quantities -------------------------------------------------------------
    def prefill_seconds(self, input_tokens: int, hit_ratio: float) -> tuple[float, int]:
        """Time to prefill one prompt alone, and its number of chunks; cached tokens cost nothing."""
        cached = min(int(input_tokens * hit_ratio), input_tokens - 1)
        todo = input_tokens - cached
        t, done, chunks = 0.0, cached, 0
        while todo > 0:
            step = min(self.chunk, todo)
            t += self.cost.prefill_time(step, done)
            done += step
            todo -= step
            chunks += 1
        return t, chunks

    def _buckets(self, mix: Sequence[LengthBucket], hit_ratio: float) -> list[_Bucket]:
        total = sum(b.weight for b in mix)
        out = []
        for b in mix:
            s, chunks = self.prefill_seconds(b.input_tokens, hit_ratio)
            out.append(_Bucket(b.weight / total, b.input_tokens, b.output_tokens, s, chunks))
        return out

    # ----- prefill: M/G/1 ------------------------------------------------------------------------
    @staticmethod
    def mg1_attainment(rate: float, services: Sequence[tuple[float, float]], budget_s: float) -> float:
        """Share of requests whose wait + own service <= budget, for Poisson arrivals at ``rate``.

        ``services`` are (weight, service seconds) pairs with weights summing to one.
        """
        es = sum(w * s for w, s in services)
        es2 = sum(w * s * s for w, s in services)
        rho = rate * es
        if rho >= 1.0:
            return 0.0
        mean_wait = rate * es2 / (2 * (1 - rho)) if rate > 0 else 0.0
        met = 0.0
        for w, s in services:
            slack = budget_s - s
            if slack < 0:
                continue
            if rho <= 0 or mean_wait <= 0:
                met += w
            else:
                met += w * (1 - rho * math.exp(-rho * slack / mean_wait))
        return met

    def prefill_goodput(self, mix: Sequence[LengthBucket], hit_ratio: float) -> float:
        buckets = self._buckets(mix, hit_ratio)
        services = [(b.weight, b.prefill_s) for b in buckets]
        es = sum(w * s for w, s in services)
        target = phase_target(self.slo.attainment)
        return _bisect_max(lambda r: self.mg1_attainment(r, services, self.slo.ttft_s) >= target, 1.0 / es)

    # ----- decode: batch bound + Poisson occupancy ----------------------------------------------
    def _decode_shape(self, buckets: Sequence[_Bucket]) -> tuple[float, float, float]:
        """Mean output length, time-weighted mean context and KV reservation of a running sequence."""
        mean_out = sum(b.weight * b.output_tokens for b in buckets)
        context = sum(b.weight * b.output_tokens * (b.input_tokens + b.output_tokens / 2) for b in buckets) / mean_out
        reserve = sum(b.weight * b.output_tokens * (b.input_tokens + b.output_tokens) for b in buckets) / mean_out
        return mean_out, context, reserve

    def decode_step(self, batch: float, context_per_seq: float) -> float:
        b = max(1, math.ceil(batch))
        return self.cost.decode_step_time(b, int(b * context_per_seq))

    def max_decode_batch(self, context_per_seq: float, reserve_per_seq: float, tpot_s: float) -> int:
        """Largest batch whose step fits the TPOT budget and whose KV reservations fit the cache."""
        kv_bound = int(self.kv_capacity // max(reserve_per_seq, 1.0))
        hi = min(self.max_seqs, kv_bound)
        best = 0
        for b in range(1, hi + 1):
            if self.decode_step(b, context_per_seq) > tpot_s:
                break
            best = b
        return best

    def decode_goodput(self, mix: Sequence[LengthBucket]) -> float:
        """Requests/s one decode instance serves with the TPOT target met.

        The instance is ``c`` batch slots (the largest batch within the TPOT budget and the KV
        cache); a request that finds them full waits (M/M/c, Erlang C), and the wait is spread over
        its output tokens, so a long answer tolerates a longer wait than a short one.
        """
        buckets = self._buckets(mix, 0.0)
        mean_out, context, reserve = self._decode_shape(buckets)
        slots = self.max_decode_batch(context, reserve, self.slo.tpot_s * TPOT_MARGIN)
        if slots == 0:
            return 0.0
        step = self.decode_step(slots, context)
        service_rate = 1.0 / (mean_out * step)  # per slot
        target = phase_target(self.slo.attainment)
        slack = [(b.weight, (self.slo.tpot_s - step) * max(b.output_tokens - 1, 0)) for b in buckets]

        def ok(rate: float) -> bool:
            offered = rate / service_rate
            if offered >= slots:
                return False
            p_wait = erlang_c(slots, offered)
            drain = slots * service_rate - rate
            met = sum(w * (1 - p_wait * math.exp(-drain * t)) for w, t in slack)
            return met >= target

        return _bisect_max(ok, slots * service_rate)

    # ----- aggregated: both on one engine -----------------------------------------------------
    def unified_goodput(self, mix: Sequence[LengthBucket], hit_ratio: float) -> float:
        buckets = self._buckets(mix, hit_ratio)
        mean_out, context, reserve = self._decode_shape(buckets)
        p = self.cost.params
        target = phase_target(self.slo.attainment)
        es = sum(b.weight * b.prefill_s for b in buckets)
        kv_bound = min(self.max_seqs, int(self.kv_capacity // max(reserve, 1.0)))
        chunk_time = sum(b.weight * b.prefill_s for b in buckets) / max(
            sum(b.weight * b.chunks for b in buckets), 1e-9)

        def ok(rate: float) -> bool:
            rho_p = rate * es
            if rho_p >= 1:
                return False
            # Fixed point: the batch depends on the time per token, which depends on the batch.
            tpot = self.decode_step(1, context)
            for _ in range(20):
                batch = rate * mean_out * tpot
                decode_iter = self.decode_step(batch, context)
                # Per second: prefill-carrying iterations (each also decodes one token per sequence)
                # take rho_p of the time, decode-only iterations the rest.
                tokens_per_s = rho_p / max(chunk_time, 1e-9) + (1 - rho_p) / decode_iter
                tpot = 1.0 / tokens_per_s
            batch = rate * mean_out * tpot
            if tpot > self.slo.tpot_s * TPOT_MARGIN or poisson_cdf(kv_bound, batch) < target:
                return False
            # Decodes ride on every prefill chunk and lengthen it.
            extra = p.per_token_s * batch + p.kv_read_s_per_token * batch * context
            services = [(b.weight, b.prefill_s + b.chunks * extra) for b in buckets]
            return self.mg1_attainment(rate, services, self.slo.ttft_s) >= target

        return _bisect_max(ok, 1.0 / es)
