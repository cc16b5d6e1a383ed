"""The engine's prefix cache: GPU blocks shared with running requests, and an optional host tier.

Why not a plain LRU sized "capacity - reserved": a running request's prompt blocks *are* cache
blocks (vLLM and SGLang share them by reference count), so subtracting every running request's
whole reservation from the cache's room counts those blocks twice and, near saturation, leaves
the cache almost nothing. Here GPU memory is split the way the engines split it:

* **pinned** blocks: cached blocks that at least one running request uses (reference counted).
  They stay matchable and are never evicted while in use;
* **free** blocks: cached blocks no running request uses, in LRU order: the only evictable part;
* the running requests' KV that is *not* a cache block (prompt not yet computed, reserved output).

The engine gives the free list whatever GPU memory the other two leave (:meth:`fit`). A block
evicted from the free list moves to the **host tier** (an LRU in host memory, as in Mooncake's
KVCache store, vLLM + LMCache CPU offload or SGLang HiCache) when one is configured; a later hit
there is loaded back over PCIe instead of being recomputed. The host tier keeps its copy when a
block is loaded (it is a store, not a swap space), so a block evicted again costs no new copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.blockcache import BlockCache


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """Leading blocks of a request found in the cache, and how many of their tokens came from host."""

    blocks: int
    tokens: int
    host_tokens: int


class EngineKVCache:
    __slots__ = ("_free", "_pinned", "free_tokens", "host", "pinned_tokens")

    def __init__(self, host_capacity_tokens: int = 0) -> None:
        if host_capacity_tokens < 0:
            raise ValueError("host_cache_tokens must be >= 0")
        self._free: OrderedDict[int, int] = OrderedDict()  # hash -> size, least recently used first
        self._pinned: dict[int, list[int]] = {}  # hash -> [size, running requests using it]
        self.free_tokens = 0
        self.pinned_tokens = 0
        self.host = BlockCache(host_capacity_tokens) if host_capacity_tokens else None

    @property
    def gpu_tokens(self) -> int:
        return self.free_tokens + self.pinned_tokens

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._pinned or block_hash in self._free

    def peek(self, hashes: Sequence[int]) -> PrefixHit:
        """The longest prefix held on GPU or host, without changing anything."""
        blocks = tokens = host_tokens = 0
        for h in hashes:
            if h in self._pinned:
                size = self._pinned[h][0]
            elif h in self._free:
                size = self._free[h]
            elif self.host is not None and h in self.host:
                size = self.host.peek_prefix((h,))[1]
                host_tokens += size
            else:
                break
            blocks += 1
            tokens += size
        return PrefixHit(blocks, tokens, host_tokens)

    def acquire(self, hashes: Sequence[int]) -> PrefixHit:
        """Pin the longest cached prefix for a request being admitted; host blocks are loaded to GPU."""
        hit = self.peek(hashes)
        for h in hashes[:hit.blocks]:
            entry = self._pinned.get(h)
            if entry is not None:
                entry[1] += 1
                continue
            size = self._free.pop(h, None)
            if size is not None:
                self.free_tokens -= size
            else:  # in the host tier (peek said so): copy it back, keep the host copy
                assert self.host is not None
                size = self.host.match_prefix((h,))[1]
            self._pinned[h] = [size, 1]
            self.pinned_tokens += size
        return hit

    def add_pinned(self, hashes: Sequence[int], sizes: Sequence[int]) -> None:
        """A request finished its prefill: its newly computed blocks become cache blocks it pins.

        A block another request computed meanwhile is shared (the duplicate is dropped)."""
        for h, size in zip(hashes, sizes, strict=True):
            entry = self._pinned.get(h)
            if entry is not None:
                entry[1] += 1
                continue
            old = self._free.pop(h, None)
            if old is not None:
                self.free_tokens -= old
            self._pinned[h] = [size, 1]
            self.pinned_tokens += size

    def release(self, hashes: Sequence[int]) -> None:
        """A request left: unpin its blocks; the unused ones join the free list.

        Tail blocks are freed first so they are evicted before the shared head (as vLLM does)."""
        for h in reversed(hashes):
            entry = self._pinned[h]
            entry[1] -= 1
            if entry[1] == 0:
                del self._pinned[h]
                self.pinned_tokens -= entry[0]
                self._free[h] = entry[0]
                self.free_tokens += entry[0]

    def fit(self, free_limit_tokens: int) -> int:
        """Evict least recently used free blocks (to the host tier, if any) until at most
        ``free_limit_tokens`` remain; returns the tokens evicted from GPU."""
        evicted = 0
        limit = max(0, free_limit_tokens)
        while self.free_tokens > limit:
            h, size = self._free.popitem(last=False)
            self.free_tokens -= size
            evicted += size
            if self.host is not None:
                self.host.insert((h,), (size,))
        return evicted
