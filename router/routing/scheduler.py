"""The late-binding scheduler: the gateway's per-instance queues and its exact accounting.

Shared by the live gateway and the discrete-event simulator, so both run the same bookkeeping:

* ``submit`` asks the policy for an instance, queues the request there, counts its uncached
  tokens as queued and records its prompt blocks in the instance's shadow cache (the next request
  with the same prefix then sees the hit it will get).
* ``release`` hands requests to engines when the instance has budget: fewer than
  ``dispatch_max_unprefilled`` sent-but-not-prefilled requests, or in-flight uncached prefill under
  ``dispatch_budget`` seconds. Holding the rest in the gateway (late binding) is what lets
  ``rebalance`` still move them when an instance turns hot; a request sent to an engine can no
  longer move without moving its KV.
* ``on_first_token`` / ``on_finished`` / ``on_failed`` / ``cancel`` release the accounting.

Per-instance queues are heaps with lazy deletion, ordered by (longest hit, arrival) as in the paper
or, with ``queue_order="prefill"``, by arrival + weight x estimated prefill seconds (short prefills
first, a long one overtaken only by requests arriving within that multiple of its own prefill
time), so submit, release and cancel are O(log n); the heaps are compacted when stale items
outnumber live ones, and both the per-instance and the total queue are bounded
(:class:`QueueFullError`).
No clock is read: every call takes ``now``.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from tandem.router.routing.capabilities import LateBinding, Migrating
from tandem.router.routing.config import SchedulerParams
from tandem.router.routing.types import (
    ClusterView,
    Decision,
    InstanceState,
    RouteRequest,
    RoutingPolicy,
    attention_pairs,
)

QUEUED, INFLIGHT, PREFILLED = 0, 1, 2


class QueueFullError(RuntimeError):
    """The gateway queue is at its bound: 429 when one instance's queue is full, 503 when the pool's is."""

    def __init__(self, message: str, scope: Literal["instance", "total"], instance_id: str | None = None) -> None:
        super().__init__(message)
        self.scope = scope
        self.instance_id = instance_id


Alternatives = Callable[[Decision, ClusterView, Collection[str]], list[str]]


@dataclass(frozen=True, slots=True)
class Migration:
    request_id: str
    source: str
    target: str
    gain_s: float  # estimated TTFT improvement of the moved request


@dataclass(slots=True)
class _Entry:
    req: RouteRequest
    decision: Decision
    instance: str
    hit: int
    miss: int
    pairs: int  # attention pairs of the miss: attention_pairs(miss, hit)
    rank: float  # release order key within the instance's queue (lower first), then arrival
    state: int
    enqueued_at: float
    seq: int
    moves: int = 0


class _InstanceQueue:
    """Queued requests of one instance: a priority heap, an age heap, both lazily cleaned."""

    __slots__ = ("by_age", "by_priority", "live")

    def __init__(self) -> None:
        self.live: dict[str, _Entry] = {}
        self.by_priority: list[tuple[float, float, int, str]] = []
        self.by_age: list[tuple[float, int, str]] = []

    def __len__(self) -> int:
        return len(self.live)

    def push(self, e: _Entry) -> None:
        rid = e.req.request_id
        self.live[rid] = e
        heapq.heappush(self.by_priority, (e.rank, e.req.arrival, e.seq, rid))
        heapq.heappush(self.by_age, (e.enqueued_at, e.seq, rid))

    def _current(self, seq: int, rid: str) -> bool:
        e = self.live.get(rid)
        return e is not None and e.seq == seq

    def peek(self) -> _Entry | None:
        heap = self.by_priority
        while heap and not self._current(heap[0][2], heap[0][3]):
            heapq.heappop(heap)
        return self.live[heap[0][3]] if heap else None

    def pop(self) -> _Entry | None:
        e = self.peek()
        if e is not None:
            heapq.heappop(self.by_priority)
            del self.live[e.req.request_id]
            self._compact()
        return e

    def oldest(self) -> float | None:
        heap = self.by_age
        while heap and not self._current(heap[0][1], heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def discard(self, rid: str) -> None:
        self.live.pop(rid, None)
        self._compact()

    def _compact(self) -> None:
        """Rebuild the heaps once stale items dominate, so memory stays O(live)."""
        if len(self.by_priority) + len(self.by_age) > 4 * len(self.live) + 64:
            es = self.live.values()
            self.by_priority = [(e.rank, e.req.arrival, e.seq, e.req.request_id) for e in es]
            self.by_age = [(e.enqueued_at, e.seq, e.req.request_id) for e in es]
            heapq.heapify(self.by_priority)
            heapq.heapify(self.by_age)


class Scheduler:
    """Policy + per-instance queues + accounting for one pool. Not thread-safe: one event loop owns it."""

    def __init__(self, policy: RoutingPolicy, cluster: ClusterView, params: SchedulerParams | None = None) -> None:
        self.policy = policy
        self.cluster = cluster
        self.params = params or SchedulerParams()
        lb = self.params.late_binding
        if lb is None:
            lb = isinstance(policy, LateBinding) and bool(policy.late_binding)
        self.late_binding: bool = lb
        self._entries: dict[str, _Entry] = {}
        self._queues: dict[str, _InstanceQueue] = {}
        self._nonempty: dict[str, None] = {}  # insertion-ordered set: deterministic iteration
        self._queued_total = 0
        self._seq = itertools.count()
        self.reasons: Counter[str] = Counter()
        self.migrations = 0
        policy.on_membership(cluster.instances)

    # ----- queries ---------------------------------------------------------------------------
    @property
    def queued_total(self) -> int:
        return self._queued_total

    def queued(self, instance_id: str) -> list[RouteRequest]:
        """The queue of one instance in release order (admin API; O(q log q))."""
        q = self._queues.get(instance_id)
        if q is None:
            return []
        return [e.req for e in sorted(q.live.values(), key=lambda e: (e.rank, e.req.arrival, e.seq))]

    def instance_of(self, request_id: str) -> str | None:
        e = self._entries.get(request_id)
        return e.instance if e else None

    def is_queued(self, request_id: str) -> bool:
        e = self._entries.get(request_id)
        return e is not None and e.state == QUEUED

    def __len__(self) -> int:
        return len(self._entries)

    # ----- membership ------------------------------------------------------------------------
    def on_membership(self) -> None:
        """The caller changed ``cluster.instances`` (join/leave); the policy rebuilds what it needs."""
        self.policy.on_membership(self.cluster.instances)

    def requeue(self, instance_id: str, now: float) -> list[tuple[RouteRequest, Decision | None]]:
        """Re-route everything queued for an instance that went away, unhealthy or draining.

        None for a request that fits nowhere (no routable instance, queues full): the caller fails it.
        """
        q = self._queues.get(instance_id)
        if q is None:
            return []
        out: list[tuple[RouteRequest, Decision | None]] = []
        for e in list(q.live.values()):
            self._drop(e)
            try:
                out.append((e.req, self.submit(e.req, now, exclude=(instance_id,))))
            except RuntimeError:  # NoInstanceError, QueueFullError
                out.append((e.req, None))
        return out

    # ----- requests --------------------------------------------------------------------------
    def submit(self, req: RouteRequest, now: float, exclude: Collection[str] = ()) -> Decision:
        """Route and queue a request; ``exclude`` names instances that already failed it."""
        if req.request_id in self._entries:
            raise ValueError(f"request_id {req.request_id!r} is already scheduled")
        cfg = self.params
        if self._queued_total >= cfg.max_queued_total:
            raise QueueFullError(f"gateway queue full ({self._queued_total} requests)", "total")
        cluster = self.cluster
        if exclude:
            cluster = ClusterView({k: v for k, v in cluster.instances.items() if k not in exclude})
        decision = self.policy.choose(req, cluster)
        iid = decision.instance_id
        q = self._queues.get(iid)
        if q is None:
            q = self._queues[iid] = _InstanceQueue()
        if len(q) >= cfg.max_queued_per_instance:
            raise QueueFullError(f"queue of instance {iid} full ({len(q)} requests)", "instance", iid)
        inst = self.cluster.instances[iid]
        hit = decision.hit_tokens
        miss = req.prompt_tokens - hit
        e = _Entry(req, decision, iid, hit, miss, attention_pairs(miss, hit), 0.0, QUEUED, now, next(self._seq))
        self._enqueue(e, inst, q)
        self._entries[req.request_id] = e
        self.reasons[decision.reason] += 1
        return decision

    def _enqueue(self, e: _Entry, inst: InstanceState, q: _InstanceQueue) -> None:
        req = e.req
        cfg = self.params
        if cfg.queue_order == "hit":
            e.rank = -e.hit
        else:
            e.rank = req.arrival + cfg.prefill_order_weight * inst.prefill_s(e.miss, e.pairs)
        if req.block_hashes:
            inst.shadow.insert(req.block_hashes, [req.block_size] * len(req.block_hashes))
        if inst.exact is not None:
            inst.exact.routed(req)
        inst.queued_miss_tokens += e.miss
        inst.queued_attn_pairs += e.pairs
        inst.queued_requests += 1
        self._queued_total += 1
        q.push(e)
        self._nonempty[e.instance] = None

    def _dequeue(self, e: _Entry) -> None:
        """Take a queued entry off its queue and the queued accounting."""
        inst = self.cluster.instances.get(e.instance)
        if inst is not None:
            inst.queued_miss_tokens -= e.miss
            inst.queued_attn_pairs -= e.pairs
            inst.queued_requests -= 1
            if inst.exact is not None:
                inst.exact.settled(e.req)
        self._queued_total -= 1
        q = self._queues[e.instance]
        q.discard(e.req.request_id)
        if not q.live:
            self._nonempty.pop(e.instance, None)

    def _has_budget(self, inst: InstanceState, e: _Entry) -> bool:
        if not self.late_binding:
            return True
        if inst.unprefilled_requests < self.params.dispatch_max_unprefilled:
            return True
        return inst.prefill_s(inst.inflight_miss_tokens + e.miss,
                              inst.inflight_attn_pairs + e.pairs) <= self.params.dispatch_budget

    def release(self, now: float, instances: Collection[str] | None = None) -> list[tuple[RouteRequest, str]]:
        """Requests to send now, as (request, instance). ``instances`` limits the check to those."""
        out: list[tuple[RouteRequest, str]] = []
        targets = list(self._nonempty) if instances is None else [i for i in instances if i in self._nonempty]
        for iid in targets:
            inst = self.cluster.instances.get(iid)
            if inst is None or not inst.routable:
                continue
            q = self._queues[iid]
            while (e := q.peek()) is not None and self._has_budget(inst, e):
                q.pop()
                self._queued_total -= 1
                inst.queued_miss_tokens -= e.miss
                inst.queued_attn_pairs -= e.pairs
                inst.queued_requests -= 1
                inst.inflight_miss_tokens += e.miss
                inst.inflight_attn_pairs += e.pairs
                inst.inflight_requests += 1
                inst.unprefilled_requests += 1
                e.state = INFLIGHT
                out.append((e.req, iid))
            if not q.live:
                self._nonempty.pop(iid, None)
        return out

    def on_first_token(self, request_id: str) -> None:
        e = self._entries.get(request_id)
        if e is None or e.state != INFLIGHT:
            return
        inst = self.cluster.instances.get(e.instance)
        if inst is not None:
            inst.inflight_miss_tokens -= e.miss
            inst.inflight_attn_pairs -= e.pairs
            inst.unprefilled_requests -= 1
            if inst.exact is not None:
                inst.exact.settled(e.req)
        e.state = PREFILLED

    def on_finished(self, request_id: str) -> None:
        e = self._entries.pop(request_id, None)
        if e is not None:
            self._drop(e)

    def on_failed(self, request_id: str) -> None:
        """The engine failed the request: release its accounting; the caller may resubmit with an exclusion."""
        self.on_finished(request_id)

    def cancel(self, request_id: str) -> bool:
        """The client went away: forget the request wherever it is. True when it was known."""
        e = self._entries.pop(request_id, None)
        if e is None:
            return False
        self._drop(e)
        return True

    def _drop(self, e: _Entry) -> None:
        self._entries.pop(e.req.request_id, None)
        if e.state == QUEUED:
            self._dequeue(e)
            return
        inst = self.cluster.instances.get(e.instance)
        if inst is None:
            return
        if e.state == INFLIGHT:
            inst.inflight_miss_tokens -= e.miss
            inst.inflight_attn_pairs -= e.pairs
            inst.unprefilled_requests -= 1
            if inst.exact is not None:
                inst.exact.settled(e.req)
        inst.inflight_requests -= 1

    # ----- hotspot migration -----------------------------------------------------------------
    def is_hot(self, inst: InstanceState, now: float) -> bool:
        """Pending uncached prefill above alpha x SLO, or a queued request waiting >= hotspot_wait_s."""
        if inst.pending_s > self.params.slo_budget_s:
            return True
        q = self._queues.get(inst.id)
        oldest = q.oldest() if q is not None and q.live else None
        return oldest is not None and now - oldest >= self.params.hotspot_wait_s

    def rebalance(self, now: float) -> list[Migration]:
        """Greedily move queued requests off hot instances while the best move's TTFT gain is positive."""
        cfg = self.params
        if not (self.late_binding and cfg.migration and isinstance(self.policy, Migrating)):
            return []
        alternatives = self.policy.alternatives
        moves: list[Migration] = []
        instances = self.cluster.instances
        for iid in list(self._nonempty):
            src = instances.get(iid)
            if src is None or len(moves) >= cfg.max_migrations_per_tick or not self.is_hot(src, now):
                continue
            self._drain_hotspot(src, now, alternatives, moves)
        self.migrations += len(moves)
        return moves

    def _best_target(self, e: _Entry, src: InstanceState, now: float,
                     alternatives: Alternatives) -> tuple[float, InstanceState | None, int]:
        """(gain, target, hit there) of the best move for one queued request.

        Targets are the request's other candidate; a ring neighbour only when that one is hot too.
        A target must stay under the hotspot threshold with the request added (and not be hot by
        queue age): moving work onto an instance that is, or thereby becomes, hot does not cure a
        hotspot, it moves it, and near saturation (every instance hot) such moves cascade, each one
        giving up the moved request's cache hit and so adding prefill work to a full pool.
        """
        instances = self.cluster.instances
        limit = self.params.slo_budget_s
        stay = src.pending_s
        alts = alternatives(e.decision, self.cluster, (src.id,))
        cands = [t for t in alts if t in e.decision.candidates]
        if not cands or all(self.is_hot(instances[t], now) for t in cands):
            cands = alts
        best: tuple[float, InstanceState | None, int] = (0.0, None, 0)
        for tid in cands:
            q = self._queues.get(tid)
            if q is not None and len(q) >= self.params.max_queued_per_instance:
                continue
            tgt = instances[tid]
            hit = tgt.hit_tokens(e.req)
            there = tgt.ttft_estimate(e.req, hit)
            if there > limit or self.is_hot(tgt, now):
                continue
            gain = stay - there
            if gain > best[0]:
                best = (gain, tgt, hit)
        return best

    def _drain_hotspot(self, src: InstanceState, now: float, alternatives: Alternatives,
                       moves: list[Migration]) -> None:
        q = self._queues[src.id]
        # Lazy greedy: gains only shrink as moves load the targets and unload the source, so a
        # stale gain is an upper bound; re-evaluate the top item and apply it if it still leads.
        heap: list[tuple[float, int, str]] = []
        cap = self.params.max_moves_per_request
        for e in q.live.values():
            if e.moves >= cap:
                continue
            gain, _, _ = self._best_target(e, src, now, alternatives)
            if gain > 0:
                heap.append((-gain, e.seq, e.req.request_id))
        heapq.heapify(heap)
        while heap and len(moves) < self.params.max_migrations_per_tick:
            _, seq, rid = heapq.heappop(heap)
            e = q.live.get(rid)
            if e is None or e.seq != seq:
                continue
            gain, tgt, hit = self._best_target(e, src, now, alternatives)
            if gain <= 0 or tgt is None:
                continue
            if heap and gain < -heap[0][0]:
                heapq.heappush(heap, (-gain, seq, rid))
                continue
            self._move(e, src, tgt, hit)
            moves.append(Migration(rid, src.id, tgt.id, gain))

    def _move(self, e: _Entry, src: InstanceState, tgt: InstanceState, hit: int) -> None:
        self._dequeue(e)
        e.instance = tgt.id
        e.hit = hit
        e.miss = e.req.prompt_tokens - hit
        e.pairs = attention_pairs(e.miss, hit)
        e.seq = next(self._seq)
        e.moves += 1
        q = self._queues.get(tgt.id)
        if q is None:
            q = self._queues[tgt.id] = _InstanceQueue()
        self._enqueue(e, tgt, q)
