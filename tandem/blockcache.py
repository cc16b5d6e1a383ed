"""An LRU of prefix blocks keyed by chained hash, with a capacity in tokens.

The router uses it as its shadow of each instance's prefix cache, the engine simulator as its host
tier. Hashes are chained (a block's hash covers every block before it), so a block always has the
same parent. Every touch refreshes a chain tail first and its head last, which keeps each block at
least as recent as its children: eviction takes tails before the heads other prompts share (the
order vLLM frees blocks in), and what is cached of any chain is a prefix of it, so a lookup can
bisect instead of walking every block of a long prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class BlockCache:
    __slots__ = ("_blocks", "capacity_tokens", "evicted", "tokens")

    def __init__(self, capacity_tokens: int, record_evictions: bool = False) -> None:
        if capacity_tokens < 0:
            raise ValueError("capacity_tokens must be >= 0")
        self.capacity_tokens = capacity_tokens
        self.tokens = 0
        self._blocks: OrderedDict[int, int] = OrderedDict()
        # The hashes evicted, for a caller that reports evictions (the simulator's KV-cache events).
        self.evicted: list[int] | None = [] if record_evictions else None

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def peek_prefix(self, hashes: Sequence[int]) -> tuple[int, int]:
        """(blocks, tokens) of the longest cached prefix, without touching recency."""
        blocks = tokens = 0
        for h in hashes:
            size = self._blocks.get(h)
            if size is None:
                break
            blocks += 1
            tokens += size
        return blocks, tokens

    def prefix_blocks(self, hashes: Sequence[int]) -> int:
        """Number of leading blocks cached (no sizes, no recency): the router's hot-path lookup.

        A bisection (O(log n) lookups), valid because the cached blocks of a chain form a prefix."""
        blocks = self._blocks
        if not hashes or hashes[0] not in blocks:
            return 0
        lo, hi = 1, len(hashes)  # hashes[:lo] cached; the answer is in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if hashes[mid - 1] in blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def match_prefix(self, hashes: Sequence[int]) -> tuple[int, int]:
        """Like :meth:`peek_prefix`, and marks the matched blocks most recently used."""
        blocks, tokens = self.peek_prefix(hashes)
        for h in reversed(hashes[:blocks]):
            self._blocks.move_to_end(h)
        return blocks, tokens

    def insert(self, hashes: Sequence[int], sizes: Sequence[int]) -> None:
        """Insert (or refresh) a chain's blocks, tail first, then evict least recently used to fit."""
        for h, size in zip(reversed(hashes), reversed(sizes), strict=True):
            if h in self._blocks:
                self._blocks.move_to_end(h)
                continue
            self._blocks[h] = size
            self.tokens += size
        self.shrink(self.capacity_tokens)

    def shrink(self, limit_tokens: int) -> int:
        """Evict least recently used blocks until at most ``limit_tokens`` remain; returns tokens evicted."""
        evicted = 0
        while self.tokens > max(0, limit_tokens) and self._blocks:
            h, size = self._blocks.popitem(last=False)
            self.tokens -= size
            evicted += size
            if self.evicted is not None:
                self.evicted.append(h)
        return evicted

    def clear(self) -> None:
        self._blocks.clear()
        self.tokens = 0
