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
from tandem.kvindex import PromptTokens
from tandem.perf.costmodel import CostModel, attention_pairs


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing knows of a request.

    ``block_hashes`` are chained hashes of the prompt's full routing blocks (``block_size`` tokens
    each; Mooncake traces: 512-token ``hash_ids``). ``fallback_key`` keys prompts with no full block
    (a hash of the whole text, or of the length bucket). ``tokens``: the prompt's token ids, for
    instances whose cache view is exact (:class:`CacheView`); None when the caller has none.
    """

    request_id: str
    prompt_tokens: int
    block_hashes: tuple[int, ...]
    block_size: int
    arrival: float
    fallback_key: int = 0
    model: str = ""
    # This request's own TTFT objective when it has one (SLOs that grow with the prompt, as in
    # PrfaaS-style offload: 2 s + 1 ms per token); None: the pool's configured SLO.
    slo_ttft_s: float | None = None
    tokens: PromptTokens | None = field(default=None, compare=False)


class CacheView(Protocol):
    """An exact view of one engine's prefix cache: its own KV-cache events (the gateway), or the
    simulated engine's cache itself (the DES). Without one, routing estimates hits from the shadow
    cache of what it routed there.

    ``routed`` and ``settled`` bracket a request's time on its way into the engine (queued in the
    gateway, sent, not prefilled): its blocks count as cached for the requests routed behind it, as
    the engine will have them by the time it schedules those.
    """

    def hit_tokens(self, req: RouteRequest) -> int | None:
        """Prompt tokens the engine would serve from its cache; None: no exact answer now (use the shadow)."""
        ...

    def routed(self, req: RouteRequest) -> None: ...

    def settled(self, req: RouteRequest) -> None: ...


@dataclass(frozen=True, slots=True)
class PrefillCost:
    """The parts of an instance's prefill time that a per-token constant cannot express.

    DualMap's published estimate is pending miss tokens x ``prefill_s_per_token``. On an engine
    with chunked prefill and continuous batching two more terms are large:

    * attention is quadratic: prefilling m tokens after h cached ones costs ``attn_pair_s`` for
      each of m*h + m(m+1)/2 query-key pairs, so one 88k-token prompt takes ~3x what a constant
      fitted at 8k tokens says (Mooncake's long prompts are half of its prefill time);
    * every chunk of ``chunk_tokens`` prefill tokens shares its iteration with one token of each
      running sequence, and reads their KV: ``decode_seq_s`` per running sequence plus
      ``decode_context_s`` per token of their context (``kv_usage`` x ``kv_capacity_tokens``,
      both scraped from the engine), so a busy engine prefills slower than an idle one.

    All zero (the default) is the published linear estimate. The coefficients come from the
    engine's performance profile (:meth:`from_cost_model`); the state they multiply (pending
    tokens and attention pairs, running sequences, KV usage) is what the gateway also has.
    """

    attn_pair_s: float = 0.0
    chunk_tokens: int = 8192
    decode_seq_s: float = 0.0
    decode_context_s: float = 0.0
    kv_capacity_tokens: int = 0

    @classmethod
    def from_cost_model(cls, cost: CostModel, chunk_tokens: int, kv_capacity_tokens: int) -> tuple[float, PrefillCost]:
        """(seconds per prefill token, the other terms) of an engine timed by ``cost``.

        The per-token figure carries the linear layers and the fixed cost of an iteration spread
        over a full chunk (a loaded engine runs full chunks).
        """
        p, k = cost.params, cost.slowdown
        per_token = (p.per_token_s + p.step_overhead_s / chunk_tokens) * k
        return per_token, cls(p.attn_pair_s * k, chunk_tokens, p.per_token_s * k, p.kv_read_s_per_token * k,
                              kv_capacity_tokens)


@dataclass(slots=True)
class InstanceState:
    """One engine instance as routing sees it. Mutable; owned by the caller's state layer."""

    id: str
    prefill_s_per_token: float
    shadow: BlockCache
    cost: PrefillCost = PrefillCost()
    # Measured over profiled prefill time of this engine (tandem.router.calibration): 1.0 is the
    # profile's own speed; every estimate below is multiplied by it.
    prefill_scale: float = 1.0
    queued_miss_tokens: int = 0  # waiting in the gateway's own queue for this instance
    inflight_miss_tokens: int = 0  # sent to the engine, no first token seen yet
    queued_attn_pairs: int = 0  # attention pairs of the queued misses (see attention_pairs)
    inflight_attn_pairs: int = 0
    queued_requests: int = 0
    inflight_requests: int = 0  # sent, not finished
    unprefilled_requests: int = 0  # sent, no first token seen yet (the late-binding dispatch budget)
    engine_running: int = 0  # from the engine's /metrics
    engine_waiting: int = 0
    kv_usage: float = 0.0
    healthy: bool = True
    draining: bool = False
    exact: CacheView | None = None  # set: hits come from the engine's own cache view, else the shadow

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining

    @property
    def pending_miss_tokens(self) -> int:
        return self.queued_miss_tokens + self.inflight_miss_tokens

    @property
    def pending_attn_pairs(self) -> int:
        return self.queued_attn_pairs + self.inflight_attn_pairs

    def s_per_token(self) -> float:
        """Seconds per prefill token now: the linear term plus the running batch's share of each chunk."""
        c = self.cost
        drag = c.decode_seq_s * self.engine_running + c.decode_context_s * self.kv_usage * c.kv_capacity_tokens
        return self.prefill_s_per_token + drag / c.chunk_tokens

    def prefill_s(self, tokens: int, pairs: int) -> float:
        """Estimated seconds to prefill ``tokens`` uncached tokens spanning ``pairs`` attention pairs here."""
        return (tokens * self.s_per_token() + pairs * self.cost.attn_pair_s) * self.prefill_scale

    @property
    def pending_s(self) -> float:
        """Estimated seconds of prefill queued and in flight (the hotspot measure)."""
        return self.prefill_s(self.pending_miss_tokens, self.pending_attn_pairs)

    def hit_tokens(self, req: RouteRequest) -> int:
        """Prompt tokens this instance would serve from its prefix cache: the exact view's answer
        when it has one, else the shadow cache's."""
        if self.exact is not None and (hit := self.exact.hit_tokens(req)) is not None:
            return hit
        # Routing blocks are full blocks of ``req.block_size`` tokens, so a count is enough.
        tokens = self.shadow.prefix_blocks(req.block_hashes) * req.block_size
        return min(tokens, max(req.prompt_tokens - 1, 0))

    def ttft_estimate(self, req: RouteRequest, hit: int | None = None) -> float:
        """DualMap's estimate: prefill of the pending misses plus this request's own miss.

        With a zero :class:`PrefillCost` this is the published (pending + own miss tokens) x
        prefill seconds per token.
        """
        if hit is None:
            hit = self.hit_tokens(req)
        miss = req.prompt_tokens - hit
        return self.prefill_s(self.pending_miss_tokens + miss, self.pending_attn_pairs + attention_pairs(miss, hit))


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
    # Every Decision.reason it can give: the gateway creates their metric series at start, so the
    # first request of each reason is counted by rate() (a series born at 1 is not).
    reasons: tuple[str, ...]

    def choose(self, req: RouteRequest, cluster: ClusterView) -> Decision:
        """Pick an instance among ``cluster.routable()``; raise NoInstanceError if there is none."""
        ...

    def on_membership(self, instance_ids: Iterable[str]) -> None:
        """The pool's membership changed (join, leave, drain); rebuild only what is needed."""
        ...
