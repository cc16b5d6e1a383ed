"""Policy names -> policy objects, the one place the gateway, the DES and the benchmarks look them up."""

from __future__ import annotations

from tandem.router.routing.baselines import (
    ConsistentHashPolicy,
    LeastLoadedPolicy,
    LeastRequestPolicy,
    MinTTFTPolicy,
    PrefixTreePolicy,
    RoundRobinPolicy,
)
from tandem.router.routing.config import RoutingConfig
from tandem.router.routing.dualmap import DualMapPolicy
from tandem.router.routing.types import RoutingPolicy

POLICIES: dict[str, type] = {
    p.name: p for p in (DualMapPolicy, RoundRobinPolicy, LeastRequestPolicy, LeastLoadedPolicy,
                        ConsistentHashPolicy, PrefixTreePolicy, MinTTFTPolicy)
}


def policy_names() -> list[str]:
    return list(POLICIES)


def make_policy(name: str, config: RoutingConfig | None = None) -> RoutingPolicy:
    """A fresh policy object (each keeps its own rings and key window: never share one between pools).

    The policy gets only its own parameters (its class's ``Params`` model) cut from the flat ``config``.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; available: {', '.join(POLICIES)}")
    return cls((config or RoutingConfig()).scoped(cls.Params))
