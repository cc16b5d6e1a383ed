"""The optional capabilities of a routing policy or a cache view, one small Protocol each.

Every policy satisfies :class:`~tandem.router.routing.types.RoutingPolicy` (choose, on_membership),
every cache view :class:`~tandem.router.routing.types.CacheView`. Some can do more, and the
scheduler, the gateway's pool, its scraper and its admin API use that only where one declares it:
a policy or view states a capability by carrying the member its Protocol names, and
callers test it with ``isinstance`` (the Protocols are runtime-checkable) instead of probing for
attributes by name, so a renamed member is a type error rather than a silently lost feature.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol, runtime_checkable

from tandem.router.routing.keys import AdaptiveKeyer
from tandem.router.routing.rings import DualRing
from tandem.router.routing.types import ClusterView, Decision


@runtime_checkable
class LateBinding(Protocol):
    """A policy whose default is late binding: requests wait in the gateway's per-instance queues
    until the instance has budget, so they can still move (hotspot migration).

    ``late_binding`` is the policy's default; ``RoutingConfig.late_binding`` overrides it. A policy
    without this capability dispatches at once unless the configuration says otherwise.
    """

    late_binding: bool


@runtime_checkable
class Migrating(Protocol):
    """A policy that can name other instances for a request already queued (hotspot migration)."""

    def alternatives(self, decision: Decision, cluster: ClusterView, exclude: Collection[str]) -> list[str]:
        """Instances a queued request may move to, best affinity first."""
        ...


@runtime_checkable
class DualRinged(Protocol):
    """A policy that maps keys on two consistent-hash rings (the admin API shows their members)."""

    rings: DualRing


@runtime_checkable
class AdaptivelyKeyed(Protocol):
    """A policy keyed by an adaptive-depth prefix key.

    The admin API lists its expanded prefixes, and with shared state the gateway feeds it the
    requests other replicas routed, so every replica's window sees the whole traffic.
    """

    keyer: AdaptiveKeyer


@runtime_checkable
class CapacityAware(Protocol):
    """A cache view that uses what the engine's /metrics tell of its KV cache: the block size (to
    key prompts before the first event) and the number of blocks (to model its evictions)."""

    def engine_config(self, block_size: int | None, kv_blocks: int | None) -> None:
        """The engine's block size and KV capacity in blocks, each None when its /metrics omit it."""
        ...
