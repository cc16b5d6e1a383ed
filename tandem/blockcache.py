"""An LRU of prefix blocks keyed by chained hash, with a capacity in tokens.

The engine simulator uses it as the engine's prefix cache; the router uses the same structure as
its shadow of each instance's cache, so both agree on what a hit is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class BlockCache:
    __slots__ = ("_blocks", "capacity_tokens", "tokens")

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens < 0:
            raise ValueError("capacity_tokens must be >= 0")
        self.capacity_tokens = capacity_tokens
        self.tokens = 0
        self._blocks: OrderedDict[int, int] = OrderedDict()

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
        """Number of leading blocks cached (no sizes, no recency): the router's hot-path lookup."""
        n = 0
        for present in map(self._blocks.__contains__, hashes):
            if not present:
                break
            n += 1
        return n

    def match_prefix(self, hashes: Sequence[int]) -> tuple[int, int]:
        """Like :meth:`peek_prefix`, and marks the matched blocks most recently used."""
        blocks, tokens = self.peek_prefix(hashes)
        for h in hashes[:blocks]:
            self._blocks.move_to_end(h)
        return blocks, tokens

    def insert(self, hashes: Sequence[int], sizes: Sequence[int]) -> None:
        """Insert (or refresh) blocks in prefix order, then evict least recently used to fit."""
        for h, size in zip(hashes, sizes, strict=True):
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
            _, size = self._blocks.popitem(last=False)
            self.tokens -= size
            evicted += size
        return evicted

    def clear(self) -> None:
        self._blocks.clear()
        self.tokens = 0
