"""The routing contract: what a policy sees, what it decides, and who updates the state.

Policies are pure: they read a :class:`ClusterView` and a :class:`RouteRequest` and return a
:class:`Decision`. The state behind the view is updated by the caller's I/O layer: the gateway from
its own accounting (tokens sent and not yet prefilled) plus scraped engine metrics, the DES from its
simulated engines. Neither a policy nor the scheduler ever performs I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tandem.blockcache import BlockCache


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing knows of a request.

    ``block_hashes`` are chained hashes of the prompt's full routing blocks (``block_size`` tokens
    each; Mooncake traces: 512-token ``hash_ids``). ``fallback_key`` keys prompts with no full block
    (a hash of the whole text, or of the length bucket).
    """

    request_id: str
    prompt_tokens: int
    block_hashes: tuple[int, ...]
    block_size: int
    arrival: float
    fallback_key: int = 0
    model: str = ""


@dataclass(slots=True)
class InstanceState:
    """One engine instance as routing sees it. Mutable; owned by the caller's state layer."""

    id: str
    prefill_s_per_token: float
    shadow: BlockCache
    queued_miss_tokens: int = 0  # waiting in the gateway's own queue for this instance
    inflight_miss_tokens: int = 0  # sent to the engine, no first token seen yet
    queued_requests: int = 0
    inflight_requests: int = 0  # sent, not finished
    unprefilled_requests: int = 0  # sent, no first token seen yet (the late-binding dispatch budget)
    engine_running: int = 0  # from the engine's /metrics
    engine_waiting: int = 0
    kv_usage: float = 0.0
    healthy: bool = True
    draining: bool = False

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining

    @property
    def pending_miss_tokens(self) -> int:
        return self.queued_miss_tokens + self.inflight_miss_tokens

    def hit_tokens(self, req: RouteRequest) -> int:
        """Prompt tokens this instance would serve from its prefix cache (per the shadow cache)."""
        # Routing blocks are full blocks of ``req.block_size`` tokens, so a count is enough.
        tokens = self.shadow.prefix_blocks(req.block_hashes) * req.block_size
        return min(tokens, max(req.prompt_tokens - 1, 0))

    def ttft_estimate(self, req: RouteRequest, hit: int | None = None) -> float:
        """DualMap's estimate: (pending miss tokens + this request's miss) x prefill seconds per token."""
        miss = req.prompt_tokens - (self.hit_tokens(req) if hit is None else hit)
        return (self.pending_miss_tokens + miss) * self.prefill_s_per_token


@dataclass(slots=True)
class ClusterView:
    """The instances of one pool (one model, one role), in a stable order."""

    instances: dict[str, InstanceState] = field(default_factory=dict)

    def routable(self) -> list[InstanceState]:
        return [i for i in self.instances.values() if i.routable]

    def __getitem__(self, instance_id: str) -> InstanceState:
        return self.instances[instance_id]


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and why (the reason is exported in metrics and the admin API)."""

    instance_id: str
    reason: str  # e.g. "affinity", "slo_switch", "least_loaded", "round_robin", "fallback"
    candidates: tuple[str, ...] = ()
    estimates: Mapping[str, float] = field(default_factory=dict)
    hit_tokens: int = 0
    key: int = 0  # the routing key (DualMap: the adaptive-depth prefix hash); migration re-walks the rings with it


class NoInstanceError(RuntimeError):
    """No routable instance in the pool: the gateway answers 503 with Retry-After."""


class RoutingPolicy(Protocol):
    """A routing policy. Implementations keep only routing-internal state (rings, key windows)."""

    name: str

    def choose(self, req: RouteRequest, cluster: ClusterView) -> Decision:
        """Pick an instance among ``cluster.routable()``; raise NoInstanceError if there is none."""
        ...

    def on_membership(self, instance_ids: Iterable[str]) -> None:
        """The pool's membership changed (join, leave, drain); rebuild only what is needed."""
        ...
