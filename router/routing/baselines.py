"""The baselines every routing benchmark compares DualMap against, behind the same interface.

They are written to be as good as their designs allow (no handicaps): the load-based ones read
the same exact gateway accounting DualMap does, ``consistent_hash`` uses DualMap's adaptive key,
and ``prefix_tree`` reads the same shadow caches as its approximate radix tree. None declares
:class:`~tandem.router.routing.capabilities.LateBinding`: they dispatch at once unless configured
otherwise, as their designs do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tandem.router.routing.capabilities import AdaptivelyKeyed
from tandem.router.routing.config import ConsistentHashParams, NoParams, PrefixTreeParams
from tandem.router.routing.keys import AdaptiveKeyer
from tandem.router.routing.rings import XXH64, HashRing
from tandem.router.routing.types import ClusterView, Decision, InstanceState, NoInstanceError, RouteRequest


def _routable(cluster: ClusterView) -> list[InstanceState]:
    out = cluster.routable()
    if not out:
        raise NoInstanceError("no routable instance")
    return out


class RoundRobinPolicy:
    name = "round_robin"
    Params = NoParams
    reasons = ("round_robin",)

    def __init__(self, params: NoParams | None = None) -> None:
        self.params = params or NoParams()
        self._next = 0

    def on_membership(self, instance_ids: Iterable[str]) -> None:
        """Nothing to rebuild: the cycle is over whatever is routable at decision time."""

    def choose(self, req: RouteRequest, cluster: ClusterView) -> Decision:
        live = _routable(cluster)
        inst = live[self._next % len(live)]
        self._next += 1
        return Decision(inst.id, "round_robin", hit_tokens=inst.hit_tokens(req))


class _MinLoadPolicy:
    """Pick the routable instance minimising ``load`` (first in cluster order on ties)."""

    name = ""
    Params = NoParams
    reason = ""
    reasons: tuple[str, ...] = ()
    load: Callable[[InstanceState], float]

    def __init__(self, params: NoParams | None = None) -> None:
        self.params = params or NoParams()

    def on_membership(self, instance_ids: Iterable[str]) -> None:
        """Stateless: reads the live view."""

    def choose(self, req: RouteRequest, cluster: ClusterView) -> Decision:
        inst = min(_routable(cluster), key=type(self).load)
        return Decision(inst.id, self.reason, hit_tokens=inst.hit_tokens(req))


class LeastRequestPolicy(_MinLoadPolicy):
    """Fewest requests sent and not finished (plus those waiting in the gateway for it)."""

    name = "least_request"
    reason = "least_request"
    reasons = (reason,)

    @staticmethod
    def load(inst: InstanceState) -> float:
        return inst.inflight_requests + inst.queued_requests


class LeastLoadedPolicy(_MinLoadPolicy):
    """Fewest pending uncached prompt tokens (queued + in flight), ties by running requests."""

    name = "least_loaded"
    reason = "least_loaded"
    reasons = (reason,)

    @staticmethod
    def load(inst: InstanceState) -> float:
        return inst.pending_miss_tokens + inst.inflight_requests * 1e-6


class ConsistentHashPolicy(AdaptivelyKeyed):
    """One ring, DualMap's adaptive key: affinity without any load awareness."""

    name = "consistent_hash"
    Params = ConsistentHashParams
    reasons = ("consistent_hash",)

    def __init__(self, params: ConsistentHashParams | None = None) -> None:
        self.params = params or ConsistentHashParams()
        self.keyer = AdaptiveKeyer(self.params)
        self.ring = HashRing(XXH64, self.params.ring_seed, self.params.vnodes)

    def on_membership(self, instance_ids: Iterable[str]) -> None:
        self.ring.sync(instance_ids)

    def choose(self, req: RouteRequest, cluster: ClusterView) -> Decision:
        instances = cluster.instances
        if len(instances) > len(self.ring):  # joins not announced; a subset view must not shrink the ring
            for iid in instances:
                self.ring.add(iid)
        key = self.keyer.observe(req)
        iid = self.ring.first(key, lambda i: (s := instances.get(i)) is not None and s.routable)
        if iid is None:
            raise NoInstanceError("no routable instance")
        inst = instances[iid]
        return Decision(iid, "consistent_hash", (iid,), hit_tokens=inst.hit_tokens(req), key=key)


class PrefixTreePolicy:
    """Cache-aware routing in the manner of the SGLang router.

    When the pool is balanced, the instance with the longest cached prefix wins if it matches at
    least ``cache_threshold`` of the prompt, else the instance with the most free cache. When
    pending requests are imbalanced (max - min > ``balance_abs_threshold`` and max > min x
    ``balance_rel_threshold``) it routes to the shortest queue instead. The router's own view of
    each instance's cache (SGLang: an approximate radix tree per worker, LRU-evicted) is the
    shadow block cache here.
    """

    name = "prefix_tree"
    Params = PrefixTreeParams
    reasons = ("prefix_match", "most_free_cache", "shortest_queue")

    def __init__(self, params: PrefixTreeParams | None = None) -> None:
        self.params = params or PrefixTreeParams()

    def on_membership(self, instance_ids: Iterable[str]) -> None:
        """The per-instance trees are the shadow caches, owned by the state layer."""

    @staticmethod
    def _load(inst: InstanceState) -> int:
        return inst.inflight_requests + inst.queued_requests

    def choose(self, req: RouteRequest, cluster: ClusterView) -> Decision:
        live = _routable(cluster)
        loads = [self._load(i) for i in live]
        lo, hi = min(loads), max(loads)
        cfg = self.params
        if hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold:
            inst = live[loads.index(lo)]
            return Decision(inst.id, "shortest_queue", hit_tokens=inst.hit_tokens(req))
        best, best_hit = live[0], -1
        for inst in live:
            hit = inst.hit_tokens(req)
            if hit > best_hit:
                best, best_hit = inst, hit
        if req.prompt_tokens and best_hit >= cfg.cache_threshold * req.prompt_tokens:
            return Decision(best.id, "prefix_match", hit_tokens=best_hit)
        inst = min(live, key=lambda i: (i.shadow.tokens, self._load(i)))
        return Decision(inst.id, "most_free_cache", hit_tokens=inst.hit_tokens(req))


class MinTTFTPolicy:
    """Global minimum of DualMap's TTFT estimate over every instance (an O(N) oracle-like choice)."""

    name = "min_ttft"
    Params = NoParams
    reasons = ("min_ttft",)

    def __init__(self, params: NoParams | None = None) -> None:
        self.params = params or NoParams()

    def on_membership(self, instance_ids: Iterable[str]) -> None:
        """Stateless: reads the live view."""

    def choose(self, req: RouteRequest, cluster: ClusterView) -> Decision:
        live = _routable(cluster)
        best, best_est, best_hit = live[0], float("inf"), 0
        for inst in live:
            hit = inst.hit_tokens(req)
            est = inst.ttft_estimate(req, hit)
            if est < best_est:
                best, best_est, best_hit = inst, est, hit
        return Decision(best.id, "min_ttft", estimates={best.id: best_est}, hit_tokens=best_hit)

