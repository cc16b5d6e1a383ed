"""DualMap: two cache-affine candidates per key, an SLO-aware choice between them.

The key (adaptive-depth prefix hash) maps to one instance on each of two independent rings.
Requests sharing a prefix therefore share the same two candidates, which concentrates their
cache hits on two instances, while the choice between the two spreads load (power of two
choices). The choice is cache-first: the candidate with the longer prefix hit wins (ties: the
less loaded), unless its estimated TTFT exceeds alpha x SLO (the request's own SLO when it carries
one, e.g. one that grows with the prompt), in which case the lower estimate
wins. Cache affinity is worth having only while it does not cost the SLO.

A decision touches two instances, never the whole pool: its cost is two bisects, two shadow
cache lookups and a few dict operations, whatever the pool size.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from tandem.router.routing.capabilities import AdaptivelyKeyed, DualRinged, LateBinding, Migrating
from tandem.router.routing.config import DualMapParams
from tandem.router.routing.keys import AdaptiveKeyer
from tandem.router.routing.rings import DualRing
from tandem.router.routing.types import ClusterView, Decision, InstanceState, NoInstanceError, RouteRequest


class DualMapPolicy(LateBinding, Migrating, DualRinged, AdaptivelyKeyed):
    """Late binding by default (its hotspot migration needs queued requests), migrating, on two
    rings with an adaptive key: every optional capability."""

    name = "dualmap"
    Params = DualMapParams
    reasons = ("affinity", "slo_switch")
    late_binding = True

    def __init__(self, params: DualMapParams | None = None) -> None:
        self.params = params or DualMapParams()
        self.keyer = AdaptiveKeyer(self.params)
        self.rings = DualRing(self.params.vnodes, self.params.ring_seed)
        self._budget = self.params.slo_budget_s

    def on_membership(self, instance_ids: Iterable[str]) -> None:
        self.rings.sync(instance_ids)

    def choose(self, req: RouteRequest, cluster: ClusterView) -> Decision:
        instances = cluster.instances
        if len(instances) > len(self.rings):
            # Instances joined without on_membership: add them. Never remove here: a view may be a
            # subset on purpose (a retry excluding the instance that failed).
            for iid in instances:
                if iid not in self.rings.a:
                    self.rings.add(iid)
        key = self.keyer.observe(req)

        def ok(iid: str) -> bool:
            inst = instances.get(iid)
            return inst is not None and inst.healthy and not inst.draining

        pair = self.rings.candidates(key, ok)
        if pair is None:
            raise NoInstanceError("no routable instance")
        return self.decide(req, key, instances[pair[0]], instances[pair[1]])

    def decide(self, req: RouteRequest, key: int, a: InstanceState, b: InstanceState) -> Decision:
        """The SLO-aware choice between two candidates (separate from the ring walk to be testable)."""
        hit_a = a.hit_tokens(req)
        est_a = a.ttft_estimate(req, hit_a)
        if a is b:
            return Decision(a.id, "affinity", (a.id,), {a.id: est_a}, hit_a, key)
        hit_b = b.hit_tokens(req)
        est_b = b.ttft_estimate(req, hit_b)
        # Larger hit first; on the same hit the less loaded (lower estimate; ring A on an exact tie).
        first_a = hit_a > hit_b if hit_a != hit_b else est_a <= est_b
        pick, est, hit = (a, est_a, hit_a) if first_a else (b, est_b, hit_b)
        reason = "affinity"
        budget = self._budget if req.slo_ttft_s is None else self.params.alpha * req.slo_ttft_s
        if est > budget:
            lower_a = est_a <= est_b
            if lower_a != first_a:
                pick, hit = (a, hit_a) if lower_a else (b, hit_b)
                reason = "slo_switch"
        return Decision(pick.id, reason, (a.id, b.id), {a.id: est_a, b.id: est_b}, hit, key)

    def alternatives(self, decision: Decision, cluster: ClusterView, exclude: Collection[str]) -> list[str]:
        """Where a queued request may migrate: its other candidate, then the next ring-A neighbour.

        Used by the scheduler's hotspot migration; both are instances the key already maps near,
        so a moved request keeps what affinity it can.
        """
        instances = cluster.instances
        out: list[str] = []
        for iid in decision.candidates:
            if iid not in exclude and iid not in out and (inst := instances.get(iid)) is not None \
                    and inst.routable:
                out.append(iid)
        skip = set(decision.candidates) | set(exclude)
        for iid in self.rings.a.walk(decision.key):
            if iid not in skip and (inst := instances.get(iid)) is not None and inst.routable:
                out.append(iid)
                break
        return out
