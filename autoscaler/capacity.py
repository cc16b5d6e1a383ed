"""How many instances of each role a rate needs under the SLOs, from the engine's profile.

DistServe sizes a role as ``ceil(R / goodput)``, goodput being the highest rate one instance
sustains while the target share of requests meets the objective. Two refinements matter:

* **Queueing.** Prefill is a queue, and sizing it from throughput alone (``1 / mean prefill
  time``) is the classic mistake: at 90 % utilisation the *wait*, not the prefill, blows the TTFT
  budget. The wait is modelled, per length bucket of the observed mix, so a few long prompts
  (large second moment of the service time) cost what they cost in reality.
* **Pooling.** The gateway sends each request to the least-loaded instance of the pool, which
  behaves like one queue in front of ``n`` servers, not ``n`` separate queues: ten instances carry
  more than ten times one instance at the same attainment. The pool is therefore modelled as
  M/G/c (Erlang C for the probability of waiting, Allen-Cunneen's ``(1 + Cs^2) / 2`` for general
  service times, an exponential conditional wait), and a role's size is the smallest ``n`` whose
  pool meets the target. With ``c = 1`` this is exactly Pollaczek-Khinchine's M/G/1.

Decode instances are ``slots`` batch places each: the largest batch whose iteration keeps the
time per output token within the SLO and whose KV reservations fit the cache; the pool is
M/M/(n x slots). Where the wait lands depends on which bound binds. When admission is the limit
(the engine admits a request once its KV reservation fits and a sequence slot is free), the
request waits before its first decode step, and in a disaggregated deployment the decode
instance streams the first token: the wait counts against the TTFT, within the slack that the
prompt's own prefill and the first step leave. When the TPOT budget is the limit the engine
admits more and every step slows instead; the wait spread over the output tokens (slack
``(TPOT - step) x (out - 1)``) stands in for that.

Aggregated (unified) instances do both in one engine: prefill chunks lengthen the iterations the
decodes ride on and decodes lengthen every prefill chunk; they are checked together under the
mixed cost model, per instance (no pooling credit: the interference dominates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from tandem.api.models import Role
from tandem.api.observations import LengthBucket
from tandem.autoscaler.models import ScalingSLO
from tandem.perf.costmodel import CostModel
from tandem.perf.profile import Profile

# The model's TPOT must stay this far inside the SLO: individual requests see batches above the
# mean, so a mean at the objective would fail about half of them.
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
    if term == 0.0:  # far in the normal regime: normal approximation with continuity correction
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


def _bisect_max(ok: Callable[[float], bool], hi: float, iterations: int = 40) -> float:
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
    miss: int = 0  # uncached prompt tokens


@dataclass(frozen=True, slots=True)
class Workload:
    """Everything the queueing formulas need about one length mix and hit ratio."""

    buckets: tuple[_Bucket, ...]
    es: float  # mean prefill seconds
    cs2: float  # squared coefficient of variation of prefill seconds
    mean_out: float
    context: float  # time-weighted mean context of a decoding sequence
    reserve: float  # time-weighted KV reservation of a decoding sequence
    slots: int  # decode batch places per instance
    step: float  # decode step time with every slot busy
    admission_bound: bool  # KV cache or max_num_seqs, not the TPOT budget, bounds the batch (waits hit TTFT)


class CapacityModel:
    """Pool sizes and goodput for a profile and SLO; pure and cheap (closed forms, short searches)."""

    def __init__(self, profile: Profile, slo: ScalingSLO, *, kv_capacity_tokens: int | None = None,
                 max_utilisation: float = 0.85, decode_max_utilisation: float = 0.9) -> None:
        self.profile = profile
        # A pool run near 100 % sits at a cliff: a forecast a few percent low and the queue never
        # drains. Utilisation above this is refused whatever the queueing formula says. Decode can
        # run closer to it: its waits are spread over the output tokens (the TPOT slack), while a
        # prefill wait counts in full against the TTFT.
        self.max_utilisation = max_utilisation
        self.decode_max_utilisation = decode_max_utilisation
        self.slo = slo
        self.cost = CostModel.from_profile(profile)
        self.kv_capacity = kv_capacity_tokens or profile.kv_capacity_tokens
        self.chunk = profile.max_num_batched_tokens
        self.max_seqs = profile.max_num_seqs
        self.target = phase_target(slo.attainment)
        self._workload = lru_cache(maxsize=64)(self._make_workload)

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

    def decode_step(self, batch: float, context_per_seq: float) -> float:
        b = max(1, math.ceil(batch))
        return self.cost.decode_step_time(b, int(b * context_per_seq))

    def max_decode_batch(self, context_per_seq: float, reserve_per_seq: float, tpot_s: float,
                         kv_tokens: float | None = None) -> int:
        """Largest batch whose step fits the TPOT budget and whose KV reservations fit ``kv_tokens``
        (default: the whole cache)."""
        kv_bound = int((self.kv_capacity if kv_tokens is None else kv_tokens) // max(reserve_per_seq, 1.0))
        best = 0
        for b in range(1, min(self.max_seqs, kv_bound) + 1):
            if self.decode_step(b, context_per_seq) > tpot_s:
                break
            best = b
        return best

    def _make_workload(self, mix: tuple[LengthBucket, ...], hit_ratio: float) -> Workload:
        total = sum(b.weight for b in mix)
        buckets = []
        for b in mix:
            s, chunks = self.prefill_seconds(b.input_tokens, hit_ratio)
            miss = b.input_tokens - min(int(b.input_tokens * hit_ratio), b.input_tokens - 1)
            buckets.append(_Bucket(b.weight / total, b.input_tokens, b.output_tokens, s, chunks, miss))
        es = sum(b.weight * b.prefill_s for b in buckets)
        es2 = sum(b.weight * b.prefill_s ** 2 for b in buckets)
        mean_out = sum(b.weight * b.output_tokens for b in buckets)
        context = sum(b.weight * b.output_tokens * (b.input_tokens + b.output_tokens / 2) for b in buckets) / mean_out
        reserve = sum(b.weight * b.output_tokens * (b.input_tokens + b.output_tokens) for b in buckets) / mean_out
        # Admission is first come, first served: a head-of-line request whose reservation does not
        # fit blocks the queue, leaving up to one reservation of the cache unused, and the requests
        # that block are the big ones (the size-biased mean reservation, E[r^2] / E[r]).
        held = sum(b.weight * (b.input_tokens + b.output_tokens) for b in buckets)
        blocking = sum(b.weight * (b.input_tokens + b.output_tokens) ** 2 for b in buckets) / held
        usable = max(self.kv_capacity - blocking, reserve)
        slots = self.max_decode_batch(context, reserve, self.slo.tpot_s * TPOT_MARGIN, usable)
        admission_bound = slots >= min(self.max_seqs, int(usable // max(reserve, 1.0)))
        return Workload(tuple(buckets), es, es2 / (es * es) - 1.0, mean_out, context, reserve, slots,
                        self.decode_step(max(slots, 1), context), admission_bound)

    def workload(self, mix: Sequence[LengthBucket], hit_ratio: float = 0.0) -> Workload:
        return self._workload(tuple(mix), round(hit_ratio, 3))

    # ----- attainment of a pool of n instances at a rate --------------------------------------
    def prefill_attainment(self, rate: float, n: int, w: Workload) -> float:
        """Share of requests whose TTFT (wait + own prefill) meets the SLO: M/G/c, Allen-Cunneen."""
        offered = rate * w.es
        if offered >= n:
            return 0.0
        if offered > self.max_utilisation * n:
            return 0.0
        p_wait = erlang_c(n, offered)
        mean_wait = (1 + w.cs2) / 2 * w.es / (n - offered)  # conditional on waiting
        busy = offered / n
        met = 0.0
        for b in w.buckets:
            # The engine fills an iteration's token budget with other queued prompts, so under load
            # a prompt's own iteration carries others' tokens too (about utilisation x the rest).
            # The first token is the decode instance's first step.
            batched = busy * self.cost.params.per_token_s * max(0, self.chunk - b.miss)
            slack = self.slo.ttft_s - b.prefill_s - batched - w.step
            if slack >= 0:
                met += b.weight * (1 - p_wait * math.exp(-slack / mean_wait))
        return met

    def decode_attainment(self, rate: float, n: int, w: Workload) -> float:
        """Share of requests whose decode wait fits its slack: before the first token (TTFT) when
        the KV cache bounds the batch, spread over the output (TPOT) when the step time does."""
        if w.slots == 0:
            return 0.0
        servers = n * w.slots
        service = w.mean_out * w.step
        offered = rate * service
        if offered > self.decode_max_utilisation * servers:
            return 0.0
        p_wait = erlang_c(servers, offered)
        drain = (servers - offered) / service
        met = 0.0
        for b in w.buckets:
            if w.admission_bound:
                slack = self.slo.ttft_s - b.prefill_s - w.step
                if slack < 0:  # misses the TTFT at any pool size: the prefill role's ceiling, not ours
                    met += b.weight
                    continue
            else:
                slack = (self.slo.tpot_s - w.step) * max(b.output_tokens - 1, 0)
            met += b.weight * (1 - p_wait * math.exp(-drain * slack))
        return met

    def unified_ok(self, rate: float, w: Workload) -> bool:
        """Whether one aggregated instance meets both targets at ``rate``."""
        rho_p = rate * w.es
        if rho_p >= 1:
            return False
        p = self.cost.params
        kv_bound = min(self.max_seqs, int(self.kv_capacity // max(w.reserve, 1.0)))
        chunk_time = w.es / max(sum(b.weight * b.chunks for b in w.buckets), 1e-9)
        # Fixed point: the batch depends on the time per token, which depends on the batch.
        tpot = self.decode_step(1, w.context)
        for _ in range(20):
            decode_iter = self.decode_step(rate * w.mean_out * tpot, w.context)
            # Per second: prefill-carrying iterations (each also decodes one token per sequence)
            # take rho_p of the time, decode-only iterations the rest.
            tpot = 1.0 / (rho_p / max(chunk_time, 1e-9) + (1 - rho_p) / decode_iter)
        batch = rate * w.mean_out * tpot
        if tpot > self.slo.tpot_s * TPOT_MARGIN or poisson_cdf(kv_bound, batch) < self.target:
            return False
        # Decodes ride on every prefill chunk and lengthen it.
        extra = p.per_token_s * batch + p.kv_read_s_per_token * batch * w.context
        longer = [_Bucket(b.weight, b.input_tokens, b.output_tokens, b.prefill_s + b.chunks * extra, b.chunks)
                  for b in w.buckets]
        es = sum(b.weight * b.prefill_s for b in longer)
        es2 = sum(b.weight * b.prefill_s ** 2 for b in longer)
        inflated = Workload(tuple(longer), es, es2 / (es * es) - 1.0, w.mean_out, w.context, w.reserve,
                            w.slots, w.step, w.admission_bound)
        return self.prefill_attainment(rate, 1, inflated) >= self.target

    def meets(self, role: Role, rate: float, n: int, w: Workload) -> bool:
        if n <= 0:
            return rate <= 0
        if role == "prefill":
            # Prompts whose prefill alone exceeds the TTFT SLO fail at any pool size; size for the
            # target among the rest rather than growing to the maximum for nothing.
            ceiling = sum(b.weight for b in w.buckets if b.prefill_s <= self.slo.ttft_s)
            if ceiling <= 0:
                return rate * w.es <= self.max_utilisation * n
            return self.prefill_attainment(rate, n, w) >= self.target * ceiling
        if role == "decode":
            return self.decode_attainment(rate, n, w) >= self.target
        return self.unified_ok(rate / n, w)

    # ----- sizing -----------------------------------------------------------------------------
    def pool_goodput(self, role: Role, n: int, w: Workload) -> float:
        """The highest rate ``n`` instances of ``role`` carry at the target attainment."""
        if role == "prefill":
            hi = n / w.es
        elif role == "decode":
            hi = n * w.slots / (w.mean_out * w.step) if w.slots else 0.0
        else:
            hi = n / w.es
        return _bisect_max(lambda r: self.meets(role, r, n, w), hi) if hi > 0 else 0.0

    def pool_size(self, role: Role, rate: float, w: Workload, limit: int) -> int | None:
        """Smallest n <= ``limit`` that carries ``rate``, or None when even ``limit`` does not.

        Starts from the no-pooling estimate (an upper bound: pooling only helps) and walks down,
        so a tick costs a handful of Erlang evaluations.
        """
        if rate <= 0:
            return 0
        single = self.pool_goodput(role, 1, w)
        if single <= 0:
            return None
        n = min(limit, max(1, math.ceil(rate / single)))
        if not self.meets(role, rate, n, w):
            while n < limit and not self.meets(role, rate, n, w):
                n += 1
            return n if self.meets(role, rate, n, w) else None
        while n > 1 and self.meets(role, rate, n - 1, w):
            n -= 1
        return n

    # ----- per-instance goodput (one instance alone), for reports and the simple cases ----------
    def prefill_goodput(self, mix: Sequence[LengthBucket], hit_ratio: float) -> float:
        return self.pool_goodput("prefill", 1, self.workload(mix, hit_ratio))

    def decode_goodput(self, mix: Sequence[LengthBucket]) -> float:
        return self.pool_goodput("decode", 1, self.workload(mix, 0.0))

    def unified_goodput(self, mix: Sequence[LengthBucket], hit_ratio: float) -> float:
        return self.pool_goodput("unified", 1, self.workload(mix, hit_ratio))
