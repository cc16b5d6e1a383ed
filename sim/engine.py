"""A continuous-batching engine in virtual time: the core of both the simulator process and the DES.

The engine is pure state: callers feed it requests with a timestamp and ask it to run up to a
time; it answers with the token emissions that happened. ``tandem sim`` drives it with the wall
clock and streams the emissions over HTTP; the discrete-event simulator drives it from an event
heap. One scheduler, one cost model, so a live replay and a simulated replay of the same trace
agree.

Scheduling follows vLLM v1: every iteration first gives each decoding sequence one token, then
spends the rest of the token budget on prefill chunks (running prefills first, then admissions
from the FCFS waiting queue). A request is admitted only when its worst-case KV footprint
(prompt + max_tokens) fits, so nothing is ever preempted. Prefix-cache hits skip prefill work;
the cache's layout (blocks shared with running requests, optional host tier) is described in
:mod:`tandem.sim.kvcache`.

A decode instance of a disaggregated deployment gets requests whose prompt KV comes over a link
(``SimRequest.kv_ready_at``). As in vLLM's NixlConnector, the request is admitted first (its KV
blocks are allocated as the pull's destination), waits without being scheduled until the KV has
landed, and then recomputes only the last prompt token, which yields the first output token.

When an iteration would be pure decode, the engine may plan several iterations at once (until
the first sequence finishes); a request arriving in the middle cuts that plan at the next
iteration boundary, so coalescing changes no result, only the number of events.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.perf.costmodel import CostModel, attention_pairs
from tandem.sim.kvcache import BlockMeta, EngineKVCache


@dataclass(slots=True)
class SimRequest:
    id: str
    prompt_tokens: int
    max_tokens: int
    block_hashes: tuple[int, ...] = ()
    block_size: int = 16
    arrival: float = 0.0
    # Disaggregated decode: the prompt's KV is pulled from a prefill instance and lands at this time
    # (math.inf while the transfer's end is not known yet). None: this engine prefills the prompt.
    kv_ready_at: float | None = None
    # The prompt's token ids, for the KV-cache events of an engine that publishes them (else empty).
    token_ids: tuple[int, ...] = ()
    # progress, owned by the engine
    cached_tokens: int = 0
    computed_tokens: int = 0  # prompt tokens with KV (cached + prefilled)
    host_tokens: int = 0  # of cached_tokens, loaded from the host tier
    pinned_blocks: int = 0  # leading block_hashes this request pins in the prefix cache
    pinned_tokens: int = 0  # their tokens: prompt KV that is a cache block, not extra memory
    generated: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def prefill_done(self) -> bool:
        return self.computed_tokens >= self.prompt_tokens

    def awaiting_kv(self, now: float) -> bool:
        return self.kv_ready_at is not None and self.kv_ready_at > now

    @property
    def reservation(self) -> int:
        return self.prompt_tokens + self.max_tokens

    def block_sizes(self) -> list[int]:
        return [min(self.block_size, self.prompt_tokens - i * self.block_size)
                for i in range(len(self.block_hashes))]

    def block_metas(self, first: int) -> list[BlockMeta | None]:
        """Parent and token ids of blocks ``first``.. (None for a partial block or unknown tokens)."""
        bs, out = self.block_size, []
        for i in range(first, len(self.block_hashes)):
            tokens = self.token_ids[i * bs:(i + 1) * bs]
            out.append(BlockMeta(self.block_hashes[i - 1] if i else None, tokens) if len(tokens) == bs else None)
        return out


@dataclass(frozen=True, slots=True)
class Emission:
    """``tokens`` new output tokens of one request at ``time`` (the end of an iteration)."""

    request_id: str
    time: float
    tokens: int
    first: bool
    finished: bool


@dataclass(frozen=True, slots=True)
class EngineLimits:
    kv_capacity_tokens: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 131072
    # Host-memory KV tier (0 = none): GPU evictions land there; hits are loaded over PCIe.
    host_cache_tokens: int = 0
    # Host -> GPU bandwidth in GB/s (bytes). 25 ~ an effective PCIe Gen5 x16 copy; independent of the profile.
    host_link_gbytes_s: float = 25.0


@dataclass(slots=True)
class _Plan:
    start: float
    end: float
    steps: int
    decode: list[SimRequest]
    decode_context: int
    prefill: list[tuple[SimRequest, int]] = field(default_factory=list)


@dataclass
class EngineCounters:
    """Monotonic counters exported as the engine's Prometheus metrics."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    host_hit_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    iterations: int = 0


