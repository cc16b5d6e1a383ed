"""The DES's exact cache view: routing reads the simulated engine's own prefix cache.

What a gateway following the engine's KV-cache events knows, with no event delay: the blocks on
the engine's GPU and in its host tier, plus the blocks of requests routed there that it has not
prefilled yet (they will be cached by the time it schedules the requests behind them). Against
the shadow view (what routing sent there, LRU-bounded to the engine's capacity) this measures what
exact knowledge of evictions is worth (``tandem bench routing --cache-view``).
"""

from __future__ import annotations

from tandem.kvindex import InflightBlocks, hit_tokens
from tandem.router.routing.types import RouteRequest
from tandem.sim.kvcache import EngineKVCache


class EngineCacheView:
    """The routing core's ``CacheView`` over a simulated engine's cache (routing and engine blocks
    are the trace's blocks: the same chained hashes, the same size)."""

    __slots__ = ("_routed", "cache", "inflight")

    def __init__(self, cache: EngineKVCache) -> None:
        self.cache = cache
        self.inflight = InflightBlocks()
        self._routed: dict[str, tuple[int, ...]] = {}

    def hit_tokens(self, req: RouteRequest) -> int:
        cache, host, inflight = self.cache, self.cache.host, self.inflight
        n = 0
        for h in req.block_hashes:
            if h not in cache and (host is None or h not in host) and h not in inflight:
                break
            n += 1
        return hit_tokens(n, req.block_size, req.prompt_tokens)

    def routed(self, req: RouteRequest) -> None:
        if req.block_hashes and req.request_id not in self._routed:
            self._routed[req.request_id] = req.block_hashes
            self.inflight.add(req.block_hashes)

    def settled(self, req: RouteRequest) -> None:
        hashes = self._routed.pop(req.request_id, None)
        if hashes:
            self.inflight.remove(hashes)
