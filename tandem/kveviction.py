"""Eviction-aware exact view: which cached blocks will still be there when a request is scheduled.

Why: the event index is exact at the moment routing asks, but an engine with a small cache evicts
between that moment and the moment it schedules the request. vLLM keeps freed cached blocks in an
LRU free queue and, each time a request it schedules needs new blocks, takes them from the queue's
oldest end: never-cached free blocks first (it puts them at the front), then the least recently
used cached ones (a ``BlockRemoved`` each). So the requests already routed there and not yet
started allocate, before the candidate, about ``pending`` new blocks; what does not fit in the free
room evicts that many of the oldest cached blocks. A prefix is only worth what survives that:

* capacity ``C``: the engine's KV blocks (vLLM's ``num_gpu_blocks``) less the one null block it
  never hands out; unknown capacity means no correction (the view answers as if nothing is evicted);
* free room ``F = C - cached``, cached = blocks in the index;
* at risk: the ``max(0, pending - F)`` least recently used cached blocks;
* the candidate's hit: the longest prefix none of whose cached blocks is at risk.

The recency order is the gateway's approximation of vLLM's free queue (:class:`LruOrder`): blocks
become most recent when they are stored, when a request that hits them is routed (it will hold
them) and when a request that holds them starts (its first token: it frees them together, when it
ends), a chain's first block the most recent of its chain (vLLM frees a request's blocks tail
first, so the tail is evicted first). Without the last rule a conversation's next turn would find
its head older than the blocks its previous turn added, and lose its whole prefix first.

Not modelled, each of which makes the correction smaller than the real evictions: blocks held by
running requests (not evictable in vLLM, evictable here), the partial blocks of running requests
(they take free room), requests other gateway replicas routed there, blocks stored by another
medium than the GPU (offloading), and blocks the index skipped.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from itertools import islice

NULL_BLOCKS = 1  # vLLM reserves one block of its pool as the null block


class LruOrder:
    """Cached block keys from least to most recently used, each with a rank that only grows.

    Ranks make the at-risk test O(1) per block: the ``n`` least recently used keys are exactly those
    ranked at or below the ``n``-th one's rank (:meth:`cutoff`). Finding that rank walks ``n`` keys
    from the old end; it is kept until the order changes, so a routing decision pays it at most
    once per candidate, and only under eviction pressure.
    """

    __slots__ = ("_cut", "_rank", "_tick", "_version")

    def __init__(self) -> None:
        self._rank: dict[int, int] = {}  # key -> rank; insertion order = rank order (oldest first)
        self._tick = 0
        self._version = 0
        self._cut: tuple[int, int, int] = (-1, 0, 0)  # (version, n, cutoff rank) of the last cutoff

    def __len__(self) -> int:
        return len(self._rank)

    def __contains__(self, key: int) -> bool:
        return key in self._rank

    @property
    def version(self) -> int:
        """Changes whenever the order does (a cache key for what is derived from it)."""
        return self._version

    def rank(self, key: int) -> int | None:
        return self._rank.get(key)

    def use(self, chain: Sequence[int]) -> None:
        """Make the keys of ``chain`` (a prefix in chain order) the most recently used, its first key
        last: vLLM frees a request's blocks tail first, so a chain's tail is evicted before its head."""
        rank = self._rank
        for key in reversed(chain):
            rank.pop(key, None)
            self._tick += 1
            rank[key] = self._tick
        self._version += 1

    def touch(self, chain: Sequence[int]) -> None:
        """:meth:`use` for the keys of ``chain`` already present (a routed request's cached prefix)."""
        self.use([k for k in chain if k in self._rank])

    def discard(self, key: int) -> None:
        if self._rank.pop(key, None) is not None:
            self._version += 1

    def clear(self) -> None:
        self._rank.clear()
        self._version += 1

    def cutoff(self, n: int) -> int:
        """The rank of the ``n``-th least recently used key: keys ranked at or below it are the ``n``
        oldest (all of them when ``n`` >= len); 0 when ``n`` <= 0 (no key is ranked 0)."""
        if n <= 0 or not self._rank:
            return 0
        n = min(n, len(self._rank))
        version, cached_n, cut = self._cut
        if version == self._version and cached_n == n:
            return cut
        cut = next(islice(self._rank.values(), n - 1, None))
        self._cut = (self._version, n, cut)
        return cut


def blocks_at_risk(engine_blocks: int | None, cached: int, pending: int) -> int:
    """Cached blocks that the ``pending`` new blocks of requests scheduled first will evict: what
    does not fit in the free room of an engine of ``engine_blocks`` blocks. 0 when the capacity is unknown."""
    if not engine_blocks:
        return 0
    free = max(0, engine_blocks - NULL_BLOCKS - cached)
    return max(0, pending - free)


def new_blocks(prompt_tokens: int, block_size: int, hit_blocks: int) -> int:
    """Blocks a request allocates when scheduled: every block its prompt touches (the partial last
    one too) beyond those it finds cached."""
    return max(0, -(-prompt_tokens // block_size) - hit_blocks)


def surviving_prefix(keys: Iterable[int], order: LruOrder, cutoff: int, coming: Container[int]) -> int:
    """Leading ``keys`` that will be cached when the request is scheduled: in ``order`` and ranked
    above ``cutoff`` (not among the at-risk oldest), or ``coming`` (blocks that requests routed
    ahead of it will store; they are new, so never at risk). O(len(keys))."""
    n = 0
    for k in keys:
        r = order.rank(k)
        if (r is None or r <= cutoff) and k not in coming:
            break
        n += 1
    return n