class Engine:
    def __init__(self, cost: CostModel, limits: EngineLimits, *, coalesce_decode: bool = True,
                 kv_events: bool = False) -> None:
        if limits.kv_capacity_tokens <= 0:
            raise ValueError("the model does not fit: KV capacity is zero")
        if limits.host_link_gbytes_s <= 0:
            raise ValueError("host_link_gbytes_s must be positive")
        self.cost = cost
        self.limits = limits
        self.coalesce_decode = coalesce_decode
        self.cache = EngineKVCache(limits.host_cache_tokens, events=kv_events)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.reserved_tokens = 0  # sum of running requests' worst-case KV (prompt + max_tokens)
        self.shared_tokens = 0  # the part of it that is pinned cache blocks (counted once, in the cache)
        self.counters = EngineCounters()
        # Told (tokens per iteration, iterations) as each plan completes: the metrics' iteration histogram.
        self.on_iteration: Callable[[int, int], None] | None = None
        self._plan: _Plan | None = None

    # ----- queries -------------------------------------------------------------------------
    def validate(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request can never run here, or None. Checked before a request is accepted."""
        if prompt_tokens <= 0:
            return "prompt is empty"
        if max_tokens <= 0:
            return "max_tokens must be positive"
        if prompt_tokens + max_tokens > self.limits.max_model_len:
            return (f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                    f"maximum context length {self.limits.max_model_len}")
        if prompt_tokens + max_tokens > self.limits.kv_capacity_tokens:
            return (f"prompt + max_tokens ({prompt_tokens + max_tokens}) exceeds the KV cache capacity "
                    f"({self.limits.kv_capacity_tokens} tokens)")
        return None

    @property
    def busy(self) -> bool:
        return self._plan is not None

    def next_event_time(self) -> float | None:
        """When the planned iteration(s) end or, when idle, when awaited KV lands; None when idle."""
        if self._plan:
            return self._plan.end
        ready = self._next_kv_ready()
        return ready if ready < math.inf else None

    def _next_kv_ready(self, after: float = -math.inf) -> float:
        return min((r.kv_ready_at for r in self.running
                    if r.kv_ready_at is not None and r.kv_ready_at > after and not r.prefill_done),
                   default=math.inf)

    def kv_usage(self) -> float:
        used = sum(r.computed_tokens + r.generated for r in self.running)
        return min(1.0, used / self.limits.kv_capacity_tokens)

    # ----- inputs ---------------------------------------------------------------------------
    def submit(self, req: SimRequest, now: float) -> None:
        reason = self.validate(req.prompt_tokens, req.max_tokens)
        if reason:
            raise ValueError(reason)
        req.arrival = now
        self.waiting.append(req)
        self._cut_plan(now)
        if self._plan is None:
            self._start_plan(now)

    def kv_arrived(self, request_id: str, now: float) -> bool:
        """The KV of a request submitted with ``kv_ready_at=math.inf`` has landed at ``now``.

        Used when the transfer's end depends on other traffic (a shared link) and so was not known
        at submission. False when the request is unknown (aborted meanwhile).
        """
        for r in (*self.waiting, *self.running):
            if r.id == request_id and r.kv_ready_at is not None:
                r.kv_ready_at = min(r.kv_ready_at, now)
                self._cut_plan(now)
                if self._plan is None:
                    self._start_plan(now)
                return True
        return False

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (vLLM's ``/reset_prefix_cache``); refused (False) while requests
        run or wait, whose blocks are in use, as vLLM refuses it."""
        if self.running or self.waiting:
            return False
        self.cache.clear()
        return True

    def abort(self, request_id: str, now: float) -> bool:
        """Drop a request whose client went away; an iteration already planned still takes its time."""
        for i, r in enumerate(self.waiting):
            if r.id == request_id:
                del self.waiting[i]
                self.counters.aborted_requests += 1
                return True
        for r in self.running:
            if r.id == request_id:
                r.finished_at = now
                self._remove_running(r)
                self.counters.aborted_requests += 1
                return True
        return False

    # ----- time -----------------------------------------------------------------------------
    def advance(self, now: float) -> list[Emission]:
        """Complete every planned iteration ending at or before ``now``; start the next one."""
        out: list[Emission] = []
        free_since = -math.inf
        while True:
            plan = self._plan
            if plan is not None:
                if plan.end > now:
                    break
                self._plan = None
                out.extend(self._complete(plan))
                free_since = plan.end
                self._start_plan(free_since)
                continue
            ready = self._next_kv_ready()
            if ready > now:
                break
            self._start_plan(max(ready, free_since))  # idle until awaited KV landed
            if self._plan is None:
                break
        if self._plan is None:
            self._start_plan(now)
        return out

    # ----- internals ------------------------------------------------------------------------
    def _cut_plan(self, now: float) -> None:
        """A multi-iteration decode plan ends at the first iteration boundary after ``now``."""
        plan = self._plan
        if plan is None or plan.steps <= 1 or plan.prefill:
            return
        batch = len(plan.decode)
        done = self.cost.decode_steps_within(batch, plan.decode_context, now - plan.start)
        keep = min(plan.steps, done + 1)
        if keep < plan.steps:
            plan.steps = keep
            plan.end = plan.start + self.cost.decode_steps_time(batch, plan.decode_context, keep)

    def _start_plan(self, now: float) -> None:
        budget = self.limits.max_num_batched_tokens
        decode = [r for r in self.running if r.prefill_done]
        budget -= len(decode)
        prefill: list[tuple[SimRequest, int]] = []
        pairs = 0.0
        load_s = 0.0
        for r in self.running:
            if budget <= 0:
                break
            if not r.prefill_done and not r.awaiting_kv(now):
                chunk = min(budget, r.prompt_tokens - r.computed_tokens)
                prefill.append((r, chunk))
                pairs += attention_pairs(chunk, r.computed_tokens)
                budget -= chunk
        while budget > 0 and self.waiting and len(self.running) < self.limits.max_num_seqs:
            r = self.waiting[0]
            if self.reserved_tokens + r.reservation > self.limits.kv_capacity_tokens:
                break
            self.waiting.popleft()
            load_s += self._admit(r, now)
            if r.awaiting_kv(now):
                continue
            chunk = min(budget, r.prompt_tokens - r.computed_tokens)
            prefill.append((r, chunk))
            pairs += attention_pairs(chunk, r.computed_tokens)
            budget -= chunk
        if not decode and not prefill:
            return
        context = sum(r.prompt_tokens + r.generated for r in decode)
        prefill_tokens = sum(c for _, c in prefill)
        if prefill or not self.coalesce_decode:
            steps = 1
            # Host-tier hits are copied in before the iteration that admits them can use them.
            duration = self.cost.step_time(prefill_tokens, pairs, len(decode), context) + load_s
        else:
            steps = min(r.max_tokens - r.generated for r in decode)
            ready = self._next_kv_ready(after=now)
            if ready < math.inf:  # stop at the first iteration boundary after awaited KV lands
                steps = min(steps, self.cost.decode_steps_within(len(decode), context, ready - now) + 1)
            duration = self.cost.decode_steps_time(len(decode), context, steps)
        self.counters.iterations += steps
        self._plan = _Plan(now, now + duration, steps, decode, context, prefill)

    def _admit(self, r: SimRequest, now: float) -> float:
        """Start ``r`` with its cached prefix pinned; returns the seconds to load its host-tier part."""
        hit = self.cache.acquire(r.block_hashes)
        r.pinned_blocks, r.pinned_tokens = hit.blocks, hit.tokens
        cached = min(hit.tokens, r.prompt_tokens - 1)
        r.cached_tokens = r.computed_tokens = cached
        r.host_tokens = min(hit.host_tokens, cached)
        if r.kv_ready_at is not None:
            r.computed_tokens = r.prompt_tokens - 1  # pulled KV; the last token is recomputed here
            r.host_tokens = 0  # the whole prompt's KV comes over the link: nothing to load from host
        r.admitted_at = now
        self.running.append(r)
        self.reserved_tokens += r.reservation
        self.shared_tokens += r.pinned_tokens
        self.counters.prefix_query_tokens += r.prompt_tokens
        self.counters.prefix_hit_tokens += cached
        self.counters.host_hit_tokens += r.host_tokens
        self.counters.prompt_tokens += r.prompt_tokens
        self._fit_cache()
        if not r.host_tokens:
            return 0.0
        return self.cost.kv_transfer_time(r.host_tokens, self.limits.host_link_gbytes_s * 8)

    def _fit_cache(self) -> None:
        """Give the free cached blocks whatever GPU memory pinned blocks and reservations leave.

        Memory = pinned cache blocks + free cache blocks + the running requests' reservations
        minus the part of them that is pinned cache blocks (``shared_tokens``). Admission keeps
        ``reserved_tokens <= capacity`` and pinned blocks are each used by at least one request
        (``pinned_tokens <= shared_tokens``), so the free list's room is never negative."""
        room = (self.limits.kv_capacity_tokens - self.cache.pinned_tokens
                - (self.reserved_tokens - self.shared_tokens))
        self.cache.fit(room)

    def _complete(self, plan: _Plan) -> list[Emission]:
        out: list[Emission] = []
        if self.on_iteration is not None:  # a plan with prefill chunks is one iteration; a decode plan, steps
            prefill_tokens = sum(chunk for _, chunk in plan.prefill)
            self.on_iteration(len(plan.decode) + prefill_tokens, 1 if plan.prefill else plan.steps)
        t = plan.end
        for r in plan.decode:
            if r.finished_at is not None:
                continue  # aborted while the plan ran
            r.generated += plan.steps
            self.counters.generation_tokens += plan.steps
            done = r.generated >= r.max_tokens
            out.append(Emission(r.id, t, plan.steps, False, done))
            if done:
                self._finish(r, t)
        for r, chunk in plan.prefill:
            if r.finished_at is not None:
                continue
            r.computed_tokens += chunk
            if r.prefill_done:
                new = r.block_hashes[r.pinned_blocks:]
                sizes = r.block_sizes()[r.pinned_blocks:]
                metas = r.block_metas(r.pinned_blocks) if self.cache.events is not None else None
                self.cache.add_pinned(new, sizes, metas)
                added = sum(sizes)
                r.pinned_blocks += len(new)
                r.pinned_tokens += added
                self.shared_tokens += added
                self._fit_cache()
                r.generated = 1
                r.first_token_at = t
                self.counters.generation_tokens += 1
                done = r.max_tokens <= 1
                out.append(Emission(r.id, t, 1, True, done))
                if done:
                    self._finish(r, t)
        return out

    def _finish(self, r: SimRequest, now: float) -> None:
        r.finished_at = now
        self.counters.finished_requests += 1
        self._remove_running(r)

    def _remove_running(self, r: SimRequest) -> None:
        self.running.remove(r)
        self.cache.release(r.block_hashes[:r.pinned_blocks])
        self.reserved_tokens -= r.reservation
        self.shared_tokens -= r.pinned_tokens
